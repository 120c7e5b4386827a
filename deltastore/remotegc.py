"""gc of a remote (schema/FORMAT.md §10): plan, then execute. The plan lists the objects that
no ref of the remote reaches and that were written longer ago than a grace period; executing
reads the refs again and spares what a ref made since reaches. The grace period is what keeps
the objects of a push under way (uploaded, its refs not yet made); a push also re-uploads what
a gc removed under it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from .errors import RemoteDataRejected, RemoteError
from .hashing import ALGORITHM, is_id
from .limits import load_json
from .remote import MARKER, MAX_REF_BYTES, Remote, RemoteVersion, backend_errors, remote_manifest



GRACE_SECONDS = 24 * 3600


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

    def to_json(self) -> dict:
        """`gc --remote --json`."""
        plan = self.plan
        return {"dry_run": False, "remote": plan.url if plan else None, "objects": list(self.removed),
                "bytes": self.bytes_freed, "skipped": list(self.skipped),
                "kept_young": plan.kept_young if plan else 0}


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
        now = time.time()
        found = _object_infos(remote)
    objects, sizes, young = [], [], 0
    for oid, (size, modified) in sorted(found.items()):
        if oid in reached:
            continue
        if modified is None or now - modified < grace_seconds:
            young += 1
            continue
        objects.append(oid)
        sizes.append(size)
    return RemoteGcPlan(url, tuple(objects), tuple(sizes), sum(sizes), tuple(sorted({rv.id for rv in listed})), young)


def gc(plan: RemoteGcPlan) -> RemoteGcResult:
    """Remove what `plan` lists, except objects that a ref made since the plan reaches (read
    again just before deleting)."""
    remote = Remote(plan.url)
    with backend_errors(plan.url):
        listed = remote.versions()
        newer = [rv for rv in listed if rv.id not in set(plan.refs)]
        reached = _reached(remote, newer)
        removed, skipped, freed = [], [], 0
        for oid, size in zip(plan.objects, plan.sizes):
            if oid in reached:
                skipped.append(oid)
                continue
            try:
                remote.fs.rm_file(remote.object_path(oid))
            except FileNotFoundError:
                continue
            removed.append(oid)
            freed += size
    return RemoteGcResult(tuple(removed), freed, tuple(skipped), plan)


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


def _object_infos(remote: Remote) -> dict[str, tuple[int, float | None]]:
    """Object id -> (size, when last written, in seconds since the epoch; None when unknown)."""
    base = remote.path("objects")
    remote.fs.invalidate_cache()
    try:
        found = remote.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    finally:
        remote.fs.invalidate_cache()
    prefix = remote.fs._strip_protocol(base).rstrip("/") + "/"
    out = {}
    for path, info in found.items():
        rel = remote.fs._strip_protocol(path)[len(prefix):]
        fan, _, rest = rel.partition("/")
        oid = f"{ALGORITHM}:{fan}{rest}"
        if len(fan) == 2 and is_id(oid):
            out[oid] = (int(info.get("size") or 0), _modified(info))
    return out


def _modified(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
