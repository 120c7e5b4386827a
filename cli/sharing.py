"""Commands that move versions between stores and formats: push, pull, remote, clone,
export-lora, import-lora."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from deltastore import DeltastoreError, Store
from deltastore.sharing.remote import (PullResult as RemotePull, PushResult as RemotePush, Remote, RemoteVersion,
                               add_remote, clone as remote_clone, pull as remote_pull, push as remote_push,
                               remote_url, remotes, remove_remote)

from .options import (ENCODINGS, PEFT_DTYPES, Dtype, base_path_option, chat_option, export_tokenizer_option, finite,
                      hub_options, json_option, key_values, lower_case, only_base, out_option, remote_option, with_store)
from .output import echo, emit_json, escape, hold, on_interrupt, progress, size, to_jsonable

# Library modules that import torch (or transformers, matplotlib, huggingface_hub) are imported
# inside the commands that use them: this module is loaded for its light commands too, and those
# must start without them (cli/main.py, tests/test_startup.py).

if TYPE_CHECKING:
    from deltastore.exports.export_fidelity import ExportFidelity
    from deltastore.sharing.hub import PullResult as HubPull, PushResult as HubPush
    from deltastore.exports.gguf_lora import GgufLoraExport as GgufExport
    from deltastore.exports.lora import LoraExport


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--repo", "repo_id", metavar="ID", help="The Hub repo, USER/NAME (created if missing).")
@remote_option
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
        hold()
        on_interrupt(remote_holds(store, refs, remote))
        with progress("uploading", enabled=not as_json) as cb:
            r = remote_push(store, list(refs), remote, progress=cb)
        return emit_json(r) if as_json else remote_pushed(r)
    from deltastore.sharing.hub import push as hub_push

    on_interrupt(hub_holds(store, refs, repo_id, revision, token, endpoint))
    h = hub_push(store, list(refs), repo_id, revision=revision, private=private, token=token, endpoint=endpoint,
                 progress=not as_json and sys.stderr.isatty())
    return emit_json(h) if as_json else hub_pushed(h)


@click.command()
@click.argument("repo_id", metavar="ID", required=False)
@remote_option
@click.option("--revision", metavar="REV", help="A branch, a commit, or a version's tag STANCE-vN (then only that version).")
@click.option("--stance", help="Pull only this stance.")
@click.option("--into", metavar="NAME",
              help="Store the pulled stance's versions under the local stance NAME (they keep their ids; from a "
                   "Hub repo, their numbers too).")
@click.option("--force-download", is_flag=True,
              help="Fetch every file from the Hub again instead of reading the local Hugging Face cache.")
@click.option("--fetch-base", is_flag=True,
              help="Fetch a base this store lacks from the Hub repo and commit the pulled repo records for it "
                   "(into the Hugging Face cache), and register it if it is the very base the versions need.")
@click.option("--base-revision", metavar="REV",
              help="Fetch the base (as --fetch-base does) at this branch, tag or commit instead of the recorded one.")
@hub_options
@json_option
@with_store
def pull(store: Store, repo_id: str | None, remote: str | None, revision: str | None, stance: str | None,
         into: str | None, force_download: bool, fetch_base: bool, base_revision: str | None, token: str | None,
         endpoint: str | None, as_json: bool) -> None:
    """Download versions from a Hub repo (ID), or from a remote (ID the name of one, or --remote),
    into the store, verified: nothing is stored unless every name, size and hash checks out and
    every version's base is a base of this store (a remote brings its bases along; --fetch-base
    fetches them from the Hub, and refuses weights whose base id is not the one the versions
    need). From a Hub repo, a local stance holding versions the repo's stance lacks is never added
    to: pull that stance --into another name. From a remote, versions join the local stance of
    their name (or --into's): under the remote's numbers where those are above the stance's
    numbers here, otherwise after its newest, as the pull says."""
    if remote is None and repo_id is not None and repo_id in remotes(store):
        remote, repo_id = repo_id, None
    if (repo_id is None) == (remote is None):
        raise click.UsageError("give one of ID (a Hub repo, or a remote's name) and --remote NAME")
    if remote is not None:
        if force_download or revision is not None or fetch_base or base_revision is not None:
            raise click.UsageError("--revision, --force-download, --fetch-base and --base-revision are for a "
                                   "Hub repo, not a remote")
        with progress("downloading", enabled=not as_json) as cb:
            r = remote_pull(store, remote, stance=stance, into=into, progress=cb)
        return emit_json(r) if as_json else remote_pulled(r)
    from deltastore.sharing.hub import pull as hub_pull

    h = hub_pull(store, repo_id, revision=revision, stance=stance, into=into, token=token, endpoint=endpoint,
                 force_download=force_download, fetch_base=fetch_base or base_revision is not None,
                 base_revision=base_revision,
                 progress=not as_json and sys.stderr.isatty())
    return emit_json(h) if as_json else hub_pulled(h)


def hub_pushed(r: HubPush) -> None:
    for hv in r.pushed:
        echo(f"pushed {hv.ref} {hv.id[:15]} as revision {hv.tag}")
    for hv in r.already_there:
        echo(f"{hv.ref} is already in {r.repo_id}")
    echo(f"{r.url} ({'commit ' + r.commit[:12] + ', ' + size(r.bytes_uploaded) if r.commit else 'no new commit'})")


def hub_pulled(r: HubPull) -> None:
    for b in r.bases_fetched:
        echo(f"fetched base {b.id[:19]} from {b.hub_id} at {b.hub_revision[:12]}")
    for hv in r.pulled:
        echo(f"pulled {hv.ref} {hv.id[:15]}")
    for hv in r.already_here:
        echo(f"{hv.ref} was already here")
    echo(f"{len(r.pulled)} new versions from {r.repo_id} at {r.commit[:12]}")


def hub_holds(store: Store, refs: tuple[str, ...], repo_id: str, revision: str | None, token: str | None,
              endpoint: str | None) -> Callable[[], str]:
    """Which of the versions named the Hub repo's branch holds: the report of an interrupted
    push (the versions its one commit listed; their tags may have been on the way)."""
    from deltastore.sharing.hub import versions_held

    try:
        ids = {store.resolve(r).id for r in refs}
    except DeltastoreError:  # the push refuses them itself, before it sends anything
        ids = set()

    def report() -> str:
        there = versions_held(repo_id, ids, revision=revision, token=token, endpoint=endpoint) if ids else []
        if not there:
            return f"nothing was pushed: {repo_id} holds none of the versions named"
        return f"{repo_id} holds " + ", ".join(f"{hv.ref} {hv.id[:15]}" for hv in there)
    return report


def remote_holds(store: Store, refs: tuple[str, ...], remote: str) -> Callable[[], str]:
    """Which of the versions named the remote holds: the report of an interrupted push (a
    version is there once its ref is; objects uploaded without one are not a version). What
    it needs of the store is read now: the store may be closed when Ctrl-C comes."""
    try:
        url, ids = remote_url(store, remote), {store.resolve(r).id for r in refs}
    except DeltastoreError:  # the push refuses them itself, before it sends anything
        url, ids = None, set()

    def report() -> str:
        there = [rv for rv in Remote(url).versions() if rv.id in ids] if url else []
        if not there:
            return f"nothing was pushed: {remote} holds none of the versions named"
        return f"{remote} holds " + ", ".join(f"{rv.ref} {rv.id[:15]}" for rv in there)
    return report


def remote_pushed(r: RemotePush) -> None:
    for rv in r.pushed:
        echo(f"pushed {rv.ref} {rv.id[:15]}{_here(rv)}")
    for rv in r.already_there:
        echo(f"{rv.ref} {rv.id[:15]} is already there{_here(rv)}")
    for line in r.stale_locks_removed:
        echo(line)
    _tags(r)
    echo(f"{r.url}: {r.objects_uploaded} objects, {size(r.bytes_uploaded)} uploaded"
         + (f" ({r.objects_repaired} repaired: missing or damaged there)" if r.objects_repaired else ""))


def _tags(r: RemotePush | RemotePull) -> None:
    """The tags a push or a pull carried, and one line for each it left where it was."""
    if r.tags:
        echo(f"tags {', '.join(r.tags)}")
    for line in r.tags_not_moved:
        echo(line)


def _here(rv: RemoteVersion) -> str:
    """The version's ref in the store where it differs from the remote's (a stance both
    stores added to: FORMAT.md §10)."""
    return "" if rv.local in (None, rv.ref) else f" ({rv.local} here)"


def remote_pulled(r: RemotePull) -> None:
    for rv in r.pulled:
        landed = "" if rv.local == rv.ref else f" as {rv.local} here"
        echo(f"pulled {rv.ref} {rv.id[:15]}{landed}")
    _tags(r)
    echo(f"{len(r.pulled)} new versions from {r.url} ({r.objects_downloaded} objects, "
         f"{size(r.bytes_downloaded)} downloaded)")


@click.group()
def remote() -> None:
    """Remotes: object storage (s3://, gs://, az://) or a shared folder (file://) to push to and
    pull from. Credentials come from each backend's usual places and are never stored."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@with_store
def remote_add(store: Store, name: str, url: str) -> None:
    """Remember URL as remote NAME."""
    echo(f"remote {name}: {add_remote(store, name, url)}")


@remote.command("list")
@json_option
@with_store(readonly=True)
def remote_list(store: Store, as_json: bool) -> None:
    """The store's remotes."""
    known = remotes(store)
    if as_json:
        return emit_json(known)
    for name, url in known.items():
        click.echo(f"{escape(name)}\t{escape(url)}")  # escaped apart: the tab between them stays a tab


@remote.command("remove")
@click.argument("name")
@with_store
def remote_remove(store: Store, name: str) -> None:
    """Forget remote NAME (the remote itself is not touched)."""
    echo(f"removed remote {name} ({remove_remote(store, name)})")


@click.command()
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
def clone(url: str, directory: str, as_json: bool) -> None:
    """A new store in DIRECTORY/.deltastore holding every version of the remote at URL (kept as
    its remote `origin`), verified as a pull is. DIRECTORY/.deltastore must be new or empty; a
    clone that fails removes what it created, and only that."""
    with progress("downloading", enabled=not as_json) as cb:
        store, r = remote_clone(url, directory, progress=cb)
    store.close()
    return emit_json(r) if as_json else remote_pulled(r)


@click.command("export-lora")
@click.argument("ref")
@click.option("--rank", type=int, help="The rank of every pair (at most each matrix's smaller side).")
@click.option("--energy", type=float,
              help="Per matrix, the smallest rank holding this fraction of its delta's energy (rank_pattern); "
                   "capped by --rank.")
@click.option("--dtype", type=Dtype(["bf16", "f16", "f32", "q8_0"]), default="bf16", show_default=True,
              help="The dtype of the factors (q8_0: GGUF only; fp16, fp32 are taken as f16, f32).")
@click.option("--format", "fmt", type=click.Choice(["peft", "gguf"]), default="peft", show_default=True,
              help="peft: an adapter folder; gguf: one GGUF LoRA file for llama.cpp and Ollama (Llama, Qwen2, GPT-2).")
@out_option
@base_path_option
@click.option("--exact", is_flag=True,
              help="Factor each delta by its exact truncated SVD instead of a randomized one (slower; "
                   "--energy always does).")
@click.option("--for", "server", type=click.Choice(["vllm"]),
              help="vllm: an adapter vLLM loads: projections only, ranks capped at --max-rank, no modules_to_save.")
@click.option("--max-rank", type=int, help="With --for vllm: the server's --max-lora-rank (default 16).")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Measure the KL and top-1 of what was written (read back, merged into the base) against the "
                   "stored version, on these prompts (one per line); the base must be a model folder.")
@click.option("--max-kl", type=float, metavar="K",
              help="With --prompts: the smallest of ranks 1, 2, 4, ... up to --rank (default 128) whose KL is at "
                   "most K.")
@chat_option
@export_tokenizer_option
@json_option
@with_store(readonly=True)
def export_lora(store: Store, ref: str, rank: int | None, energy: float | None, dtype: str, fmt: str, out: str,
                base_path: str | None, exact: bool, server: str | None, max_rank: int | None, prompts: str | None,
                max_kl: float | None, chat: bool, tokenizer: str | None, as_json: bool) -> None:
    """Write a version as a PEFT LoRA adapter folder that peft loads: each changed 2-D Linear or
    Embedding weight becomes lora_A/lora_B from a randomized SVD of its delta (--exact: the
    truncated SVD; lora_alpha = r); changed norms go to modules_to_save, changed biases with
    bias="lora_only"; anything else is listed as dropped. The energy shown is compare's energy
    column, measured on the pairs written. --format gguf: a GGUF LoRA file as llama.cpp's
    convert_lora_to_gguf.py writes one (Linear and Conv1D pairs only; the rest listed as dropped)."""
    from deltastore.exports.lora import export_lora as run_export

    dtype = _factor_dtype(dtype, fmt, chat, prompts)
    if prompts or server or max_kl is not None or max_rank is not None or tokenizer:
        return served_export(store, ref, out, fmt, server, rank, energy, dtype, max_rank, prompts, max_kl,
                             base_path, tokenizer, chat, exact, as_json)
    if rank is None and energy is None:
        raise click.UsageError("give --rank R, --energy F, or both")
    with progress("factoring", enabled=not as_json) as cb:
        if fmt == "gguf":
            from deltastore.exports.gguf_lora import export_gguf_lora

            e = export_gguf_lora(store, ref, out, rank=rank, energy=energy, dtype=dtype, base_weights=base_path,
                                 progress=cb)
        else:
            e = run_export(store, ref, out, rank=rank, energy=energy, dtype=dtype, base_weights=base_path,
                           exact=exact, progress=cb)
    if as_json:
        return emit_json(finite(to_jsonable(e)))
    return gguf_written(e) if fmt == "gguf" else lora_written(e)


def _factor_dtype(dtype: str, fmt: str, chat: bool, prompts: str | None) -> str:
    """export-lora's --dtype as the exporter of --format takes it, its options checked together."""
    if dtype == "q8_0" and fmt != "gguf":
        raise click.UsageError("--dtype q8_0 is for --format gguf; a PEFT adapter is bf16, f16 or f32")
    if chat and not prompts:
        raise click.UsageError("--chat says how --prompts are put to the model: give --prompts FILE too")
    return dtype if fmt == "gguf" else PEFT_DTYPES[dtype]


def gguf_written(g: GgufExport) -> None:
    echo(f"wrote {g.out}: {len(g.ranks)} LoRA pairs for {g.architecture}, rank at most {g.rank} ({g.dtype}); "
         f"{size(g.bytes)}; the pairs hold {g.energy_kept:.1%} of their deltas' energy")
    if g.warning:
        echo(f"warning: {g.warning}", err=True)


def lora_written(e: LoraExport, vllm_rank: int | None = None) -> None:
    ranks = sorted(set(e.ranks.values()))
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
    echo(f"wrote {e.out}: {len(e.targets)} LoRA pairs at {shown} ({e.dtype}), {len(e.saved)} tensors "
         f"whole; {size(e.bytes)}")
    echo(f"energy held ({'exact' if e.exact else 'randomized'} SVD, measured): {e.energy_kept:.3f} per "
         f"delta on average (as compare's energy column), {e.energy_kept_total:.3f} of all the deltas' "
         "energy together")
    if vllm_rank is not None:
        echo(f"for vLLM: serve with --enable-lora --max-lora-rank {vllm_rank} (or more)")
        shares = sorted(e.dropped_shares.items(), key=lambda kv: -kv[1])
        if shares:
            more = f" and {len(shares) - 8} more" if len(shares) > 8 else ""
            echo("left out (vLLM loads no pair for them), with their share of the squared delta: "
                 + ", ".join(f"{n} {v:.2%}" for n, v in shares[:8]) + more)
    elif e.warning:
        echo(f"warning: {e.warning}", err=True)


def served_export(store: Store, ref: str, out: str, fmt: str, server: str | None, rank: int | None,
                  energy: float | None, dtype: str, max_rank: int | None, prompts: str | None, max_kl: float | None,
                  base_path: str | None, tokenizer: str | None, chat: bool, exact: bool, as_json: bool) -> None:
    """export-lora --for vllm and --prompts: the export (measured, with --prompts), then its lines."""
    from deltastore.exports.export_fidelity import export_lora_measured
    from deltastore.exports.vllm_lora import DEFAULT_MAX_RANK, export_vllm_lora

    if server and fmt == "gguf":
        raise click.UsageError("--for vllm writes a PEFT adapter folder: leave out --format gguf")
    if max_rank is not None and not server:
        raise click.UsageError("--max-rank is vLLM's limit: give it with --for vllm")
    if (max_kl is not None or tokenizer) and not prompts:
        raise click.UsageError("--max-kl needs --prompts FILE (one prompt per line); so does --tokenizer")
    if rank is None and energy is None and max_kl is None and not server:
        raise click.UsageError("give --rank R, --energy F, or both")

    limit = DEFAULT_MAX_RANK if max_rank is None else max_rank
    m = None
    with progress("exporting and measuring" if prompts else "factoring", enabled=not as_json) as cb:
        if prompts:
            m = export_lora_measured(store, ref, out, prompts=prompts, fmt=fmt, server=server, rank=rank,
                                     energy=energy, dtype=dtype, max_rank=max_rank, max_kl=max_kl,
                                     base_weights=base_path, tokenizer=tokenizer, chat=chat, exact=exact, progress=cb)
            e = m.export
        else:
            e = export_vllm_lora(store, ref, out, max_rank=limit, rank=rank, energy=energy, dtype=dtype,
                                 base_weights=base_path, progress=cb)
    if as_json:
        return emit_json(finite(to_jsonable(m or e)))
    gguf_written(e) if fmt == "gguf" else lora_written(e, vllm_rank=limit if server else None)
    if m is None:
        return None
    f = m.fidelity
    echo(f"fidelity of what was written{ran_in(f, fmt == 'gguf')}, over {f.prompts} prompts ({f.positions} positions), "
         f"against the stored version: KL {f.kl:.3g}, top-1 {f.top1:.1%}; the base alone: KL {f.base_kl:.3g}, "
         f"top-1 {f.base_top1:.1%}")
    if f.stored_kl is not None:
        echo(f"the stored version itself, against the fine-tune it was committed from (recorded at commit): "
             f"KL {f.stored_kl:.3g}" + (f", top-1 {f.stored_top1:.1%}" if f.stored_top1 is not None else ""))
    if max_kl is not None:
        tried = ", ".join(f"rank {r} KL {kl:.3g}" for r, kl in m.tried)
        echo(f"--max-kl {max_kl:g}: the smallest rank tried that stays under it was kept ({tried})")
    return None


def ran_in(f: ExportFidelity, gguf: bool) -> str:
    """Where a GGUF file's figures come from: llama.cpp, or torch's estimate (and why)."""
    if not gguf:
        return ""
    return " (run in llama.cpp)" if f.runtime == "llama.cpp" else f" ({f.runtime_note})"


@click.command("import-lora")
@click.argument("stance")
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--base", "base_ref",
              help="The base the adapter was trained on: name, id prefix or path (default: the store's only base).")
