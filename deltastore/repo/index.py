"""The catalog as an index of the store's truth (schema/FORMAT.md §6): replaying ref records
into it (reading each manifest and base record from its object), rebuilding it from nothing,
and comparing it with what the truth says, which fsck and gc do before they trust it.

Replay never opens a transaction of its own: the caller holds one (a catch-up under the write
lock, or a rebuild into a new database), so a replay lands whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import baserecords, journalfiles
from .catalog import Catalog, dumps
from .catalog_sqlite import IndexConflict
from ..core.durable import fsync_dir
from ..core.errors import CorruptObject, DeltastoreError, MissingObject, cut
from ..core.hashing import canonical_json, is_id
from ..core.names import name_problem, number_problem
from .objects import ObjectStore
from .reflog import RefLog, RefLogError

# Base records are baserecords.py's; store.py, maintenance.py and remote.py find these here.
BASE_FORMAT = baserecords.BASE_FORMAT
base_record = baserecords.base_record
base_list = baserecords.base_list
base_record_problem = baserecords.base_record_problem
weights_disagree = baserecords.weights_disagree

REJECTED_FILE = "refs.log.rejected"


@dataclass(frozen=True)
class Rejected:
    """A ref record the catalog cannot index (a number another version holds, a field of the
    wrong type, a base still in use): where it is in refs.log, its line, and why."""

    line: int  # 1-based line number in refs.log
    end: int  # offset just past it
    text: bytes  # the line, with its newline
    reason: str

    def describe(self) -> str:
        shown = self.text.rstrip(b"\n").decode("utf-8", "replace")
        return f"refs.log line {self.line}, {cut(shown, 160)}, cannot be indexed: {self.reason}"


class UnindexableRecord(DeltastoreError, ValueError):
    """A write found a ref record it cannot index after what the catalog holds."""

    def __init__(self, rejected: Rejected):
        self.rejected = rejected
        super().__init__(f"{rejected.describe()}; run `deltastore fsck --rebuild-catalog`, which sets it aside "
                         f"in {REJECTED_FILE} and indexes the rest")


@dataclass
class Unindexed:
    """What a replay could not index: records whose manifest or base record object is missing
    or damaged (ref, what is wrong, the object id), and records the catalog refuses."""

    problems: list[tuple[str, str, str, str]] = field(default_factory=list)  # (kind, object id, ref, message)
    rejected: list[Rejected] = field(default_factory=list)
    bases: set[str] = field(default_factory=set)  # bases whose base record cannot be indexed


# -- what a version and a base contribute to the catalog --------------------------------------


def version_rows(m: Mapping[str, Any], vid: str, stance: str, number: int,
                 sizes: Mapping[str, int]) -> tuple[dict, list[dict], list[str], list[dict]]:
    """The catalog rows of one manifest: the version row, its objects (id, size on disk,
    uncompressed size), their ids, and tensors and bytes per encoding."""
    objects: dict[str, dict] = {}
    by_encoding: dict[str, dict] = {}
    total = 0
    for t in m["tensors"]:
        entry_bytes = 0
        for o in t["objects"].values():
            size = sizes.get(o["id"], 0)
            objects[o["id"]] = {"id": o["id"], "size": size, "raw_size": o["size"]}
            entry_bytes += size
        total += entry_bytes
        e = by_encoding.setdefault(t["encoding"], {"encoding": t["encoding"], "tensors": 0, "bytes": 0})
        e["tensors"] += 1
        e["bytes"] += entry_bytes
    row = {"id": vid, "stance": stance, "number": number, "parent": m["parent"], "base_id": m["base"],
           "encoding": m["encoding"], "message": m["message"], "created": m["created"],
           "tensors": len(m["tensors"]), "bytes": total}
    return row, list(objects.values()), list(objects), list(by_encoding.values())


# -- replay ------------------------------------------------------------------------------------


def replay(cat: Catalog, objects: ObjectStore, refs: RefLog, *, start: int | None = None,
           end: int | None = None, unindexed: Unindexed | None = None) -> None:
    """Inside a transaction of `cat`: apply every record from where the catalog stands (or
    `start`) to the log's end (or `end`), and note how far it got. Versions and bases that a
    later record of the same stretch deletes are never read: gc may have removed their manifests."""
    offset = cat.log_position()[0] if start is None else start
    todo, refused = [], []
    for after, record, line in refs.records(offset):
        if end is not None and after > end:
            break
        todo.append((after, record, line))
    well_formed = []
    for after, record, line in todo:
        problem = record_problem(record)
        if problem is None:
            well_formed.append((after, record, line))
        else:
            refused.append((after, line, problem))
    gone = _removed_later([r for _, r, _ in well_formed])
    for after, record, line in well_formed:
        if record["op"] not in ("version", "base") or record["id"] not in gone:
            problem = _indexed(cat, objects, record, unindexed)
            if problem is not None:
                refused.append((after, line, problem))
    if refused:
        rejected = [Rejected(refs.line_number(after), after, line, why) for after, line, why in sorted(refused)]
        if unindexed is None:
            raise UnindexableRecord(rejected[0])
        unindexed.rejected.extend(rejected)
    if todo:
        cat.set_log_position(todo[-1][0], todo[-1][2])


def _is_text(x: Any) -> bool:
    return isinstance(x, str)


def _is_optional_text(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _is_move(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and is_id(x[0]) \
        and number_problem(x[1]) is None


# What each field of a ref record must be (FORMAT.md §6); reflog.parse checked the fields' names.
_FIELDS: dict[str, Any] = {
    "id": lambda x: isinstance(x, str) and is_id(x), "record": lambda x: isinstance(x, str) and is_id(x),
    "version": lambda x: isinstance(x, str) and is_id(x), "name": _is_optional_text, "source": _is_optional_text,
    "hub_id": _is_optional_text, "created": _is_text, "stance": _is_text, "old": _is_text, "new": _is_text,
    "into": _is_text, "versions": lambda x: isinstance(x, list) and all(_is_move(m) for m in x),
}


def record_problem(r: dict) -> str | None:
    """Why a ref record cannot be indexed, whatever the catalog holds: a field of the wrong
    type, a version number past the bound, a stance name no ref can reach. None if it can."""
    for key, value in r.items():
        if key == "op":
            continue
        if key == "number":
            problem = number_problem(value)
            if problem:
                return problem
        elif not _FIELDS[key](value):
            return f"its {key!r} is not what a {r['op']} record holds"
    if r["op"] == "version":
        return name_problem(r["stance"])
    if r["op"] in ("tag", "untag") and r["name"] is None:
        return f"its 'name' is not what a {r['op']} record holds"
    return None


def _indexed(cat: Catalog, objects: ObjectStore, r: dict, unindexed: Unindexed | None) -> str | None:
    """Apply one record, all of it or none (a savepoint); why the catalog refused it, or None."""
    if r["op"] == "version":
        held = cat.version_at(r["stance"], r["number"])
        if held is not None and held["id"] != r["id"] and cat.version(r["id"]) is None:
            return f"{r['stance']}@{r['number']} is already version {held['id']}"
    try:
        with cat.savepoint():
            apply_record(cat, objects, r, unindexed)
    except IndexConflict as e:
        return e.detail
    except _Refused as e:
        return str(e)
    except DeltastoreError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # Its manifest or base record holds fields of the wrong shape (an object written by hand).
        return f"the object it names is not a {'base record' if r['op'] == 'base' else 'manifest'} ({cut(e)})"
    return None


def _removed_later(records: list[dict]) -> set[str]:
    """Ids of versions whose stance is deleted later in `records`, and of bases removed later
    (and not registered again)."""
    members: dict[str, set[str]] = {}
    gone: set[str] = set()
    for r in records:
        op = r["op"]
        if op == "base":
            gone.discard(r["id"])
        elif op == "unbase":
            gone.add(r["id"])
        elif op == "version":
            members.setdefault(r["stance"], set()).add(r["id"])
            gone.discard(r["id"])
        elif op in ("rename", "merge"):
            new = r["new"] if op == "rename" else r["into"]
            members[new] = members.pop(r["old"], set()) | members.get(new, set())
        elif op == "delete":
            gone |= members.pop(r["stance"], set())
        elif op == "drop":
            gone.add(r["id"])
    return gone


def apply_record(cat: Catalog, objects: ObjectStore, r: dict, unindexed: Unindexed | None = None) -> None:
    op = r["op"]
    if op == "base":
        if cat.base_record_id(r["id"]) != r["record"]:  # new here, or its record replaced (`base add`)
            rec = _read_base_record(objects, r, unindexed, replacing=cat.has_base(r["id"]))
            if rec is None:
                return
            row, tensors = base_rows(r["id"], r["record"], rec, name=r["name"], source=r["source"],
                                     hub_id=r["hub_id"], created=r["created"])
            cat.put_base(row, tensors)
        else:
            cat.put_base({k: r[k] for k in ("id", "name", "source", "hub_id")}, [])
    elif op == "version":
        if cat.version(r["id"]) is not None:
            return
        m = _read_json(objects, r["id"], f"{r['stance']}@{r['number']}", unindexed)
        if m is None:
            return
        if unindexed is not None and m.get("base") in unindexed.bases:
            # Its base record is missing or wrong: fsck reports that; the version waits for it.
            ref = f"{r['stance']}@{r['number']}"
            unindexed.problems.append(("missing-object", m["base"], ref, f"{ref} is stored against base "
                                       f"{m['base'][:19]}, whose base record cannot be indexed"))
            return
        sizes = {}
        for t in m["tensors"]:
            for o in t["objects"].values():
                try:
                    sizes[o["id"]] = objects.size(o["id"])
                except FileNotFoundError:
                    sizes[o["id"]] = 0  # fsck reports it missing
        row, object_rows, links, by_encoding = version_rows(m, r["id"], r["stance"], r["number"], sizes)
        cat.insert_version(row, object_rows, links, by_encoding, m["metadata"])
    elif op == "tag":
        if cat.version(r["version"]) is not None:
            cat.put_tag(r["stance"], r["name"], r["version"], r["created"])
    elif op == "untag":
        cat.remove_tag(r["stance"], r["name"])
    elif op == "rename":
        if cat.has_stance(r["old"]) and not cat.has_stance(r["new"]):
            cat.move_stance(r["old"], r["new"])
    elif op == "merge":
        if cat.has_stance(r["old"]):
            cat.move_versions(r["old"], r["into"], [(vid, number) for vid, number in r["versions"]])
    elif op == "delete":
        if cat.has_stance(r["stance"]):
            cat.remove_stance(r["stance"])
    elif op == "drop":
        cat.remove_version(r["id"], r["stance"], r["number"])
    elif op == "unbase":
        cat.drop_base(r["id"])


def base_rows(base: str, record_id: str, rec: dict, **fields: Any) -> tuple[dict, list[dict]]:
    """The catalog rows of a base from its base record (checked) and its ref's fields."""
    tensors = [{"base_id": base, "name": t["name"], "dtype": t["dtype"], "shape": dumps(t["shape"]),
                "tensor_id": t["tensor"], "sq_norm": t["sq_norm"]} for t in rec["tensors"]]
    return {"id": base, "tensor_count": len(tensors), "bytes": rec["bytes"], "record": record_id, **fields}, tensors


