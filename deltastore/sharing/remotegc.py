"""gc of a remote (schema/FORMAT.md §10): plan, then execute. The plan lists the objects that
no ref of the remote reaches and that were written longer ago than a grace period; it only
reads. Executing takes the remote's exclusive lock, so that no push runs while it deletes,
reads the refs again under it and spares what a ref made since the plan reaches. The lock is
what keeps a push's objects (those it uploaded and those it found there and relies on); the
grace period only keeps a push of a deltastore from before the locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.errors import RemoteDataRejected, RemoteError
from ..core.limits import load_json
from .remoteerrors import backend_errors
from .remotefs import MARKER, MAX_REF_BYTES, Remote, RemoteVersion, remote_manifest
from .remotelock import EXCLUSIVE, Lock

GRACE_SECONDS = 24 * 3600


def _step(name: str) -> None:
    """Called between the steps of a gc; does nothing. Tests replace it to run a push at
    that very moment (tests/test_remote_race.py)."""


@dataclass(frozen=True)
class RemoteGcPlan:
    url: str
    objects: tuple[str, ...]  # to remove: no ref reaches them, and older than the grace period
    sizes: tuple[int, ...]
    bytes: int
    refs: tuple[str, ...]  # the version ids the plan found reachable
    kept_young: int  # unreachable, but newer than the grace period: a push may be landing them

    def to_json(self) -> dict:
        """`gc --remote --dry-run --json`."""
        return {"dry_run": True, "remote": self.url, "objects": list(self.objects), "bytes": self.bytes,
                "kept_young": self.kept_young}


@dataclass(frozen=True)
class RemoteGcResult:
    removed: tuple[str, ...]
    bytes_freed: int
    skipped: tuple[str, ...]  # reached by a ref made since the plan
    plan: RemoteGcPlan | None = None  # what was carried out
    stale_locks_removed: tuple[str, ...] = ()  # one line each

    def to_json(self) -> dict:
        """`gc --remote --json`."""
        plan = self.plan
        return {"dry_run": False, "remote": plan.url if plan else None, "objects": list(self.removed),
                "bytes": self.bytes_freed, "skipped": list(self.skipped),
                "kept_young": plan.kept_young if plan else 0, "stale_locks_removed": list(self.stale_locks_removed)}


def gc_plan(url: str, *, grace_seconds: float = GRACE_SECONDS) -> RemoteGcPlan:
    """What gc would remove from a remote: objects no ref reaches (through its manifest, or a
    base ref), last written more than `grace_seconds` ago. An object of unknown age is kept.
    Refuses when a ref's manifest is missing or damaged: then what it reaches is unknown."""
    remote = Remote(url)
    with backend_errors(url):
        if not remote.is_remote():
            raise RemoteError(f"{url} is not a deltastore remote (it has no {MARKER} file)", url=url)
        listed = remote.versions()
        reached = _reached(remote, listed)
        _step("plan:refs-read")
        now = time.time()
        found = remote.object_infos()
    objects, sizes, young = [], [], 0
    for oid, (size, modified) in sorted(found.items()):
        if oid in reached:
            continue
        if modified is None or now - modified < grace_seconds:
            young += 1
            continue
        objects.append(oid)
        sizes.append(size)
    _step("planned")
    return RemoteGcPlan(url, tuple(objects), tuple(sizes), sum(sizes), tuple(sorted({rv.id for rv in listed})), young)


def gc(plan: RemoteGcPlan) -> RemoteGcResult:
    """Remove what `plan` lists, holding the remote's exclusive lock (no push runs meanwhile),
    except objects that a ref made since the plan reaches (read again under the lock).
    Refuses while another push or gc holds a live lock; removes stale ones, and says so."""
    remote = Remote(plan.url)
    with backend_errors(plan.url):
        lock = Lock(remote, EXCLUSIVE).acquire()
        try:
            _step("locked")
            removed, skipped, freed = _execute(remote, plan, lock)
        finally:
            lock.release()
    return RemoteGcResult(tuple(removed), freed, tuple(skipped), plan, tuple(lock.stale_removed))


def _execute(remote: Remote, plan: RemoteGcPlan, lock: Lock) -> tuple[list[str], list[str], int]:
    planned = set(plan.refs)
    newer = [rv for rv in remote.versions() if rv.id not in planned]
    reached = _reached(remote, newer)
    _step("reread")
    removed, skipped, freed = [], [], 0
    for oid, size in zip(plan.objects, plan.sizes):
        if oid in reached:
            skipped.append(oid)
            continue
        lock.check()
        try:
            remote.fs.rm_file(remote.object_path(oid))
        except FileNotFoundError:
            continue
        removed.append(oid)
        freed += size
    _step("deleted")
    return removed, skipped, freed


def _reached(remote: Remote, listed: list[RemoteVersion]) -> set[str]:
    """What the refs in `listed` and every base ref reach: manifests, their objects, base objects."""
    reached: set[str] = set()
    for rv in listed:
        _, v = remote_manifest(remote, rv)
        reached.add(rv.id)
        reached.update(o.id for e in v.tensors for o in e.objects.values())
    for rel in remote.find("bases"):
        name = f"bases/{rel}"
        ref = load_json(remote.read(name, remote.path(name), MAX_REF_BYTES), name, max_bytes=MAX_REF_BYTES,
                        error=remote.bad(name))
        if not (isinstance(ref, dict) and isinstance(ref.get("id"), str) and isinstance(ref.get("record"), str)):
            raise RemoteDataRejected(remote.url, name, "not a base ref")
        reached.update((ref["id"], ref["record"]))
    return reached
