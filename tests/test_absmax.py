"""int8 and int4 decoded in numpy (absmax.py, an in-place apply to files) give torch's bytes:
held against the two torch decodes, the encodings' (a live apply on the CPU, and every
result id recorded at commit) and ondevice.py's (a GPU): scale times code, plus the base, in
float32, rounded once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deltastore.codecs import absmax, ondevice
from deltastore.codecs.encodings import get
from deltastore.core.errors import EncodingError
from deltastore.core.hashing import dtype_name

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def torch_reference(encoding: str, encoded, base: torch.Tensor) -> torch.Tensor:
    entry = SimpleNamespace(name="w", encoding=encoding, params=encoded.params)
    parts = {part: torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())
             for part, data in encoded.parts.items()}
    return ondevice.absmax(entry, parts, base)


@pytest.mark.parametrize("encoding", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, group_size", [((64, 96), 64), ((37, 53), 64), ((1, 1), 64), ((3, 1001), 1),
                                                ((130, 2049), 128), ((7, 9), 5), ((0, 8), 64)])
def test_numpy_decode_gives_torch_bytes(encoding, dtype, shape, group_size):
    g = torch.Generator().manual_seed(sum(shape) + group_size)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    # A fine-tune's small delta, with a few outliers and some exact zeros (scale 0 groups).
    delta = torch.randn(shape, generator=g) * 1e-4
    delta.view(-1)[::97] *= 300
    delta.view(-1)[:group_size] = 0
    target = (base.float() + delta).to(dtype)
    encoded = get(encoding, group_size=group_size).encode(base, target)
    out = np.empty(base.numel() * base.element_size(), dtype=np.uint8)
    absmax.decode_into(encoded.parts, encoded.params, bits=8 if encoding == "int8" else 4, base=raw(base),
                       base_dtype=dtype_name(dtype), out=out, dtype=dtype_name(dtype))
    if base.numel():  # (ondevice.py leaves an empty tensor to the CPU)
        assert np.array_equal(out, raw(torch_reference(encoding, encoded, base)))
    # The encoding's torch decode (a live apply on the CPU), into an output tensor and without.
    decoded = get(encoding, group_size=group_size).decode(base, encoded, dtype=dtype, shape=shape)
    assert np.array_equal(raw(decoded), out)
    into = torch.empty(shape, dtype=dtype)
    assert get(encoding).decode(base, encoded, dtype=dtype, shape=shape, out=into) is into
    assert np.array_equal(raw(into), out)


@pytest.mark.parametrize("base_dtype, dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                               (torch.float16, torch.bfloat16)], ids=str)
def test_a_dtype_change_rounds_once_to_the_result_dtype(base_dtype, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(33, 65, generator=g).to(base_dtype)
    encoded = get("int4").encode(base.float(), base.float() + torch.randn(33, 65, generator=g) * 1e-2)
    decoded = get("int4").decode(base, encoded, dtype=dtype, shape=(33, 65))
    dw = torch.from_numpy(np.concatenate([s.copy() for _, s in absmax.dw_slices(
        encoded.parts, encoded.params, bits=4, numel=33 * 65, slice_elements=128)]))
    assert torch.equal(decoded, (dw.reshape(33, 65) + base.float()).to(dtype))


def test_rounding_to_bf16_is_torchs_round_to_nearest_even():
    # Every tie, both sides of a tie, the largest finite values (some round up to inf), inf,
    # subnormals and zeros, of both signs, and a spread of ordinary values.
    rng = np.random.default_rng(0)
    high = rng.integers(0, 0x7F80, size=4000, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = (high[:, None] | low[None, :]).reshape(-1)
    bits = np.concatenate([bits, [0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0x00000001, 0x00008000,
                                  0x00018000, 0]]).astype(np.uint32)
    bits = np.concatenate([bits, bits | 0x80000000])
    values = bits.view(np.float32)
    out = np.empty(values.size, dtype=np.uint16)
    absmax._round_to_bf16(values.copy(), out, np.empty(values.size, dtype=np.uint32))
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, expected)


def test_the_result_may_overwrite_the_base():
    base = torch.randn(40, 70).to(torch.bfloat16)
    encoded = get("int4").encode(base, base.float() + torch.randn(40, 70) * 1e-3)
    expected = raw(torch_reference("int4", encoded, base)).copy()
    inplace = raw(base.clone()).copy()
    absmax.decode_into(encoded.parts, encoded.params, bits=4, base=inplace, base_dtype="BF16", out=inplace,
                       dtype="BF16")
    assert np.array_equal(inplace, expected)


def test_sizes_are_checked_before_any_arithmetic():
    base = torch.randn(8, 8)
    encoded = get("int8").encode(base, base + 0.01)
    out = np.full(256, 7, dtype=np.uint8)
    with pytest.raises(EncodingError, match="do not hold the same number of elements"):
        absmax.decode_into(encoded.parts, encoded.params, bits=8, base=raw(base)[:-4], base_dtype="F32", out=out,
                           dtype="F32")
    short = {**encoded.parts, "codes": bytes(encoded.parts["codes"])[:-1]}
    with pytest.raises(EncodingError, match="part 'codes' has 63 bytes, the entry needs 64"):
        absmax.decode_into(short, encoded.params, bits=8, base=raw(base), base_dtype="F32", out=out, dtype="F32")
    with pytest.raises(EncodingError, match="param 'group_size' must be a whole number"):
        absmax.decode_into(encoded.parts, {**encoded.params, "group_size": 0}, bits=8, base=raw(base),
                           base_dtype="F32", out=out, dtype="F32")
    assert (out == 7).all()  # nothing written
