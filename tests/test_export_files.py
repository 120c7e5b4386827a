"""`export` from the base's files, decoded in numpy two tensors at a time (modelfolder.py's
write_decoded), writes the very bytes that the torch path (write_model) writes, and refuses
base files that changed."""

from __future__ import annotations

import pytest
import torch

from deltastore import BaseMismatch, Store
from deltastore.patching import patch
from deltastore.weights.models import open_files

from helpers import file_bytes, make_model


@pytest.mark.parametrize("encoding", ["lossless", "int4", "int8"])
@pytest.mark.parametrize("sharded", [False, True])
def test_export_from_files_writes_what_the_torch_path_writes(tmp_path, monkeypatch, encoding, sharded) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=sharded)
    with Store.init(tmp_path / "store") as store:
        store.commit("s", pair.ft, base=pair.base, encoding=encoding)
        progress: list[tuple[int, int]] = []
        fast = store.export("s", tmp_path / "fast", progress=lambda *a: progress.append(a))
        monkeypatch.setattr(patch, "decodes_from_files", lambda *a: False)  # the torch path
        slow = store.export("s", tmp_path / "slow")
    # Every weight file, the index, the config and tokenizer files, byte for byte.
    assert file_bytes(fast) == file_bytes(slow)
    assert sorted(p.name for p in fast.iterdir()) == sorted(p.name for p in pair.base.iterdir())
    n = len(open_files(pair.base).infos)
    assert progress == [(k, n) for k in range(1, n + 1)]


def test_export_from_changed_base_files_is_refused(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    with Store.init(tmp_path / "store") as store:
        store.commit("s", pair.ft, base=pair.base, encoding="int4")
        path = next(pair.base.glob("*.safetensors"))
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
        with pytest.raises(BaseMismatch, match="differ from those registered"):
            store.export("s", tmp_path / "out")
    assert not (tmp_path / "out").exists()
