"""Keeping a store honest: fsck (report every problem, never stop at the first), gc (plan,
then execute) and stats.

fsck only reads, except under `repair`, which does only what is safe: remove temporary files
of writers that are gone and the pending rows of commits whose process died (their objects
then become gc's). It reads the catalog in one snapshot, replays the ref log up to the point
that snapshot indexed into an index of its own (the truth: manifests and base records read
from their objects) and compares the two, then checks the files.

gc trusts nothing the catalog says alone: its roots are what the truth reaches, and any
disagreement between the two, or a catalog SQLite finds damaged, stops it before it deletes
anything.

gc removes only objects that nothing references: no version, no apply journal, no commit in
progress (a pending row of a live process). Each object is checked again inside a write
transaction just before its file is deleted, so a commit running at the same time can never
lose an object it has just decided to reuse: a commit records its pending row (a write
transaction) before it looks for or writes an object. A gc killed at any moment leaves at
worst an objects row whose file is gone and that nothing references, which the next gc
removes.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import REBUILD_HINT, CorruptObject, DeltastoreError, GcRefused, MissingObject, short
from ..core.hashing import is_id
from ..repo import index, journalfiles
from ..repo.objects import HEADER, MAGIC
from .bases import describe_base
from .chain import broken_chains
from .reader import Reader

# A temporary file younger than this may belong to a write in progress (of another host).
TMP_GRACE_S = 3600

# Kinds of problem. Errors: the store lost or garbled something, or the catalog contradicts
# itself. Notes (error=False): harmless leftovers that gc or `fsck --repair` clear, and states
# that need the user (a stance applied in place).
# An unfinished journal is a note: the store is whole and `revert` completes it (schema/FORMAT.md
# §8: a crash leaves fsck clean apart from leftovers and open journals).
ERRORS = ("missing-object", "corrupt-object", "bad-manifest", "index-mismatch", "dangling-row", "check-failed",
          "catalog-damaged", "damaged-originals", "broken-chain", "unindexable-record", "bad-base-record")
NOTES = ("missing-parent", "unfinished-journal", "open-journal", "tmp-file", "stale-pending",
         "unreferenced-object", "stray-file")


@dataclass(frozen=True)
class Problem:
    kind: str  # one of ERRORS or NOTES
    subject: str  # an object id, version id, file or journal target
    message: str
    versions: tuple[str, ...] = ()  # the versions it breaks, STANCE@N
    error: bool = True  # False: harmless (gc or --repair clears it), or needs the user, not a fix


@dataclass(frozen=True)
class FsckReport:
    problems: tuple[Problem, ...]
    objects_checked: int  # re-hashed (--read-data)
    versions_checked: int
    repaired: tuple[str, ...] = ()
    rebuilt: index.Rebuilt | None = None  # what the catalog was rebuilt from first, if it was

    @property
    def ok(self) -> bool:
        return not any(p.error for p in self.problems)

    def to_json(self) -> dict:
        """`fsck --json`."""
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems],
                "objects_checked": self.objects_checked, "versions_checked": self.versions_checked,
                "repaired": list(self.repaired), **({"rebuilt": asdict(self.rebuilt)} if self.rebuilt else {})}

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}


def _truth(reader: Reader) -> tuple[Any, dict, Any, list[str]]:
    """In one snapshot of the catalog: the truth replayed up to the log offset the catalog
    indexed, the catalog's rows fsck and gc read, the index the truth gives, and where the
    catalog differs from it (SQLite's own structural check first)."""
    cat = reader.repo.catalog
    with cat.snapshot():
        damage = cat.quick_check()
        offset = cat.log_position()[0]
        rows = {
            "versions": cat.version_rows(),
            "dangling": cat.foreign_key_problems(),
            "orphans": cat.missing_parents(),
            "objects": {r["id"]: r for r in cat.object_rows()},
            "journals": cat.open_journals(),
            "pending": cat.pending_commits(),
            "referenced": cat.referenced_objects(),
        }
        true, unindexed = index.truth(reader.repo.root, reader.repo.objects, reader.repo.refs, offset)
        diffs = [] if damage else index.differences(cat, true)
    # The records past what the catalog indexed (a writer died before its commit, or a line
    # written by hand): the next write replays them, so each must be one the catalog can index.
    with true.transaction():
        index.replay(true, reader.repo.objects, reader.repo.refs, start=offset, unindexed=unindexed)
    if damage:
        diffs = [(f"SQLite finds the catalog damaged ({'; '.join(damage[:2])[:200]})", [])]
    return true, rows, unindexed, diffs


def fsck(reader: Reader, *, read_data: bool = False, repair: bool = False) -> FsckReport:
    problems: list[Problem] = []
    true, rows, unindexed, diffs = _truth(reader)
    try:
        versions = rows["versions"]
        refs = {v["id"]: f"{v['stance']}@{v['number']}" for v in true.version_rows()}
        refs.update({v["id"]: f"{v['stance']}@{v['number']}" for v in versions})
        for d, keys in diffs:
            kind = "catalog-damaged" if d.startswith("SQLite") else "index-mismatch"
            broken = tuple(sorted({refs[k] for k in keys if isinstance(k, str) and k in refs}))
            problems.append(Problem(kind, "catalog.db", f"the catalog disagrees with the store's refs and objects: {d}; "
                                    f"{REBUILD_HINT}", broken))
        for kind, oid, ref, message in unindexed.problems:
            problems.append(Problem(kind, oid, message, (ref,) if "@" in ref else ()))
        for r in unindexed.rejected:
            problems.append(Problem("unindexable-record", f"refs.log:{r.line}", f"{r.describe()}; "
                                    f"`deltastore fsck --rebuild-catalog` sets it aside in {index.REJECTED_FILE}"))
        # What each object breaks, from the manifests (the truth) and the catalog's index of them.
        users: dict[str, set[str]] = {}
        for source in (true.version_objects(), reader.repo.catalog.version_objects()):
            for vid, oids in source.items():
                for oid in oids:
                    users.setdefault(oid, set()).add(refs.get(vid, short(vid)))
        for vid, ref in refs.items():
            users.setdefault(vid, set()).add(ref)  # the manifest itself
        for b in true.bases():
            users.setdefault(b["id"], set()).add(f"base {b['name'] or short(b['id'])}")
            users.setdefault(b["record"], set()).add(f"base {b['name'] or short(b['id'])}")
        sizes = {r["id"]: r for r in true.object_rows()}
        sizes.update(rows["objects"])
        journal_links = true.journal_object_rows() + reader.repo.catalog.journal_object_rows()
        referenced = rows["referenced"] | true.live_references([]) | {p[1] for p in unindexed.problems}
    finally:
        true.close()
    for d in rows["dangling"]:
        problems.append(Problem("dangling-row", f"{d['table']}:{d['rowid']}",
                                f"a row of {d['table']} refers to a {d['parent']} row that does not exist"))
    for o in rows["orphans"]:
        problems.append(Problem("missing-parent", o["id"], f"the parent of {o['stance']}@{o['number']} was deleted "
                                "(its own tensors are unaffected)", (f"{o['stance']}@{o['number']}",), error=False))

    checked, object_problems = _check_objects(reader, sizes, users, referenced, journal_links, read_data)
    problems += [p for p in object_problems if (p.kind, p.subject) not in {(q.kind, q.subject) for q in problems}]

    if read_data:
        problems += _check_base_records(reader)

    for version, why in broken_chains(reader):
        problems.append(Problem("broken-chain", version.id, why, (version.ref,)))

    for j in rows["journals"]:
        damaged = journalfiles.damaged_originals(reader.repo.root, j) if read_data else []
        # Without --read-data, the base files a journal points to are checked by identity
        # (stat data and headers), as revert checks them before it writes.
        moved = None if read_data else journalfiles.base_files_problem(j)
        if damaged:
            problems.append(Problem("damaged-originals", j["target"], f"the original bytes saved to revert "
                                    f"{j['target']} are missing or damaged ({', '.join(damaged[:5])}): "
                                    "revert cannot restore its base exactly"))
        elif moved:
            problems.append(Problem("damaged-originals", j["target"], f"the base's files that revert of "
                                    f"{j['target']} takes the original bytes from changed ({moved}): put them "
                                    f"back, or `deltastore revert --forget {j['id']}`"))
        problems.append(_journal_note(reader.repo.root, j, refs.get(j["version_id"], "a version")))
    leftovers, repaired = _leftovers(reader, rows["pending"], repair)
    problems += leftovers
    return FsckReport(tuple(problems), checked, len(versions), tuple(repaired))


def _leftovers(reader: Reader, pending: list[dict], repair: bool) -> tuple[list[Problem], list[str]]:
    """What dead writers left: temporary files, originals no journal recorded, the pending
    rows of commits whose process died. Removed under `repair` (what it did, said), otherwise
    noted."""
    problems: list[Problem] = []
    repaired: list[str] = []
    for tmp in _stray_tmp(reader.repo.objects.tmp):
        if repair and _stale_tmp(tmp):
            _remove_tmp(tmp)
            repaired.append(f"removed {tmp}")
        else:
            problems.append(Problem("tmp-file", str(tmp), "a temporary file " +
                                    ("of a dead process" if _stale_tmp(tmp) else "of a write in progress"), error=False))
    for orphan in journalfiles.orphan_originals(reader.repo.root):
        if not _stale_tmp(orphan, by_age=True):
            continue  # an apply between renaming its originals in and writing its journal
        if repair:
            orphan.unlink(missing_ok=True)
            repaired.append(f"removed {orphan}")
        else:
            problems.append(Problem("tmp-file", str(orphan), "original bytes saved by an apply that never "
                                    "recorded its journal (or left by a revert)", error=False))
    dead = [p["token"] for p in pending if _dead_writer(p)]
    if dead and repair:
        with reader.repo.catalog.transaction():
            reader.repo.catalog.drop_pending_of(dead)
        repaired += [f"dropped the pending objects of dead commit {t}" for t in dead]
    elif dead:
        for p in pending:
            if p["token"] in dead:
                problems.append(Problem("stale-pending", p["token"],
                                        f"a commit by process {p['pid']} died before landing; `fsck --repair` "
                                        "clears it and gc then removes its objects", error=False))
    return problems, repaired


def _journal_note(store_root: Path, j: dict, applied: str) -> Problem:
    """An open journal, and what to run: revert while its files are where apply left them;
    otherwise (copied and deleted, replaced) the command that drops it, which is all that can run."""
    gone = journalfiles.files_gone(j)
    if gone:
        return Problem("open-journal", j["target"], f"{j['target']} had {applied} applied in place (journal "
                       f"{j['id']}), but {gone}: if it moved, `deltastore revert NEWPATH` restores its base; a copy made after "
                       f"apply (`cp -a`) keeps {applied} and is not reverted; once it is deleted, `deltastore revert "
                       f"--forget {j['id']}` drops the journal and frees its saved originals", error=False)
    reverting = journalfiles.is_reverting(store_root, j["id"])
    if j["state"] == "applied" and not reverting:
        return Problem("open-journal", j["target"], f"{j['target']} has {applied} applied in place (journal "
                       f"{j['id']}); `deltastore revert {j['target']}` restores its base", error=False)
    doing = "a revert of" if reverting else "an apply to"
    return Problem("unfinished-journal", j["target"], f"{doing} {j['target']} is in progress or was interrupted "
                   f"({'reverting' if reverting else j['state']}; journal {j['id']}): its files may be half "
                   f"patched; `deltastore revert {j['target']}` restores its base exactly", error=False)


def _check_objects(reader: Reader, rows: dict[str, dict], users: dict[str, set[str]], referenced: set[str],
                   journal_links: list[dict], read_data: bool) -> tuple[int, list[Problem]]:
    objects = reader.repo.objects
    problems: list[Problem] = []
    journal_users: dict[str, set[str]] = {}
    for j in journal_links:
        journal_users.setdefault(j["object_id"], set()).add(j["target"])
    needed = set(users) | set(journal_users)
    on_disk = set()
    for oid in objects.ids():
        on_disk.add(oid)
    checked = 0
    for oid in sorted(needed):
        vs = tuple(sorted(users.get(oid, ())))  # the versions it breaks
        also = ""
        if oid in journal_users:
            also = f"; reverting {', '.join(sorted(journal_users[oid]))} needs it"
        try:
            if oid not in on_disk and not objects.exists(oid):
                # Seen in the snapshot, gone now: missing, unless a stance was deleted and gc ran since.
                if reader.repo.catalog.is_referenced(oid):
                    problems.append(Problem("missing-object", oid, f"object {oid} is missing{also}", vs))
                continue
            row = rows.get(oid)
            size = objects.size(oid)
            if row is not None and size != row["size"]:
                problems.append(Problem("corrupt-object", oid, f"object {oid} has {size} bytes, the catalog says "
                                        f"{row['size']}{also}", vs))
                continue
            raw_size = row["raw_size"] if row is not None else None
            _check_header(objects.path(oid), oid, raw_size)
            if read_data:
                checked += 1
                objects.get(oid, raw_size=raw_size)
        except (CorruptObject, MissingObject) as e:
            problems.append(Problem("corrupt-object" if isinstance(e, CorruptObject) else "missing-object", oid,
                                    f"{e.args[0].split(';')[0]}{also}", vs))
        except (OSError, DeltastoreError) as e:
            problems.append(Problem("check-failed", oid, f"cannot check object {oid}: {e}", vs))
    for oid in sorted(on_disk - needed):
        if read_data:
            checked += 1
            try:
                objects.get(oid)
            except DeltastoreError as e:
                problems.append(Problem("corrupt-object", oid, f"{e.args[0].split(';')[0]} (no version needs it; "
                                        "gc removes it)", error=False))
                continue
        if oid not in referenced:
            problems.append(Problem("unreferenced-object", oid, "no version references it; `gc` removes it", error=False))
    if objects.objects.is_dir():
        for path in sorted(objects.objects.rglob("*")):
            if path.is_file() and not _is_object_path(objects, path):
                problems.append(Problem("stray-file", str(path), "a file in objects/ that is not an object", error=False))
    return checked, problems


def _check_base_records(reader: Reader) -> list[Problem]:
    """`--read-data`: each base whose weights are where it was registered from, described
    again (hashed, squared norms) and compared with its record, which a commit trusts for the
    squared norms it divides by. Weights that are gone, or that are another base's now, tell
    nothing of the record."""
    from ..weights.models import open_model  # torch: only where there are weights to read

    problems = []
    for base in reader.bases():
        if not base.source or not Path(base.source).exists():
            continue
        try:
            row, tensors = describe_base(open_model(base.source, mapped=True))
        except (OSError, DeltastoreError):
            continue
        if row["id"] != base.id:
            continue
        wrong = index.weights_disagree(reader.repo.catalog.base_tensors(base.id), base.bytes, tensors, row["bytes"])
        if wrong is not None:
            shown = base.name or short(base.id)
            problems.append(Problem("bad-base-record", base.id, f"the record of base {shown} disagrees with its "
                                    f"weights at {base.source} ({wrong}); `deltastore base add {base.source}` "
                                    "replaces it with the record the weights give"))
    return problems


def _check_header(path: Path, oid: str, raw_size: int | None) -> None:
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise CorruptObject(oid, "shorter than its header")
    magic, _, _, _, declared = HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptObject(oid, "not a deltastore object")
    if raw_size is not None and declared != raw_size:
        raise CorruptObject(oid, f"declares {declared} bytes, the catalog says {raw_size}")


def _is_object_path(objects: Any, path: Path) -> bool:
    rel = path.relative_to(objects.objects).parts
    return len(rel) == 2 and len(rel[0]) == 2 and is_id(f"b3:{rel[0]}{rel[1]}")


def _stray_tmp(tmp: Path) -> list[Path]:
    """Files of objects being written, and folders of pushes (hub.py), `<pid>-...` both."""
    return sorted(p for p in tmp.iterdir() if p.is_file() or p.is_dir()) if tmp.is_dir() else []


def _stale_tmp(path: Path, *, by_age: bool = False) -> bool:
    """`by_age`: for a file whose name holds no pid, only its age says."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    # A push may upload for hours; its folder is not touched meanwhile.
    grace = TMP_GRACE_S * (24 if path.is_dir() else 1)
    return age > grace if by_age else not _alive(_pid_of(path.name)) or age > grace


def _remove_tmp(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dead_writer(pending: dict) -> bool:
    """A pending row's process is gone for sure: it ran on this host and no such pid lives."""
    return pending["host"] == os.uname().nodename and not _alive(pending["pid"])


@dataclass(frozen=True)
class GcPlan:
    objects: tuple[str, ...]  # object ids to remove
    bytes: int  # what removing them frees on disk
    sizes: tuple[int, ...] = ()  # bytes of each object, in the order of `objects`
    tmp_files: tuple[str, ...] = ()  # temporary files of writers that are gone
    dead_commits: tuple[str, ...] = ()  # pending tokens of commits whose process died
    rows_only: tuple[str, ...] = ()  # objects rows whose file is already gone

    def to_json(self) -> dict:
        """`gc --dry-run --json`."""
        return {"dry_run": True, "objects": list(self.objects), "bytes": self.bytes,
                "object_bytes": dict(zip(self.objects, self.sizes)), "tmp_files": list(self.tmp_files),
                "dead_commits": list(self.dead_commits)}


@dataclass(frozen=True)
class GcResult:
    removed: tuple[str, ...]
    bytes_freed: int
    skipped: tuple[str, ...] = field(default_factory=tuple)  # became referenced meanwhile
    tmp_files_removed: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """`gc --json`."""
        return {"dry_run": False, "objects": list(self.removed), "bytes": self.bytes_freed,
                "skipped": list(self.skipped), "tmp_files": list(self.tmp_files_removed)}


def gc_plan(reader: Reader) -> GcPlan:
    """What gc would remove now: every object that no version, base, journal or live commit
    needs. Refuses (GcRefused) when the catalog is damaged or disagrees with the truth."""
    cat, objects = reader.repo.catalog, reader.repo.objects
    if not reader.repo.refs.path.exists() and any(True for _ in objects.ids()):
        raise GcRefused(f"the store's ref log {reader.repo.refs.path} is missing, so nothing says which objects "
                        "its versions need")
    true, rows, unindexed, diffs = _truth(reader)
    try:
        if unindexed.problems:
            raise GcRefused(unindexed.problems[0][3] + ", so what it needs is unknown")
        if unindexed.rejected:
            raise GcRefused(unindexed.rejected[0].describe())
        if diffs:
            raise GcRefused(f"the catalog disagrees with the store's refs and objects ({diffs[0][0]})")
        with cat.snapshot():
            dead = [p["token"] for p in cat.pending_commits() if _dead_writer(p)]
            needed = cat.live_references(dead)
            object_rows = {r["id"] for r in cat.object_rows()}
        needed |= true.live_references([])
        for j in journalfiles.read_all(reader.repo.root):
            needed.update(j["objects"])
    finally:
        true.close()
    doomed, sizes = [], []
    on_disk = set()
    for oid in objects.ids():
        on_disk.add(oid)
        if oid in needed:
            continue
        try:
            sizes.append(objects.size(oid))
        except FileNotFoundError:
            continue
        doomed.append(oid)
    rows_only = tuple(sorted(object_rows - on_disk - needed))
    tmp_files = tuple(str(p) for p in _stray_tmp(objects.tmp) if _stale_tmp(p))
    tmp_bytes = sum(_size(Path(p)) for p in tmp_files)
    return GcPlan(tuple(doomed), sum(sizes) + tmp_bytes, tuple(sizes), tmp_files, tuple(dead), rows_only)


def gc(reader: Reader, plan: GcPlan | None = None, *, batch: int = 200) -> GcResult:
    plan = plan or gc_plan(reader)
    removed, skipped, freed = [], [], 0
    cat = reader.repo.catalog
    if plan.dead_commits:
        with cat.transaction():
            # Checked again: only writers still dead lose their shield (a pid cannot come back,
            # but the plan may be old).
            still = [p["token"] for p in cat.pending_commits() if p["token"] in plan.dead_commits and _dead_writer(p)]
            cat.drop_pending_of(still)
    todo = list(plan.objects) + [oid for oid in plan.rows_only if oid not in plan.objects]
    for i in range(0, len(todo), batch):
        # Holding the write lock while checking and deleting means no commit can record a
        # reference to (or a pending reuse of) one of these objects in between.
        with cat.transaction():
            if cat.log_position()[0] != reader.repo.refs.whole_size():
                # A writer died between its log append and its commit since the plan: what
                # its version needs must be indexed before anything is checked.
                reader.repo.catch_up(cat)
            for oid in todo[i:i + batch]:
                if cat.is_referenced(oid):
                    skipped.append(oid)
                    continue
                gone = reader.repo.objects.remove(oid)
                cat.delete_object_row(oid)
                if gone or oid in plan.objects:
                    freed += gone
                    removed.append(oid)
    tmp_removed = []
    for name in plan.tmp_files:
        path = Path(name)
        if _stale_tmp(path):
            freed += _size(path)
            _remove_tmp(path)
            tmp_removed.append(name)
    return GcResult(tuple(removed), freed, tuple(skipped), tuple(tmp_removed))


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class Stats:
    objects: int
    bytes_stored: int  # unique object bytes on disk
    bytes_referenced: int  # what the versions would take without sharing
    bytes_saved_by_dedup: int
    by_stance: dict[str, dict[str, int]]
    by_encoding: dict[str, dict[str, int]]
    catalog_bytes: int


def stats(reader: Reader) -> Stats:
    cat = reader.repo.catalog
    # The objects versions need (rows of objects only deleted versions needed wait for gc).
    rows = cat.object_rows(needed_only=True)
    stored = sum(r["size"] for r in rows)
    referenced = cat.referenced_bytes()
    by_stance = {r["stance"]: {"versions": r["versions"], "bytes": r["bytes"]} for r in cat.bytes_by_stance()}
    by_encoding = {r["encoding"]: {"tensors": r["tensors"], "bytes": r["bytes"]} for r in cat.bytes_by_encoding()}
    catalog_bytes = sum(p.stat().st_size for p in reader.repo.root.glob("catalog.db*"))
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
