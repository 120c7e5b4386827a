"""The arithmetic and byte layouts of the lossy encodings: a float32 delta in, parts out, and back.

Pure: no disk, no registry, no objects. Each `*_encode` takes the float32 delta dW and returns
`(parts, params)`; each `*_decode` takes them back with the element count or shape, checks
every part's size and every param before it allocates (parts and params come from outside) and
returns the decoded float32 delta. `encodings.py` wraps these pairs in `Encoding` classes.

The byte layouts are part of the on-disk format and pinned by golden tests. Every part is a
little-endian array with no header; elements run over the tensor flattened in row-major order.

- Scales are fp16 with a per-tensor power-of-two exponent `scale_exp` (params): a scale is
  `fp16 value * 2**scale_exp`. The deltas of a fine-tune are ~1e-6, where fp16 alone is
  subnormal (or zero) and loses most of its precision; the exponent moves the tensor's largest
  scale into [2**14, 2**15), so no scale overflows and only those 2**-28 below the largest
  ever go subnormal.
- int8/int4: codes q in [-qmax, qmax] (qmax 127 or 7), value = q * scale of its group; groups
  are `group_size` consecutive elements, the last one may be shorter. int8 codes are int8
  bytes. int4 codes are stored as q + 8 (a nibble from 1 to 15, 8 meaning zero), two per
  byte: element 2i in the low nibble, element 2i+1 in the high nibble; an odd count pads the
  last high nibble with 8.
- 1bit: bit i of the flattened tensor is bit (i % 8) of byte i // 8 (least significant bit
  first); 1 means +scale (dW > 0), 0 means -scale. One scale per row (dimension 0).
- nf4/fp4: bitsandbytes' own layout (element 2i in the HIGH nibble), over the flattened delta
  padded with one zero to an even count; absmax is float32 per block, `code` is the 16-entry
  float32 table the codes index.
- lowrank: `us` = U*S (m x R) * 2**-scale_exp and `vh` (R x n), both row-major in `dtype`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from .absmax import DECODE_SLICE, code_slices, exp_param, int_param
from ..core.errors import EncodingError
from ..core.limits import shown

Parts = dict[str, memoryview]

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FACTOR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- bytes ---------------------------------------------------------------------------------

def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _part(parts: Mapping[str, Any], name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Part `name` as `count` elements of `dtype`, refused unless its size is exactly that."""
    if name not in parts:
        raise EncodingError(f"the entry lacks its {name!r} part (it has {', '.join(sorted(parts)) or 'none'})")
    data = memoryview(parts[name]).cast("B")  # lengths in bytes, whatever the buffer's format
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise EncodingError(f"part {name!r} has {len(data)} bytes, the entry needs {count * itemsize}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    # A copy: the buffer may be read-only or shared, and the result must own its memory.
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).view(dtype)


# -- fp16 scales ---------------------------------------------------------------------------

def fp16_scales(scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-negative fp32 scales as (fp16 values, scale_exp); see the module docstring."""
    top = float(scales.max()) if scales.numel() else 0.0
    exp = math.frexp(top)[1] - 15 if top > 0 else 0
    # float64 makes the power-of-two shift exact, whatever the exponent.
    return (scales.double() * 2.0 ** -exp).to(torch.float16), exp


def unscale(values: torch.Tensor, exp: int) -> torch.Tensor:
    """fp16 (or any float) values times 2**exp, as float32."""
    return (values.double() * 2.0 ** exp).float()


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds no inf or nan. Its smallest and largest values are finite
    exactly then (a nan makes both nan): one pass and no temporary, where
    ``torch.isfinite(t).all()`` builds three full-size ones and took 30 times as long (200 us
    against 6 for a subtraction, per 65536 float32)."""
    if t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: no aminmax kernel
        return bool(torch.isfinite(t.float()).all())
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo) and math.isfinite(hi)


# -- int8 / int4: symmetric group-wise absmax ------------------------------------------------

def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


# Elements per slice of an encode or decode: a slice's float32 values fit in a core's L2 cache.
SLICE = 1 << 16


