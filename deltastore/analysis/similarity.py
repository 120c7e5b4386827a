"""How alike several versions of one base are: the store-facing half of ``analyze --similarity``.

For the deltas dW_i = (what apply produces for version i) - base, accumulated in float64 one
tensor at a time, it keeps only their Gram matrix <dW_i, dW_j> per (layer, module kind) and for
the whole model. Everything it reports comes from those small matrices:

- the cosine similarity of every pair, <dW_i, dW_j> / (||dW_i|| ||dW_j||);
- for each version, the share of its delta's energy ||dW_i||^2 that lies along the mean of the
  deltas (the direction they share), <dW_i, m>^2 / (||m||^2 ||dW_i||^2), and the rest, its own.

Memory stays at one tensor per version (and a float64 block of about 32 MiB). It reads the store
and never writes to it; the picture is plots.py's ``similarity_plot``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import torch

from ..metrics.analysis import locate, row_order
from ..core.pools import in_order
from ..core.errors import AnalysisError

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["Overlap", "Similarity", "overlap", "similarity"]

# Elements of each delta converted to float64 at a time: 32 MiB per version.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Overlap:
    """How the deltas of the versions line up over some tensors: one (layer, module kind) cell,
    or the whole model (``module`` None).

    ``energy[i]`` is ||dW_i||^2; ``cosine`` holds one value per pair, in ``Similarity.pairs``
    order; ``shared[i]`` the share of ``energy[i]`` along the mean delta and ``own[i]`` the rest.
    A cosine or share is None where a delta it needs is zero over these tensors.
    """

    layer: int | None
    module: str | None
    tensors: int
    energy: tuple[float, ...]
    cosine: tuple[float | None, ...]
    shared: tuple[float | None, ...]
    own: tuple[float | None, ...]


@dataclass(frozen=True)
class Similarity:
    """``analyze --similarity``: the versions compared (``refs``, ``version_ids``), their
    ``pairs`` (index pairs into ``refs``), the whole ``model`` and one row per (layer, module
    kind) that any of them changed. ``skipped``: tensors whose delta is not defined (a shape or
    dtype that differs from the base's, or not floating point), left out of every figure."""

    refs: tuple[str, ...]
    version_ids: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    model: Overlap
    rows: tuple[Overlap, ...]
    skipped: tuple[str, ...] = ()


def overlap(gram: Sequence[Sequence[float]], *, layer: int | None = None, module: str | None = None,
            tensors: int = 0) -> Overlap:
    """The cosines and energy shares that Gram matrix ``gram`` (<dW_i, dW_j>) holds."""
    n = len(gram)
    energy = tuple(float(gram[i][i]) for i in range(n))
    cosine = tuple(_cosine(gram, i, j) for i, j in combinations(range(n), 2))
    # <dW_i, m> with m the mean delta, and ||m||^2.
    along = [math.fsum(gram[i]) / n for i in range(n)]
    mean_energy = math.fsum(math.fsum(row) for row in gram) / (n * n)
    shared: list[float | None] = []
    for i in range(n):
        if energy[i] <= 0.0:
            shared.append(None)
        elif mean_energy <= 0.0:
            shared.append(0.0)  # the deltas cancel: no direction is shared
        else:
            shared.append(min(1.0, along[i] * along[i] / (mean_energy * energy[i])))
    own = tuple(None if s is None else 1.0 - s for s in shared)
    return Overlap(layer, module, tensors, energy, cosine, tuple(shared), own)


def _cosine(gram: Sequence[Sequence[float]], i: int, j: int) -> float | None:
    if gram[i][i] <= 0.0 or gram[j][j] <= 0.0:
        return None
    return max(-1.0, min(1.0, gram[i][j] / math.sqrt(gram[i][i] * gram[j][j])))


def _gram(base: torch.Tensor, results: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """<dW_i, dW_j> of one tensor, dW_i = results[i] - base (zero where results[i] is None),
    accumulated in float64 block by block."""
    n = len(results)
    gram = torch.zeros(n, n, dtype=torch.float64)
    flat_base = base.detach().reshape(-1)
    flats = [None if r is None else r.detach().reshape(-1) for r in results]
    for start in range(0, flat_base.numel(), _BLOCK_ELEMENTS):
        b = flat_base[start:start + _BLOCK_ELEMENTS].to(device="cpu", dtype=torch.float64)
        block = torch.zeros(n, b.numel(), dtype=torch.float64)
        for i, flat in enumerate(flats):
            if flat is not None:
                block[i] = flat[start:start + _BLOCK_ELEMENTS].to(device="cpu", dtype=torch.float64) - b
        gram.addmm_(block, block.T)
    return gram


def _defined(base: torch.Tensor | None, result: torch.Tensor) -> bool:
    return (base is not None and base.shape == result.shape and base.is_floating_point()
            and result.is_floating_point())


def similarity(store: Store, refs: Sequence[str], *, base_weights: Any = None,
               progress: Callable[[int, int], None] | None = None) -> Similarity:
    """Cosine similarity of every pair of the versions' deltas and each one's shared and own
    share of energy, per (layer, module kind) and over the whole model (see ``Similarity``).
    The versions must share one base; a tensor a version does not store is its base's (a zero
    delta)."""
    if len(refs) < 2:
        raise AnalysisError("similarity compares two refs or more: give at least two")
    versions = [store.resolve(ref) for ref in refs]
    ids = [v.id for v in versions]
    for k, v in enumerate(versions):
        if v.id in ids[:k]:
            raise AnalysisError(f"{refs[k]} is the same version as {refs[ids.index(v.id)]}: give each version once")
        if v.base_id != versions[0].base_id:
            raise AnalysisError(f"{v.ref} is on base {v.base_id[:19]}, {versions[0].ref} on {versions[0].base_id[:19]}: "
                                "similarity compares versions of one base")
    source = store.base_source(store.base(versions[0].base_id), base_weights)
    producers = [store.materialize(v, base_weights=source)[1] for v in versions]
    stored = [{e.name for e in v.tensors} for v in versions]
    names = sorted(set().union(*stored))

    def work(name: str) -> torch.Tensor | None:
        base = source.get(name) if name in source else None
        results = [producers[i](name) if name in stored[i] else None for i in range(len(versions))]
        if base is None or not all(r is None or _defined(base, r) for r in results):
            return None
        return _gram(base, results)

    n = len(versions)
    total = torch.zeros(n, n, dtype=torch.float64)
    cells: dict[tuple[int | None, str], tuple[torch.Tensor, int]] = {}
    skipped = []
    for done, (name, gram) in enumerate(in_order(names, work, ahead=8), start=1):
        if gram is None:
            skipped.append(name)
        else:
            where = locate(name)
            key = (where.layer, where.module)
            cell, count = cells.get(key, (torch.zeros(n, n, dtype=torch.float64), 0))
            cells[key] = (cell + gram, count + 1)
            total += gram
        if progress:
            progress(done, len(names))
    rows = tuple(overlap(cells[key][0].tolist(), layer=key[0], module=key[1], tensors=cells[key][1])
                 for key in sorted(cells, key=row_order))
    return Similarity(tuple(v.ref for v in versions), tuple(ids), tuple(combinations(range(n), 2)),
                      overlap(total.tolist(), tensors=sum(c for _, c in cells.values())), rows, tuple(skipped))
