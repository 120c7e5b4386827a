"""Squared norms of tensors given as their raw little-endian bytes (a mapped weight file's
regions), in numpy alone: bit for bit what `norms.sq_norm` gives of the same tensor, without
torch (its import was half of a `base add`), a few slices at a time (no float32 copy of a
large tensor)."""

from __future__ import annotations

import math
import os

import numpy as np

# Norms are taken a cache-sized slice at a time (2x faster than 4M-element slices here); the
# slices are part of the result (each one's sum is rounded on its own), so norms.py takes these.
CHUNK = 1 << 18
# Slices summed at once here: wide enough rows for numpy's adds, 8 MB of float32 per thread.
GROUP = 8

# float8 e4m3fn has no numpy dtype: each of its 256 codes as the float32 it stands for
# (bias 7, no infinities, S.1111.111 is nan); e5m2 is the top byte of a float16.
_E4M3 = np.array([(-1.0 if c & 0x80 else 1.0) * (
    math.nan if c & 0x7F == 0x7F else
    (c & 7) / 8 * 2.0 ** -6 if not c & 0x78 else
    (1 + (c & 7) / 8) * 2.0 ** (((c >> 3) & 15) - 7)) for c in range(256)], dtype=np.float32)
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _torch_lanes() -> int:
    """How many float32 sums torch's 2-norm kernel keeps side by side (its vector width): 16
    where it runs its AVX-512 kernels, else 8 (AVX2, NEON, its default build)."""
    chosen = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if chosen:
        return 16 if chosen.startswith("avx512") else 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return 8
    return 16 if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags) else 8


LANES = _torch_lanes()


def raw_sq_norm(dtype: str, data: bytes | memoryview) -> float | None:
    """||t||^2 of a tensor of safetensors dtype `dtype` whose bytes are `data`, as
    `norms.sq_norm` takes it: per slice of `CHUNK` elements, torch's float32 (float64 for F64)
    sum of squares (`LANES` running sums, then added in order), its square root rounded to
    that precision and squared again, summed; None for a tensor that is not of floats, or
    where the result is not finite."""
    norm = SqNorm(dtype)
    norm.add(data)
    return norm.value()


class SqNorm:
    """`raw_sq_norm` of a tensor given a block of bytes at a time, in order, every block but the
    last a whole number of CHUNKs (a mapped tensor read a block at a time): the same figure."""

    def __init__(self, dtype: str):
        self.dtype, self.size = dtype, _SIZES.get(dtype)
        self.total: float = 0  # as `sum` starts
        self.elements = 0
        self.rest = False  # a partial slice was added: nothing may follow it

    def add(self, data: bytes | memoryview) -> None:
        if self.size is None or not len(data):
            return
        if self.rest:
            raise ValueError("a block after a tensor's last, partial slice")
        raw, size = np.frombuffer(data, dtype=np.uint8), self.size
        n = len(raw) // size
        whole = n // CHUNK
        with np.errstate(over="ignore", invalid="ignore"):  # inf and nan give None, as in torch
            for first in range(0, whole, GROUP):
                count = min(GROUP, whole - first)
                for norm in _slice_norms(raw[first * CHUNK * size:(first + count) * CHUNK * size], self.dtype, count):
                    self.total += float(norm) ** 2
            if n % CHUNK:
                self.total += float(_last_slice_norm(_as_float(raw[whole * CHUNK * size:], self.dtype))) ** 2
                self.rest = True
        self.elements += n

    def value(self) -> float | None:
        if self.size is None:
            return None
        if not self.elements:  # an empty tensor's one empty slice, as torch sums it: 0.0
            self.total += float(_last_slice_norm(_as_float(np.empty(0, dtype=np.uint8), self.dtype))) ** 2
        return self.total if math.isfinite(self.total) else None


def _slice_norms(raw: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """The norms of `count` whole slices: their elements squared into rows of every slice's
    lanes side by side, the rows added in order (each lane's running sum, as torch keeps it)."""
    lanes = LANES // 2 if dtype == "F64" else LANES
    rows = CHUNK // lanes
    acc = np.float64 if dtype == "F64" else np.float32
    squares = np.empty((rows, count, lanes), dtype=acc)
    if dtype == "BF16":  # a bfloat16 is the top half of the float32 of the same value
        bits = squares.view(np.uint32)
        np.left_shift(raw.view("<u2").reshape(count, rows, lanes).transpose(1, 0, 2), 16, out=bits, dtype=np.uint32)
        np.multiply(squares, squares, out=squares)
    else:
        x = _as_float(raw, dtype).reshape(count, rows, lanes).transpose(1, 0, 2)
        np.multiply(x, x, out=squares, dtype=acc)
    sums = np.add.reduce(squares, axis=0)
    total = sums[:, 0].copy()
    for j in range(1, lanes):
        total += sums[:, j]
    return np.sqrt(total)


def _last_slice_norm(x: np.ndarray) -> np.floating:
    """The norm of a tensor's last, partial slice: whole rows of lanes, then the rest one by one."""
    lanes = LANES // 2 if x.dtype == np.float64 else LANES
    whole = len(x) - len(x) % lanes
    squares = x[:whole] * x[:whole]
    sums = np.add.reduce(squares.reshape(-1, lanes), axis=0) if whole else np.zeros(lanes, dtype=x.dtype)
    total = sums[0]
    for j in range(1, lanes):
        total = total + sums[j]
    for v in x[whole:]:
        total = total + v * v
    return np.sqrt(total)


def _as_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Elements as numpy reads them for a norm: float32 or float64, or float16 (widened as
    they are squared)."""
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E5M2":
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "F8_E4M3":
        return _E4M3[raw]
    if dtype == "F16":
        return raw.view("<f2").astype(np.float32)
    return raw.view("<f4" if dtype == "F32" else "<f8")