class _Refused(Exception):
    """A record `replay` sets aside (its reason is the message)."""


def _read_base_record(objects: ObjectStore, r: dict, unindexed: Unindexed | None, *,
                      replacing: bool) -> dict | None:
    """A base ref record's base record, checked against the base's tensor list. A wrong one
    for a base indexed already (`replacing`) is refused as a record: the base keeps the record
    it has, and the rebuild sets the line aside. For a new base it is a damaged object: the
    base and its versions wait unindexed (fsck reports it)."""
    shown = f"base {r['name'] or r['id'][:19]}"
    rec = _read_json(objects, r["record"], shown, unindexed)
    if rec is None:
        if unindexed is not None and not replacing:
            unindexed.bases.add(r["id"])
        return None
    try:
        problem = base_record_problem(objects.get(r["id"]), objects.get(r["record"]), r["id"])
    except (MissingObject, CorruptObject) as e:
        problem = f"its tensor list (object {r['id']}) cannot be read ({cut(e, 120)})"
    if problem is None:
        return rec
    if replacing:
        raise _Refused(f"its base record (object {r['record']}) is wrong ({problem}); the base keeps the one "
                       "indexed before")
    message = f"the base record of {shown} (object {r['record']}) is wrong: {problem}"
    if unindexed is None:
        raise CorruptObject(r["record"], problem)
    unindexed.problems.append(("bad-base-record", r["record"], shown, message))
    unindexed.bases.add(r["id"])
    return None


