"""How large a fine-tune's change of one tensor is: ||dW|| / ||W|| and ||dW||^2, and squared
norms, accumulated in fp32 a cache-sized slice at a time (no fp32 copy of a large tensor)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch

from .rawnorms import CHUNK


def delta_stats(base: torch.Tensor | None, target: torch.Tensor, base_sq_norm: float | None = None, *,
                blocks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
                ) -> tuple[float | None, float]:
    """(||dW|| / ||W||, ||dW||^2); (None, ||target||^2) where no base tensor matches.

    The difference is taken in the tensors' own dtype: for two nearby floats it is exact
    (Sterbenz), and it avoids fp32 copies of a 150M-element embedding. Norms accumulate in
    fp32; ||W||^2 comes from `base add` when it recorded it. `blocks()`: the two tensors as
    flat (base, target) pieces in order, each a whole number of CHUNKs but the last (mapped
    files read a block at a time): the same terms summed in the same order, the same figures."""
    if not (target.is_floating_point() and base is not None and base.shape == target.shape
            and base.dtype == target.dtype) or target.element_size() == 1:
        # No matching base, an integer tensor, or float8 (which torch cannot subtract).
        if base is None or base.shape != target.shape:
            return None, float(torch.linalg.vector_norm(target.double())) ** 2
        d2 = float(torch.linalg.vector_norm(target.double() - base.double())) ** 2
        w2 = float(torch.linalg.vector_norm(base.double())) ** 2
        return (math.sqrt(d2 / w2) if w2 > 0 and math.isfinite(d2 / w2) else None), d2
    pairs = blocks() if blocks is not None else [(base, target)]
    d2 = sq_diff_blocks((t, b) for b, t in pairs)
    w2 = base_sq_norm if base_sq_norm is not None else sq_norm(base)
    rel = math.sqrt(d2 / w2) if w2 and math.isfinite(d2 / w2) else None
    return rel, d2


def sq_norm(t: torch.Tensor) -> float | None:
    """||t||^2 of a float tensor, accumulated in fp32 (fp64 for fp64); None for other tensors
    or where it is not finite."""
    if not t.is_floating_point():
        return None
    value = sum(_sq(c) for c in _chunks(t))
    return value if math.isfinite(value) else None


def sq_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2 of two tensors of one shape and dtype, as `sq_norm` accumulates it."""
    return sq_diff_blocks([(a, b)])


def sq_diff_blocks(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """`sq_diff` of two tensors given as flat (a, b) pieces in order, each a whole number of
    CHUNKs but the last: the same terms, summed in the same order, give the same figure."""
    return sum(sq_diff_terms(pairs))


def sq_diff_terms(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[float]:
    """The terms `sq_diff_blocks` sums, one per CHUNK, in order (to be summed later in one `sum`)."""
    return (_sq(ac - bc) for a, b in pairs for ac, bc in zip(_chunks(a), _chunks(b)))


def _sq(c: torch.Tensor) -> float:
    if c.element_size() == 1:  # float8 promotes to nothing: widen it first
        c = c.float()
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(c, dtype=acc)) ** 2


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Norms of a 150M-element embedding, chunk by chunk: the fp32 temporaries stay small.
    return t.reshape(-1).split(CHUNK)