def absmax_encode(dw: torch.Tensor, *, bits: int, group_size: int) -> tuple[Parts, dict[str, Any]]:
    """Group-wise symmetric quantisation of the flat float32 delta to int8 or int4 codes."""
    flat = dw.reshape(-1)
    return absmax_encode_slices(lambda start, end: flat[start:end], flat.numel(), bits=bits, group_size=group_size)


def absmax_encode_slices(delta: Callable[[int, int], torch.Tensor], numel: int, *, bits: int, group_size: int,
                         slice_elements: int = SLICE) -> tuple[Parts, dict[str, Any]]:
    """absmax_encode of the delta that `delta(start, end)` gives a float32 slice of, a slice
    at a time: one pass for the group scales, one for the codes, each slice's arithmetic in
    the cache and no whole-tensor float32 temporary. The bytes are absmax_encode's."""
    s16, exp = absmax_scales(delta, numel, bits=bits, group_size=group_size, slice_elements=slice_elements)
    codes = np.empty(numel if bits == 8 else (numel + 1) // 2, dtype=np.int8 if bits == 8 else np.uint8)
    for start, end, part in absmax_codes(delta, numel, unscale(s16, exp), bits=bits, group_size=group_size,
                                         slice_elements=slice_elements):
        codes[start // (2 if bits == 4 else 1):][:part.size] = part
    return {"codes": memoryview(codes).cast("B"), "scales": _bytes(s16)}, {"group_size": group_size, "scale_exp": exp}


def absmax_scales(delta: Callable[[int, int], torch.Tensor], numel: int, *, bits: int, group_size: int,
                  slice_elements: int = SLICE) -> tuple[torch.Tensor, int]:
    """The first pass of absmax_encode_slices: each group's fp16 scale and their shared
    exponent (`unscale` gives the scales the codes are rounded against)."""
    qmax, n, g = _qmax(bits), numel, group_size
    groups = -(-n // g)
    top = torch.zeros(groups, dtype=torch.float32)
    for start, end, first, whole in _slices(n, g, _step(g, slice_elements)):
        d = delta(start, end)
        top[first:first + whole] = d[:whole * g].view(whole, g).abs().amax(dim=1)
        if (end - start) % g:  # the last group, short (its padding would be zeros)
            top[first + whole] = d[whole * g:].abs().amax()
    return fp16_scales(top / qmax if groups else torch.empty(0))


def absmax_codes(delta: Callable[[int, int], torch.Tensor], numel: int, s: torch.Tensor, *, bits: int,
                 group_size: int, slice_elements: int = SLICE) -> Iterator[tuple[int, int, np.ndarray]]:
    """The second pass: (start, end, codes of elements start..end) a slice at a time, each
    slice's codes a buffer of their own. Codes are rounded against the scale decode will use
    (`s`: the fp16 one, unscaled), not the exact one."""
    qmax, g = _qmax(bits), group_size
    for start, end, first, whole in _slices(numel, g, _step(g, slice_elements)):
        d, q = delta(start, end), torch.empty(end - start, dtype=torch.float32)
        _quantize(d[:whole * g].view(whole, g), s[first:first + whole, None], qmax, q[:whole * g].view(whole, g))
        if (end - start) % g:
            _quantize(d[whole * g:], s[first + whole], qmax, q[whole * g:])
        if bits == 8:
            yield start, end, q.to(torch.int8).numpy()
        else:
            yield start, end, pack_nibbles((q + 8).to(torch.uint8), pad=8).numpy()


def _step(g: int, slice_elements: int) -> int:
    """Elements a slice holds: whole groups, an even number, about `slice_elements`."""
    return math.lcm(g, 2) * max(1, slice_elements // math.lcm(g, 2))


def _slices(n: int, g: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, first group, whole groups) of each slice; every slice but the last holds
    whole groups (and an even number of elements)."""
    for start in range(0, n, step):
        end = min(start + step, n)
        yield start, end, start // g, (end - start) // g


def _quantize(x: torch.Tensor, s: torch.Tensor, qmax: int, out: torch.Tensor) -> None:
    live = s > 0
    out.copy_(torch.where(live, torch.round(x / torch.where(live, s, 1.0)).clamp_(-qmax, qmax), 0.0))


def absmax_decode(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, numel: int) -> torch.Tensor:
    # One slice covering every element: its buffer is the result.
    whole = [dw for _, dw in absmax_decode_slices(parts, params, bits=bits, numel=numel,
                                                  slice_elements=numel + 2 * int_param(params, "group_size", 1))]
    return whole[0] if whole else torch.empty(0, dtype=torch.float32)


def absmax_decode_slices(parts: Mapping[str, Any], params: Mapping[str, Any], *, bits: int, numel: int,
                         slice_elements: int = DECODE_SLICE) -> Iterator[tuple[int, torch.Tensor]]:
    """(first element, float32 dW of the next elements), in order: absmax.code_slices, each
    slice's codes converted to float32 in a tensor of its own and scaled in place. (The same
    products as absmax.dw_slices, in torch: its broadcast over 64-element groups ran 15-25%
    faster than numpy's, and a live apply decodes here.)"""
    for start, codes, s, g in code_slices(parts, params, bits=bits, numel=numel, slice_elements=slice_elements):
        out = torch.from_numpy(codes.astype(np.float32))
        m, scales = out.numel(), torch.from_numpy(s)
        whole = m // g
        out[:whole * g].view(whole, g).mul_(scales[:whole, None])
        if m % g:
            out[whole * g:].mul_(scales[whole])
        yield start, out


def pack_nibbles(codes: torch.Tensor, *, pad: int) -> torch.Tensor:
    """uint8 codes 0..15, two per byte: element 2i low nibble, 2i+1 high nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([pad], dtype=torch.uint8)])
    return codes[0::2] | (codes[1::2] << 4)


# -- 1bit: sign with one scale per row (BitDelta) ----------------------------------------------

def sign_encode(dw: torch.Tensor) -> tuple[Parts, dict[str, Any]]:
    """dw: float32 (rows, cols). The row scale is mean |dW|: the L2-optimal one for signs."""
    rows, cols = dw.shape
    s16, exp = fp16_scales(dw.abs().mean(dim=1) if cols else torch.zeros(rows))
    signs = np.packbits((dw.reshape(-1) > 0).numpy(), bitorder="little")
    return {"signs": memoryview(signs), "scales": _bytes(s16)}, {"scale_exp": exp}


def sign_decode(parts: Mapping[str, Any], params: Mapping[str, Any], *, rows: int, cols: int) -> torch.Tensor:
    n = rows * cols
    s = unscale(_part(parts, "scales", torch.float16, rows), exp_param(params))
    packed = _part(parts, "signs", torch.uint8, (n + 7) // 8).numpy()
    out = torch.empty(rows, cols, dtype=torch.float32)
    out.view(-1).copy_(torch.from_numpy(np.unpackbits(packed, count=n, bitorder="little")))
    return out.mul_(2).sub_(1).mul_(s[:, None])


# -- nf4 / fp4 through bitsandbytes -----------------------------------------------------------

def _bnb() -> Any:
    # bitsandbytes warns on import, on every CPU, that an optional faster kernel package is
    # missing; the library never prints, so that warning is kept out of the user's output.
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F  # noqa: N812 (bitsandbytes' own idiom)
    except ImportError as e:
        raise EncodingError(f"nf4 and fp4 need bitsandbytes (pip install bitsandbytes): {e}") from None
    return F


def bnb_encode(dw: torch.Tensor, *, quant_type: str, blocksize: int) -> tuple[Parts, dict[str, Any]]:
    """bitsandbytes' 4-bit quantisation of the flat delta: the very bytes ``quantize_4bit``
    makes on a CPU (tested), computed here a slice at a time with bitsandbytes' code table."""
    code = _bnb().get_4bit_type(quant_type, device="cpu").float()
    flat = dw.reshape(-1).float()
    # An even count, as bitsandbytes' CPU kernel needs (its odd-shape path is slow); the zero
    # added joins the last block, whose absmax it cannot change.
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed, absmax = _quantize_4bit(flat, code, blocksize)
    parts = {"data": _bytes(packed), "absmax": _bytes(absmax), "code": _bytes(code)}
    params = {"quant_type": quant_type, "blocksize": blocksize, "quant_shape": [flat.numel()],
              "quant_dtype": "F32"}
    return parts, params


def _quantize_4bit(flat: torch.Tensor, code: torch.Tensor, blocksize: int,
                   slice_elements: int = SLICE) -> tuple[torch.Tensor, torch.Tensor]:
    # bitsandbytes' CPU quantize_4bit, the same operations in the same order (each element
    # scaled by the reciprocal of its block's absmax, clamped to [-1, 1], and given the code
    # whose interval between midpoints holds it; a short last block divided by its absmax),
    # but a cache-sized slice at a time: on the whole tensor it took 2-3 times as long.
    nearest = _NearestCode(code)
    n, bs = flat.numel(), blocksize
    full = n - n % bs
    absmax = torch.empty(-(-n // bs), dtype=torch.float32)
    packed = np.empty(n // 2, dtype=np.uint8)
    step = bs * max(1, slice_elements // bs)
    for start in range(0, full, step):
        end = min(start + step, full)
        blocks = flat[start:end].view(-1, bs)
        top = blocks.abs().amax(dim=1)
        absmax[start // bs:end // bs] = top
        q = nearest((blocks * (1.0 / top.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1))
        packed[start // 2:end // 2] = (q[::2] << 4) | q[1::2]
    if full < n:
        tail = flat[full:]
        top = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = top
        q = nearest(torch.clamp(tail / top, -1, 1))
        packed[full // 2:] = (q[::2] << 4) | q[1::2]
    return torch.from_numpy(packed), absmax


class _NearestCode:
    """The index in a 16-entry code table of each value in [-1, 1], as bitsandbytes picks it:
    ``torch.bucketize`` of the value among the midpoints of the sorted codes, mapped back to
    the table's order. bucketize's binary search was 90% of the encoding (20 ns an element);
    here a uniform grid of ``CELLS`` cells gives each value the bucket of its cell's left
    edge, and two comparisons with the midpoints next to it correct that by one where a
    midpoint lies between the two (never more: the midpoints are over 4 cells apart), which
    is exact (tested on every 97th float32 in [-1, 1], and in the tests on every 997th) and 4 times as fast."""

    CELLS = 4096

    def __init__(self, code: torch.Tensor) -> None:
        order = torch.argsort(code)
        self.bounds = (code[order[:-1]] + code[order[1:]]) / 2
        self.remap = order.to(torch.uint8).numpy()
        self.grid = bool((self.bounds.diff() > 4 * 2 / self.CELLS).all())
        if self.grid:
            edges = torch.linspace(-1, 1, self.CELLS + 1, dtype=torch.float64)[:-1].float()
            self.left = torch.bucketize(edges, self.bounds).numpy().astype(np.int64)
            # bounds[q - 1] and bounds[q] for every bucket q, with -inf and +inf at the ends.
            inf = np.array([np.inf], dtype=np.float32)
            self.around = np.concatenate([-inf, self.bounds.numpy(), inf])

    def __call__(self, scaled: torch.Tensor) -> np.ndarray:
        if not self.grid:  # another table, with midpoints too close for the grid
            q = torch.bucketize(scaled, self.bounds).numpy()
        else:
            s = scaled.numpy()
            cell = np.clip(((s + 1.0) * (self.CELLS / 2)).astype(np.int64), 0, self.CELLS - 1)
            q = self.left[cell]
            q += s > self.around[q + 1]
            q -= s <= self.around[q]
        return self.remap[q]


def bnb_decode(parts: Mapping[str, Any], params: Mapping[str, Any], *, quant_type: str, numel: int) -> torch.Tensor:
    if params.get("quant_type") != quant_type:
        raise EncodingError(f"param 'quant_type' must be {quant_type!r}, got {shown(params.get('quant_type'))}")
    bs = params.get("blocksize")
    if bs not in BNB_BLOCKSIZES or isinstance(bs, bool):
        raise EncodingError(f"param 'blocksize' must be one of {', '.join(map(str, BNB_BLOCKSIZES))}, got {shown(bs)}")
    n_even = numel + numel % 2
    if params.get("quant_shape") != [n_even] or params.get("quant_dtype") != "F32":
        raise EncodingError(f"params 'quant_shape'/'quant_dtype' must be [{n_even}]/'F32' for {numel} elements, "
                            f"got {shown(params.get('quant_shape'))}/{shown(params.get('quant_dtype'))}")
    data = _part(parts, "data", torch.uint8, n_even // 2)
    absmax = _part(parts, "absmax", torch.float32, -(-n_even // bs))
    code = _part(parts, "code", torch.float32, 16)
    if not numel:
        return torch.empty(0)
    F = _bnb()
    if _bytes(code).tobytes() == _bytes(F.get_4bit_type(quant_type, device="cpu").float()).tobytes():
        state = F.QuantState(absmax=absmax, shape=torch.Size([n_even]), code=code, blocksize=bs,
                             quant_type=quant_type, dtype=torch.float32)
        out = F.dequantize_4bit(data.view(-1, 1), quant_state=state)
    else:
        # Made with another code table than this bitsandbytes has: bitsandbytes' dequantisation
        # (code[nibble] * absmax of the block, high nibble first) with the recorded table.
        nibbles = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1).long()
        out = code[nibbles] * absmax.repeat_interleave(bs)[:n_even]
    return out.reshape(-1)[:numel]


# -- lowrank: truncated SVD --------------------------------------------------------------------

@dataclass(frozen=True)
class GramBasis:
    """What ``truncated_svd`` finds of a float32 matrix before it picks a rank, kept to serve
    every rank: the right singular vectors (of the transpose, for a wide matrix) as the
    eigenvectors of the Gram matrix of ``a * 2**-shift``, largest first, signs fixed, the first
    ``vectors.shape[1]`` of them; ``values``: all singular values of ``a``, descending."""

    vectors: torch.Tensor
    values: torch.Tensor
    shift: int


def gram_basis(a: torch.Tensor, *, keep: int) -> GramBasis:
    """``a``'s ``GramBasis`` with its first ``keep`` vectors (one eigendecomposition)."""
    a, _, top = _upright(a)
    if top == 0:
        return GramBasis(torch.zeros(a.shape[1], 0), torch.zeros(a.shape[1], dtype=torch.float64), 0)
    shift = math.frexp(top)[1]
    values, vectors = _eigen(_times_pow2(a, -shift))
    scaled = values.double().clamp_min(0.0).sqrt() * 2.0 ** shift
    # clone, not contiguous: LAPACK's column-major layout is kept, and with it the order in
    # which `a @ v` sums (the bytes of U*S do not change with a basis).
    return GramBasis(vectors[:, :keep].clone(), scaled, shift)


def _upright(a: torch.Tensor) -> tuple[torch.Tensor, bool, float]:
    # A wide matrix is factored through its transpose (the smaller Gram matrix); and its largest
    # magnitude, from which the power-of-two normalisation is taken.
    tall = a.shape[0] >= a.shape[1]
    a = a if tall else a.T
    return a, tall, float(a.abs().max()) if a.numel() else 0.0


def _eigen(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The eigenvalues (descending) and eigenvectors of a's Gram matrix, each vector's largest
    # entry positive.
    w, v = torch.linalg.eigh(a.T @ a)  # ascending eigenvalues
    v = v.flip(1)
    sign = torch.where(v.gather(0, v.abs().argmax(dim=0, keepdim=True)) < 0, -1.0, 1.0)
    return w.flip(0), v * sign


def truncated_svd(a: torch.Tensor, rank: int, *, basis: GramBasis | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U*S, Vh) of float32 `a`'s best rank-`rank` approximation.

    A full SVD of an embedding-sized matrix takes ~10 s on two cores; the eigenvectors of the
    small Gram matrix (min(m, n) square) are the right singular vectors, and `a` times them is
    U*S, in about a second. Squaring loses the directions below ~3e-4 of the largest singular
    value, whose share of the energy is under 1e-7: the approximation stays the best one to
    that. Signs are fixed (each Vh row's largest entry is positive) so that the bytes do not
    depend on the LAPACK build. `basis`: ``gram_basis(a)`` with at least `rank` vectors, made
    once for several ranks; the result is the same bytes as without it.
    """
    a, tall, top = _upright(a)
    if top == 0:
        us, vh = torch.zeros(a.shape[0], rank), torch.zeros(rank, a.shape[1])
    else:
        shift = math.frexp(top)[1]  # an exact power-of-two normalisation keeps the Gram in range
        a = _times_pow2(a, -shift)
        if basis is not None and basis.shift == shift and basis.vectors.shape[1] >= rank:
            v = basis.vectors[:, :rank]
        else:
            v = _eigen(a)[1][:, :rank]
        us = _times_pow2(a @ v, shift)
        vh = v.T
    return (us.contiguous(), vh.contiguous()) if tall else (vh.T.contiguous(), us.T.contiguous())


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 10, iterations: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U*S, Vh, energy held) of a rank-`rank` approximation of float32 `a` by a randomized SVD
    (Halko, Martinsson and Tropp 2011): a seeded Gaussian sketch of `rank + oversample` columns,
    `iterations` power iterations, each re-orthonormalised.

    It costs a few products of `a` with thin matrices instead of an eigendecomposition per
    matrix. The result is ``P a`` for an orthogonal projection P, so the energy it holds,
    ||P a||^2 / ||a||^2, is measured exactly (not estimated); it is at most what the exact
    truncated SVD holds. Signs are fixed as ``truncated_svd`` fixes them.
    """
    a = a.to(torch.float32)
    m, n = a.shape
    total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    k = min(rank + oversample, m, n)
    if total == 0.0 or not math.isfinite(total):
        return torch.zeros(m, rank), torch.zeros(rank, n), 1.0
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(a @ torch.randn(n, k, generator=gen)).Q
    for _ in range(iterations):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    r = min(rank, s.shape[0])
    vh = vh[:r]
    sign = torch.where(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)) < 0, -1.0, 1.0)
    vh = vh * sign
    us = (q @ u_small[:, :r]) * (s[:r] * sign.reshape(-1))
    held = float((s[:r].double() ** 2).sum()) / total
    if r < rank:  # a matrix smaller than the rank: the rest of the pair is zero
        us = torch.cat([us, torch.zeros(m, rank - r)], dim=1)
        vh = torch.cat([vh, torch.zeros(rank - r, n)], dim=0)
    return us.contiguous(), vh.contiguous(), min(held, 1.0)


def _times_pow2(t: torch.Tensor, exp: int) -> torch.Tensor:
    # In steps that float32 can hold (2**128 is not a float32): exact, bar a subnormal result.
    while abs(exp) > 100:
        step = 100 if exp > 0 else -100
        t, exp = t * 2.0 ** step, exp - step
    return t * 2.0 ** exp


def lowrank_encode(dw: torch.Tensor, *, rank: int, dtype: str,
                   basis: GramBasis | None = None) -> tuple[Parts, dict[str, Any]]:
    us, vh = truncated_svd(dw, rank, basis=basis)
    _, exp = fp16_scales(us.abs().amax().reshape(1) if us.numel() else torch.empty(0))
    t = FACTOR_DTYPES[dtype]
    parts = {"us": _bytes((us.double() * 2.0 ** -exp).to(t)), "vh": _bytes(vh.to(t))}
    return parts, {"rank": rank, "dtype": dtype, "scale_exp": exp}


def lowrank_decode(parts: Mapping[str, Any], params: Mapping[str, Any], *, rows: int, cols: int) -> torch.Tensor:
    rank = int_param(params, "rank", 1, min(rows, cols))
    dtype = params.get("dtype")
    if not isinstance(dtype, str) or dtype not in FACTOR_DTYPES:
        raise EncodingError(f"param 'dtype' must be one of {', '.join(FACTOR_DTYPES)}, got {shown(dtype)}")
    exp = exp_param(params)
    us = _part(parts, "us", FACTOR_DTYPES[dtype], rows * rank).view(rows, rank)
    vh = _part(parts, "vh", FACTOR_DTYPES[dtype], rank * cols).view(rank, cols).double()
    out = torch.empty(rows, cols, dtype=torch.float32)
    # float64, where products of bf16/fp16 factors are exact and sums of a few hundred of them
    # nearly so: the float32 result does not hang on the BLAS's order of summation. In row
    # chunks, to bound the float64 temporary.
    step = max(1, (1 << 23) // max(cols, 1))
    for i in range(0, rows, step):
        out[i:i + step] = (us[i:i + step].double() @ vh).mul_(2.0 ** exp)
    return out
