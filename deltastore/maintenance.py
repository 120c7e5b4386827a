"""Keeping a store honest: fsck (report every problem, never stop at the first), gc (plan,
then execute) and stats.

fsck only reads, except under `repair`, which does only what is safe: remove temporary files
and pending rows of commits whose process is gone. gc removes only objects that nothing
references (no version, no apply journal, no commit in progress), each one checked again
inside a write transaction just before it is deleted, so a commit running at the same time
can never lose an object it has just decided to reuse.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptObject, MissingObject
from .hashing import canonical_json, manifest_id

# A temporary file younger than this may belong to a write in progress.
TMP_GRACE_S = 3600


@dataclass(frozen=True)
class Problem:
    kind: str  # missing-object, corrupt-object, bad-manifest, dangling-row, open-journal, tmp-file, stale-pending, unreferenced-object
    subject: str
    message: str
    versions: tuple[str, ...] = ()
    error: bool = True  # False: harmless (gc or --repair clears it)


@dataclass(frozen=True)
class FsckReport:
    problems: tuple[Problem, ...]
    objects_checked: int
    versions_checked: int
    repaired: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not any(p.error for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]


def fsck(store: Any, *, read_data: bool = False, repair: bool = False) -> FsckReport:
    cat, objects = store.catalog, store.objects
    problems: list[Problem] = []
    users: dict[str, set[str]] = {}
    for r in cat.query("SELECT e.object_id, v.stance, v.number FROM entry_objects e "
                       "JOIN versions v ON v.id = e.version_id"):
        users.setdefault(r["object_id"], set()).add(f"{r['stance']}@{r['number']}")

    versions = cat.query("SELECT id, stance, number, manifest FROM versions")
    for v in versions:
        ref = f"{v['stance']}@{v['number']}"
        try:
            m = json.loads(v["manifest"])
            if manifest_id(m) != v["id"] or canonical_json(m).decode() != v["manifest"]:
                problems.append(Problem("bad-manifest", v["id"], f"{ref}: manifest does not hash to its id", (ref,)))
        except ValueError:
            problems.append(Problem("bad-manifest", v["id"], f"{ref}: manifest is not JSON", (ref,)))
    for r in cat.query("SELECT DISTINCT e.object_id FROM entry_objects e LEFT JOIN objects o "
                       "ON o.id = e.object_id WHERE o.id IS NULL"):
        problems.append(Problem("dangling-row", r["object_id"], "referenced but has no objects row",
                                tuple(sorted(users.get(r["object_id"], ())))))

    rows = {r["id"]: r for r in cat.object_rows()}
    referenced = cat.referenced_objects()
    checked = 0
    for oid, row in rows.items():
        vs = tuple(sorted(users.get(oid, ())))
        if oid not in referenced:
            continue
        try:
            size = objects.size(oid)
        except FileNotFoundError:
            problems.append(Problem("missing-object", oid, f"object {oid} is missing", vs))
            continue
        if size != row["size"]:
            problems.append(Problem("corrupt-object", oid, f"object {oid} has {size} bytes, the catalog says {row['size']}", vs))
            continue
        if read_data:
            checked += 1
            try:
                objects.get(oid, raw_size=row["raw_size"])
            except (CorruptObject, MissingObject) as e:
                problems.append(Problem("corrupt-object", oid, str(e), vs))
    on_disk = set(objects.ids())
    for oid in sorted(referenced & set(users) - on_disk - set(rows)):
        problems.append(Problem("missing-object", oid, f"object {oid} is missing", tuple(sorted(users[oid]))))
    for oid in sorted(on_disk - referenced):
        problems.append(Problem("unreferenced-object", oid, "no version references it; `gc` removes it", error=False))

    for j in cat.open_journals():
        problems.append(Problem("open-journal", j["target"],
                                f"{j['target']} has a stance applied in place ({j['state']}); "
                                f"`deltastore revert {j['target']}` restores its base", error=False))
    for j in cat.query("SELECT DISTINCT j.journal_id, j.object_id FROM journal_objects j"):
        if not objects.exists(j["object_id"]):
            problems.append(Problem("missing-object", j["object_id"],
                                    "an apply journal's original bytes are missing: revert cannot restore them"))

    repaired: list[str] = []
    now = time.time()
    for tmp in objects.temporary_files():
        pid = _pid_of(tmp.name)
        stale = not _alive(pid) or now - tmp.stat().st_mtime > TMP_GRACE_S
        if repair and stale:
            tmp.unlink(missing_ok=True)
            repaired.append(f"removed {tmp}")
        else:
            problems.append(Problem("tmp-file", str(tmp), "a temporary file " +
                                    ("of a dead process" if stale else "of a write in progress"), error=False))
    host = os.uname().nodename
    for p in cat.query("SELECT DISTINCT token, pid, host FROM pending"):
        if p["host"] == host and not _alive(p["pid"]):
            if repair:
                cat.drop_pending(p["token"])
                repaired.append(f"dropped pending objects of dead commit {p['token']}")
            else:
                problems.append(Problem("stale-pending", p["token"],
                                        f"a commit by process {p['pid']} died before landing; `fsck --repair` clears it",
                                        error=False))
    return FsckReport(tuple(problems), checked, len(versions), tuple(repaired))


@dataclass(frozen=True)
class GcPlan:
    objects: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class GcResult:
    removed: tuple[str, ...]
    bytes_freed: int
    skipped: tuple[str, ...] = field(default_factory=tuple)  # became referenced meanwhile


def gc_plan(store: Any) -> GcPlan:
    referenced = store.catalog.referenced_objects()
    doomed, total = [], 0
    for oid in store.objects.ids():
        if oid not in referenced:
            try:
                total += store.objects.size(oid)
            except FileNotFoundError:
                continue
            doomed.append(oid)
    return GcPlan(tuple(doomed), total)


def gc(store: Any, plan: GcPlan | None = None, *, batch: int = 200) -> GcResult:
    plan = plan or gc_plan(store)
    removed, skipped, freed = [], [], 0
    cat = store.catalog
    for i in range(0, len(plan.objects), batch):
        # Holding the write lock while checking and deleting means no commit can record a
        # reference to (or a pending reuse of) one of these objects in between.
        with cat.transaction():
            for oid in plan.objects[i:i + batch]:
                if cat.is_referenced(oid):
                    skipped.append(oid)
                    continue
                freed += store.objects.remove(oid)
                cat.conn.execute("DELETE FROM objects WHERE id = ?", [oid])
                removed.append(oid)
    return GcResult(tuple(removed), freed, tuple(skipped))


@dataclass(frozen=True)
class Stats:
    objects: int
    bytes_stored: int  # unique object bytes on disk
    bytes_referenced: int  # what the versions would take without sharing
    bytes_saved_by_dedup: int
    by_stance: dict[str, dict[str, int]]
    by_encoding: dict[str, dict[str, int]]
    catalog_bytes: int


def stats(store: Any) -> Stats:
    cat = store.catalog
    rows = cat.object_rows()
    stored = sum(r["size"] for r in rows)
    referenced = cat.one("SELECT coalesce(sum(bytes), 0) AS b FROM versions")["b"]
    by_stance = {r["stance"]: {"versions": r["versions"], "bytes": r["bytes"]} for r in cat.query(
        "SELECT stance, count(*) AS versions, sum(bytes) AS bytes FROM versions GROUP BY stance ORDER BY stance")}
    by_encoding = {r["encoding"]: {"tensors": r["tensors"], "bytes": r["bytes"]} for r in cat.query(
        "SELECT encoding, count(*) AS tensors, sum(bytes) AS bytes FROM entries GROUP BY encoding ORDER BY encoding")}
    catalog_bytes = sum(p.stat().st_size for p in store.root.glob("catalog.db*"))
    return Stats(len(rows), stored, referenced, max(referenced - stored, 0), by_stance, by_encoding, catalog_bytes)


def _pid_of(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
