"""mixedrank: a delta's singular vectors at mixed precision, in the bytes of a bf16 lowrank:R.

Delta-CoMe (Ping et al., 2024) observed that a fine-tune's delta has a long tail of singular
values: a bf16 low-rank factorisation spends 16 bits on each of its R directions and nothing on
the rest, where a few bits each for many more directions keep more of it. Here each direction
i of dW = sum_i s_i u_i v_i^T gets a width b_i in BITS (or none), chosen so that the squared
error is least for the bytes of lowrank:R (16 * R * (m + n) bits, the group scales included;
at least those of one 8-bit direction):

- the error of every direction at every width is measured exactly (the quantised vectors'
  inner products give ||s_i (u_i v_i^T - uq_i vq_i^T)||^2), then the widths are chosen by a
  Lagrangian bisection, as rate-distortion theory's reverse water-filling does: a direction's
  bits follow the log of its energy;
- U*S is quantised at those widths, then V is fitted again to dW given the quantised U (least
  squares), so V absorbs U's rounding error before it is quantised itself.

At most 4R directions are kept, so that a decode costs at most four lowrank:R decodes.

Layout (little-endian, part of the on-disk format; FORMAT.md §4):
- params `bits`: the width of each kept direction, in order (largest singular value first);
  `group_size`; `u_exp`, `v_exp`: the power-of-two exponents of the two parts' scales.
- `u`: the codes of U*S's columns, column after column (m codes each at its direction's
  width), as one bit stream: code j of a b-bit column is bits [o, o + b) of the stream, least
  significant bit first, where o counts the bits before it; bit t of the stream is bit t % 8
  of byte t // 8. The stream is padded with zero bits to a whole byte.
- `u_scales`: fp16, per column ceil(m / group_size) steps (a group is `group_size`
  consecutive codes of the column, the last may be shorter); a step is the fp16 value times
  2**u_exp.
- `v`, `v_scales`: the same for V's rows (n codes each) with `v_exp`.
- a b-bit code k stands for (k + 1/2 - 2**(b-1)) * step (uniform, mid-rise, no zero level).
- dW = (U V) computed in float64, rounded once to float32.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from .absmax import int_param, part_view
from .quantize import truncated_svd
from ..core.errors import EncodingError
from ..core.limits import shown

#: The widths a direction may be stored at.
BITS = (1, 2, 3, 4, 8)
#: Directions kept at most, per rank of the byte budget (decode cost bound).
DIRECTIONS_PER_RANK = 4
#: Encode side only: each group's step is the one of these fractions of its absmax (as the
#: largest level) that rounds the group best.
_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
_ESTIMATE_CLIPS = (1.0, 0.8, 0.6)  # enough to rank the widths, at half the cost
_EXP_RANGE = (-200, 200)

Parts = dict[str, memoryview]


def budget_bits(rank: int, rows: int, cols: int) -> int:
    """The bits of a bf16 lowrank:`rank` of a rows x cols matrix: what mixedrank:`rank` may spend."""
    return 16 * rank * (rows + cols)


def encode(dw: torch.Tensor, *, rank: int, group_size: int,
           covariance: torch.Tensor | None = None) -> tuple[Parts, dict[str, Any]]:
    """dw: float32 (m, n). The parts and params of its mixedrank:`rank`. With `covariance`
    (n x n: the sum of x x^T over the inputs x the layer met on calibration prompts), the
    directions kept and their widths are those that matter to the layer's outputs on such
    inputs, ||(dW - dW') x||, rather than to the weights (activation-aware, as ASVD and SVD-LLM
    fit low-rank factors): the same layout, decoded the same way."""
    m, n = dw.shape
    cost = {b: (m + n) * b + 16 * (-(-m // group_size) + -(-n // group_size)) for b in BITS}
    # One 8-bit direction is always affordable: on a tiny matrix the scales alone would
    # otherwise take the whole budget.
    budget = max(budget_bits(rank, m, n), cost[BITS[-1]]) if rank else 0
    k = min(m, n, DIRECTIONS_PER_RANK * rank, budget // cost[BITS[0]])
    if k == 0 or not bool(dw.any()):
        return _parts([], np.empty((0, m), np.uint8), np.empty(0), np.empty((0, n), np.uint8), np.empty(0),
                      group_size)
    weighted = covariance is not None
    # S is in one of the two factors, which depends on the shape.
    us, vh = truncated_svd(_whitened(dw, covariance) if weighted else dw, k)
    u, su = _unit_rows(us.T)
    v, sv = _unit_rows(vh)
    widths = _allocate(su * sv, u, v, cost, budget, group_size)
    keep = [i for i, b in enumerate(widths) if b]
    bits = [widths[i] for i in keep]
    if not keep:
        return encode(dw, rank=0, group_size=group_size)
    # U's columns as they are (weighted: unit left singular vectors of dW L, which span the
    # output directions to keep); V is fitted to dW itself below either way.
    uq, u_codes, u_steps = _quantize_rows((u if weighted else us.T)[keep].contiguous(), bits, group_size)
    # V fitted again to dW given the quantised U: least squares in float64, r x r.
    a = torch.from_numpy(uq).T  # (m, r) float64
    v = torch.linalg.solve(a.T @ a + 1e-12 * torch.eye(len(keep), dtype=torch.float64) * float(a.pow(2).sum()),
                           a.T @ dw.double()).float()
    _, v_codes, v_steps = _quantize_rows(v, bits, group_size)
    return _parts(bits, u_codes, u_steps, v_codes, v_steps, group_size)


def decode(parts: Mapping[str, Any], params: Mapping[str, Any], *, rows: int, cols: int) -> torch.Tensor:
    """The float32 dW (rows x cols) the parts hold."""
    bits = params.get("bits")
    if not isinstance(bits, list) or len(bits) > min(rows, cols) or any(
            not isinstance(b, int) or isinstance(b, bool) or b not in BITS for b in bits):
        raise EncodingError(f"param 'bits' must be a list of at most {min(rows, cols)} widths from "
                            f"{', '.join(map(str, BITS))}, got {shown(bits)}")
    g = int_param(params, "group_size", 1)
    u = _dequantize(parts, "u", bits, rows, g, int_param(params, "u_exp", *_EXP_RANGE))
    v = _dequantize(parts, "v", bits, cols, g, int_param(params, "v_exp", *_EXP_RANGE))
    out = torch.zeros(rows, cols, dtype=torch.float32)
    if not bits:
        return out
    ut, vt = torch.from_numpy(u).T, torch.from_numpy(v)
    # float64 products of the exact dequantised values; row chunks bound the temporary.
    step = max(1, (1 << 23) // max(cols, 1))
    for i in range(0, rows, step):
        out[i:i + step] = ut[i:i + step] @ vt
    return out


#: Added to the normalised covariance's diagonal: inputs never seen on the calibration prompts
#: keep a little weight, and the Cholesky factor exists.
DAMPING = 0.01


def _whitened(dw: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """dW L, for covariance C = L L^T (normalised, damped): ||dW L|| = ||dW x|| over the inputs."""
    c = covariance.double()
    if c.shape != (dw.shape[1], dw.shape[1]) or not bool(torch.isfinite(c).all()):
        raise EncodingError(f"an input covariance of shape {tuple(c.shape)} does not fit a {dw.shape[0]}x"
                            f"{dw.shape[1]} weight")
    scale = float(c.diagonal().mean())
    c = (c / scale if scale > 0 else torch.zeros_like(c)) + DAMPING * torch.eye(c.shape[0], dtype=torch.float64)
    return (dw.double() @ torch.linalg.cholesky(c)).float()


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = x.double().norm(dim=1).float()
    live = norms > 0
    return torch.where(live[:, None], x / torch.where(live, norms, 1.0)[:, None], 0.0).contiguous(), norms


# -- widths --------------------------------------------------------------------------------

def _allocate(s: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, cost: dict[int, int], budget: int,
              group_size: int) -> list[int]:
    """The width (0: dropped) of each direction, least total squared error within `budget`."""
    widths = (0, *BITS)
    err = np.empty((len(s), len(widths)))
    s2 = s.double().numpy() ** 2
    err[:, 0] = s2
    for j, b in enumerate(BITS, start=1):
        uq = _quantize_rows(u, [b] * len(s), group_size, _ESTIMATE_CLIPS)[0]
        vq = _quantize_rows(vh, [b] * len(s), group_size, _ESTIMATE_CLIPS)[0]
        un, vn = u.double().numpy(), vh.double().numpy()
        err[:, j] = s2 * (1 - 2 * (un * uq).sum(1) * (vn * vq).sum(1) + (uq ** 2).sum(1) * (vq ** 2).sum(1))
    costs = np.array([0, *(cost[b] for b in BITS)], dtype=np.float64)

    def choose(lam: float) -> np.ndarray:
        return np.argmin(err + lam * costs, axis=1)

    # At hi no direction is worth a bit. Halving from there keeps the choice the same for a
    # delta scaled by a power of two.
    lo, hi = 0.0, 2 * float(s2.max()) / costs[1]
    for _ in range(64):
        mid = (lo + hi) / 2
        if costs[choose(mid)].sum() > budget:
            lo = mid
        else:
            hi = mid
    return [widths[j] for j in choose(hi)]


# -- codes ---------------------------------------------------------------------------------

def _quantize_rows(x: torch.Tensor, bits: list[int], g: int,
                   clips: tuple[float, ...] = _CLIPS) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Each row of float32 `x` at its width: (the dequantised rows, float64; each row's codes;
    the fp16-representable steps of all rows' groups, float64, row after row). Each group's
    step is the one of `clips` (fractions of its absmax as the largest level) that rounds it best."""
    k, length = x.shape
    groups = -(-length // g)
    xp = torch.nn.functional.pad(x.float(), (0, groups * g - length)).view(k, groups, g)
    # Rounded in units of a power of two near the largest value (exact): the squared errors
    # compared below neither overflow nor flush to zero in float32, whatever the delta's scale.
    largest = float(xp.abs().max()) if xp.numel() else 0.0
    shift = math.frexp(largest)[1] if largest > 0 else 0
    xp = xp * 2.0 ** -shift
    top = xp.abs().amax(dim=2).double() if groups else torch.zeros(k, 0, dtype=torch.float64)
    halves = torch.tensor([1 << (b - 1) for b in bits], dtype=torch.float64)[:, None]
    exp = _exp(float((top / (halves - 0.5)).max()) if top.numel() else 0.0)
    h = halves.float()[:, :, None]
    best = torch.full((k, groups), math.inf)
    steps = torch.zeros(k, groups, dtype=torch.float64)
    codes = torch.zeros(xp.shape)
    for clip in clips:
        step = torch.from_numpy(_fp16((top * clip / (halves - 0.5)).numpy(), exp))
        s32 = step.float()[:, :, None]
        c = (xp / torch.where(s32 > 0, s32, 1.0)).add_(h).floor_().clamp_(min=torch.zeros_like(h), max=2 * h - 1)
        err = (c + 0.5 - h).mul_(s32).sub_(xp).pow_(2).sum(dim=2)
        better = err < best
        best = torch.where(better, err, best)
        steps = torch.where(better, step, steps)
        codes = torch.where(better[:, :, None], c, codes)
    steps = steps * 2.0 ** shift
    deq = ((codes.double() + 0.5 - halves[:, :, None]) * steps[:, :, None]).reshape(k, -1)[:, :length]
    flat = codes.reshape(k, -1)[:, :length].to(torch.uint8).numpy()
    return deq.numpy(), list(flat), steps.numpy()


def _exp(top: float) -> int:
    return math.frexp(top)[1] - 15 if top > 0 else 0


def _fp16(values: np.ndarray, exp: int) -> np.ndarray:
    """`values` rounded to what an fp16 times 2**exp holds."""
    return (values * 2.0 ** -exp).astype(np.float16).astype(np.float64) * 2.0 ** exp


def _parts(bits: list[int], u_codes: Any, u_steps: np.ndarray, v_codes: Any, v_steps: np.ndarray,
           g: int) -> tuple[Parts, dict[str, Any]]:
    u_exp, v_exp = _exp(float(u_steps.max()) if u_steps.size else 0.0), _exp(float(v_steps.max()) if v_steps.size else 0.0)
    parts = {"u": _pack(u_codes, bits), "u_scales": _scales(u_steps, u_exp),
             "v": _pack(v_codes, bits), "v_scales": _scales(v_steps, v_exp)}
    return parts, {"bits": list(bits), "group_size": g, "u_exp": u_exp, "v_exp": v_exp}


def _scales(steps: np.ndarray, exp: int) -> memoryview:
    return memoryview((steps.reshape(-1) * 2.0 ** -exp).astype("<f2").tobytes())


def _pack(codes: Any, bits: list[int]) -> memoryview:
    stream = [np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :b].reshape(-1) for c, b in zip(codes, bits)]
    return memoryview(np.packbits(np.concatenate(stream) if stream else np.empty(0, np.uint8), bitorder="little"))


def _dequantize(parts: Mapping[str, Any], name: str, bits: list[int], length: int, g: int, exp: int) -> np.ndarray:
    """(len(bits), length) float64: the rows part `name` holds."""
    total = length * sum(bits)
    packed = part_view(parts, name, np.uint8, -(-total // 8))
    groups = -(-length // g)
    steps = part_view(parts, f"{name}_scales", "<f2", groups * len(bits)).astype(np.float64).reshape(len(bits), groups)
    steps *= 2.0 ** exp
    stream = np.unpackbits(packed, count=total, bitorder="little")
    widths = np.asarray(bits, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(widths * length)[:-1]]).astype(np.int64)
    out = np.empty((len(bits), length))
    for b in sorted(set(bits)):  # every direction of one width at once
        rows = np.flatnonzero(widths == b)
        fields = np.stack([stream[st:st + length * b] for st in starts[rows]]).reshape(len(rows), length, b)
        code = fields[:, :, 0].copy()
        for j in range(1, b):
            code |= fields[:, :, j] << j
        out[rows] = (code + (0.5 - (1 << (b - 1)))) * np.repeat(steps[rows], g, axis=1)[:, :length]
    return out
