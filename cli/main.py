"""`deltastore` commands. Each parses its options, makes one library call and renders the
result; library errors become one-line messages (exit 1), tracebacks only with
DELTASTORE_DEBUG=1."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from deltastore import DeltastoreError, Store
from deltastore.errors import DiskFull, is_disk_full
from deltastore.store import DEFAULT_DIR, find_store

from .output import echo, emit_json, escape, progress, size, table, to_jsonable


class DeltastoreGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`deltastore log | head -1`): stop quietly, as git does, with
            # the status of a process ended by SIGPIPE.
            _silence_stdout()
            raise click.exceptions.Exit(128 + 13) from None
        except DeltastoreError as e:
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            raise click.ClickException(escape(e)) from None
        except (KeyboardInterrupt, click.Abort):
            # Ctrl-C: the command's own clean-up (finally blocks, the store's close) has run by
            # now; exit as an interrupted process does, whatever the moment (click says
            # "Aborted!" and exits 1).
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except click.ClickException as e:
            e.message = escape(e.message)  # it may quote what the user typed
            raise
        except click.exceptions.Exit:
            raise
        except OSError as e:
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            if is_disk_full(e):
                raise click.ClickException(str(DiskFull())) from None
            raise click.ClickException(escape(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))) from None
        except UnicodeEncodeError as e:
            # Bytes that are not UTF-8 in an argument reach Python as lone surrogates, which
            # neither the catalog nor a manifest can hold.
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            shown = str(e.object[max(0, e.start - 20):e.end + 20]) if isinstance(e.object, str) else ""
            raise click.ClickException(f"{shown!r} holds bytes that are not UTF-8 text; give names and values "
                                       "as UTF-8") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left of it on exit raises nothing
    more (the fix Python's documentation of SIGPIPE gives)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (an in-process runner)
        pass


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON value on stdout.")(f)


def with_store(f: Callable | None = None, *, readonly: bool | None = None) -> Callable:
    """Open the store the group's --store (or $DELTASTORE_DIR, or the nearest .deltastore/) names.
    `readonly=True` for commands that only read: their catalog is opened read-only, so they work
    on a full disk too."""
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        @click.pass_context
        def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
            store = Store.open(store_path(ctx), readonly=readonly)
            ctx.call_on_close(store.close)
            return f(store, *args, **kwargs)
        return wrapper
    return decorate(f) if f is not None else decorate


def store_path(ctx: click.Context) -> Path:
    path = ctx.find_root().params.get("store")
    return Path(path) if path else find_store()


ENCODINGS = "lossless, int8, int4, nf4, fp4, 1bit, lowrank:R"


def lower_case(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Encoding names in any case (`INT4` as `int4`): the manifest keeps the lower-case spec."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, tuple):  # REGEX=ENCODING: the regex keeps its case
        return tuple(f"{v.rpartition('=')[0]}={v.rpartition('=')[2].lower()}" if "=" in v else v for v in value)
    return value


def only_base(store: Store, base_ref: str | None) -> str:
    """--base as given, or the store's one base when it holds exactly one."""
    if base_ref is not None:
        return base_ref
    bases = store.bases()
    if len(bases) == 1:
        return bases[0].id
    if not bases:
        raise click.UsageError("--base is needed: the store holds no base yet; give --base MODEL_PATH "
                               "(a model folder or .safetensors file)")
    names = ", ".join(b.name or b.id[:19] for b in bases[:5]) + (" ..." if len(bases) > 5 else "")
    raise click.UsageError(f"--base is needed: the store holds {len(bases)} bases ({names})")


def parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint=option)
        out[key] = value
    return out


@click.group(cls=DeltastoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False), envvar=None,
              help="Store folder (default: $DELTASTORE_DIR, else the nearest .deltastore/ upwards).")
@click.version_option(package_name="deltastore")
def cli(store: str | None) -> None:
    """Store, version, apply and share fine-tuning deltas of PyTorch language models."""


@cli.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@json_option
@click.pass_context
def init(ctx: click.Context, directory: str | None, as_json: bool) -> None:
    """Create a store (default: ./.deltastore)."""
    path = directory or ctx.find_root().params.get("store") or DEFAULT_DIR
    store = Store.init(path)
    store.close()
    if as_json:
        emit_json({"store": str(Path(path).absolute())})
    else:
        echo(f"created store {path}")


@cli.group()
def base() -> None:
    """Register and list base models."""


@base.command("add")
@click.argument("model", type=click.Path())
@click.option("--name", help="A name to refer to the base by.")
@click.option("--hub-id", help="The base's Hugging Face Hub id (for model cards).")
@json_option
@with_store
def base_add(store: Store, model: str, name: str | None, hub_id: str | None, as_json: bool) -> None:
    """Register a base: MODEL is a .safetensors file or a model folder. Prints its base id."""
    with progress("hashing", enabled=not as_json) as cb:
        b = store.add_base(model, name=name, hub_id=hub_id, progress=cb)
    if as_json:
        emit_json(b)
    else:
        echo(b.id)


@base.command("list")
@json_option
@with_store(readonly=True)
def base_list(store: Store, as_json: bool) -> None:
    """Bases with ids, names, tensor counts and bytes."""
    bases = store.bases()
    if as_json:
        return emit_json(bases)
    table([[b.id[:19], b.name, b.tensor_count, size(b.bytes), b.source] for b in bases],
          ["id", "name", "tensors", "bytes", "source"])


@cli.command()
@click.argument("stance")
@click.argument("model", type=click.Path())
@click.option("--base", "base_ref", help="Base name, id prefix or model path (default: the store's only base).")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@click.option("--encoding", default="lossless", show_default=True, callback=lower_case,
              metavar="ENCODING",
              help=f"How to store each tensor delta: {ENCODINGS} (any case), or auto: the smallest whose KL "
                   "stays under --max-kl.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Measure fidelity on these prompts (one per line) and record it in the version's "
                   "metadata; needs the base as a Hugging Face model folder.")
@click.option("--max-kl", type=float, metavar="K",
              help="With --encoding auto: the largest KL(fine-tuned || stored) to accept; with another "
                   "encoding: refuse to commit above it.")
