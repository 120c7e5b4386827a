"""Commands that write model weights: apply (in place or to a new folder), revert, export."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from deltastore import DeltastoreError, ModelWritten, Store

from .options import (Dtype, base_path_option, chat_option, export_tokenizer_option, json_option, mix_weights, out_option,
                      with_store)
from .output import echo, emit_json, on_interrupt, progress, size, to_jsonable
from .sharing import ran_in

# Library modules that import torch (or transformers, matplotlib, huggingface_hub) are imported
# inside the commands that use them: this module is loaded for its light commands too, and those
# must start without them (cli/main.py, tests/test_startup.py).


@click.command()
@click.argument("ref")
@click.argument("target", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Write the patched model here instead of in place.")
@click.option("--break-links", is_flag=True,
              help="Give a weight file that has other hard links a private copy first, then patch that copy.")
@click.option("--scale", type=float, metavar="A",
              help="Write base + A*delta instead (needs --out: files are patched in place only with a version "
                   "as stored).")
@click.option("--verify", is_flag=True,
              help="Hash every region patched in place (with --out: every base tensor read), even in files this "
                   "store hashed before whose stat data (device, inode, size, times) is unchanged.")
@json_option
@with_store
def apply(store: Store, ref: str, target: str, out: str | None, break_links: bool, scale: float | None,
          verify: bool, as_json: bool) -> None:
    """Apply a version to TARGET, a model file or folder of the version's base.

    Without --out, TARGET's safetensors files are patched in place, journalled in the store so
    that `deltastore revert TARGET` restores them exactly, even after a crash. A weight file that
    another path shares (a symlink, a hard link) is refused; one apply or revert at a time.
    Regions are checked to hold the base, but in files trusted since `base add` (see --verify).
    --scale A with --out writes base + A*delta (A = 0.5: the stance at half strength)."""
    if scale is not None:
        if not out:
            raise click.ClickException(f"--scale writes a new folder only: add --out DIR, or use "
                                       f"`deltastore export --mix {ref}={scale:g} --out DIR`")
        from deltastore.patching.mix import export_mix

        with progress("writing", enabled=not as_json) as cb:
            path = export_mix(store.reader, {ref: scale}, out, base_weights=target, progress=cb)
        return emit_json(ModelWritten(path, store.resolve(ref).ref, scale)) if as_json else echo(f"wrote {path}")
    if out:
        with progress("writing", enabled=not as_json) as cb:
            path = store.export(ref, out, base_weights=target, progress=cb, verify=verify)
        return emit_json(ModelWritten(path, store.resolve(ref).ref)) if as_json else echo(f"wrote {path}")
    on_interrupt(target_state(store, ref, target))
    with progress("applying", enabled=not as_json) as cb:
        j = store.apply_files(ref, target, break_links=break_links, progress=cb, verify=verify)
    if as_json:
        return emit_json(j)
    echo(f"applied {store.resolve(j.version_id).ref} to {target} ({j.regions} tensors); "
         f"`deltastore revert {target}` undoes it")


def target_state(store: Store, ref: str, target: str) -> Callable[[], str]:
    """What an interrupted in-place apply left: the journal it wrote (before the first byte of
    TARGET, FORMAT.md §7) and how far it got, or none. What it needs of the store is read now:
    the store may be closed when Ctrl-C comes."""
    from deltastore.repo import journalfiles

    before = journalfiles.ids(store.root)
    try:
        ref = store.resolve(ref).ref
    except DeltastoreError:  # the apply refuses it itself
        pass

    def report() -> str:
        new = [j for j in journalfiles.read_all(store.root) if j["id"] not in before]
        if not new:
            return f"nothing was stored and {target} is unchanged"
        if new[-1]["state"] == "applied":
            return f"{ref} is applied to {target}: `deltastore revert {target}` undoes it"
        return f"{target} is part patched with {ref}: `deltastore revert {target}` puts it back"
    return report


@click.command()
@click.argument("target", type=click.Path())
@click.option("--forget", is_flag=True,
              help="Instead: drop the journal of TARGET (a path, or the journal id fsck shows) that revert cannot "
                   "restore, its files gone (copied and deleted) or changed since, and free its saved originals; "
                   "no model file is written.")
@json_option
@with_store(patched="target")
def revert(store: Store, target: str, forget: bool, as_json: bool) -> None:
    """Undo what apply did to TARGET, bit for bit.

    Writes only into tensors that hold what apply wrote (one that holds the base already is
    left as it is); anything else there stops it before its first write. A copy of TARGET made
    after apply (`cp -a`) keeps the applied version and is not reverted; once TARGET itself is
    gone, --forget drops its journal."""
    if forget:
        done = store.forget_journal(target)
    else:
        with progress("reverting", enabled=not as_json) as cb:
            done = store.revert_files(target, progress=cb)
    if as_json:
        return emit_json(done)
    for j in done:
        if forget:
            echo(f"forgot the journal {j.id} of {j.target}: its saved originals are freed; no model file was written")
        elif j.written == 0:
            echo(f"{target} already holds the base ({j.regions} tensors): nothing was written; its journal is dropped")
        else:
            held = f"; {j.regions - j.written} held the base already" if j.written < j.regions else ""
            echo(f"reverted {target} ({j.written} tensors back to the base{held})")


@click.command()
@click.argument("ref", required=False)
@click.option("--mix", "mix", callback=mix_weights, metavar="REF=A,REF=B",
              help="Instead of REF: write base + A*delta(REF) + B*delta(REF) ..., each tensor rounded once "
                   "(versions of one base).")
@out_option
@base_path_option
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: a Hugging Face model folder; gguf: one GGUF file for llama.cpp and Ollama (Llama, Qwen2, "
                   "GPT-2 bases with a BPE tokenizer llama.cpp knows).")
@click.option("--dtype", type=Dtype(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="With --format gguf: the file type (norms and 1-D tensors stay f32, as llama.cpp's converter "
                   "writes them; fp16, fp32 are taken as f16, f32).")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --format gguf: measure the KL and top-1 of the file written (read back) against the "
                   "stored version, on these prompts (one per line).")
@chat_option
@export_tokenizer_option
@click.option("--verify", is_flag=True,
              help="Hash every base tensor read, even in files this store hashed before whose stat data (device, "
                   "inode, size, times) is unchanged.")
@json_option
@with_store(readonly=True)
def export(store: Store, ref: str | None, mix: dict[str, float] | None, out: str, base_path: str | None, fmt: str,
           dtype: str, prompts: str | None, chat: bool, tokenizer: str | None, verify: bool, as_json: bool) -> None:
    """Write the full fine-tuned model (base + delta) as a Hugging Face model folder, or with
    --format gguf as one GGUF model file as llama.cpp's convert_hf_to_gguf.py writes it (the
    tokenizer from the base folder; one whose pre-tokenizer is not known is refused). Base files
    this store hashed whole at `base add`, unchanged since, are trusted (see --verify)."""
    if (ref is None) == (mix is None):
        raise click.UsageError("give REF, or --mix REF=A,REF=B, not both")
    if (prompts or tokenizer or chat) and fmt != "gguf" or (mix is not None and fmt == "gguf"):
        raise click.UsageError("--prompts measures a GGUF file of one REF: give REF and --format gguf")
    if chat and not prompts:
        raise click.UsageError("--chat says how --prompts are put to the model: give --prompts FILE too")
    if fmt == "gguf":
        return gguf_model_export(store, ref, out, dtype=dtype, base_path=base_path, prompts=prompts,
                                 tokenizer=tokenizer, chat=chat, as_json=as_json)
    if Path(out).is_file():
        raise click.UsageError(f"{out} is a file: --out is a new folder (or give --format gguf)")
    if mix is not None:
        return mix_export(store, mix, out, base_path, as_json)
    with progress("writing", enabled=not as_json) as cb:
        path = store.export(ref, out, base_weights=base_path, progress=cb, verify=verify)
    return emit_json(ModelWritten(path, store.resolve(ref).ref)) if as_json else echo(f"wrote {path}")


def gguf_model_export(store: Store, ref: str, out: str, *, dtype: str, base_path: str | None, prompts: str | None,
                      tokenizer: str | None, chat: bool, as_json: bool) -> None:
    """export --format gguf [--prompts]: the merged GGUF model, and its fidelity when asked."""
    from deltastore.exports.export_fidelity import export_gguf_measured
    from deltastore.exports.gguf_model import export_gguf

    fidelity = None
    with progress("writing", enabled=not as_json) as cb:
        if prompts:
            m = export_gguf_measured(store, ref, out, prompts=prompts, dtype=dtype, base_weights=base_path,
                                     tokenizer=tokenizer, chat=chat, progress=cb)
            g, fidelity = m.export, m.fidelity
        else:
            g = export_gguf(store, ref, out, dtype=dtype, base_weights=base_path, progress=cb)
    if as_json:
        return emit_json({**to_jsonable(g), "fidelity": fidelity})
    types = ", ".join(f"{n} {t}" for t, n in sorted(g.types.items()))
    echo(f"wrote {g.out}: {g.architecture}, {g.tensors} tensors ({types}), tokenizer pre-tokenizer "
         f"{g.pre_tokenizer!r}; {size(g.bytes)}")
    if fidelity is not None:
        f = fidelity
        echo(f"fidelity of what was written{ran_in(f, True)}, over {f.prompts} prompts ({f.positions} positions), "
             f"against the stored version: KL {f.kl:.3g}, top-1 {f.top1:.1%}; the base alone: KL {f.base_kl:.3g}, "
             f"top-1 {f.base_top1:.1%}")
    return None


def mix_export(store: Store, mix: dict[str, float], out: str, base_path: str | None, as_json: bool) -> None:
    """export --mix: base + A*delta(REF) + B*delta(REF) ..."""
    from deltastore.patching.mix import export_mix

    with progress("writing", enabled=not as_json) as cb:
        path = export_mix(store.reader, mix, out, base_weights=base_path, progress=cb)
    return emit_json(ModelWritten(path, mix=mix)) if as_json else echo(f"wrote {path}")
