"""Every picture deltastore draws, as PNG files: size against KL for ``compare`` (``plot``),
the per (layer, module) heatmap for ``analyze`` (``heatmap``, ``analyze_plot``), the cosine
similarity of versions' deltas in the same layout (``similarity_plot``) and the singular values of
one tensor (``spectrum_plot``).

Each is a bare matplotlib ``Figure`` on the Agg canvas, never pyplot: no window, and no change to
the caller's global backend or figure list. matplotlib is optional (the ``fidelity`` extra) and
slow to import, so it is imported inside the functions that draw. Nothing here computes a
figure: the numbers come from compare.py, analysis.py, refanalysis.py and similarity.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics.analysis import MODULE_KINDS, TensorChange, summarize
from .compare import Comparison, Row, pareto
from ..core.errors import AnalysisError, CompareError
from .refanalysis import RefAnalysis, Spectra
from .similarity import Similarity
from ..core.units import size

__all__ = ["HEATMAP_VALUES", "analyze_plot", "heatmap", "plot", "similarity_grids", "similarity_plot",
           "spectrum_plot"]


def _figure() -> tuple[Any, Any]:
    # matplotlib: optional and slow to import (see above).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg, Figure


_KIND_STYLE = {
    "full": ("#4d4d4d", "s", "full copy"),
    "full-quantized": ("#9467bd", "D", "full model quantised"),
    "delta": ("#1f77b4", "o", "delta encoding"),
    "lora": ("#d62728", "^", "LoRA (rank R)"),
    "selection": ("#2ca02c", "v", "selection"),
}


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def plot(comparison: Comparison, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Size against KL(fine-tuned || stored), both on log scales, one labelled point per row;
    rows whose KL is 0 sit on a line marked 0 under the rest, the base's own KL is a dashed
    line. PNG."""
    rows = [r for r in comparison.rows if r.kind != "base"]
    base_row = next((r for r in comparison.rows if r.kind == "base"), None)
    if any(r.kl is None for r in comparison.rows):
        raise CompareError(f"the plot needs fidelity, which was not measured ({comparison.fidelity_skipped}); "
                           "give --prompts FILE and the base as a Hugging Face model folder")
    FigureCanvasAgg, Figure = _figure()

    positive = [r.kl for r in comparison.rows if r.kl and r.kl > 0]
    low = min(positive) if positive else 1e-6
    high = max(positive) if positive else 1.0
    floor = 10 ** (math.floor(math.log10(low)) - 1)

    fig = Figure(figsize=(10.5, 6.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = [max(r.bytes, 1) for r in rows]
    ys = [r.kl if r.kl > 0 else floor for r in rows]
    base_kl = base_row.kl if base_row is not None and base_row.kl else None
    _scatter(ax, rows, xs, ys, base_kl, floor, high)
    best = pareto(rows)
    if len(best) > 1:  # a step line: the least KL each byte budget can buy
        ax.step([max(r.bytes, 1) for r in best], [r.kl if r.kl > 0 else floor for r in best], where="post",
                color="#2ca02c", linewidth=1.1, alpha=0.7, zorder=2, label="frontier: nothing smaller keeps more")
    ax.set_title(title or f"What each way of storing the fine-tune costs and keeps "
                          f"({comparison.positions} positions)", fontsize=11)
    # The lower left is where no way of storing a fine-tune lands (small and exact).
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    # Labels keep off the base's dashed line and the line that stands for 0.
    _label_points(fig, ax, rows, xs, ys, lines=([base_kl] if base_kl is not None else []) + [floor])
    out = Path(path)
    fig.savefig(out, format="png", dpi=130)
    return out


def _scatter(ax: Any, rows: Sequence[Row], xs: Sequence[float], ys: Sequence[float], base_kl: float | None,
             floor: float, high: float) -> None:
    """The points, one marker per kind of row; the base's KL dashed, 0 as the line at ``floor``."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter

    for kind, (color, marker, label) in _KIND_STYLE.items():
        pts = [(x, y) for x, y, r in zip(xs, ys, rows) if r.kind == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=46, label=label,
                       zorder=3, edgecolors="white", linewidths=0.6)
    if base_kl is not None:
        ax.axhline(base_kl, color="#ff7f0e", linestyle="--", linewidth=1.2, zorder=1,
                   label=f"base model, nothing kept (KL {base_kl:.3g})")
    ax.axhline(floor, color="#bbbbbb", linewidth=0.8, zorder=0)
    ax.set_xlim(min(xs) / 4, max(xs) * 12)  # room for the labels right of the largest
    ax.set_ylim(floor / 4, max(high, base_kl if base_kl is not None else high) * 6)
    # A log axis cannot show 0: the floor line stands for it.
    decades = range(int(math.log10(floor)) + 1, int(math.ceil(math.log10(ax.get_ylim()[1]))) + 1)
    ticks = [floor] + [10.0 ** d for d in decades]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.set_yticklabels(["0 (exact)"] + [f"1e{d}" for d in decades])
    ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes stored (log scale)")
    ax.set_ylabel("KL(fine-tuned || stored), nats per token (log scale)")
    ax.grid(True, which="major", alpha=0.25)


# Where a label may sit, in pixels from its point: nearest first, each ring in eight directions.
_OFFSETS = [(dx, dy) for radius in (7, 16, 28, 42, 58, 76)
            for dx, dy in ((radius, 0), (radius, -radius), (radius, radius), (0, radius), (0, -radius),
                           (-radius, 0), (-radius, radius), (-radius, -radius))]


def _label_points(fig: Any, ax: Any, rows: Sequence[Row], xs: Sequence[float], ys: Sequence[float],
                  lines: Sequence[float]) -> None:
    """Each row's label and size beside its point, left to right, where it covers least of the
    legend, the points, the horizontal ``lines`` and the labels already placed."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = [ax.get_legend().get_window_extent(renderer)]
    points = ax.transData.transform(list(zip(xs, ys)))
    for px, py in points:
        taken.append(Bbox([[px - 8, py - 8], [px + 8, py + 8]]))
    frame = ax.get_window_extent(renderer)
    for level in lines:
        y = ax.transData.transform((xs[0], level))[1]
        taken.append(Bbox([[frame.x0, y - 2], [frame.x1, y + 2]]))
    order = sorted(range(len(rows)), key=lambda i: (points[i][0], points[i][1]))
    for i in order:
        text = f"{_short(rows[i].label)}  {size(rows[i].bytes)}"
        dx, dy, ha, va, box = _place(ax, renderer, text, (xs[i], ys[i]), taken, frame)
        # A label away from its point gets a line to it, so that it cannot be read as a neighbour's.
        arrow = dict(arrowstyle="-", color="#888888", lw=0.6) if math.hypot(dx, dy) > 12 else None
        ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset pixels", ha=ha, va=va,
                    fontsize=8, arrowprops=arrow, zorder=4)
        taken.append(box)


def _place(ax: Any, renderer: Any, text: str, xy: tuple[float, float], taken: Sequence[Any],
           frame: Any) -> tuple[int, int, str, str, Any]:
    """(dx, dy, ha, va, box) of the first offset where ``text`` overlaps nothing ``taken`` and
    stays inside ``frame``, else of the one that costs least (overlap, then distance)."""
    best, best_cost = None, math.inf
    for dx, dy in _OFFSETS:
        ha = "left" if dx > 0 else "right" if dx < 0 else "center"
        va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
        candidate = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset pixels", ha=ha, va=va, fontsize=8)
        box = candidate.get_window_extent(renderer).expanded(1.04, 1.15)
        cost = sum(_overlap(box, other) for other in taken)
        outside = (max(frame.x0 - box.x0, 0) + max(box.x1 - frame.x1, 0)
                   + max(frame.y0 - box.y0, 0) + max(box.y1 - frame.y1, 0))
        cost += outside * 1000 + math.hypot(dx, dy) * 0.01
        candidate.remove()
        if cost < best_cost:
            best, best_cost = (dx, dy, ha, va, box), cost
        if cost < 1:
            break
    return best


def _short(label: str) -> str:
    return label if len(label) <= 38 else label[:35] + "..."


HEATMAP_VALUES: tuple[str, ...] = ("rel_change", "energy", "energy_share", "rank90", "rank99")


def _panels(grids: Mapping[str, Any], layers: Sequence[int | None], modules: Sequence[str],
            path: str | os.PathLike, *, norm: Any, cmap: Any, extend: str, colorbar_label: str, xlabel: str,
            title: str | None, shown: Any, hatch_bad: bool = False) -> None:
    """One panel per grid (layers down, module kinds across) on one colour scale, the layout of
    every heatmap; ``shown`` maps a grid to what is drawn (NaN draws in ``cmap``'s bad colour,
    or, with ``hatch_bad`` and a transparent one, hatched)."""
    FigureCanvasAgg, Figure = _figure()
    columns = len(grids)
    width = max(3.2, 0.42 * len(modules) + 1.1) * columns + 1.3
    height = min(40.0, max(3.0, 0.24 * len(layers) + 1.6))
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns, squeeze=False, sharey=True)
    row_labels = ["—" if layer is None else str(layer) for layer in layers]
    # Tick every layer while the labels fit, else every k-th.
    row_step = max(1, math.ceil(len(layers) / 40))
    image = None
    for index, (ax, (label, grid)) in enumerate(zip(axes[0], grids.items())):
        image = ax.imshow(np.ma.masked_invalid(shown(grid)), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        if hatch_bad:
            ax.patch.set_hatch("///")
            ax.patch.set_edgecolor("#b0b0b0")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(0, len(layers), row_step), row_labels[::row_step], fontsize=8)
        if index == 0:
            ax.set_ylabel("layer (— = outside the blocks)", fontsize=9)
        ax.tick_params(length=2)
    colorbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9, pad=0.02, extend=extend)
    colorbar.set_label(colorbar_label, fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    fig.supxlabel(xlabel, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(Path(path), format="png", dpi=120)


def heatmap(
    panels: Mapping[str, Mapping[str, TensorChange]],
    path: str | Path,
    *,
    value: str = "rel_change",
    title: str | None = None,
) -> Path:
    """Draw one panel per label (layers down, module kinds across) on one colour scale; PNG.

    Cells a panel has no tensor for are white; cells whose value is zero (unchanged) are light
    grey. The scale is logarithmic when the values span more than two decades.
    """
    if value not in HEATMAP_VALUES:
        raise AnalysisError(f"unknown heatmap value {value!r}: use one of {HEATMAP_VALUES}")
    if not panels:
        raise AnalysisError("heatmap needs at least one panel")

    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    tables = {label: summarize(changes) for label, changes in panels.items()}
    keys = {(row.layer, row.module) for rows in tables.values() for row in rows}
    modules = [kind for kind in MODULE_KINDS if any(module == kind for _, module in keys)]
    layers = sorted({layer for layer, _ in keys}, key=lambda layer: (layer is not None, layer or 0))

    grids = []
    for rows in tables.values():
        grid = np.full((len(layers), len(modules)), np.nan)
        for row in rows:
            cell = getattr(row, value)
            grid[layers.index(row.layer), modules.index(row.module)] = (
                np.nan if cell is None else float(cell)
            )
        grids.append(grid)

    stacked = np.stack(grids)
    finite = stacked[np.isfinite(stacked)]
    positive = finite[finite > 0]
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
    else:
        low, high = 0.5, 1.0  # nothing changed: every cell draws as "unchanged"
    if high <= low:
        # One value only: draw it at the top of the scale, not where "small" would be.
        low = high / 2
    use_log = high / low > 100.0
    norm = LogNorm(vmin=low, vmax=high) if use_log else Normalize(vmin=low, vmax=high)
    viridis = matplotlib.colormaps["viridis"]
    cmap = viridis.with_extremes(bad="white", under="#d9d9d9", over=viridis(1.0))

    def shown(grid: Any) -> Any:
        # Zeros (unchanged) sit just under the scale so that they draw in the "under" colour,
        # infinities (a change of an all-zero tensor) over it.
        grid = np.where(grid == 0.0, low * 0.5, grid)
        return np.where(np.isinf(grid), high * 2, grid)

    _panels(dict(zip(tables, grids)), layers, modules, path, norm=norm, cmap=cmap, extend="min",
            colorbar_label=value.replace("_", " ") + (" (log scale)" if use_log else ""),
            xlabel="module kind    (grey: unchanged, white: no such tensor)", title=title, shown=shown)
    return Path(path)


def analyze_plot(analyses: Sequence[RefAnalysis], path: str | os.PathLike, *, value: str = "rel_change") -> Path:
    """``heatmap`` of what ``refanalysis.analyze`` found: one panel per ref, one colour scale."""

    panels: dict[str, Mapping[str, TensorChange]] = {}
    for a in analyses:
        label = f"{a.ref} ({a.encoding})"
        if label in panels:
            label = f"{a.ref} ({a.encoding}, {a.version_id[3:11]})"
        panels[label] = a.changes
    return heatmap(panels, path, value=value, title="relative change ||dW||/||W|| per layer and module")


def similarity_grids(found: Similarity) -> tuple[list[int | None], list[str], dict[str, Any]]:
    """What ``similarity_plot`` draws: the layers (rows), module kinds (columns) and, per pair
    "A vs B", the cosine of each cell (NaN where a delta is zero there)."""
    keys = [(row.layer, row.module) for row in found.rows]
    modules = [kind for kind in MODULE_KINDS if any(module == kind for _, module in keys)]
    layers = sorted({layer for layer, _ in keys}, key=lambda layer: (layer is not None, layer or 0))
    grids: dict[str, Any] = {}
    for p, (i, j) in enumerate(found.pairs):
        grid = np.full((len(layers), len(modules)), np.nan)
        for row in found.rows:
            cosine = row.cosine[p]
            grid[layers.index(row.layer), modules.index(row.module)] = np.nan if cosine is None else cosine
        grids[f"{found.refs[i]} vs {found.refs[j]}"] = grid
    return layers, modules, grids


def similarity_plot(found: Similarity, path: str | os.PathLike) -> Path:
    """The cosine similarity of each pair's deltas per (layer, module): one panel per pair, the
    layout of ``heatmap``, on one diverging scale from -1 (opposite) to 1 (the same direction)."""
    import matplotlib
    from matplotlib.colors import Normalize

    layers, modules, grids = similarity_grids(found)
    tensors = np.zeros((len(layers), len(modules)), dtype=bool)
    for row in found.rows:
        tensors[layers.index(row.layer), modules.index(row.module)] = True

    def shown(grid: Any) -> Any:
        # A cell with tensors but no cosine (a delta is zero there) draws over the scale, in grey.
        return np.where(tensors & np.isnan(grid), 2.0, grid)

    # Cosine 0 is white on this scale: cells without a changed tensor are hatched instead.
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0), over="#d9d9d9")
    _panels(grids, layers, modules, path, norm=Normalize(vmin=-1.0, vmax=1.0), cmap=cmap, extend="neither",
            colorbar_label="cosine similarity of the deltas",
            xlabel="module kind    (grey: a delta is zero there, hatched: no such tensor changed)",
            title="cosine similarity of the deltas per layer and module", shown=shown, hatch_bad=True)
    return Path(path)


def spectrum_plot(spectra_: Sequence[Spectra], path: str | os.PathLike) -> Path:
    """Two panels: the spectra of the base and of each ref's tensor (left), of each delta (right)."""
    FigureCanvasAgg, Figure = _figure()
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    first = spectra_[0]
    left.plot(range(1, len(first.base) + 1), first.base, color="black", linewidth=2.2, label="base")
    for s in spectra_:
        left.plot(range(1, len(s.tuned) + 1), s.tuned, linewidth=1, linestyle="--", label=s.ref)
        right.plot(range(1, len(s.delta) + 1), [max(v, 1e-30) for v in s.delta], linewidth=1.2, label=s.ref)
    for ax, title in ((left, "weights W (base) and W + dW"), (right, "delta dW")):
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(f"singular values of {first.name}", fontsize=11)
    out = Path(path)
    fig.savefig(out, format="png", dpi=120)
    return out