def _read_json(objects: ObjectStore, oid: str, ref: str, unindexed: Unindexed | None) -> dict | None:
    try:
        value = json.loads(objects.get(oid))
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except MissingObject:
        kind, message = "missing-object", f"the manifest or base record of {ref} (object {oid}) is missing"
    except CorruptObject as e:
        kind, message = "corrupt-object", f"the manifest or base record of {ref} is corrupt ({e.reason})"
    except (ValueError, RecursionError):
        kind, message = "bad-manifest", f"the manifest or base record of {ref} (object {oid}) is not JSON"
    if unindexed is None:
        raise DeltastoreError(f"{message}; run `deltastore fsck` to see what it breaks")
    unindexed.problems.append((kind, oid, ref, message))
    return None


# -- the truth, in a catalog of its own, and the differences -----------------------------------


def truth(root: Path, objects: ObjectStore, refs: RefLog, end: int) -> tuple[Catalog, Unindexed]:
    """The index the truth gives, up to log offset `end`, in a database in memory."""
    cat = Catalog(Path(":memory:"), create=True)
    unindexed = Unindexed()
    with cat.transaction():
        replay(cat, objects, refs, start=0, end=end, unindexed=unindexed)
        for j in journalfiles.read_all(root):
            cat.put_journal({k: j[k] for k in ("id", "target", "version_id", "state", "plan", "created")},
                            j["objects"])
    return cat, unindexed