@base_path_option
@click.option("--encoding", callback=lower_case, metavar="ENCODING",
              help=f"How to store the result: {ENCODINGS} (any case); default lowrank:R, R the adapter's rank, "
                   "in its dtype.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", callback=key_values, help="User metadata (repeatable).")
@click.option("--tag", help="Tag the new version (refused when the tag names a version already).")
@click.option("--move-tag", is_flag=True, help="Move --tag's tag to the new version when it names another one.")
@json_option
@with_store
def import_lora(store: Store, stance: str, adapter: str, base_ref: str | None, base_path: str | None,
                encoding: str | None, message: str, meta: dict[str, str], tag: str | None, move_tag: bool,
                as_json: bool) -> None:
    """Commit a PEFT LoRA adapter folder (safetensors only) as a new version of STANCE, as commit
    takes STANCE MODEL: each target weight becomes W + scaling * B @ A, modules_to_save and biases
    replace the base's. Every name and shape is checked against the base first; an adapter for
    another model is refused. (The older order, ADAPTER STANCE, still works, with a warning.)"""
    from deltastore.exports.lora import ADAPTER_CONFIG, import_lora as run_import

    if (Path(stance) / ADAPTER_CONFIG).is_file() and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        echo(f"warning: import-lora ADAPTER STANCE is deprecated: write import-lora {adapter} {stance}", err=True)
        stance, adapter = adapter, stance
    base = only_base(store, base_ref)
    with progress("importing", enabled=not as_json) as cb:
        i = run_import(store, adapter, stance, base=base, base_weights=base_path, encoding=encoding,
                       message=message, metadata=meta, tag=tag, move_tag=move_tag, progress=cb)
    if as_json:
        return emit_json(i)
    r = i.result
    echo(f"{r.version.ref} {r.version.id}")
    echo(f"{len(i.targets)} LoRA pairs (rank {i.rank}) and {len(i.replaced)} whole tensors, stored as "
         f"{i.encoding}: {r.tensors_stored} tensors, {size(r.bytes_stored)}")
