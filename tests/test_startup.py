"""Read commands start fast: they never import torch, numpy or transformers (about 2 CPU-seconds
of imports before anything happens), and those that write nothing not sqlite-utils either."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltastore import Store

from helpers import make_model

REPO = Path(__file__).resolve().parents[1]
# sqlite_utils (and the scan of every installed package's entry points its plugins make) was
# a third of `log`'s start: the catalog writes through it, and reads without it.
HEAVY = ("torch", "numpy", "transformers", "sqlite_utils")
# Runs one command in a fresh interpreter, then says which heavy modules it imported.
PROBE = """
import json, sys
from cli.main import cli
try:
    cli(sys.argv[1:], prog_name="deltastore")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("startup")
    pair = make_model(tmp)
    with Store.init(tmp / "store") as store:
        store.commit("curious", pair.ft, base=pair.base, tag="paper")
    return tmp / "store"


def heavy_imports(root: Path, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, "--store", str(root), *args], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), result.stderr
    return report["heavy"]


@pytest.mark.parametrize("args", [
    ("--help",), ("--version",), ("log",), ("log", "curious", "--json"), ("show", "curious@1"),
    ("stances",), ("tag", "curious@1", "second"), ("stats",), ("fsck",), ("gc", "--dry-run"), ("commit", "--help"),
], ids=lambda a: " ".join(a))
def test_read_commands_do_not_import_torch(root, args):
    # `tag` writes a row; fsck and gc write a catalog rebuilt from the truth, to check the live
    # one against it: all through sqlite-utils. The others write nothing.
    allowed = {"sqlite_utils"} if args[0] in ("tag", "fsck", "gc") else set()
    assert set(heavy_imports(root, *args)) - allowed == set()


def test_a_command_that_needs_tensors_still_gets_them(root):
    # The probe sees an import where there is one: analyze builds tensors. (An export of a
    # lossless, int8 or int4 version against its base is decoded in numpy from the files.)
    assert "torch" in heavy_imports(root, "analyze", "curious@1")
    assert "torch" not in heavy_imports(root, "export", "curious@1", "--out", str(root.parent / "exported"))


def test_in_place_apply_of_a_lossless_version_and_revert_do_without_torch(root, tmp_path):
    # Importing torch was most of a two-tensor in-place apply's time (1.3 of its 2.2 s, idle):
    # a lossless version against the base is decoded from the files' bytes in numpy.
    shutil.copytree(root.parent / "model-base", tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert "torch" not in heavy_imports(root, "apply", "curious@1", str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before
    assert "torch" not in heavy_imports(root, "revert", str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_in_place_apply_of_an_int8_or_int4_version_does_without_torch(root, tmp_path, encoding):
    # Their codes decode in numpy (absmax.py), and the result is still checked against its id:
    # the file holds what `apply --out` (decoded in torch) writes.
    stance = f"lossy-{encoding}"
    with Store.open(root) as store:
        store.commit(stance, root.parent / "model-ft", base=root.parent / "model-base", encoding=encoding)
    shutil.copytree(root.parent / "model-base", tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert "torch" not in heavy_imports(root, "apply", f"{stance}@1", str(tmp_path / "m"))
    assert "torch" not in heavy_imports(root, "apply", f"{stance}@1", str(root.parent / "model-base"),
                                        "--out", str(tmp_path / "out"))
    with Store.open(root) as store:  # decoded in torch
        decoded = dict(store.tensors(f"{stance}@1", base_weights=root.parent / "model-base"))
    for folder in ("m", "out"):
        written = load_file(tmp_path / folder / "model.safetensors")
        assert written.keys() == decoded.keys()
        assert all(torch.equal(written[name], decoded[name]) for name in written)
    assert "torch" not in heavy_imports(root, "revert", str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_in_place_apply_of_another_lossy_version_imports_torch_to_decode(root, tmp_path):
    with Store.open(root) as store:
        store.commit("lossy-1bit", root.parent / "model-ft", base=root.parent / "model-base", encoding="1bit")
    shutil.copytree(root.parent / "model-base", tmp_path / "m")
    assert "torch" in heavy_imports(root, "apply", "lossy-1bit@1", str(tmp_path / "m"))
    assert "torch" not in heavy_imports(root, "revert", str(tmp_path / "m"))


def test_base_add_does_without_torch(tmp_path):
    # Tensor ids from the mapped bytes and squared norms in numpy: importing torch was half of a
    # 1 GB base's `base add` (3.3 of 6.3 s).
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    Store.init(tmp_path / "store").close()
    assert "torch" not in heavy_imports(tmp_path / "store", "base", "add", str(pair.base))
    assert "torch" not in heavy_imports(tmp_path / "store", "base", "add", str(pair.base), "--verify")
    with Store.open(tmp_path / "store") as store:
        assert [b.tensor_count for b in store.bases()] == [len(pair.base_state)]
