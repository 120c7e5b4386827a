"""The int8 and int4 layouts (quantize.py states them) decoded in numpy alone: each code times
its group's scale, plus the base, in float32, rounded once to the result's dtype.

patch.py decodes here, so that an in-place apply of an int8 or int4 version to files runs
without importing torch (1.3 CPU-seconds; SmolLM2's int4 command went from 3.2-4.0 s to 1.5 s).
Every step is one IEEE float32 operation per element (a multiply, an add, a rounding to
nearest even), as in torch, so the bytes are torch's: tests/test_absmax.py holds them against
the encodings' torch decode and ondevice.py's, and a result is still checked against the id
recorded at commit. A live apply keeps the torch arithmetic (quantize.absmax_decode_slices,
over `code_slices`): numpy's bf16 rounding takes six passes where torch fuses it into its
copy, and decoded qwen0.5b's int4 tensors 35% slower on warm memory.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from ..core.errors import EncodingError
from ..core.limits import shown

# The dtypes (safetensors names) of bases and results decoded here, as numpy sees their
# elements: bf16 has no numpy type, so its bits are handled as uint16.
ELEMENTS = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
DTYPES = tuple(ELEMENTS)
BITS = {"int8": 8, "int4": 4}  # the encodings decoded here, and their code widths

# fp32 spans 2**-149 .. 2**128; an exponent outside this cannot come from a real tensor.
EXP_RANGE = (-200, 200)

# Decoding does little per element, so the fixed cost of a slice weighs: with 2 MB of L2 per
# core, 1 << 18 elements (1 MB of float32) decoded int4 23% faster than 1 << 16.
DECODE_SLICE = 1 << 18


def int_param(params: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise EncodingError(f"param {key!r} must be a whole number {bound}, got {shown(value)}")
    return value


def exp_param(params: Mapping[str, Any]) -> int:
    return int_param(params, "scale_exp", *EXP_RANGE)


def part_view(parts: Mapping[str, Any], name: str, dtype: Any, count: int) -> np.ndarray:
    """Part `name` as `count` elements of a numpy `dtype`, read in place (never written): a
    copy of a large part would cost more than its decoding."""
    if name not in parts:
        raise EncodingError(f"the entry lacks its {name!r} part (it has {', '.join(sorted(parts)) or 'none'})")
    data = memoryview(parts[name]).cast("B")  # lengths in bytes, whatever the buffer's format
    itemsize = np.dtype(dtype).itemsize
    if len(data) != count * itemsize:
        raise EncodingError(f"part {name!r} has {len(data)} bytes, the entry needs {count * itemsize}")
    return np.frombuffer(data, dtype=dtype) if count else np.empty(0, dtype=dtype)


def unscale(values: np.ndarray, exp: int) -> np.ndarray:
    """fp16 scales times 2**exp, as float32: exact in float64, then rounded once (so a scale
    that falls below float32's normal range rounds as torch's `.double() * 2**exp` did)."""
    return (values.astype(np.float64) * 2.0 ** exp).astype(np.float32)


def code_slices(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, numel: int,
                slice_elements: int = DECODE_SLICE) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """(first element, the int8 codes of the elements from there, the float32 scales of their
    groups, the group size), in order: a whole number of groups (and of code bytes) at a
    time. The codes of int4 are one buffer, overwritten by the next slice."""
    g, n = int_param(params, "group_size", 1), numel
    full_groups, rest = divmod(n, g)
    s = unscale(part_view(parts, "scales", np.float16, full_groups + (rest > 0)), exp_param(params))
    # The codes' size is checked before anything is decoded: the element count comes from
    # outside, and only the codes back it.
    raw = part_view(parts, "codes", np.int8 if bits == 8 else np.uint8, n if bits == 8 else (n + 1) // 2)
    step = math.lcm(g, 2) * max(1, slice_elements // math.lcm(g, 2))
    if bits == 4:
        words, shifted = (np.empty(min(step, n) // 2 + 1, dtype=np.uint16) for _ in range(2))
    for start in range(0, n, step):
        end = min(start + step, n)
        first, last = start // g, -(-end // g)  # every slice but the last holds whole groups
        if bits == 8:
            yield start, raw[start:end], s[first:last], g
            continue
        # Each code byte becomes a 16-bit word holding its two nibbles as the int8 codes minus
        # the offset 8 (element 2i in the low byte), in integer passes over a byte or two per
        # element: 23% faster than a lookup of float pairs (np.take), whose output is eight
        # bytes per code byte.
        pairs = raw[start // 2:(end + 1) // 2]
        w, t = words[:len(pairs)], shifted[:len(pairs)]
        np.copyto(w, pairs)
        np.left_shift(w, 4, out=t)
        np.bitwise_or(w, t, out=w)
        np.bitwise_and(w, 0x0F0F, out=w)
        # A nibble v (0..15) + 0x78, then ^ 0x80, is the int8 v - 8; no carry crosses a byte.
        np.add(w, 0x7878, out=w)
        np.bitwise_xor(w, 0x8080, out=w)
        yield start, w.view(np.int8)[:end - start], s[first:last], g


def dw_slices(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, numel: int,
              slice_elements: int = DECODE_SLICE) -> Iterator[tuple[int, np.ndarray]]:
    """(first element, float32 dW of the elements from there): `code_slices` times their
    scales. Each slice is one buffer, overwritten by the next: take a copy to keep one."""
    dw = None
    for start, codes, s, g in code_slices(parts, params, bits=bits, numel=numel, slice_elements=slice_elements):
        m = codes.size
        if dw is None:
            dw = np.empty(m, dtype=np.float32)
        out = dw[:m]
        np.copyto(out, codes, casting="safe")
        whole = m // g
        grouped = out[:whole * g].reshape(whole, g)
        np.multiply(grouped, s[:whole, None], out=grouped)
        if m % g:
            np.multiply(out[whole * g:], s[whole], out=out[whole * g:])
        yield start, out


def block_parts(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, numel: int,
                first: int, end: int) -> dict[str, memoryview]:
    """The parts of elements `first`..`end` of an int8 or int4 entry of `numel` elements, as
    `decode_into` takes a whole entry's: its codes and its groups' scales, views (no copy). The
    whole parts' sizes are checked; `first` must start a group (and an int4 code byte)."""
    g = int_param(params, "group_size", 1)
    sizes = part_sizes(params, bits=bits, numel=numel)
    scales = part_view(parts, "scales", np.float16, sizes["scales"] // 2)
    codes = part_view(parts, "codes", np.int8 if bits == 8 else np.uint8, sizes["codes"])
    if first % math.lcm(g, 2) or not 0 <= first <= end <= numel:
        raise EncodingError(f"elements {first}..{end} do not start a group of {g} in {numel}")
    a, b = block_bytes(params, bits=bits, first=first, end=end)
    return {"codes": memoryview(codes[a["codes"]:b["codes"]]).cast("B"),
            "scales": memoryview(scales[a["scales"] // 2:b["scales"] // 2]).cast("B")}


def part_sizes(params: Mapping[str, Any], *, bits: int, numel: int) -> dict[str, int]:
    """The bytes each part of an int8 or int4 entry of `numel` elements holds."""
    return block_bytes(params, bits=bits, first=0, end=numel)[1]


def block_bytes(params: Mapping[str, Any], *, bits: int, first: int, end: int
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Where the bytes of elements `first`..`end` start and end in each part (`first` starts a
    group and an int4 code byte): a block's parts read in order, one after another."""
    g, per_byte = int_param(params, "group_size", 1), 1 if bits == 8 else 2
    return ({"codes": first // per_byte, "scales": first // g * 2},
            {"codes": -(-end // per_byte), "scales": -(-end // g) * 2})


def decode_into(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, base: np.ndarray,
                base_dtype: str, out: np.ndarray, dtype: str) -> np.ndarray:
    """An int8 (`bits` 8) or int4 entry's result: dW plus the base in float32, rounded once to
    `dtype`, into `out` (the result's bytes, uint8); `base`: the base's bytes (uint8), of
    `base_dtype`. Sizes are checked before any arithmetic. `out` may be `base` itself."""
    n = out.size // ELEMENTS[dtype].itemsize
    if out.size != n * ELEMENTS[dtype].itemsize or base.size != n * ELEMENTS[base_dtype].itemsize:
        raise EncodingError(f"a base of {base.size} bytes ({base_dtype}) and a result of {out.size} bytes "
                            f"({dtype}) do not hold the same number of elements")
    b, o = base.view(ELEMENTS[base_dtype]), out.view(ELEMENTS[dtype])
    bits32 = np.empty(min(DECODE_SLICE, n), dtype=np.uint32)  # bf16 <-> float32 bit patterns
    for start, dw in dw_slices(parts, params, bits=bits, numel=n):
        end = start + dw.size
        wide = bits32[:dw.size]
        if base_dtype == "BF16":
            # A bf16 is the top half of the float32 of the same value: exact.
            np.left_shift(b[start:end], 16, out=wide, dtype=np.uint32)
            np.add(dw, wide.view(np.float32), out=dw)
        else:
            np.add(dw, b[start:end], out=dw)
        if dtype == "BF16":
            _round_to_bf16(dw, o[start:end], wide)
        else:
            np.copyto(o[start:end], dw, casting="same_kind")  # float16: rounds to nearest even
    return out


def _round_to_bf16(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """float32 -> bf16 bits, rounded to nearest even, as torch rounds: add 0x7FFF plus the
    lowest kept bit, keep the top half. A result is finite or an overflow to inf, both
    rounded right this way; a NaN cannot come from a base and scales that commit accepted
    (and if one did, the result's id would refuse it)."""
    u = x.view(np.uint32)
    np.right_shift(u, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(scratch, u, out=scratch)
    np.right_shift(scratch, 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")  # only the low 16 bits are left
