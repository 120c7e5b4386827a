"""What each export format keeps of a real fine-tune: SmolLM2-135M-Instruct, curious-uncertainty.

    python examples/export_smollm.py                 # prints docs/exports.md's table (minutes to an hour on a CPU)
    python examples/export_smollm.py --ranks 8,16    # fewer ranks; --ranks none: the merged GGUF rows only

For each rank, the version is written as a PEFT adapter (bf16), as vLLM's profile of it (bf16,
--max-rank = the rank), and as a GGUF LoRA (f16 and q8_0); then as a merged GGUF model (f16 and
q8_0). Every file is read back, merged into the base in memory and measured against the stored
version (deltastore.exports.export_fidelity): mean next-token KL and top-1 agreement over the questions
in examples/prompts.txt, each put through the chat template. Sizes are the files written.
"""

from __future__ import annotations

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
from deltastore.exports.export_fidelity import ExportBench, merged  # noqa: E402
from deltastore.exports.gguf_lora import export_gguf_lora, read_gguf_lora  # noqa: E402
from deltastore.exports.gguf_model import export_gguf, read_gguf_model  # noqa: E402
from deltastore.exports.lora import adapter_weights, export_lora  # noqa: E402
from deltastore.exports.vllm_lora import export_vllm_lora  # noqa: E402

STANCE = "curious-uncertainty"
RANKS = (8, 16, 32, 64)


def peft_weights(folder: Path, source) -> dict:
    w = adapter_weights(folder, source)
    return {n: w.target.get(n) for n in [*w.deltas, *w.replaced]}


def main(ranks: tuple[int, ...] = RANKS) -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    base = smollm.base_folder()
    tuned = smollm.finetune(base, STANCE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store.init(tmp / "store")
        store.commit("s", tuned, base=str(base))  # lossless: the stored version is the fine-tune
        bench = ExportBench(store, "s", HERE / "prompts.txt", chat=True)
        source = bench.source
        none = bench.base_fidelity()
        rows.append(("nothing (the base alone)", "-", 0, none))

        def measure(label: str, rank: str, path: Path, size: int, weights: dict) -> None:
            f = bench.measure(weights)
            rows.append((label, rank, size, f))
            print(f"{label:28} {rank:>5} {size / 1e6:8.1f} MB  KL {f.kl:.3g}  top-1 {f.top1:.3f}", flush=True)

        for r in ranks:
            out = tmp / f"peft-{r}"
            e = export_lora(store, "s", out, rank=r, dtype="bf16")
            measure("PEFT adapter, bf16", str(r), out, e.bytes, peft_weights(out, source))
            out = tmp / f"vllm-{r}"
            e = export_vllm_lora(store, "s", out, max_rank=r, dtype="bf16")
            measure("vLLM profile, bf16", str(r), out, e.bytes, peft_weights(out, source))
            for dtype in ("f16", "q8_0"):
                out = tmp / f"lora-{r}-{dtype}.gguf"
                g = export_gguf_lora(store, "s", out, rank=r, dtype=dtype)
                measure(f"GGUF LoRA, {dtype}", str(r), out, g.bytes, merged(source, read_gguf_lora(out, source)))
        for dtype in ("f16", "q8_0"):
            out = tmp / f"model-{dtype}.gguf"
            g = export_gguf(store, "s", out, dtype=dtype)
            measure(f"GGUF model (merged), {dtype}", "full", out, g.bytes, read_gguf_model(out, source))

    print()
    print(f"| format | rank | size | KL | top-1 |  ({none.positions} positions)")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rank, size, f in rows:
        shown = "-" if not size else f"{size / 1e6:.1f} MB"
        print(f"| {label} | {rank} | {shown} | {f.kl:.2g} | {f.top1:.3f} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks, or none")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    main(() if args.ranks == "none" else tuple(int(r) for r in args.ranks.split(",")))
    print(f"\n{time.perf_counter() - start:.0f} s")