@click.option("--chat", is_flag=True, help="Each prompt is a user message, put through the model's chat template.")
@click.option("--tokenizer", type=click.Path(exists=True), metavar="PATH_OR_FOLDER",
              help="The tokenizer for --prompts (a tokenizer.json or a folder holding one), where the base "
                   "folder has none.")
@click.option("--encoding-for", "encoding_for", multiple=True, metavar="REGEX=ENCODING", callback=lower_case,
              help="A different encoding for tensors whose name matches REGEX (repeatable).")
@click.option("--group-size", type=int, help="Group size of int8/int4 (default 64).")
@click.option("--include", help="Store only tensors whose name matches this regex.")
@click.option("--exclude", help="Leave out tensors whose name matches this regex.")
@click.option("--top-k", type=int, help="Store only the K most-changed tensors (by relative change).")
@click.option("--min-rel-change", type=float, help="Store only tensors with ||dW||/||W|| at least this.")
@click.option("--energy", type=float, help="Store the fewest tensors holding this fraction of the squared delta.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="User metadata (repeatable).")
@click.option("--meta-file", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Training facts (learning rate, epochs, examples, loss...) as a flat JSON object; "
                   "--meta overrides its keys.")
@click.option("--tag", help="Tag the new version.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Store changed tensors holding nan or inf (exactly, with a lossless encoding) instead of "
                   "refusing the commit.")
@click.option("--allow-empty", is_flag=True,
              help="Make a new version even when the model stores exactly what the stance's newest does.")
@click.option("--force", is_flag=True,
              help="Commit even a model whose tensors moved too far from the base's to be a fine-tune of it.")
@click.option("--new-stance", is_flag=True,
              help="Start STANCE even though its name is a few letters from an existing stance's.")
@json_option
@with_store
def commit(store: Store, stance: str, model: str, base_ref: str, base_path: str | None, encoding: str,
           prompts: str | None, max_kl: float | None, chat: bool, tokenizer: str | None,
           encoding_for: tuple[str, ...],
           group_size: int | None,
           include: str | None, exclude: str | None,
           top_k: int | None, min_rel_change: float | None, energy: float | None, message: str,
           meta: tuple[str, ...], meta_file: str | None, tag: str | None, allow_nonfinite: bool,
           allow_empty: bool, force: bool, new_stance: bool, as_json: bool) -> None:
    """Store the fine-tuned MODEL as a new version of STANCE."""
    from deltastore.history import read_metadata_file

    base_ref = only_base(store, base_ref)
    metadata = read_metadata_file(meta_file) if meta_file else {}
    metadata.update(parse_pairs(meta, "--meta"))
    rules = [tuple(r.rsplit("=", 1)) for r in encoding_for]
    if any(len(r) != 2 for r in rules):
        raise click.BadParameter("expected REGEX=ENCODING", param_hint="--encoding-for")
    options = {"group_size": group_size} if group_size is not None else {}
    choice = None
    if encoding == "auto" or prompts or max_kl is not None or chat or tokenizer:
        if prompts is None or (encoding == "auto" and max_kl is None):
            raise click.UsageError("--encoding auto needs --prompts FILE (one prompt per line) and --max-kl K "
                                   "(e.g. 0.01)" if encoding == "auto" else
                                   "--max-kl, --chat and --tokenizer need --prompts FILE")
        from deltastore.compare import commit_measured

        with progress("measuring", enabled=not as_json) as cb:
            measured = commit_measured(store, stance, model, base=base_ref, base_weights=base_path, prompts=prompts,
                                       encoding=encoding, max_kl=max_kl, chat=chat, tokenizer=tokenizer,
                                       encoding_for=rules,
                                       encoding_options=options,
                                       include=include, exclude=exclude, top_k=top_k, min_rel_change=min_rel_change,
                                       energy=energy, message=message, metadata=metadata, tag=tag, progress=cb,
                                       allow_nonfinite=allow_nonfinite, allow_empty=allow_empty, force=force,
                                       new_stance=new_stance)
        r, choice = measured.result, measured.choice
    else:
        with progress("committing", enabled=not as_json) as cb:
            r = store.commit(stance, model, base=base_ref, base_weights=base_path, encoding=encoding,
                             encoding_for=rules, encoding_options=options, include=include, exclude=exclude,
                             top_k=top_k, min_rel_change=min_rel_change, energy=energy, message=message,
                             metadata=metadata, tag=tag, progress=cb, allow_nonfinite=allow_nonfinite,
                             allow_empty=allow_empty, force=force, new_stance=new_stance)
    v = r.version
    summary = {"id": v.id, "stance": v.stance, "number": v.number, "tensors_stored": r.tensors_stored,
               "tensors_unchanged": r.unchanged, "bytes_stored": r.bytes_stored, "bytes_new": r.bytes_new,
               "left_out": list(r.left_out), "left_out_energy_fraction": r.left_out_energy_fraction,
               "median_rel_change": r.median_rel_change}
    if choice is not None:
        summary.update(encoding=choice.encoding, kl=choice.kl, top1=choice.top1, base_kl=choice.base_kl,
                       max_kl=choice.max_kl, candidates=[{"encoding": c.spec, "bytes": c.bytes, "kl": c.kl,
                                                          "top1": c.top1, "note": c.note} for c in choice.candidates])
    if as_json:
        return emit_json(summary)
    if choice is not None:
        limit = f" (at most {choice.max_kl:g})" if choice.max_kl is not None else ""
        echo(f"{choice.encoding}: KL {choice.kl:.3g}{limit}, top-1 {choice.top1:.1%}; "
             f"the base alone: KL {choice.base_kl:.3g}")
        for c in choice.candidates:
            if c.spec != choice.encoding:
                echo(f"  {c.spec}: {c.note}" if "skipped" in c.note else f"  {c.spec} ({size(c.bytes)}): {c.note}")
    echo(f"{v.ref} {v.id}")
    echo(f"stored {r.tensors_stored} tensors ({r.unchanged} unchanged), {size(r.bytes_stored)} "
         f"({size(r.bytes_new)} new)")
    if r.left_out:
        echo(f"left out {len(r.left_out)} changed tensors holding "
             f"{r.left_out_energy_fraction:.1%} of the squared delta")


@cli.command()
@json_option
@with_store(readonly=True)
def stances(store: Store, as_json: bool) -> None:
    """Stances with their newest version."""
    rows = store.stances()
    if as_json:
        return emit_json(rows)
    table([[r["name"], r["versions"], r["latest"]] for r in rows], ["stance", "versions", "newest"])


@cli.group()
def stance() -> None:
    """Rename or delete a stance."""


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
    echo(f"deleted {r.stance} ({len(r.versions)} versions); `deltastore gc` frees "
         f"{size(r.bytes_only_here)} that no other version shares")
    if r.orphaned:
        echo(f"the parent of {', '.join(r.orphaned)} was one of them (their tensors are unaffected)")


def version_summary(v: Any) -> dict:
    return {"id": v.id, "ref": v.ref, "stance": v.stance, "number": v.number, "parent": v.parent,
            "base": v.base_id, "created": v.created, "message": v.message, "encoding": v.encoding,
            "tensors": v.tensor_count, "bytes": v.bytes, "tags": list(v.tags), "metadata": v.metadata}


@cli.command()
@click.argument("stance", required=False)
@click.option("--where", multiple=True, metavar="KEY=VALUE", help="Only versions with this metadata.")
@json_option
@with_store(readonly=True)
def log(store: Store, stance: str | None, where: tuple[str, ...], as_json: bool) -> None:
    """Versions, newest first."""
    versions = store.log(stance, where=parse_pairs(where, "--where"))
    if as_json:
        return emit_json([version_summary(v) for v in versions])
    table([[v.ref, v.short_id, v.created[:19].replace("T", " "), v.encoding, v.tensor_count, size(v.bytes),
            ",".join(v.tags), v.message] for v in versions],
          ["version", "id", "created", "encoding", "tensors", "bytes", "tags", "message"])


@cli.command()
@click.argument("ref")
@json_option
@with_store(readonly=True)
def show(store: Store, ref: str, as_json: bool) -> None:
    """One version, tensor by tensor."""
    v = store.resolve(ref)
    if as_json:
        return emit_json({**version_summary(v), "selection": v.selection,
                          "tensor_entries": [e.to_manifest() for e in v.tensors]})
    echo(f"version  {v.ref}  {v.id}")
    echo(f"base     {v.base_id}")
    echo(f"created  {v.created}")
    if v.parent:
        echo(f"parent   {v.parent}")
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


@cli.command()
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@json_option
@with_store(readonly=True)
def diff(store: Store, ref_a: str, ref_b: str, base_path: str | None, as_json: bool) -> None:
    """Tensor by tensor, what differs between two versions: tensors added, removed or changed,
    and ||A - B|| / ||B|| of the tensors apply would produce (so it works across encodings)."""
    d = store.diff(ref_a, ref_b, base_weights=base_path)
    if as_json:
        return emit_json(d)
    echo(f"{d.a} {d.a_id[3:15]} -> {d.b} {d.b_id[3:15]}: {d.count('changed')} changed, "
         f"{d.count('added')} added, {d.count('removed')} removed, {d.unchanged} unchanged")
    if d.tensors:
        echo()
        table([[t.name, t.status, t.encoding_a or "(base)", t.encoding_b or "(base)",
                "-" if t.rel_change is None else f"{t.rel_change:.3g}"] for t in d.tensors],
              ["tensor", "status", "a", "b", "||a-b||/||b||"])


@cli.command()
@click.argument("ref")
@click.argument("name", required=False)
@click.option("--delete", "-d", "delete", is_flag=True,
              help="Remove the tag instead: `tag --delete STANCE@TAG` or `tag --delete STANCE TAG`.")
@json_option
@with_store
def tag(store: Store, ref: str, name: str | None, delete: bool, as_json: bool) -> None:
    """Name a version (STANCE@NAME then refers to it); with --delete, remove a tag."""
    if delete:
        v = store.untag(ref, name)
        tag_name = name or ref.partition("@")[2]
        if as_json:
            return emit_json({"id": v.id, "ref": v.ref, "tag": tag_name, "deleted": True})
        return echo(f"deleted tag {v.stance}@{tag_name} (was {v.ref} {v.short_id})")
    if name is None:
        raise click.UsageError("give a tag NAME (or --delete to remove one)")
    v = store.tag(ref, name)
    if as_json:
        return emit_json({"id": v.id, "ref": v.ref, "tag": name})
    echo(f"{v.stance}@{name} -> {v.ref} {v.short_id}")


@cli.command()
@click.argument("ref")
@click.argument("target", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Write the patched model here instead of in place.")
@click.option("--break-links", is_flag=True,
              help="Give a weight file that has other hard links a private copy first, then patch that copy.")
@json_option
@with_store
def apply(store: Store, ref: str, target: str, out: str | None, break_links: bool, as_json: bool) -> None:
    """Apply a version to TARGET, a model file or folder of the version's base.

    Without --out, TARGET's safetensors files are patched in place, journalled in the store so
    that `deltastore revert TARGET` restores them exactly, even after a crash. A weight file that
    another path shares (a symlink, a hard link) is refused; one apply or revert at a time."""
    if out:
        with progress("writing", enabled=not as_json) as cb:
            path = store.export(ref, out, base_weights=target, progress=cb)
        result = {"ref": store.resolve(ref).ref, "out": str(path)}
        return emit_json(result) if as_json else echo(f"wrote {path}")
    j = store.apply_files(ref, target, break_links=break_links)
    if as_json:
        return emit_json(j)
    echo(f"applied {store.resolve(j.version_id).ref} to {target} ({j.regions} tensors); "
         f"`deltastore revert {target}` undoes it")


@cli.command()
@click.argument("target", type=click.Path())
@json_option
@with_store
def revert(store: Store, target: str, as_json: bool) -> None:
    """Undo what apply did to TARGET, bit for bit."""
    done = store.revert_files(target)
    if as_json:
        return emit_json(done)
    for j in done:
        echo(f"reverted {target} ({j.regions} tensors back to the base)")


@cli.command()
@click.argument("ref")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A new folder.")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@json_option
@with_store(readonly=True)
def export(store: Store, ref: str, out: str, base_path: str | None, as_json: bool) -> None:
    """Write the full fine-tuned model (base + delta) as a Hugging Face model folder."""
    with progress("writing", enabled=not as_json) as cb:
        path = store.export(ref, out, base_weights=base_path, progress=cb)
    if as_json:
        return emit_json({"ref": store.resolve(ref).ref, "out": str(path)})
    echo(f"wrote {path}")


@cli.command()
@click.option("--read-data", is_flag=True, help="Re-hash every object.")
@click.option("--repair", is_flag=True, help="Do what is safe: remove stale temporary files and pending rows.")
@click.option("--rebuild-catalog", is_flag=True,
              help="First rebuild the catalog from the store's objects, refs.log and journals alone "
                   "(when it is missing, damaged or disagrees with them; no other process may use the store).")
@json_option
@click.pass_context
def fsck(ctx: click.Context, read_data: bool, repair: bool, rebuild_catalog: bool, as_json: bool) -> None:
    """Check the store: the catalog against the refs and objects, every object and journal. Exit 1 on errors."""
    root = store_path(ctx)
    rebuilt = Store.rebuild_catalog(root) if rebuild_catalog else None
    if rebuilt is not None and not as_json:
        click.echo(f"rebuilt the catalog: {rebuilt.versions} versions in {rebuilt.stances} stances, "
                   f"{rebuilt.bases} bases, {rebuilt.journals} open journals")
    store = Store.open(root, readonly=None if repair or rebuild_catalog else True)
    ctx.call_on_close(store.close)
    report = store.fsck(read_data=read_data, repair=repair)
    if as_json:
        emit_json({"ok": report.ok, "problems": report.problems, "objects_checked": report.objects_checked,
                   "versions_checked": report.versions_checked, "repaired": report.repaired,
                   **({"rebuilt": rebuilt} if rebuilt else {})})
    else:
        for line in report.repaired:
            echo(f"repaired: {line}")
        notes: dict[str, list] = {}
        for p in report.problems:
            if not p.error:
                notes.setdefault(p.kind, []).append(p)
                continue
            where = f" (breaks {', '.join(p.versions)})" if p.versions else ""
            echo(f"error: {p.kind}: {p.message}{where}")
        for kind, items in notes.items():
            # Harmless findings can be many (every object a revert left for gc): one line each kind.
            more = f" (and {len(items) - 1} more like it)" if len(items) > 1 else ""
            echo(f"note: {kind}: {items[0].subject}: {items[0].message}{more}")
        echo(f"{report.versions_checked} versions, {report.objects_checked} objects re-hashed: "
             f"{'ok' if report.ok else f'{len(report.errors)} errors'}")
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only print the plan: what it would free (--verbose: every object).")
@click.option("-v", "--verbose", is_flag=True, help="With --dry-run: list every object and file it would remove.")
@click.option("--remote", "remote", metavar="NAME", help="Collect a remote's garbage instead of the store's.")
@click.option("--grace", "grace", type=click.FloatRange(min=0), default=24 * 3600.0, show_default=True,
              metavar="SECONDS", help="With --remote: keep unreferenced objects younger than this (a push may be landing them).")
@json_option
@with_store
def gc(store: Store, dry_run: bool, verbose: bool, remote: str | None, grace: float, as_json: bool) -> None:
    """Remove objects that no version, journal or running commit references."""
    if remote is not None:
        return gc_remote(store, remote, grace, dry_run, as_json)
    plan = store.gc_plan()
    if dry_run:
        if as_json:
            return emit_json({"dry_run": True, "objects": plan.objects, "bytes": plan.bytes,
                              "object_bytes": dict(zip(plan.objects, plan.sizes)),
                              "tmp_files": plan.tmp_files, "dead_commits": plan.dead_commits})
        if verbose:
            for oid, n in zip(plan.objects, plan.sizes):
                echo(f"would remove {oid}  {size(n)}")
            for name in plan.tmp_files:
                echo(f"would remove {name}")
        return echo(f"would free {size(plan.bytes)} in {len(plan.objects)} objects"
                    + (f" and {len(plan.tmp_files)} temporary files" if plan.tmp_files else ""))
    if not as_json:
        echo(f"plan: remove {len(plan.objects)} objects, {size(plan.bytes)}")
    result = store.gc(plan)
    if as_json:
        return emit_json({"dry_run": False, "objects": result.removed, "bytes": result.bytes_freed,
                          "skipped": result.skipped, "tmp_files": result.tmp_files_removed})
    echo(f"freed {size(result.bytes_freed)} in {len(result.removed)} objects"
         + (f" ({len(result.skipped)} kept: in use again)" if result.skipped else ""))


def gc_remote(store: Store, remote: str, grace: float, dry_run: bool, as_json: bool) -> None:
    from deltastore.remote import remote_url
    from deltastore.remotegc import gc as run_gc, gc_plan

    plan = gc_plan(remote_url(store.root, remote), grace_seconds=grace)
    if dry_run:
        if as_json:
            return emit_json({"dry_run": True, "remote": plan.url, "objects": list(plan.objects), "bytes": plan.bytes,
                              "kept_young": plan.kept_young})
        for oid, n in zip(plan.objects, plan.sizes):
            click.echo(f"would remove {oid}  {size(n)}")
        return click.echo(f"would free {size(plan.bytes)} in {len(plan.objects)} objects "
                          f"({plan.kept_young} unreferenced objects younger than {grace:g} s kept)")
    result = run_gc(plan)
    if as_json:
        return emit_json({"dry_run": False, "remote": plan.url, "objects": list(result.removed),
                          "bytes": result.bytes_freed, "skipped": list(result.skipped), "kept_young": plan.kept_young})
    click.echo(f"freed {size(result.bytes_freed)} in {len(result.removed)} objects of {plan.url}"
               + (f" ({len(result.skipped)} kept: in use again)" if result.skipped else ""))


@cli.command()
@json_option
@with_store(readonly=True)
def stats(store: Store, as_json: bool) -> None:
    """Bytes stored, bytes saved by dedup, per stance and per encoding."""
    s = store.stats()
    if as_json:
        return emit_json(s)
    echo(f"objects {s.objects}, stored {size(s.bytes_stored)}, referenced {size(s.bytes_referenced)}, "
         f"saved by dedup {size(s.bytes_saved_by_dedup)}, catalog {size(s.catalog_bytes)}")
    table([[k, v["versions"], size(v["bytes"])] for k, v in s.by_stance.items()], ["stance", "versions", "bytes"])
    table([[k, v["tensors"], size(v["bytes"])] for k, v in s.by_encoding.items()], ["encoding", "tensors", "bytes"])


@cli.command()
@json_option
@click.pass_context
def upgrade(ctx: click.Context, as_json: bool) -> None:
    """Convert a store of an older format in place (crash-safe; no other process may use the store)."""
    from deltastore.upgrade import upgrade as run_upgrade

    done = run_upgrade(store_path(ctx))
    if as_json:
        return emit_json(done)
    click.echo(f"upgraded the store from {done.was}: {done.versions} versions, {done.bases} bases, "
               f"{done.journals} open journals")


def hub_options(f: Callable) -> Callable:
    """--token and --endpoint, which default to what huggingface_hub reads (HF_TOKEN or the saved
    login, HF_ENDPOINT), as huggingface-cli does."""
    f = click.option("--endpoint", metavar="URL", help="The Hub's URL (default: $HF_ENDPOINT, else huggingface.co).")(f)
    return click.option("--token", metavar="TOKEN", help="A Hub access token (default: $HF_TOKEN, else the saved login).")(f)


def hub_version_json(hv: Any) -> dict:
    return {"ref": hv.ref, "stance": hv.stance, "number": hv.number, "id": hv.id, "revision": hv.tag}


@cli.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--repo", "repo_id", metavar="ID", help="The Hub repo, USER/NAME (created if missing).")
@click.option("--remote", "remote", metavar="NAME", help="A remote (`remote add`) or a URL, instead of the Hub.")
@click.option("--revision", metavar="BRANCH", help="The branch to push to (default: main; created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@hub_options
@json_option
@with_store(readonly=True)
def push(store: Store, refs: tuple[str, ...], repo_id: str | None, remote: str | None, revision: str | None,
         private: bool, token: str | None, endpoint: str | None, as_json: bool) -> None:
    """Upload versions to a Hub repo (one commit, and a tag STANCE-vN per version) or to a remote
    (each version takes its stance's next number there). Versions already there are not uploaded
    again."""
    if (repo_id is None) == (remote is None):
        raise click.UsageError("give one of --repo ID (the Hub) and --remote NAME")
    if remote is not None:
        return push_to_remote(store, refs, remote, as_json)
    from deltastore.hub import push as hub_push

    r = hub_push(store, list(refs), repo_id, revision=revision, private=private, token=token, endpoint=endpoint,
                 progress=not as_json and sys.stderr.isatty())
    if as_json:
        return emit_json({"repo": r.repo_id, "revision": r.revision, "url": r.url, "commit": r.commit,
                          "pushed": [hub_version_json(hv) for hv in r.pushed],
                          "already_there": [hub_version_json(hv) for hv in r.already_there],
                          "tags_created": list(r.tags_created), "bytes_uploaded": r.bytes_uploaded})
    for hv in r.pushed:
        echo(f"pushed {hv.ref} {hv.id[:15]} as revision {hv.tag}")
    for hv in r.already_there:
        echo(f"{hv.ref} is already in {r.repo_id}")
    echo(f"{r.url} ({'commit ' + r.commit[:12] + ', ' + size(r.bytes_uploaded) if r.commit else 'no new commit'})")


@cli.command()
@click.argument("repo_id", metavar="ID", required=False)
@click.option("--remote", "remote", metavar="NAME", help="A remote (`remote add`) or a URL, instead of the Hub.")
@click.option("--revision", metavar="REV", help="A branch, a commit, or a version's tag STANCE-vN (then only that version).")
@click.option("--stance", help="Pull only this stance.")
@click.option("--into", metavar="NAME",
              help="Store the pulled stance's versions under the local stance NAME (they keep their ids and numbers).")
@click.option("--force-download", is_flag=True,
              help="Fetch every file from the Hub again instead of reading the local Hugging Face cache.")
@hub_options
@json_option
@with_store
def pull(store: Store, repo_id: str | None, remote: str | None, revision: str | None, stance: str | None,
         into: str | None, force_download: bool, token: str | None, endpoint: str | None, as_json: bool) -> None:
    """Download versions from a Hub repo (ID), or from a remote (ID the name of one, or --remote),
    into the store, verified: nothing is stored unless every name, size and hash checks out and
    every version's base is a base of this store (a remote brings its bases along). A local
    stance holding versions the repo's stance lacks is never added to: pull that stance
    --into another name."""
    from deltastore.remote import remotes

    if remote is None and repo_id is not None and repo_id in remotes(store.root):
        remote, repo_id = repo_id, None
    if (repo_id is None) == (remote is None):
        raise click.UsageError("give one of ID (a Hub repo, or a remote's name) and --remote NAME")
    if remote is not None:
        if into is not None or force_download or revision is not None:
            raise click.UsageError("--into, --revision and --force-download are for a Hub repo, not a remote")
        return pull_from_remote(store, remote, stance, as_json)
    from deltastore.hub import pull as hub_pull

    r = hub_pull(store, repo_id, revision=revision, stance=stance, into=into, token=token, endpoint=endpoint,
                 force_download=force_download, progress=not as_json and sys.stderr.isatty())
    if as_json:
        return emit_json({"repo": r.repo_id, "revision": r.revision, "commit": r.commit,
                          "pulled": [hub_version_json(hv) for hv in r.pulled],
                          "already_here": [hub_version_json(hv) for hv in r.already_here],
                          "bytes_downloaded": r.bytes_downloaded})
    for hv in r.pulled:
        echo(f"pulled {hv.ref} {hv.id[:15]}")
    for hv in r.already_here:
        echo(f"{hv.ref} was already here")
    echo(f"{len(r.pulled)} new versions from {r.repo_id} at {r.commit[:12]}")


# -- remotes: object storage and shared folders (deltastore/remote.py) --------------------------


def remote_version_json(rv: Any) -> dict:
    return {"ref": rv.ref, "stance": rv.stance, "number": rv.number, "id": rv.id}


def push_to_remote(store: Store, refs: tuple[str, ...], remote: str, as_json: bool) -> None:
    from deltastore.remote import push as remote_push, remote_url

    url = remote_url(store.root, remote)
    with progress("uploading", enabled=not as_json) as cb:
        r = remote_push(store, list(refs), url, progress=cb)
    if as_json:
        return emit_json({"remote": r.url, "pushed": [remote_version_json(rv) for rv in r.pushed],
                          "already_there": [remote_version_json(rv) for rv in r.already_there],
                          "objects_uploaded": r.objects_uploaded, "bytes_uploaded": r.bytes_uploaded})
    for rv in r.pushed:
        click.echo(f"pushed {rv.ref} {rv.id[:15]}")
    for rv in r.already_there:
        click.echo(f"{rv.ref} {rv.id[:15]} is already there")
    click.echo(f"{r.url}: {r.objects_uploaded} objects, {size(r.bytes_uploaded)} uploaded")


def pull_from_remote(store: Store, remote: str, stance: str | None, as_json: bool) -> None:
    from deltastore.remote import pull as remote_pull, remote_url

    url = remote_url(store.root, remote)
    with progress("downloading", enabled=not as_json) as cb:
        r = remote_pull(store, url, stance=stance, progress=cb)
    render_pull(r, as_json)


def render_pull(r: Any, as_json: bool) -> None:
    if as_json:
        return emit_json({"remote": r.url, "pulled": [remote_version_json(rv) for rv in r.pulled],
                          "already_here": [remote_version_json(rv) for rv in r.already_here],
                          "bases_added": list(r.bases_added), "objects_downloaded": r.objects_downloaded,
                          "bytes_downloaded": r.bytes_downloaded})
    for rv in r.pulled:
        click.echo(f"pulled {rv.ref} {rv.id[:15]}")
    click.echo(f"{len(r.pulled)} new versions from {r.url} ({r.objects_downloaded} objects, "
               f"{size(r.bytes_downloaded)} downloaded)")


@cli.group()
def remote() -> None:
    """Remotes: object storage (s3://, gs://, az://) or a shared folder (file://) to push to and
    pull from. Credentials come from each backend's usual places and are never stored."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@with_store
def remote_add(store: Store, name: str, url: str) -> None:
    """Remember URL as remote NAME."""
    from deltastore.remote import add_remote

    add_remote(store.root, name, url)
    click.echo(f"remote {name}: {url}")


@remote.command("list")
@json_option
@with_store(readonly=True)
def remote_list(store: Store, as_json: bool) -> None:
    """The store's remotes."""
    from deltastore.remote import remotes

    known = remotes(store.root)
    if as_json:
        return emit_json([{"name": n, "url": u} for n, u in known.items()])
    for name, url in known.items():
        click.echo(f"{name}\t{url}")


@remote.command("remove")
@click.argument("name")
@with_store
def remote_remove(store: Store, name: str) -> None:
    """Forget remote NAME (the remote itself is not touched)."""
    from deltastore.remote import remove_remote

    click.echo(f"removed remote {name} ({remove_remote(store.root, name)})")


@cli.command()
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
def clone(url: str, directory: str, as_json: bool) -> None:
    """A new store in DIRECTORY/.deltastore holding every version of the remote at URL (kept as
    its remote `origin`), verified as a pull is."""
    from deltastore.remote import clone as remote_clone

    with progress("downloading", enabled=not as_json) as cb:
        store, r = remote_clone(url, directory, progress=cb)
    store.close()
    render_pull(r, as_json)


# -- what a fine-tune costs and keeps (deltastore/compare.py, deltastore/lora.py) -------------


def _number_list(text: str, option: str, kind: type = str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s",
                                 param_hint=option) from None


def _kl(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}"


def _finite(value: Any) -> Any:
    """JSON has no inf or nan: those become null."""
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@cli.command("compare")
@click.argument("base", type=click.Path(exists=True))
@click.argument("model", type=click.Path(exists=True))
@click.option("--encodings", "encodings_text", default="lossless,int8,int4,nf4,fp4,1bit", show_default=True,
              callback=lower_case,
              help="Delta encodings to compare, comma-separated (lowrank:R too).")
@click.option("--ranks", "ranks_text", default="8,32", show_default=True,
              help="LoRA ranks to compare, comma-separated ('' for none).")
@click.option("--full", "full_text", default="int4,nf4", show_default=True, callback=lower_case,
              help="Encodings of the whole model quantised, comma-separated ('' for none).")
@click.option("--select", "selects", multiple=True, metavar="SPEC",
              help="A selection to compare (repeatable): KEY=VALUE pairs joined by ';', keys include, exclude, "
                   "top_k, min_rel_change, energy, encoding; e.g. 'include=layers\\.15\\.self_attn\\.v_proj' "
                   "or 'top_k=2;encoding=int4'.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Measure fidelity on these prompts (one per line); BASE must be a Hugging Face model folder.")
@click.option("--chat", is_flag=True, help="Each prompt is a user message, put through the model's chat template.")
@click.option("--tokenizer", type=click.Path(exists=True), metavar="PATH_OR_FOLDER",
              help="The tokenizer for --prompts (a tokenizer.json or a folder holding one), where the base "
                   "folder has none.")
@click.option("--group-size", type=int, help="Group size of int8/int4 (default 64).")
@click.option("--lora-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="The dtype of the LoRA factors.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG", help="Draw size against KL (needs --prompts).")
@json_option
def compare_command(base: str, model: str, encodings_text: str, ranks_text: str, full_text: str,
                    selects: tuple[str, ...], prompts: str | None, chat: bool, tokenizer: str | None,
                    group_size: int | None,
                    lora_dtype: str,
                    plot: str | None, as_json: bool) -> None:
    """What each way of storing fine-tune MODEL of BASE costs, and how much of it each keeps.

    One row per way: the base itself (nothing kept), the full copy (raw and zstd), the full
    model quantised, every delta encoding, a LoRA of each rank (R*(m+n) per changed matrix, and
    the mean share of each delta's energy rank R holds) and each --select. Bytes are what the
    store would write. With --prompts, each row's fidelity: the mean KL(fine-tuned || stored) of
    the next-token distributions and the top-1 agreement. Nothing is written to a store."""
    from deltastore.compare import compare as run_compare, plot as draw

    if plot and not prompts:
        raise click.UsageError("--plot draws KL against size: give --prompts FILE too")
    options = {"group_size": group_size} if group_size is not None else {}
    with progress("comparing", enabled=not as_json) as cb:
        c = run_compare(base, model, encodings=_number_list(encodings_text, "--encodings"),
                        ranks=_number_list(ranks_text, "--ranks", int), full=_number_list(full_text, "--full"),
                        selections=selects, prompts=prompts, chat=chat, tokenizer=tokenizer, lora_dtype=lora_dtype,
                        encoding_options=options, progress=cb)
    if plot:
        draw(c, plot)
    if as_json:
        return emit_json(_finite({**to_jsonable(c), "plot": plot}))
    what = (f"fidelity over {c.prompts} prompts ({c.positions} positions)" if c.fidelity_skipped is None
            else f"no fidelity: {c.fidelity_skipped}")
    echo(f"{c.changed} of {c.tensors} tensors changed; full copy {size(c.full_bytes)} ({c.dtype}); {what}")
    table([[r.label, size(r.bytes), f"{r.fraction:.4f}" if r.bytes else "0", r.tensors,
            "-" if r.energy is None else f"{r.energy:.3f}", _kl(r.kl),
            "-" if r.top1 is None else f"{r.top1:.1%}", r.note] for r in c.rows],
          ["stored as", "bytes", "of full", "tensors", "energy", "KL", "top-1", "note"])
    if plot:
        echo(f"wrote {plot}")


@cli.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="A heatmap: layers down, module kinds across, one panel per ref, one colour scale.")
@click.option("--value", type=click.Choice(["rel_change", "energy", "energy_share", "rank90", "rank99"]),
              default="rel_change", show_default=True, help="What the heatmap shows.")
@click.option("--all", "show_all", is_flag=True, help="List unchanged (layer, module) cells too.")
@click.option("--spectrum", metavar="NAME",
              help="Instead: the singular values of one tensor in the base, in each ref and of each delta "
                   "(--plot draws them).")
@click.option("--alpha", "with_alpha", is_flag=True,
              help="Add WeightWatcher's power-law alpha of each row's matrix in the base and in the "
                   "fine-tune, and its shift (alpha_ft - alpha_base) / alpha_base (needs "
                   "pip install 'deltastore[alpha]'; one fit takes about 0.06 s for a 576x576 matrix, "
                   "3 s for 8192x2048, on two CPU cores).")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@json_option
@with_store(readonly=True)
def analyze(store: Store, refs: tuple[str, ...], plot: str | None, value: str, show_all: bool,
            spectrum: str | None, with_alpha: bool, base_path: str | None, as_json: bool) -> None:
    """Which layers and modules each version changed, and how: per layer and module kind, the
    relative change ||dW||/||W||, the share of the squared delta, the effective rank (the rank
    holding 90% and 99% of the delta's energy) and the top singular values. dW is what apply
    produces minus the base, so versions of any encoding compare. --alpha adds WeightWatcher's
    power-law alpha of the weights before and after (the mean over a row's matrices; "-" where
    it fits none: vectors, and matrices outside its default size limits)."""
    from deltastore.compare import analyze as run_analyze, analyze_plot

    if with_alpha and spectrum:
        raise click.UsageError("--alpha adds columns to the analysis table; --spectrum shows one tensor instead")
    if spectrum:
        from deltastore.compare import spectra, spectrum_plot

        found = spectra(store, list(refs), spectrum, base_weights=base_path)
        if plot:
            spectrum_plot(found, plot)
        if as_json:
            return emit_json({"spectra": to_jsonable(found), "plot": plot})
        echo(f"singular values of {spectrum} (largest 5)")
        table([["base", *(f"{x:.4g}" for x in found[0].base[:5])]]
              + [[f"{s.ref}", *(f"{x:.4g}" for x in s.tuned[:5])] for s in found]
              + [[f"{s.ref} delta", *(f"{x:.4g}" for x in s.delta[:5])] for s in found],
              ["", "1", "2", "3", "4", "5"])
        return echo(f"wrote {plot}") if plot else None
    with progress("analyzing", enabled=not as_json) as cb:
        results = run_analyze(store, list(refs), base_weights=base_path, alpha=with_alpha, progress=cb)
    if plot:
        analyze_plot(results, plot, value=value)
    if as_json:
        return emit_json(_finite({"refs": [_analysis_json(a) for a in results], "plot": plot}))
    for k, a in enumerate(results):
        if k:
            echo()
        rows = [r for r in a.rows if show_all or r.energy > 0 or r.rel_change != 0]
        echo(f"{a.ref} ({a.encoding}, {a.tensors} tensors stored): {len(rows)} of {len(a.rows)} "
             f"(layer, module) cells {'listed' if show_all else 'changed'}")
        alpha_headers = ["alpha base", "alpha ft", "alpha shift"] if a.row_alphas is not None else []
        table([["-" if r.layer is None else r.layer, r.module, r.tensors, f"{r.rel_change:.3g}",
                *_alpha_cells(a, r), f"{r.energy_share:.1%}", r.rank90, r.rank99,
                " ".join(f"{x:.3g}" for x in r.singular_values[:3]) or "-"] for r in rows],
              ["layer", "module", "tensors", "rel change", *alpha_headers, "energy", "rank90", "rank99",
               "top singular values"])
    if plot:
        echo(f"wrote {plot}")


def _alpha_cells(a: Any, row: Any) -> list[str]:
    """Alpha base, alpha ft and the shift of one analyze row ("-" where WeightWatcher fits
    none), or nothing without --alpha, so that the table is as it was."""
    if a.row_alphas is None:
        return []
    found = a.row_alphas.get((row.layer, row.module))
    if found is None:
        return ["-", "-", "-"]
    return [_alpha(found.alpha_base), _alpha(found.alpha_ft),
            "-" if found.alpha_shift is None else f"{100 * found.alpha_shift:+.3g}%"]  # -36.6%, +0.0121%


def _alpha(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _analysis_json(a: Any) -> dict[str, Any]:
    """One ref of analyze --json; with --alpha, each row gets alpha_base, alpha_ft and
    alpha_shift, and "alpha" gives them per tensor."""
    rows = to_jsonable(list(a.rows))
    out = {"ref": a.ref, "id": a.version_id, "encoding": a.encoding, "tensors_stored": a.tensors, "rows": rows}
    if a.row_alphas is not None:
        for row in rows:
            found = a.row_alphas.get((row["layer"], row["module"]))
            row.update(to_jsonable(found) if found else {"alpha_base": None, "alpha_ft": None, "alpha_shift": None})
        out["alpha"] = to_jsonable(dict(a.alphas))
    return out


@cli.command("export-lora")
@click.argument("ref")
@click.option("--rank", type=int, help="The rank of every pair (at most each matrix's smaller side).")
@click.option("--energy", type=float,
              help="Per matrix, the smallest rank holding this fraction of its delta's energy (rank_pattern); "
                   "capped by --rank.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "q8_0"]), default="bf16", show_default=True,
              help="The dtype of the factors (q8_0: GGUF only).")
@click.option("--format", "fmt", type=click.Choice(["peft", "gguf"]), default="peft", show_default=True,
              help="peft: an adapter folder; gguf: one GGUF LoRA file for llama.cpp and Ollama (Llama, Qwen2, GPT-2).")
@click.option("--out", required=True, type=click.Path(), help="A new folder (--format gguf: a new .gguf file).")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@click.option("--exact", is_flag=True,
              help="Factor each delta by its exact truncated SVD instead of a randomized one (slower; "
                   "--energy always does).")
@json_option
@with_store(readonly=True)
def export_lora(store: Store, ref: str, rank: int | None, energy: float | None, dtype: str, fmt: str, out: str,
                base_path: str | None, exact: bool, as_json: bool) -> None:
    """Write a version as a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)
    that peft.PeftModel.from_pretrained loads: each changed 2-D weight of a Linear or Embedding
    module becomes lora_A/lora_B from a randomized SVD of its delta (--exact: the truncated SVD;
    lora_alpha = r, so the scaling is 1); changed norms go to modules_to_save, changed biases of
    those modules with bias="lora_only". Anything else is listed as dropped. The energy shown is
    measured on the pairs written, as compare's energy column: the mean over the pairs of the
    share of each delta's energy (squared Frobenius norm) its pair holds. With --format gguf, a
    GGUF LoRA file as llama.cpp's convert_lora_to_gguf.py writes one: pairs for Linear and Conv1D
    weights only; changed embeddings, norms and biases are listed as dropped, with their share of
    the delta."""
    from deltastore.lora import export_lora as run_export

    if rank is None and energy is None:
        raise click.UsageError("give --rank R, --energy F, or both")
    if fmt == "gguf":
        from deltastore.gguf_lora import export_gguf_lora

        gguf_dtype = {"bf16": "bf16", "fp16": "f16", "fp32": "f32", "q8_0": "q8_0"}[dtype]
        with progress("factoring", enabled=not as_json) as cb:
            g = export_gguf_lora(store, ref, out, rank=rank, energy=energy, dtype=gguf_dtype,
                                 base_weights=base_path, progress=cb)
        if as_json:
            return emit_json(_finite(to_jsonable(g)))
        echo(f"wrote {g.out}: {len(g.ranks)} LoRA pairs for {g.architecture}, rank at most {g.rank} ({g.dtype}); "
             f"{size(g.bytes)}; the pairs hold {g.energy_kept:.1%} of their deltas' energy")
        if g.warning:
            echo(f"warning: {g.warning}", err=True)
        return None
    with progress("factoring", enabled=not as_json) as cb:
        e = run_export(store, ref, out, rank=rank, energy=energy, dtype=dtype, base_weights=base_path,
                       exact=exact, progress=cb)
    if as_json:
        return emit_json(_finite(to_jsonable(e)))
    ranks = sorted(set(e.ranks.values()))
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
    echo(f"wrote {e.out}: {len(e.targets)} LoRA pairs at {shown} ({e.dtype}), {len(e.saved)} tensors "
         f"whole; {size(e.bytes)}")
    echo(f"energy held ({'exact' if e.exact else 'randomized'} SVD, measured): {e.energy_kept:.3f} per "
         f"delta on average (as compare's energy column), {e.energy_kept_total:.3f} of all the deltas' "
         "energy together")
    if e.warning:
        echo(f"warning: {e.warning}", err=True)


@cli.command("import-lora")
@click.argument("stance")
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--base", "base_ref",
              help="The base the adapter was trained on: name, id prefix or path (default: the store's only base).")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@click.option("--encoding", callback=lower_case, metavar="ENCODING",
              help=f"How to store the result: {ENCODINGS} (any case); default lowrank:R, R the adapter's rank, "
                   "in its dtype.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="User metadata (repeatable).")
@click.option("--tag", help="Tag the new version.")
@json_option
@with_store
def import_lora(store: Store, stance: str, adapter: str, base_ref: str | None, base_path: str | None,
                encoding: str | None, message: str, meta: tuple[str, ...], tag: str | None, as_json: bool) -> None:
    """Commit a PEFT LoRA adapter folder (safetensors only) as a new version of STANCE, as commit
    takes STANCE MODEL: each target weight becomes W + scaling * B @ A, modules_to_save and biases
    replace the base's. Every name and shape is checked against the base first; an adapter for
    another model is refused. (The older order, ADAPTER STANCE, still works, with a warning.)"""
    from deltastore.lora import ADAPTER_CONFIG, import_lora as run_import

    if (Path(stance) / ADAPTER_CONFIG).is_file() and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        echo(f"warning: import-lora ADAPTER STANCE is deprecated: write import-lora {adapter} {stance}", err=True)
        stance, adapter = adapter, stance
    base_ref = only_base(store, base_ref)

    with progress("importing", enabled=not as_json) as cb:
        i = run_import(store, adapter, stance, base=base_ref, base_weights=base_path, encoding=encoding,
                       message=message, metadata=parse_pairs(meta, "--meta"), tag=tag, progress=cb)
    r = i.result
    v = r.version
    if as_json:
        return emit_json({"id": v.id, "ref": v.ref, "stance": v.stance, "number": v.number, "encoding": i.encoding,
                          "rank": i.rank, "targets": list(i.targets), "replaced": list(i.replaced),
                          "tensors_stored": r.tensors_stored, "bytes_stored": r.bytes_stored})
    echo(f"{v.ref} {v.id}")
    echo(f"{len(i.targets)} LoRA pairs (rank {i.rank}) and {len(i.replaced)} whole tensors, stored as "
         f"{i.encoding}: {r.tensors_stored} tensors, {size(r.bytes_stored)}")


def main() -> None:
    cli(prog_name="deltastore")
