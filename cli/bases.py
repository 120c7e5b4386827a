"""Commands on bases: base add, base list, base remove."""

from __future__ import annotations

import click

from deltastore import Store

from .options import json_option, with_store
from .output import echo, emit_json, progress, size, table


@click.group()
def base() -> None:
    """Register, list and remove base models."""


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


@base.command("remove")
@click.argument("name")
@json_option
@with_store
def base_remove(store: Store, name: str, as_json: bool) -> None:
    """Forget base NAME (a name or id prefix), refused while any version uses it. The model's
    own files are not touched; `deltastore gc` then removes what the store kept of it."""
    b = store.remove_base(name)
    if as_json:
        return emit_json(b)
    echo(f"removed base {b.name or b.id[:19]} ({b.id}); `deltastore gc` frees what the store kept of it")
