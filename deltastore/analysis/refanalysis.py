"""What stored versions changed against their base: the store-facing half of ``analyze``.

``analyze``: for each ref, every tensor apply would produce compared with the base's
(relative change, energy, effective ranks, top singular values; with ``alpha=True``
WeightWatcher's alpha before and after, from alpha.py), and their summary per (layer,
module). ``spectra``: the singular values of one matrix in the base, as applied, and of their
difference. The arithmetic is analysis.py's, the pictures plots.py's. It reads the store and
never writes to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..metrics.alpha import AlphaShift, alpha_shift, load_weightwatcher, matrix_alpha, summarize_alpha
from ..metrics.analysis import ModuleChange, TensorChange, singular_values, summarize, tensor_change
from ..core.pools import in_order
from ..core.errors import AnalysisError

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["RefAnalysis", "Spectra", "analyze", "spectra"]


@dataclass(frozen=True)
class RefAnalysis:
    """What one version's applied tensors changed against its base: per tensor (``changes``)
    and per (layer, module kind) (``rows``)."""

    ref: str
    version_id: str
    encoding: str
    tensors: int
    rows: tuple[ModuleChange, ...]
    changes: Mapping[str, TensorChange] = field(repr=False, compare=False)
    #: With ``alpha=True``: WeightWatcher's alpha of every tensor in the base and as applied
    #: (``alphas``) and per (layer, module) row (``row_alphas``); None otherwise.
    alphas: Mapping[str, AlphaShift] | None = field(default=None, repr=False, compare=False)
    row_alphas: Mapping[tuple[int | None, str], AlphaShift] | None = field(default=None, repr=False,
                                                                           compare=False)

    def to_json(self) -> dict[str, Any]:
        """One ref of `analyze --json`; with alphas, each row gets alpha_base, alpha_ft and
        alpha_shift (None where WeightWatcher fits none), and "alpha" gives them per tensor."""
        rows = [asdict(r) for r in self.rows]
        out = {"ref": self.ref, "id": self.version_id, "encoding": self.encoding, "tensors_stored": self.tensors,
               "rows": rows}
        if self.row_alphas is not None:
            for row, r in zip(rows, self.rows):
                row.update(asdict(self.row_alphas.get((r.layer, r.module)) or AlphaShift(None, None, None)))
            out["alpha"] = {name: asdict(a) for name, a in (self.alphas or {}).items()}
        return out


def _unchanged(base: torch.Tensor) -> TensorChange:
    norm = float(torch.linalg.vector_norm(base.detach(), dtype=torch.float32)) if base.is_floating_point() else 0.0
    matrix = base.dim() == 2
    return TensorChange(shape=tuple(base.shape), base_norm=norm, delta_norm=0.0, rel_change=0.0, energy=0.0,
                        rank90=0 if matrix else None, rank99=0 if matrix else None, singular_values=(),
                        spectrum=())


def _measure(b: torch.Tensor | None, result: torch.Tensor, top: int) -> TensorChange:
    if b is None or b.shape != result.shape or not b.is_floating_point() or not result.is_floating_point():
        size = float(torch.linalg.vector_norm(result.double())) if result.is_floating_point() else 0.0
        return TensorChange(tuple(result.shape), 0.0, size, math.inf, size * size, None, None, ())
    return tensor_change(b, result, top=top)


def analyze(store: Store, refs: Sequence[str], *, base_weights: Any = None, top: int = 5, alpha: bool = False,
            progress: Callable[[int, int], None] | None = None) -> list[RefAnalysis]:
    """For each ref, every tensor apply would produce compared with the base's: relative change,
    energy, effective ranks and top singular values, and their summary per (layer, module).

    ``alpha=True`` adds WeightWatcher's power-law alpha of each matrix in the base and as
    applied (the optional weightwatcher package; ``AlphaUnavailable`` before any work when it
    is missing)."""
    ww = load_weightwatcher() if alpha else None
    # A base matrix's alpha, shared by every ref on that base: (base id, name) -> alpha.
    base_alphas: dict[tuple[str, str], float | None] = {}
    out = []
    versions = [store.resolve(ref) for ref in refs]
    for k, version in enumerate(versions):
        base = store.base(version.base_id)
        source = store.base_source(base, base_weights)
        infos, tensor = store.materialize(version, base_weights=source)
        entries = {e.name for e in version.tensors}

        def work(name: str) -> tuple[TensorChange, torch.Tensor | None, torch.Tensor | None]:
            b = source.get(name) if name in source else None
            stored = name in entries
            result = tensor(name) if stored else b
            change = _measure(b, result, top) if stored else _unchanged(b)
            # The tensors go back to this (main) thread only when their alpha is wanted: the
            # fit prints, so it runs here, one matrix at a time, while workers read the next.
            return (change, b, result) if ww is not None else (change, None, None)

        changes: dict[str, TensorChange] = {}
        alphas: dict[str, AlphaShift] = {}
        for j, (name, (change, b, result)) in enumerate(in_order(list(infos), work)):
            changes[name] = change
            if ww is not None:
                key = (version.base_id, name)
                if key not in base_alphas:
                    base_alphas[key] = matrix_alpha(ww, b)
                # A tensor the version does not store is the base's own: the same alpha.
                tuned = base_alphas[key] if name not in entries else matrix_alpha(ww, result)
                alphas[name] = alpha_shift(base_alphas[key], tuned)
            del b, result  # not held while the next tensor is awaited
            if progress:
                progress(k * len(infos) + j + 1, len(versions) * len(infos))
        out.append(RefAnalysis(version.ref, version.id, version.encoding, len(entries),
                               tuple(summarize(changes)), changes,
                               alphas if ww is not None else None,
                               summarize_alpha(alphas) if ww is not None else None))
    return out


@dataclass(frozen=True)
class Spectra:
    """The singular values, descending, of one 2-D tensor of the base, of what a version applies,
    and of their difference."""

    ref: str
    name: str
    base: tuple[float, ...]
    tuned: tuple[float, ...]
    delta: tuple[float, ...]


def spectra(store: Store, refs: Sequence[str], name: str, *, base_weights: Any = None) -> list[Spectra]:
    """``Spectra`` of tensor ``name`` for each ref (what ``analyze --spectrum NAME`` draws)."""
    out = []
    for ref in refs:
        version = store.resolve(ref)
        source = store.base_source(store.base(version.base_id), base_weights)
        infos, tensor = store.materialize(version, base_weights=source)
        if name not in infos:
            close = [n for n in infos if name in n][:3]
            raise AnalysisError(f"{version.ref} has no tensor {name!r}" + (f"; did you mean {', '.join(close)}?"
                                                                          if close else ""))
        b, t = source.get(name), tensor(name)
        if b.dim() != 2 or t.shape != b.shape or not b.is_floating_point():
            raise AnalysisError(f"{name} is not a floating-point matrix of one shape in base and {version.ref}: "
                               "it has no spectrum")
        b32, t32 = b.to(torch.float32), t.to(torch.float32)
        out.append(Spectra(version.ref, name, tuple(singular_values(b32).tolist()),
                           tuple(singular_values(t32).tolist()), tuple(singular_values(t32 - b32).tolist())))
    return out
