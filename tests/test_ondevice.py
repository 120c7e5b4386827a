"""Decoding on the module's device (ondevice.py): the arithmetic, compared with the reference
decode on the CPU here; and apply, revert, prepare and switch on a CUDA module, where there is one."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deltastore import BaseMismatch, CorruptObject, DeltastoreError, Store
from deltastore.codecs import encodings, ondevice
from deltastore.core.hashing import hasher, hexdigest_id, staged_update, tensor_id

from helpers import make_model, module_snapshot, object_files

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: no CUDA device here")


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


@pytest.mark.parametrize("encoding", ["lossless", "int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decoding_in_torch_gives_the_bytes_of_the_reference_decode(tmp_path, store, encoding, dtype) -> None:
    # The arithmetic a CUDA module's apply and switch run, compared here on the CPU.
    pair = make_model(tmp_path, dtype)
    version = store.commit("s", pair.ft, base=pair.base, encoding=encoding).version
    decoded = 0
    for entry in version.tensors:
        if entry.encoding != encoding or entry.params.get("mode") == "raw":
            continue
        decoded += 1
        base = pair.base_state[entry.name]
        reference = store.decode_entry(entry, base)
        ours = ondevice.decode(entry, store.read_parts(entry), base)
        assert ours.dtype == reference.dtype and torch.equal(ours.view(torch.uint8), reference.view(torch.uint8))
    assert decoded >= 3


@pytest.mark.parametrize("encoding", ["lossless", "int4", "int8"])
def test_a_payload_of_the_wrong_size_is_refused(tmp_path, store, encoding) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    version = store.commit("s", pair.ft, base=pair.base, encoding=encoding).version
    entry = next(e for e in version.tensors if e.encoding == encoding and e.params.get("mode") != "raw")
    parts = {p: bytes(b) for p, b in store.read_parts(entry).items()}
    part = "xor" if encoding == "lossless" else "codes"
    parts[part] = parts[part][:-1]
    with pytest.raises(DeltastoreError, match="bytes"):
        ondevice.decode(entry, parts, pair.base_state[entry.name])


def test_only_a_module_off_the_cpu_decodes_on_its_device(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    version = store.commit("s", pair.ft, base=pair.base, encoding="int4").version
    entry = next(e for e in version.tensors if e.encoding == "int4")
    base = pair.base_state[entry.name]
    assert not ondevice.decodes(entry, base)
    assert ondevice.decodes(entry, base.to("meta"))
    assert not ondevice.decodes(entry, base.float().to("meta"))  # another dtype: the CPU decode converts


def test_an_empty_tensor_decodes_on_the_cpu() -> None:
    # Its parts are empty, and torch refuses to view an empty uint8 part as fp16 scales: on a
    # GPU, the apply of an int4 entry of an empty tensor failed.
    base = torch.empty(0, 8, dtype=torch.bfloat16)
    encoded = encodings.get("int4").encode(base, base)
    entry = SimpleNamespace(name="w", encoding="int4", params=encoded.params, against_version=None, dtype="BF16",
                            shape=(0, 8), objects={})
    parts = {part: torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())
             for part, data in encoded.parts.items()}
    with pytest.raises(RuntimeError):
        ondevice.absmax(entry, parts, base)
    assert not ondevice.decodes(entry, base.to("meta"))
    assert encodings.get("int4").decode(base, encoded, dtype=torch.bfloat16, shape=(0, 8)).shape == (0, 8)


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 40, 1001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_a_tensor_hashed_a_slice_at_a_time_has_the_id_of_its_bytes(count, dtype) -> None:
    # How a GPU tensor is hashed (through page-locked buffers), here on the CPU with slices of
    # 16 bytes: slice edges inside and between elements, and a tensor smaller than a slice.
    t = (torch.arange(count, dtype=torch.float32) * 0.37).to(dtype)
    shape = ",".join(str(d) for d in t.shape)
    name = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8"}[dtype]
    h = hasher(0)
    h.update(f"{name} {shape}\n".encode())
    staged_update(h, t, step=16)
    assert hexdigest_id(h) == tensor_id(t)


# -- on a GPU --------------------------------------------------------------------------------------


@GPU
def test_a_cuda_tensor_has_the_id_of_its_bytes() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in [(0,), (5,), (4097, 1031), (3, 16 << 20)]:
        t = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert tensor_id(t.cuda()) == tensor_id(t)
    wide = torch.randn(64, 48, generator=g)
    assert tensor_id(wide.cuda().t()) == tensor_id(wide.t().contiguous())  # not contiguous on the GPU


@GPU
@pytest.mark.parametrize("encoding", ["lossless", "int4", "int8", "nf4", "1bit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_on_a_cuda_module_gives_the_bytes_of_the_cpu_apply(tmp_path, store, encoding, dtype) -> None:
    if encoding == "nf4":
        pytest.importorskip("bitsandbytes")
    pair = make_model(tmp_path, dtype)
    version = store.commit("s", pair.ft, base=pair.base, encoding=encoding).version
    on_cpu = copy.deepcopy(pair.base_module)
    with store.applied(on_cpu, "s"):
        expected = module_snapshot(on_cpu)
    model = copy.deepcopy(pair.base_module).cuda()
    params = dict(model.named_parameters())
    if encoding in ("lossless", "int4", "int8"):
        assert any(ondevice.decodes(e, params[e.name]) for e in version.tensors if e.name in params)
    base = module_snapshot(model)
    for _ in range(2):  # the second apply finds its bases checked (checked.py on a CUDA tensor)
        handle = store.apply(model, "s")
        assert module_snapshot(model) == expected
        assert all(p.device.type == "cuda" for p in model.parameters())
        handle.revert()
        assert module_snapshot(model) == base


@GPU
def test_a_cuda_module_with_tied_weights_applies_and_reverts(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, llama=True, tied=True)
    store.commit("s", pair.ft, base=pair.base, encoding="int4")
    on_cpu = copy.deepcopy(pair.base_module)
    with store.applied(on_cpu, "s"):
        expected = module_snapshot(on_cpu)
    model = copy.deepcopy(pair.base_module).cuda()
    base = module_snapshot(model)
    with store.applied(model, "s"):
        assert module_snapshot(model) == expected
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert module_snapshot(model) == base


@GPU
def test_a_cuda_apply_refuses_a_damaged_object_or_another_base_and_writes_nothing(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("s", pair.ft, base=pair.base, encoding="int4")
    model = copy.deepcopy(pair.base_module).cuda()
    first = next(iter(model.parameters()))
    with torch.no_grad():
        first.add_(1)
    changed = module_snapshot(model)
    with pytest.raises(BaseMismatch):
        store.apply(model, "s")
    assert module_snapshot(model) == changed

    model = copy.deepcopy(pair.base_module).cuda()
    base = module_snapshot(model)
    largest = max(object_files(store.root), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    with pytest.raises(CorruptObject):
        store.apply(model, "s")
    assert module_snapshot(model) == base
