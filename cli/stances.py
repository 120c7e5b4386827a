"""Commands on stances and their versions: commit, stances, stance, log, show, diff, tag."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from deltastore import Store

from .options import (ENCODINGS, base_path_option, byte_size, encoding_rules, json_option, key_values, lower_case, only_base,
                      prompt_options, top_option, with_store)
from .output import echo, emit_json, largest, progress, size, table

# Library modules that import torch (or transformers, matplotlib, huggingface_hub) are imported
# inside the commands that use them: this module is loaded for its light commands too, and those
# must start without them (cli/main.py, tests/test_startup.py).

if TYPE_CHECKING:
    from deltastore.analysis.committing import Committed


@click.command()
@click.argument("stance")
@click.argument("model", type=click.Path())
@click.option("--base", "base_ref", help="Base name, id prefix or model path (default: the store's only base).")
@base_path_option
@click.option("--encoding", default="lossless", show_default=True, callback=lower_case,
              metavar="ENCODING",
              help=f"How to store each tensor delta: {ENCODINGS} (any case), or auto: the smallest whose KL "
                   "stays under --max-kl, or the closest to the fine-tune within --max-bytes.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Measure fidelity on these prompts (one per line) and record it in the version's "
                   "metadata; needs the base as a Hugging Face model folder.")
@click.option("--max-kl", type=float, metavar="K",
              help="With --encoding auto: the largest KL(fine-tuned || stored) to accept; with another "
                   "encoding: refuse to commit above it.")
@click.option("--max-bytes", callback=byte_size, metavar="B",
              help="With --encoding auto: the most bytes the version may store (16.8MB, 500kB, 2GiB); the "
                   "encoding of lowest KL within it is chosen (with --max-kl too: the smallest within both).")
@click.option("--calibration", type=click.Path(dir_okay=False), metavar="FILE",
              help="Prompts (one per line) that mixedrank-aw:R is fitted on: the directions each layer's inputs "
                   "use on them are kept (with --chat, as user messages). With --encoding auto, mixedrank-aw "
                   "takes mixedrank's place among the candidates. Needs MODEL as a Hugging Face folder.")
@prompt_options
@click.option("--encoding-for", "encoding_for", multiple=True, metavar="REGEX=ENCODING", callback=encoding_rules,
              help="A different encoding for tensors whose name matches REGEX (repeatable).")
@click.option("--group-size", type=int, help="Group size of int8/int4 (default 64).")
@click.option("--include", help="Store only tensors whose name matches this regex.")
@click.option("--exclude", help="Leave out tensors whose name matches this regex.")
@click.option("--top-k", type=int, help="Store only the K most-changed tensors (by relative change).")
@click.option("--min-rel-change", type=float, help="Store only tensors with ||dW||/||W|| at least this.")
@click.option("--energy", type=float, help="Store the fewest tensors holding this fraction of the squared delta.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", callback=key_values, help="User metadata (repeatable).")
@click.option("--meta-file", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Training facts (learning rate, epochs, examples, loss...) as a flat JSON object; "
                   "--meta overrides its keys.")
@click.option("--tag", help="Tag the new version (refused when the tag names a version already).")
@click.option("--move-tag", is_flag=True, help="Move --tag's tag to the new version when it names another one.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Store changed tensors holding nan or inf (exactly, with a lossless encoding) instead of "
                   "refusing the commit.")
@click.option("--allow-empty", is_flag=True,
              help="Make a new version even when the model stores exactly what the stance's newest does.")
@click.option("--force", is_flag=True,
              help="Commit even a model whose tensors moved too far from the base's to be a fine-tune of it.")
@click.option("--new-stance", is_flag=True,
              help="Start STANCE even though its name is a few letters from an existing stance's.")
@click.option("--against", metavar="REF",
              help="Store each tensor's delta against what apply of REF (a version of the same base) gives "
                   "instead of the base: a chain of at most 4 links, every link verified on apply. `compare "
                   "--against REF` shows the bytes and KL first.")
@click.option("--verify", is_flag=True,
              help="Hash the base's weight files whole, even those this store hashed before whose stat data "
                   "(device, inode, size, times) is unchanged.")
@json_option
@with_store
def commit(store: Store, stance: str, model: str, base_ref: str, base_path: str | None, encoding: str,
           prompts: str | None, max_kl: float | None, max_bytes: int | None, calibration: str | None, chat: bool,
           tokenizer: str | None,
           encoding_for: list[tuple[str, str]], group_size: int | None, include: str | None, exclude: str | None,
           top_k: int | None, min_rel_change: float | None, energy: float | None, message: str,
           meta: dict[str, str], meta_file: str | None, tag: str | None, move_tag: bool, allow_nonfinite: bool,
           allow_empty: bool, force: bool, new_stance: bool, against: str | None, verify: bool, as_json: bool) -> None:
    """Store the fine-tuned MODEL as a new version of STANCE."""
    from deltastore.analysis.committing import commit as run_commit  # torch, which read commands do without

    base = only_base(store, base_ref)
    with progress("measuring" if prompts else "committing", enabled=not as_json) as cb:
        c = run_commit(store, stance, model, base=base, base_weights=base_path, encoding=encoding, prompts=prompts,
                       max_kl=max_kl, max_bytes=max_bytes, calibration=calibration, chat=chat, tokenizer=tokenizer, encoding_for=encoding_for,
                       encoding_options={} if group_size is None else {"group_size": group_size},
                       include=include, exclude=exclude, top_k=top_k, min_rel_change=min_rel_change, energy=energy,
                       message=message, metadata=meta, metadata_file=meta_file, tag=tag, move_tag=move_tag, progress=cb,
                       allow_nonfinite=allow_nonfinite, allow_empty=allow_empty, force=force, new_stance=new_stance,
                       against=against, **({"verify": True} if verify else {}))
    return emit_json(c) if as_json else render_commit(c)


def render_commit(c: Committed) -> None:
    r, choice = c.result, c.choice
    if choice is not None:
        limit = f" (at most {choice.max_kl:g})" if choice.max_kl is not None else ""
        if choice.max_bytes is not None:
            limit += f" in {size(choice.bytes)} (at most {size(choice.max_bytes)})"
        echo(f"{choice.encoding}: KL {choice.kl:.3g}{limit}, top-1 {choice.top1:.1%}; "
             f"the base alone: KL {choice.base_kl:.3g}")
        for k in choice.candidates:
            if k.spec != choice.encoding:
                echo(f"  {k.spec}: {k.note}" if "skipped" in k.note else f"  {k.spec} ({size(k.bytes)}): {k.note}")
    echo(f"{r.version.ref} {r.version.id}")
    echo(f"stored {r.tensors_stored} tensors ({r.unchanged} unchanged), {size(r.bytes_stored)} "
         f"({size(r.bytes_new)} new)")
    if r.left_out:
        echo(f"left out {len(r.left_out)} changed tensors holding "
             f"{r.left_out_energy_fraction:.1%} of the squared delta")


@click.command()
@json_option
@with_store(readonly=True)
def stances(store: Store, as_json: bool) -> None:
    """Stances with their newest version."""
    rows = store.stances()
    if as_json:
        return emit_json(rows)
    table([[r["name"], r["versions"], r["latest"]] for r in rows], ["stance", "versions", "newest"])


@click.group()
def stance() -> None:
    """Rename, merge or delete a stance."""


@stance.command("rename")
@click.argument("old")
@click.argument("new")
@json_option
@with_store
def stance_rename(store: Store, old: str, new: str, as_json: bool) -> None:
    """Rename stance OLD to NEW. Its versions keep their ids, numbers and tags."""
    r = store.rename_stance(old, new)
    if as_json:
        return emit_json(r)
    echo(f"renamed {r.old} to {r.new} ({r.versions} versions)")


@stance.command("merge")
@click.argument("old")
@click.argument("into")
@json_option
@with_store
def stance_merge(store: Store, old: str, into: str, as_json: bool) -> None:
    """Move every version of stance OLD into stance INTO, numbered after INTO's newest in their
    order; they keep their ids, parents and tags (OLD@TAG becomes INTO@TAG). OLD is gone
    afterwards. All or nothing; refused when both have a tag of the same name."""
    r = store.merge_stance(old, into)
    if as_json:
        return emit_json(r)
    numbers = f"{into}@{r.numbers[0]}" + (f" to {into}@{r.numbers[-1]}" if len(r.numbers) > 1 else "")
    echo(f"merged {old} into {into}: {len(r.versions)} versions, now {numbers}")


@stance.command("delete")
@click.argument("name")
@json_option
@with_store
def stance_delete(store: Store, name: str, as_json: bool) -> None:
    """Delete stance NAME: its versions and tags. Objects stay until `deltastore gc`, which
    removes those that no other version shares."""
    r = store.delete_stance(name)
    if as_json:
        return emit_json(r)
    deleted(f"{r.stance} ({len(r.versions)} versions)", r, "one of them")


@click.command()
@click.argument("ref")
@json_option
@with_store
def delete(store: Store, ref: str, as_json: bool) -> None:
    """Delete one version REF that nothing needs: refused while a tag points at it, a folder is
    patched with it, a version is stored against it, or it is its stance's only version. Its
    number is not given again; objects stay until `deltastore gc`."""
    r = store.delete_version(ref)
    if as_json:
        return emit_json(r)
    deleted(f"{r.ref} ({r.id.split(':', 1)[1][:12]}); {r.newest} is the newest now", r, r.ref)


def deleted(what: str, r, parent: str) -> None:
    """What a delete removed, what gc will free, and the versions whose parent it took."""
    echo(f"deleted {what}; `deltastore gc` frees {size(r.bytes_only_here)} that no other version shares")
    if r.orphaned:
        echo(f"the parent of {', '.join(r.orphaned)} was {parent} (their tensors are unaffected)")


@click.command()
@click.argument("stance", required=False)
@click.option("--where", multiple=True, metavar="KEY=VALUE", callback=key_values,
              help="Only versions with this metadata.")
@json_option
@with_store(readonly=True)
def log(store: Store, stance: str | None, where: dict[str, str], as_json: bool) -> None:
    """Versions, newest first: each with its base (name, else short id), and the KL and top-1 that
    a measured commit (--prompts) recorded."""
    versions = store.log(stance, where=where)
    base_names = {b.id: b.name for b in store.bases()}
    if as_json:
        return emit_json([{**v.to_json(), "base_name": base_names.get(v.base_id)} for v in versions])
    table([[v.ref, v.short_id, v.created[:19].replace("T", " "),
            base_names.get(v.base_id) or v.base_id.removeprefix("b3:")[:12], v.encoding, v.tensor_count,
            size(v.bytes), None if v.kl is None else f"{v.kl:.3g}", None if v.top1 is None else f"{v.top1:.1%}",
            ",".join(v.tags), v.message] for v in versions],
          ["version", "id", "created", "base", "encoding", "tensors", "bytes", "KL", "top-1", "tags", "message"])


@click.command()
@click.argument("ref")
@json_option
@with_store(readonly=True)
def show(store: Store, ref: str, as_json: bool) -> None:
    """One version, tensor by tensor."""
    v = store.resolve(ref)
    if as_json:
        return emit_json(v)
    echo(f"version  {v.ref}  {v.id}")
    echo(f"base     {v.base_id}")
    echo(f"created  {v.created}")
    if v.parent:
        echo(f"parent   {v.parent}")
    if v.against:
        echo(f"against  {v.against} (its deltas are against that version's result)")
    if v.tags:
        echo(f"tags     {', '.join(v.tags)}")
    if v.message:
        echo(f"message  {v.message}")
    for k, val in v.metadata.items():
        echo(f"meta     {k}={val}")
    if v.selection:
        echo(f"selection {json.dumps(v.selection, sort_keys=True)}")
    echo(f"tensors  {len(v.tensors)}, {size(v.bytes)}")
    echo()
    table([[e.name, e.dtype, "x".join(map(str, e.shape)), e.encoding,
            "-" if e.rel_change is None else f"{e.rel_change:.3g}",
            "-" if e.rel_error is None else f"{e.rel_error:.3g}"] for e in v.tensors],
          ["tensor", "dtype", "shape", "encoding", "rel change", "rel error"])


@click.command()
@click.argument("ref_a")
@click.argument("ref_b")
@base_path_option
@top_option
@json_option
@with_store(readonly=True)
def diff(store: Store, ref_a: str, ref_b: str, base_path: str | None, top: int | None, as_json: bool) -> None:
    """Tensor by tensor, what differs between two versions: tensors added, removed or changed,
    ||A - B|| / ||B|| of the tensors apply would produce (so it works across encodings) and
    each one's share of ||A - B||^2 over the model. A summary first: the counts and the largest
    differences."""
    with progress("comparing", enabled=not as_json) as cb:
        d = store.diff(ref_a, ref_b, base_weights=base_path, progress=cb)
    if as_json:
        return emit_json(d)
    echo(f"{d.a} {d.a_id[3:15]} -> {d.b} {d.b_id[3:15]}: {d.count('changed')} changed, "
         f"{d.count('added')} added, {d.count('removed')} removed, {d.unchanged} unchanged")
    total = d.energy
    summary = largest([(t.name, t.energy or 0.0) for t in d.tensors], total, "||a-b||^2")
    if summary:
        echo(summary)
    if top and len(d.tensors) > top:
        echo(f"(listed: the {top} largest of {len(d.tensors)} tensors that differ)")
    rows = d.largest(top) if top else list(d.tensors)
    if rows:
        echo()
        table([[t.name, t.status, t.encoding_a or "(base)", t.encoding_b or "(base)",
                "-" if t.rel_change is None else f"{t.rel_change:.3g}",
                "-" if t.energy is None or not total > 0 else f"{t.energy / total:.1%}"] for t in rows],
              ["tensor", "status", "a", "b", "||a-b||/||b||", "share"])


@click.command()
@click.argument("ref")
@click.argument("name", required=False)
@click.option("--delete", "-d", "delete", is_flag=True,
              help="Remove the tag instead: `tag --delete STANCE@TAG` or `tag --delete STANCE TAG`.")
@click.option("--force", "-f", is_flag=True, help="Move the tag when it names another version already.")
@json_option
@with_store
def tag(store: Store, ref: str, name: str | None, delete: bool, force: bool, as_json: bool) -> None:
    """Name a version (STANCE@NAME then refers to it); with --delete, remove a tag. A tag that
    names another version already is refused unless --force moves it."""
    if not delete and name is None:
        raise click.UsageError("give a tag NAME (or --delete to remove one)")
    t = store.untag(ref, name) if delete else store.tag(ref, name, force=force)
    v = t.version
    if as_json:
        return emit_json(t)
    if t.deleted:
        return echo(f"deleted tag {v.stance}@{t.tag} (was {v.ref} {v.short_id})")
    echo(f"{v.stance}@{t.tag} -> {v.ref} {v.short_id}")
