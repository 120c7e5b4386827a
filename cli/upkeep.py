"""Commands that keep the store itself: init, status, fsck, gc, stats, upgrade."""

from __future__ import annotations

import sys

import click

from deltastore import Store
from deltastore.engine.maintenance import FsckReport, GcPlan
from deltastore.sharing.remote import remote_url
from deltastore.sharing.remotegc import gc as run_gc, gc_plan
from deltastore.core.errors import StoreNotFound
from deltastore.store import DEFAULT_DIR
from deltastore.upgrade import upgrade as run_upgrade

from .options import json_option, store_path, with_store
from .output import echo, emit_json, size, table


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@json_option
@click.pass_context
def init(ctx: click.Context, directory: str | None, as_json: bool) -> None:
    """Create a store (default: ./.deltastore)."""
    path = directory or ctx.find_root().params.get("store") or DEFAULT_DIR
    store = Store.init(path)
    store.close()
    return emit_json(store) if as_json else echo(f"created store {path}")


@click.command()
@click.option("--remotes", "check_remotes", is_flag=True,
              help="Also list, for each remote of the store, the versions it does not hold yet (reads each remote).")
@json_option
@click.pass_context
def status(ctx: click.Context, check_remotes: bool, as_json: bool) -> None:
    """The folders patched in place (by this store or any other this user made or patched from,
    so it works from any folder): target, version, since when, state; with --remotes, what each
    remote lacks."""
    from deltastore.sharing.status import status as read_status
    try:
        root = store_path(ctx)
    except StoreNotFound:
        root = None  # the folders other stores patched are still worth listing
    now = read_status(root, check_remotes=check_remotes)
    if as_json:
        return emit_json(now)
    echo(f"store {now.store}" if now.store else "no store in this folder or above it")
    for p in now.patched:
        echo(f"patched {p.target}: {p.ref} since {p.since}, {p.state} (store {p.store})")
    if not now.patched:
        echo("no folder is patched in place")
    for name, refs in (now.unpushed or {}).items():
        echo(f"remote {name} lacks {', '.join(refs)}" if refs else f"remote {name} holds every version")
    if now.unpushed is None and now.store:
        echo("remotes not checked: pass --remotes (it reads each remote)")


@click.command()
@click.option("--read-data", is_flag=True, help="Re-hash every object.")
@click.option("--repair", is_flag=True, help="Do what is safe: remove stale temporary files and pending rows.")
@click.option("--rebuild-catalog", is_flag=True,
              help="First rebuild the catalog from the store's objects, refs.log and journals alone "
                   "(when it is missing, damaged or disagrees with them; no other process may use the store).")
@json_option
@click.pass_context
def fsck(ctx: click.Context, read_data: bool, repair: bool, rebuild_catalog: bool, as_json: bool) -> None:
    """Check the store: the catalog against the refs and objects, every object and journal. Exit 1 on errors."""
    report = Store.check(store_path(ctx), read_data=read_data, repair=repair, rebuild_catalog=rebuild_catalog)
    if as_json:
        emit_json(report)
    else:
        render_fsck(report)
    if not report.ok:
        sys.exit(1)


def render_fsck(report: FsckReport) -> None:
    if report.rebuilt is not None:
        r = report.rebuilt
        echo(f"rebuilt the catalog: {r.versions} versions in {r.stances} stances, {r.bases} bases, "
             f"{r.journals} open journals")
        for line in r.set_aside:
            echo(f"set aside in refs.log.rejected: {line}")
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


@click.command()
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
        return emit_json(plan) if as_json else render_gc_plan(plan, verbose)
    if not as_json:
        echo(f"plan: remove {len(plan.objects)} objects, {size(plan.bytes)}")
    result = store.gc(plan)
    if as_json:
        return emit_json(result)
    echo(f"freed {size(result.bytes_freed)} in {len(result.removed)} objects"
         + (f" ({len(result.skipped)} kept: in use again)" if result.skipped else ""))


def render_gc_plan(plan: GcPlan, verbose: bool) -> None:
    if verbose:
        for oid, n in zip(plan.objects, plan.sizes):
            echo(f"would remove {oid}  {size(n)}")
        for name in plan.tmp_files:
            echo(f"would remove {name}")
    echo(f"would free {size(plan.bytes)} in {len(plan.objects)} objects"
         + (f" and {len(plan.tmp_files)} temporary files" if plan.tmp_files else ""))


def gc_remote(store: Store, remote: str, grace: float, dry_run: bool, as_json: bool) -> None:
    plan = gc_plan(remote_url(store, remote), grace_seconds=grace)
    if dry_run:
        if as_json:
            return emit_json(plan)
        for oid, n in zip(plan.objects, plan.sizes):
            echo(f"would remove {oid}  {size(n)}")
        return echo(f"would free {size(plan.bytes)} in {len(plan.objects)} objects "
                    f"({plan.kept_young} unreferenced objects younger than {grace:g} s kept)")
    result = run_gc(plan)
    if as_json:
        return emit_json(result)
    for line in result.stale_locks_removed:
        echo(line)
    echo(f"freed {size(result.bytes_freed)} in {len(result.removed)} objects of {plan.url}"
         + (f" ({len(result.skipped)} kept: in use again)" if result.skipped else ""))


@click.command()
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


@click.command()
@json_option
@click.pass_context
def upgrade(ctx: click.Context, as_json: bool) -> None:
    """Convert a store of an older format in place (crash-safe; no other process may use the store)."""
    done = run_upgrade(store_path(ctx))
    if as_json:
        return emit_json(done)
    click.echo(f"upgraded the store from {done.was}: {done.versions} versions, {done.bases} bases, "
               f"{done.journals} open journals")
