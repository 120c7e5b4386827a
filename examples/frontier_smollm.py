"""Fidelity per byte on a real model: what each encoding keeps of the three SmolLM2-135M stances.

    python examples/frontier_smollm.py     # writes its section of examples/RESULTS.md and frontier-smollm.png

For each stance's full fine-tune (examples/smollm.py): every delta encoding and LoRA rank, bytes
against KL(fine-tuned || stored) on the questions of examples/prompts.txt, which no encoding is
fitted on (mixedrank-aw is fitted on the training questions, examples/calibration.txt); then
`commit --encoding auto --max-kl K --calibration` for K = 1e-3 and 1e-4, choosing on the training
questions, its choice's KL read on prompts.txt; then the time
to commit and to apply in place (and revert) each of int4 and two mixedrank versions, in one run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import smollm  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.analysis.auto import AUTO_CALIBRATED, AUTO_CANDIDATES  # noqa: E402
from deltastore.analysis.committing import commit  # noqa: E402
from deltastore.metrics.calibration import calibrate  # noqa: E402
from deltastore.analysis.compare import compare  # noqa: E402
from deltastore.analysis.plots import plot  # noqa: E402

# auto's candidates (so that its choice has a row), and two between them.
ENCODINGS = tuple(dict.fromkeys(s for s in AUTO_CANDIDATES + AUTO_CALIBRATED + ("mixedrank:12", "mixedrank-aw:6")
                                if s != "lossless"))
BOUNDS = (1e-3, 1e-4)
TIMED = ("int4", "mixedrank:16", "mixedrank:48", "mixedrank-aw:12")
BEGIN, END = "<!-- frontier_smollm.py -->", "<!-- end frontier_smollm.py -->"


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def kl(value: float | None) -> str:
    return "-" if value is None else "0" if value == 0 else f"{value:.2g}"


def main() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    base = smollm.base_folder()
    tuned = {stance: smollm.finetune(base, stance) for stance in smollm.stances()["stances"]}
    started = time.perf_counter()
    calibration = HERE / "calibration.txt"
    fitted = {s: calibrate(ft, calibration, chat=True).covariances for s, ft in tuned.items()}
    comparisons = {s: compare(base, ft, encodings=ENCODINGS, ranks=(8, 32), full=(), prompts=HERE / "prompts.txt",
                              chat=True, encoding_options={"calibration": fitted[s]}) for s, ft in tuned.items()}
    first = next(iter(comparisons))
    draw(comparisons[first], first)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        chosen = {(s, k): commit(store, s, ft, base=str(base), encoding="auto", prompts=calibration, max_kl=k,
                                 calibration=calibration, chat=True, allow_empty=True)
                  for s, ft in tuned.items() for k in BOUNDS}
        timings = timed(store, base, tuned[first], Path(tmp), fitted[first])
        store.close()
    if os.environ.get("FRONTIER_KEEP"):  # the measurements, to render again without measuring
        import pickle

        Path(os.environ["FRONTIER_KEEP"]).write_bytes(pickle.dumps((comparisons, chosen, timings)))
    section = render(comparisons, chosen, timings, time.perf_counter() - started)
    smollm.write_section(HERE / "RESULTS.md", section, BEGIN, END)
    print(section)


# The rows the picture shows (every row would crowd its labels); the table has them all.
PLOTTED = ("delta int8", "delta int4", "delta 1bit", "delta lowrank:8", "delta lowrank:32", "LoRA r=8", "LoRA r=32",
           "delta mixedrank:8", "delta mixedrank:16", "delta mixedrank:32", "delta mixedrank:64",
           "delta mixedrank-aw:4", "delta mixedrank-aw:8", "delta mixedrank-aw:16", "delta mixedrank-aw:32")


def draw(comparison, stance: str) -> None:
    rows = tuple(r for r in comparison.rows if r.label in PLOTTED or r.kind in ("base", "full"))
    plot(dataclasses.replace(comparison, rows=rows), HERE / "frontier-smollm.png",
         title=f"SmolLM2-135M-Instruct, {stance}: bytes vs KL, with the frontier")


def timed(store: Store, base: Path, ft: Path, tmp: Path, fitted: dict) -> dict[str, tuple[float, float, float]]:
    """(commit, in-place apply, revert) seconds of each encoding of TIMED, in one run (a
    calibrated one's commit without the calibration's forward passes)."""
    out = {}
    for spec in TIMED:
        stance = "timed-" + spec.replace(":", "-")
        start = time.perf_counter()
        store.commit(stance, ft, base=str(base), encoding=spec, encoding_options={"calibration": fitted})
        committed = time.perf_counter() - start
        target = tmp / stance
        shutil.copytree(base, target)
        start = time.perf_counter()
        store.apply_files(stance, target)
        applied = time.perf_counter() - start
        start = time.perf_counter()
        store.revert_files(target)
        out[spec] = (committed, applied, time.perf_counter() - start)
    return out


def render(comparisons: dict, chosen: dict, timings: dict, seconds: float) -> str:
    stances = list(comparisons)
    bf16 = next(iter(comparisons.values())).full_bytes // 2  # the fp32 copy's bytes, halved
    lines = [BEGIN, f"## Fidelity per byte: the three stances ({seconds / 60:.0f} min)", "",
             f"Run on {date.today().isoformat()} on 2 cores (load {os.getloadavg()[0]:.1f} at the end). KL is "
             "KL(fine-tuned || stored) in nats per token over every position of the 8 questions of "
             "`examples/prompts.txt`, which no encoding is fitted on; `of bf16` is the share of a bf16 copy "
             f"({mb(bf16)}). Rows in bold are on the frontier: nothing smaller keeps more.", "",
             "| stored as | " + " | ".join(f"{s}: bytes, KL" for s in stances) + " | of bf16 |",
             "| --- | " + " | ".join("---:" for _ in stances) + " | ---: |"]
    labels = [r.label for r in next(iter(comparisons.values())).rows if r.kind in ("delta", "lora")]
    for label in labels:
        cells, share = [], None
        for s in stances:
            row = comparisons[s].row(label)
            text = f"{mb(row.bytes)}, {kl(row.kl)}"
            cells.append(f"**{text}**" if row in comparisons[s].frontier else text)
            share = row.bytes / bf16
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {share:.3f} |")
    lines += ["", "`commit --encoding auto --max-kl K --prompts examples/calibration.txt --calibration "
              "examples/calibration.txt --chat` (the 15 training questions: mixedrank-aw is fitted, and every "
              "candidate measured, on them), its choice's KL measured on `examples/prompts.txt`:", "",
              "| stance | K | chosen | bytes | of bf16 | KL on the calibration questions | KL held out |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for (s, k), m in chosen.items():
        held = 0.0 if m.choice.encoding == "lossless" else comparisons[s].row(f"delta {m.choice.encoding}").kl
        lines.append(f"| {s} | {k:g} | {m.choice.encoding} | {mb(m.result.bytes_stored)} | "
                     f"{m.result.bytes_stored / bf16:.3f} | {kl(m.choice.kl)} | {kl(held)} |")
    lines += ["", f"Time to commit, apply in place and revert {stances[0]}, each against int4's in the same run:", "",
              "| encoding | commit | apply | revert |", "| --- | ---: | ---: | ---: |"]
    c4, a4, r4 = timings["int4"]
    for spec, (c, a, r) in timings.items():
        lines.append(f"| {spec} | {c:.1f} s ({c / c4:.1f}x) | {a:.2f} s ({a / a4:.1f}x) | {r:.2f} s ({r / r4:.1f}x) |")
    lines += ["", "![bytes against KL, with the frontier](frontier-smollm.png)", "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