def differences(cat: Catalog, true: Catalog) -> list[tuple[str, list]]:
    """Where the catalog says other than the truth: one line per kind of difference, with the
    keys (version ids, tags, object ids, …) that differ."""
    out = []

    def compare(what: str, mine: dict, theirs: dict) -> None:
        lost = sorted(set(theirs) - set(mine))
        extra = sorted(set(mine) - set(theirs))
        changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        parts = [f"{len(lost)} missing" if lost else "", f"{len(extra)} not in the refs" if extra else "",
                 f"{len(changed)} different" if changed else ""]
        parts = [p for p in parts if p]
        if parts:
            keys = lost + extra + changed
            shown = ", ".join(str(k) for k in keys[:3])
            out.append((f"{what}: {', '.join(parts)} ({shown})", keys))

    def compare_table(what: str, table: str, key: Any) -> None:
        compare(what, {key(r): r for r in cat.rows_for_comparison(table)},
                {key(r): r for r in true.rows_for_comparison(table)})

    compare_table("versions", "versions", lambda r: r["id"])
    compare_table("stances", "stances", lambda r: r["name"])
    compare_table("tags", "tags", lambda r: f"{r['stance']}@{r['name']}")
    compare("numbers given", cat.numbers_given(), true.numbers_given())
    compare("metadata", _grouped(cat.metadata_rows()), _grouped(true.metadata_rows()))
    compare_table("bases", "bases", lambda r: r["id"])
    compare_table("base tensors", "base_tensors", lambda r: (r["base_id"], r["name"]))
    compare("the objects each version needs", cat.version_objects(), true.version_objects())
    # Rows of objects no version needs any more stay until gc: only those of versions count.
    needed = set().union(*cat.version_objects().values(), *true.version_objects().values())
    compare("objects", {r["id"]: r["raw_size"] for r in cat.object_rows() if r["id"] in needed},
            {r["id"]: r["raw_size"] for r in true.object_rows()})
    compare_table("apply journals", "journals", lambda r: r["id"])
    compare("journal objects", _grouped_journals(cat), _grouped_journals(true))
    return out


