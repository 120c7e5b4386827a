"""analyze --similarity on a real model: how alike the three SmolLM2-135M-Instruct stance fine-tunes are.

    python examples/similarity_smollm.py     # writes its section of examples/RESULTS.md and the heatmap

Uses examples/smollm.py for the base folder and the (cached) fine-tunes, commits each stance
lossless to a temporary store, and measures the cosine similarity of every pair of deltas and
each delta's share of energy along their mean. Its section of RESULTS.md sits between two
markers, so that compare_smollm.py and this script each rewrite only their own part.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import smollm  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.metrics.analysis import MODULE_KINDS  # noqa: E402
from deltastore.analysis.plots import similarity_plot  # noqa: E402
from deltastore.analysis.similarity import overlap, similarity  # noqa: E402

BEGIN, END = "<!-- similarity_smollm.py -->", "<!-- end similarity_smollm.py -->"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def by_module(found) -> dict[str, object]:
    """The rows summed over the layers, per module kind: each row's Gram matrix rebuilt from its
    energies and cosines, <dW_i, dW_j> = cos_ij ||dW_i|| ||dW_j||."""
    n = len(found.refs)
    grams: dict[str, list[list[float]]] = {}
    counts: dict[str, int] = {}
    for row in found.rows:
        gram = grams.setdefault(row.module, [[0.0] * n for _ in range(n)])
        counts[row.module] = counts.get(row.module, 0) + row.tensors
        for i in range(n):
            gram[i][i] += row.energy[i]
        for p, (i, j) in enumerate(found.pairs):
            if row.cosine[p] is not None:
                value = row.cosine[p] * math.sqrt(row.energy[i] * row.energy[j])
                gram[i][j] += value
                gram[j][i] += value
    return {kind: overlap(grams[kind], module=kind, tensors=counts[kind]) for kind in MODULE_KINDS if kind in grams}


def main() -> None:
    base = smollm.base_folder()
    tuned = {stance: smollm.finetune(base, stance) for stance in smollm.stances()["stances"]}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        for stance, folder in tuned.items():
            store.commit(stance, folder, base=str(base), encoding="lossless")
        start = time.perf_counter()
        found = similarity(store, list(tuned))
        seconds = time.perf_counter() - start
        store.close()
    similarity_plot(found, HERE / "similarity-smollm.png")

    pairs = [f"{found.refs[i]} vs {found.refs[j]}" for i, j in found.pairs]
    lines = [
        BEGIN,
        f"## analyze --similarity: how alike the three stances are ({seconds:.0f} s)",
        "",
        "Written by `python examples/similarity_smollm.py`: the three stance fine-tunes above, each committed "
        "lossless; dW is each fine-tune minus the base, in float64. Cosine: <dW_i, dW_j> / (||dW_i|| ||dW_j||). "
        "Shared: the share of a delta's energy ||dW_i||^2 along the mean of the three deltas; own: the rest.",
        "",
        "| pair | cosine, whole model |",
        "| --- | ---: |",
        *(f"| {label} | {_cosine(c)} |" for label, c in zip(pairs, found.model.cosine)),
        "",
        "| stance | energy (squared norm of dW) | shared | own |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {ref} | {energy:.4g} | {_share(shared)} | {_share(own)} |"
          for ref, energy, shared, own in zip(found.refs, found.model.energy, found.model.shared,
                                              found.model.own)),
        "",
        "Per module kind, over all layers:",
        "",
        "| module | tensors | " + " | ".join(f"cos {i + 1}-{j + 1}" for i, j in found.pairs) + " | "
        + " | ".join(f"shared {k + 1}" for k in range(len(found.refs))) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in found.pairs) + " | "
        + " | ".join("---:" for _ in found.refs) + " |",
    ]
    for kind, o in by_module(found).items():
        lines.append(f"| {kind} | {o.tensors} | " + " | ".join(_cosine(c) for c in o.cosine) + " | "
                     + " | ".join(_share(s) for s in o.shared) + " |")
    cosines = [c for c in found.model.cosine if c is not None]
    shared = [x for x in found.model.shared if x is not None]
    lines += [
        "",
        f"What it shows: over the whole model the pairs' cosines are {min(cosines):+.3f} to {max(cosines):+.3f}, "
        f"and {min(shared):.0%} to {max(shared):.0%} of each stance's energy lies along the mean of the three "
        f"deltas, where {len(found.refs)} unrelated deltas of equal size would give 1/{len(found.refs)} "
        f"({1 / len(found.refs):.0%}): the stances move the weights in partly the same direction, and most of "
        "each delta is its own.",
    ]
    cells = [r for r in found.rows if r.cosine[0] is not None]
    cells.sort(key=lambda r: r.cosine[0])
    lines += [
        "",
        "(" + ", ".join(f"{k + 1} = {ref}" for k, ref in enumerate(found.refs)) + ")",
        "",
        f"The (layer, module) cells where {pairs[0]} agree least and most:",
        "",
        "| layer | module | " + " | ".join(f"cos {i + 1}-{j + 1}" for i, j in found.pairs) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in found.pairs) + " |",
    ]
    for r in [*cells[:3], *cells[-3:]]:
        lines.append(f"| {'-' if r.layer is None else r.layer} | {r.module} | "
                     + " | ".join(_cosine(c) for c in r.cosine) + " |")
    lines += ["", "![cosine similarity per layer and module](similarity-smollm.png)", END]
    section = "\n".join(lines)
    smollm.write_section(HERE / "RESULTS.md", section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
