"""Commands on bases: base add, base list, base remove."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deltastore import Base, Store
from deltastore.core.errors import HubRepoNotFound, short

from .options import hub_options, json_option, with_store
from .output import echo, emit_json, progress, size, table, to_jsonable

# Library modules that import torch (or transformers, matplotlib, huggingface_hub) are imported
# inside the commands that use them: this module is loaded for its light commands too, and those
# must start without them (cli/main.py, tests/test_startup.py).


@click.group()
def base() -> None:
    """Register, list and remove base models."""


@base.command("add")
@click.argument("model")
@click.option("--name", help="A name to refer to the base by.")
@click.option("--hub-id", help="The base's Hugging Face Hub id (for model cards), when MODEL is a path.")
@click.option("--from-hub", is_flag=True,
              help="MODEL is a Hub repo (HUB_ID[@REVISION]), even where a file or folder of that name exists.")
@click.option("--verify", is_flag=True,
              help="Hash every weight file whole, even one this store hashed before whose stat data (device, inode, "
                   "size, times) is unchanged.")
@hub_options
@json_option
@with_store
def base_add(store: Store, model: str, name: str | None, hub_id: str | None, from_hub: bool, verify: bool,
             token: str | None, endpoint: str | None, as_json: bool) -> None:
    """Register a base: MODEL is a .safetensors file or a model folder, or a Hub repo
    HUB_ID[@REVISION] (when no such path exists, or with --from-hub): its safetensors weights,
    config and tokenizer files are fetched into the Hugging Face cache (HF_HOME, HF_ENDPOINT and
    HF_TOKEN as usual) and registered there, not copied, with the Hub id and the commit the
    revision (default: the main branch) resolved to. Prints its short id, tensor count and size,
    then its whole id. A weight file this store hashed whole before, and whose stat data has not
    changed since, is not hashed again (a re-add is near-instant); --verify hashes it."""
    from deltastore.sharing.hubbase import looks_like_hub_ref

    if from_hub or (not Path(model).exists() and looks_like_hub_ref(model)):
        if hub_id is not None:
            raise click.UsageError("--hub-id is for a base given by its path; a Hub repo records its own id")
        b = add_from_hub(store, model, name, token, endpoint, as_json, tried_path=not from_hub, verify=verify)
    else:
        with progress("hashing", enabled=not as_json) as cb:
            b = store.add_base(model, name=name, hub_id=hub_id, progress=cb, verify=verify)
    if as_json:
        emit_json({**to_jsonable(b), "short_id": b.id.split(":", 1)[-1][:12]})  # as a version's short_id
    else:
        echo(f"base {b.name + ' ' if b.name else ''}{short(b.id)}: {b.tensor_count} tensors, {size(b.bytes)}")
        echo(f"id {b.id}")


def add_from_hub(store: Store, ref: str, name: str | None, token: str | None, endpoint: str | None,
                 as_json: bool, *, tried_path: bool, verify: bool = False) -> Base:
    from deltastore.sharing.hubbase import fetch_base, split_hub_ref

    repo_id, revision = split_hub_ref(ref)
    try:
        with progress("hashing", enabled=not as_json) as cb:
            return fetch_base(store, repo_id, revision=revision, name=name, token=token, endpoint=endpoint,
                              progress=not as_json and sys.stderr.isatty(), hashing=cb,
                              verify=verify)
    except HubRepoNotFound as e:
        if not tried_path:
            raise
        raise HubRepoNotFound(repo_id, endpoint=e.endpoint, revision=revision, message=(
            f"no file or folder {ref} here, and no Hub repo {repo_id} at {e.endpoint} (or it is private and "
            "this token cannot see it); check the path or the id")) from None


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