def _grouped(rows: list[dict]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(r["version_id"], {})[r["key"]] = r["value"]
    return out


def _grouped_journals(cat: Catalog) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in cat.rows_for_comparison("journal_objects"):
        out.setdefault(r["journal_id"], set()).add(r["object_id"])
    return out


# -- rebuild -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rebuilt:
    versions: int
    stances: int
    bases: int
    journals: int
    problems: tuple[str, ...]  # records that could not be indexed (their objects are missing or damaged)
    set_aside: tuple[str, ...] = ()  # records the catalog refused, moved from refs.log to refs.log.rejected


def rebuild(root: Path) -> Rebuilt:
    """A new catalog from the objects, refs.log and journals/ alone, written to tmp/ and then
    renamed over catalog.db."""
    root = Path(root)
    refs = RefLog(root)
    if not refs.path.exists():
        raise RefLogError(refs.path, "it is missing; without it the store's stances and versions are unknown")
    _refuse_a_log_behind_the_catalog(root, refs)
    tmp, counts, rejected = _build(root, refs)
    if rejected:
        tmp, counts = _set_aside(root, refs, tmp, rejected)
    install(root, tmp)
    return counts


def build(root: Path) -> tuple[Path, Rebuilt]:
    """The catalog the truth gives, as a database file in tmp/ (not yet in use)."""
    tmp, counts, _ = _build(root, RefLog(root))
    return tmp, counts


def _set_aside(root: Path, refs: RefLog, built: Path, rejected: list[Rejected]) -> tuple[Path, Rebuilt]:
    """Move the records the catalog refused out of refs.log, into refs.log.rejected (one JSON
    object a line: its line number, why, the record as it was), and build the catalog from the
    rest. The rest is written and indexed before it replaces refs.log; the catalog in place then
    indexed no further than the first refused record (no replay gets past one), which the lines
    before it still match, so a rebuild killed at any point leaves a store that opens."""
    built.unlink()
    whole = refs.path.read_bytes()[:refs.whole_size()]
    cuts = {(r.end - len(r.text), r.end) for r in rejected}
    kept, at = bytearray(), 0
    for start, end in sorted(cuts):
        kept += whole[at:start]
        at = end
    kept += whole[at:]
    copy = root / "tmp" / f"{os.getpid()}-refs.log.kept"
    with open(copy, "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    try:
        tmp, counts, again = _build(root, RefLog(root, path=copy))
        if again:  # every record left was indexed in the same order before: never expected
            raise UnindexableRecord(again[0])
        with open(root / REJECTED_FILE, "ab") as f:
            for r in rejected:
                f.write(canonical_json({"line": r.line, "reason": r.reason,
                                        "record": r.text.rstrip(b"\n").decode("utf-8", "replace")}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(copy, refs.path)
        fsync_dir(root)
    finally:
        copy.unlink(missing_ok=True)
    return tmp, dataclasses.replace(counts, set_aside=tuple(r.describe() for r in rejected))


def _build(root: Path, refs: RefLog) -> tuple[Path, Rebuilt, list[Rejected]]:
    objects = ObjectStore(root)
    tmp = root / "tmp" / f"{os.getpid()}-catalog-rebuild.db"
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    cat = Catalog(tmp, create=True)
    try:
        unindexed = Unindexed()
        with cat.transaction():
            replay(cat, objects, refs, start=0, unindexed=unindexed)
            journals = journalfiles.read_all(root)
            for j in journals:
                cat.put_journal({k: j[k] for k in ("id", "target", "version_id", "state", "plan", "created")},
                                j["objects"])
        counts = Rebuilt(len(cat.version_rows()), len(cat.stances()), len(cat.bases()),
                         len(journals), tuple(p[3] for p in unindexed.problems))
        cat.checkpoint()
    finally:
        cat.close()
    for leftover in (Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return tmp, counts, unindexed.rejected


def install(root: Path, built: Path) -> None:
    """Put a built catalog in place. The old one's -wal and -shm go first: a stale write-ahead
    log must never be applied to the new database."""
    for stale in ("catalog.db-wal", "catalog.db-shm"):
        (root / stale).unlink(missing_ok=True)
    os.replace(built, root / "catalog.db")
    fsync_dir(root)


def _refuse_a_log_behind_the_catalog(root: Path, refs: RefLog) -> None:
    """A readable catalog that indexed more of the log than the log holds means the log lost
    records: rebuilding from it would lose versions, so the rebuild refuses."""
    try:
        old = Catalog(root / "catalog.db", readonly=True)
    except (DeltastoreError, OSError):
        return  # nothing to compare with: the rebuild is what is left
    try:
        offset = old.log_position()[0]
    except DeltastoreError:
        return
    finally:
        old.close()
    if offset > refs.whole_size():
        raise RefLogError(refs.path, f"it has {refs.whole_size()} bytes, but the catalog indexed {offset}: it "
                          "was truncated or replaced, and rebuilding the catalog from it would lose versions")


