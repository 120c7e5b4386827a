"""The demo: a store, a small language model and a fine-tune of it, end to end.

It builds a small Llama-architecture model in code, fine-tunes every weight with AdamW for a
few steps (as a stance fine-tune does), then runs the real `deltastore` commands on a store in
./demo/.deltastore: register the base, commit the stance losslessly and as int4, apply it to
the loaded model and revert it (timed, checked bit for bit), patch the model folder in place
and revert that, and print what the store holds. Everything printed is measured in this run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"


def run(command: str) -> str:
    """Run one deltastore command as a user would type it, echoing it and its output."""
    print(f"\n$ deltastore {command}")
    out = subprocess.run([sys.executable, "-m", "deltastore.cli", *shlex.split(command)], cwd=DEMO, capture_output=True, text=True)
    print(out.stdout.rstrip())
    if out.returncode:
        print(out.stderr.rstrip())
        sys.exit(out.returncode)
    return out.stdout


def make_models(folder: Path = DEMO) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small Llama-architecture base in folder/base and a 5-step AdamW fine-tune of it in
    folder/curious-uncertainty; returns the fine-tuned model and the base's state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # A stance fine-tune in miniature: AdamW moves every weight by about the learning rate.
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    for _ in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder / "curious-uncertainty")
    return model, base_state


def main() -> None:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    print(f"demo folder: {DEMO}")
    model, base_state = make_models()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"a Llama-architecture model of {n_params / 1e6:.1f}M parameters and a 5-step AdamW fine-tune of it")

    run("init")
    run("base add base --name tiny-llama")
    run("commit curious-uncertainty curious-uncertainty --base tiny-llama -m 'lossless' --meta lr=2e-5 --tag exact")
    run("commit curious-uncertainty curious-uncertainty --base tiny-llama --encoding int4 -m 'int4, group 64'")
    run("log")

    # Apply to the loaded model, in place, and back.
    from deltastore import Store

    fine_tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(base_state)
    store = Store.open(DEMO / ".deltastore")
    t0 = time.perf_counter()
    handle = store.apply(model, "curious-uncertainty@exact")
    t_apply = time.perf_counter() - t0
    exact = all(torch.equal(model.state_dict()[k], v) for k, v in fine_tuned.items())
    t0 = time.perf_counter()
    handle.revert()
    t_revert = time.perf_counter() - t0
    back = all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    print(f"\napply curious-uncertainty@exact to the loaded model: {t_apply * 1000:.1f} ms, "
          f"bit-identical to the fine-tune: {exact}")
    print(f"revert: {t_revert * 1000:.1f} ms, bit-identical to the base: {back}")

    # Patch the model folder in place, journalled, and revert it.
    shutil.copytree(DEMO / "base", DEMO / "working-copy")
    run("apply curious-uncertainty@exact working-copy")
    run("revert working-copy")
    same = (DEMO / "working-copy/model.safetensors").read_bytes() == (DEMO / "base/model.safetensors").read_bytes()
    print(f"working-copy/model.safetensors equals the base byte for byte after revert: {same}")

    run("stats")
    run("fsck --read-data")
    full = (DEMO / "curious-uncertainty/model.safetensors").stat().st_size
    versions = store.log("curious-uncertainty")
    for v in reversed(versions):
        print(f"{v.ref} ({v.encoding}): {v.bytes / 1e6:.2f} MB stored, {v.bytes / full:.1%} of the "
              f"{full / 1e6:.1f} MB full copy")
    store.close()
    if not (exact and back and same):
        sys.exit("demo: a check failed")


if __name__ == "__main__":
    main()
