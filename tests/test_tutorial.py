"""The tutorial (docs/tutorial.md), run exactly as written, on a small model and a local Hub."""

import os
import re
import subprocess
import sys
from pathlib import Path

from hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def tutorial() -> str:
    page = (ROOT / "docs" / "tutorial.md").read_text()
    block = page.split("<!-- tutorial: begin -->", 1)[1].split("<!-- tutorial: end -->", 1)[0]
    return re.search(r"```sh\n(.*?)```", block, re.S).group(1)


def test_the_tutorial_runs_as_written(tmp_path):
    from demo import make_models

    make_models(tmp_path)
    bin_dir = Path(sys.executable).parent
    with HubServer(tmp_path / "hub", tokens={"tok-researcher": "researcher"}) as hub:
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_ENDPOINT=hub.url,
                   HF_TOKEN="tok-researcher", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
        env.pop("DELTASTORE_DIR", None)
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", tutorial()], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "curious-uncertainty@1" in out.stdout
    assert (tmp_path / "where-it-changed.png").stat().st_size > 0
    assert (tmp_path / "curious-uncertainty-again" / "config.json").exists()
