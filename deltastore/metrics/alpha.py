"""WeightWatcher's power-law alpha of a weight matrix, before and after a fine-tune.

``analyze --alpha`` puts, next to the size of each delta, how the heavy tail of the weights'
eigenvalue spectrum moved: WeightWatcher fits a power law p(lambda) ~ lambda^-alpha to the tail
of the eigenvalues of W^T W, and a smaller alpha is read as a more strongly correlated
(more "trained") matrix. The fit is WeightWatcher's own (the optional ``weightwatcher``
package, ``pip install 'deltastore[alpha]'``), run on one matrix at a time with its default
options, less the plots and the randomised comparison it would otherwise add.

A tensor WeightWatcher does not fit gets no alpha (None): one that is not a floating-point
matrix, one outside WeightWatcher's size limits (fewer than ``min_evals`` or more than
``max_evals`` eigenvalues, more than ``max_N`` rows), or one whose fit fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

from .analysis import locate
from ..core.errors import DeltastoreError

__all__ = ["AlphaShift", "AlphaUnavailable", "alpha_shift", "load_weightwatcher", "matrix_alpha",
           "summarize_alpha"]

INSTALL_HINT = "pip install 'deltastore[alpha]'"


class AlphaUnavailable(DeltastoreError, RuntimeError):
    """The optional weightwatcher package is missing (or fails to import)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing WeightWatcher says reaches the user: it prints banners and fit notes on stdout
    (which would break ``--json``), logs warnings for every small or failed fit, and numpy
    warns about its edge cases. Called from the main thread only (stdout is global)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def load_weightwatcher() -> ModuleType:
    """The weightwatcher module, imported quietly; ``AlphaUnavailable`` when it is missing."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with _quiet():
            import weightwatcher  # optional (the `alpha` extra) and slow to import: only when asked
    except ImportError as e:
        # Missing itself, or present with a dependency that fails to import: say which.
        why = "which is not installed" if e.name == "weightwatcher" else f"which fails to import ({e})"
        raise AlphaUnavailable(f"--alpha needs the weightwatcher package, {why}: {INSTALL_HINT}") from None
    finally:
        # Its import calls logging.basicConfig(level=INFO), which would make every library's
        # INFO messages appear on stderr: put the caller's root logger back as it was.
        root.handlers[:] = handlers
        root.setLevel(level)
    return weightwatcher


@dataclass(frozen=True)
class _Limits:
    min_evals: int
    max_evals: int
    max_N: int  # noqa: N815 (WeightWatcher's name)


def _limits(ww: ModuleType) -> _Limits:
    # WeightWatcher's own defaults, passed to it explicitly so that the check below and its
    # fit agree on which matrices it fits.
    return _Limits(ww.constants.DEFAULT_MIN_EVALS, ww.constants.DEFAULT_MAX_EVALS, ww.constants.DEFAULT_MAX_N)


def _fits(shape: tuple[int, ...], limits: _Limits) -> bool:
    if len(shape) != 2:
        return False
    rows, cols = max(shape), min(shape)  # WeightWatcher's N >= M
    return limits.min_evals <= cols <= limits.max_evals and rows <= limits.max_N


def matrix_alpha(ww: ModuleType, weight: torch.Tensor | None) -> float | None:
    """WeightWatcher's alpha for one weight matrix, or None where it fits none.

    The matrix is checked against WeightWatcher's size limits first, so that a matrix it would
    skip (a 150k-row embedding) is never copied to float64 for nothing."""
    limits = _limits(ww)
    if weight is None or not weight.is_floating_point() or not _fits(tuple(weight.shape), limits):
        return None
    rows, cols = weight.shape
    # WeightWatcher reads layers of a model; a Linear on the meta device allocates nothing, and
    # the tensor itself becomes its weight (WeightWatcher copies it to float, never writes it).
    layer = torch.nn.Linear(cols, rows, bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    with _quiet():
        details = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze(
            plot=False, randomize=False, mp_fit=False,
            min_evals=limits.min_evals, max_evals=limits.max_evals, max_N=limits.max_N)
    if len(details) != 1:
        return None
    row = details.iloc[0]
    alpha = float(row.get("alpha", math.nan))
    # A failed fit reports alpha -1 (status "failed").
    if row.get("status", "success") != "success" or not math.isfinite(alpha) or alpha <= 0:
        return None
    return alpha


@dataclass(frozen=True)
class AlphaShift:
    """Alpha of a matrix (or the mean over a row's matrices) in the base and in the fine-tune,
    and ``alpha_shift`` = (alpha_ft - alpha_base) / alpha_base; None where there is no fit."""

    alpha_base: float | None
    alpha_ft: float | None
    alpha_shift: float | None


def alpha_shift(base: float | None, tuned: float | None) -> AlphaShift:
    shift = (tuned - base) / base if base is not None and tuned is not None else None
    return AlphaShift(base, tuned, shift)


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def summarize_alpha(alphas: Mapping[str, AlphaShift]) -> dict[tuple[int | None, str], AlphaShift]:
    """Per (layer, module kind), as ``analysis.summarize`` groups rows: the mean alphas over the
    row's fitted matrices (one in most models; the experts of a mixture-of-experts layer share
    a row). The shift compares the means over the matrices fitted in both, so that a matrix
    fitted on one side only does not move it."""
    groups: dict[tuple[int | None, str], list[AlphaShift]] = {}
    for name, a in alphas.items():
        where = locate(name)
        groups.setdefault((where.layer, where.module), []).append(a)
    rows = {}
    for key, members in groups.items():
        both = [a for a in members if a.alpha_base is not None and a.alpha_ft is not None]
        paired = alpha_shift(_mean([a.alpha_base for a in both]), _mean([a.alpha_ft for a in both]))
        rows[key] = AlphaShift(_mean([a.alpha_base for a in members if a.alpha_base is not None]),
                               _mean([a.alpha_ft for a in members if a.alpha_ft is not None]),
                               paired.alpha_shift)
    return rows
