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
@click.option("--scale", type=float, metavar="A",
              help="Write base + A*delta instead (needs --out: files are patched in place only with a version "
                   "as stored).")
@json_option
@with_store
def apply(store: Store, ref: str, target: str, out: str | None, break_links: bool, scale: float | None,
          as_json: bool) -> None:
    """Apply a version to TARGET, a model file or folder of the version's base.

    Without --out, TARGET's safetensors files are patched in place, journalled in the store so
    that `deltastore revert TARGET` restores them exactly, even after a crash. A weight file that
    another path shares (a symlink, a hard link) is refused; one apply or revert at a time.
    --scale A with --out writes base + A*delta (A = 0.5: the stance at half strength)."""
    if scale is not None:
        if not out:
            raise click.ClickException(f"--scale writes a new folder only: add --out DIR, or use "
                                       f"`deltastore export --mix {ref}={scale:g} --out DIR`")
        from deltastore.mix import export_mix

        with progress("writing", enabled=not as_json) as cb:
            path = export_mix(store, {ref: scale}, out, base_weights=target, progress=cb)
        result = {"ref": store.resolve(ref).ref, "scale": scale, "out": str(path)}
        return emit_json(result) if as_json else echo(f"wrote {path}")
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


def _mix(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    """REF=A,REF=B -> {REF: A, REF: B}."""
    if value is None:
        return None
    weights: dict[str, float] = {}
    for item in value.split(","):
        ref, equals, weight = item.strip().rpartition("=")
        try:
            if not equals or not ref:
                raise ValueError
            weights[ref] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{item.strip()!r} is not REF=WEIGHT (e.g. curious@2=0.5)") from None
    return weights


@click.command()
@click.argument("ref", required=False)
@click.option("--mix", "mix", callback=_mix, metavar="REF=A,REF=B",
              help="Instead of REF: write base + A*delta(REF) + B*delta(REF) ..., each tensor rounded once "
                   "(versions of one base).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="A new folder.")
@click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")
@json_option
@with_store(readonly=True)
def export(store: Store, ref: str | None, mix: dict[str, float] | None, out: str, base_path: str | None,
           as_json: bool) -> None:
    """Write the full fine-tuned model (base + delta) as a Hugging Face model folder."""
    if (ref is None) == (mix is None):
        raise click.UsageError("give REF, or --mix REF=A,REF=B, not both")
    if mix is not None:
        from deltastore.mix import export_mix

        with progress("writing", enabled=not as_json) as cb:
            path = export_mix(store, mix, out, base_weights=base_path, progress=cb)
        if as_json:
            return emit_json({"mix": mix, "out": str(path)})
        return echo(f"wrote {path}")
    with progress("writing", enabled=not as_json) as cb:
        path = store.export(ref, out, base_weights=base_path, progress=cb)
    if as_json:
        return emit_json({"ref": store.resolve(ref).ref, "out": str(path)})
    echo(f"wrote {path}")
