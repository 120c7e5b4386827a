"""Commands that write model weights: apply (in place or to a new folder), revert, export."""

from __future__ import annotations

import click

from deltastore import Store

from .options import json_option, with_store
from .output import echo, emit_json, progress


@click.command()
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
    with progress("applying", enabled=not as_json) as cb:
        j = store.apply_files(ref, target, break_links=break_links, progress=cb)
    if as_json:
        return emit_json(j)
    echo(f"applied {store.resolve(j.version_id).ref} to {target} ({j.regions} tensors); "
         f"`deltastore revert {target}` undoes it")


@click.command()
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


@click.command()
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
