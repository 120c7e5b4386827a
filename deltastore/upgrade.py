"""`deltastore upgrade`: a store of format `deltastore/store/1` (manifests and refs only in
its catalog) becomes one of `deltastore/store/2` in place (schema/FORMAT.md, end of §8).

Crash-safe: everything new is written beside the old catalog first (objects, journals/,
refs.log, a new catalog in tmp/); then STORE is rewritten (the flip); then the new catalog is
renamed over the old. Killed before the flip, the store is still a format-1 store (the new
files are extra to it, and `upgrade` starts over); killed after, it is a format-2 store whose
catalog `upgrade` (or `fsck --rebuild-catalog`) rebuilds.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .repo import index, journalfiles
from .core.durable import replace_file
from .core.errors import DeltastoreError
from .core.hashing import bytes_id, canonical_json
from .repo.objects import ObjectStore
from .repo.reflog import RefLog
from .store import OLD_FORMATS, READABLE_FORMATS, STORE_FILE, STORE_FORMAT, store_format

FORMAT_1 = "deltastore/store/1"

# The catalog schema of format 1, as its migrations built it: kept so that the upgrade (and its
# tests) know exactly what they read.
FORMAT_1_SCHEMA = [
    # 1: everything a store needs
    """
    CREATE TABLE bases (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE,
        tensor_count INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        source TEXT,
        hub_id TEXT,
        created TEXT NOT NULL
    );
    CREATE TABLE base_tensors (
        base_id TEXT NOT NULL REFERENCES bases(id),
        name TEXT NOT NULL,
        dtype TEXT NOT NULL,
        shape TEXT NOT NULL,
        tensor_id TEXT NOT NULL,
        PRIMARY KEY (base_id, name)
    );
    CREATE TABLE stances (
        name TEXT PRIMARY KEY,
        created TEXT NOT NULL
    );
    CREATE TABLE versions (
        id TEXT PRIMARY KEY,
        stance TEXT NOT NULL REFERENCES stances(name),
        number INTEGER NOT NULL,
        parent TEXT,
        base_id TEXT NOT NULL REFERENCES bases(id),
        encoding TEXT NOT NULL,
        message TEXT NOT NULL,
        created TEXT NOT NULL,
        tensors INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        UNIQUE (stance, number)
    );
    CREATE TABLE entries (
        version_id TEXT NOT NULL REFERENCES versions(id),
        name TEXT NOT NULL,
        dtype TEXT NOT NULL,
        shape TEXT NOT NULL,
        encoding TEXT NOT NULL,
        base_tensor_id TEXT,
        target_tensor_id TEXT NOT NULL,
        result_tensor_id TEXT NOT NULL,
        rel_change REAL,
        rel_error REAL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (version_id, name)
    );
    CREATE TABLE entry_objects (
        version_id TEXT NOT NULL REFERENCES versions(id),
        name TEXT NOT NULL,
        part TEXT NOT NULL,
        object_id TEXT NOT NULL,
        PRIMARY KEY (version_id, name, part)
    );
    CREATE INDEX entry_objects_object ON entry_objects(object_id);
    CREATE TABLE objects (
        id TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        raw_size INTEGER NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE tags (
        stance TEXT NOT NULL REFERENCES stances(name),
        name TEXT NOT NULL,
        version_id TEXT NOT NULL REFERENCES versions(id),
        created TEXT NOT NULL,
        PRIMARY KEY (stance, name)
    );
    CREATE TABLE metadata (
        version_id TEXT NOT NULL REFERENCES versions(id),
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (version_id, key)
    );
    CREATE TABLE pending (
        token TEXT NOT NULL,
        object_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (token, object_id)
    );
    CREATE INDEX pending_object ON pending(object_id);
    CREATE TABLE journals (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        version_id TEXT NOT NULL,
        state TEXT NOT NULL,
        plan TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE journal_objects (
        journal_id TEXT NOT NULL REFERENCES journals(id),
        object_id TEXT NOT NULL,
        PRIMARY KEY (journal_id, object_id)
    );
    CREATE INDEX journal_objects_object ON journal_objects(object_id);
    """,
    # 2: each base tensor's squared norm, so a commit need not read the base twice over for
    # ||dW|| / ||W||
    """
    ALTER TABLE base_tensors ADD COLUMN sq_norm REAL;
    """,
]


@dataclass(frozen=True)
class Upgraded:
    was: str
    versions: int
    bases: int
    tags: int
    journals: int


def upgrade(root: Path) -> Upgraded:
    root = Path(root)
    fmt = store_format(root)
    if fmt in READABLE_FORMATS:
        # Done already, or killed between the flip and the new catalog: finish with a rebuild.
        counts = index.rebuild(root)
        return Upgraded(fmt, counts.versions, counts.bases, 0, counts.journals)
    if fmt not in OLD_FORMATS:
        raise DeltastoreError(f"{root} is a store of format {fmt!r}, which this deltastore cannot upgrade")
    old = _read_format_1(root / "catalog.db")
    objects = ObjectStore(root)
    (root / "tmp").mkdir(exist_ok=True)
    records = []
    for b in old["bases"]:
        tensors = [t for t in old["base_tensors"] if t["base_id"] == b["id"]]
        listing = index.base_list(tensors)
        if bytes_id(listing) != b["id"]:
            raise DeltastoreError(f"base {b['name'] or b['id'][:19]}: its tensors in the catalog do not hash to its "
                                  "id; the old catalog is damaged, nothing was changed")
        record = canonical_json(index.base_record(b["id"], b["bytes"], tensors))
        objects.put(listing, object_id=b["id"])
        rid = objects.put(record).id
        records.append({"op": "base", "id": b["id"], "record": rid, "name": b["name"], "source": b["source"],
                        "hub_id": b["hub_id"], "created": b["created"]})
    for v in old["versions"]:
        text = v["manifest"].encode()
        if bytes_id(text) != v["id"]:
            raise DeltastoreError(f"{v['stance']}@{v['number']}: its manifest in the catalog does not hash to its "
                                  "id; the old catalog is damaged, nothing was changed")
        objects.put(text, object_id=v["id"])
        records.append({"op": "version", "id": v["id"], "stance": v["stance"], "number": v["number"]})
    for t in old["tags"]:
        records.append({"op": "tag", "stance": t["stance"], "name": t["name"], "version": t["version_id"],
                        "created": t["created"]})
    for j in old["journals"]:
        journalfiles.write(root, j, [o["object_id"] for o in old["journal_objects"] if o["journal_id"] == j["id"]])
    RefLog(root).write_all(records, root / "tmp" / f"{os.getpid()}-refs.log.tmp")
    built, counts = index.build(root)
    # The flip: from here on the store is of format 2.
    replace_file(root / STORE_FILE, (json.dumps({"format": STORE_FORMAT}) + "\n").encode(),
                 root / "tmp" / f"{os.getpid()}-STORE.tmp")
    index.install(root, built)
    return Upgraded(fmt, counts.versions, counts.bases, len(old["tags"]), counts.journals)


def _read_format_1(path: Path) -> dict[str, list[dict]]:
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise DeltastoreError(f"cannot read the catalog {path} ({e}); nothing was changed") from None
    conn.row_factory = sqlite3.Row
    try:
        def rows(sql: str) -> list[dict]:
            return [dict(r) for r in conn.execute(sql)]

        return {
            "bases": rows("SELECT * FROM bases ORDER BY created, id"),
            "base_tensors": rows("SELECT * FROM base_tensors ORDER BY base_id, name"),
            # Landing order: a stance's first version makes it (and gives its creation time).
            "versions": rows("SELECT id, stance, number, manifest FROM versions ORDER BY created, stance, number"),
            "tags": rows("SELECT * FROM tags ORDER BY created, stance, name"),
            "journals": rows("SELECT * FROM journals ORDER BY created"),
            "journal_objects": rows("SELECT * FROM journal_objects"),
        }
    except (sqlite3.Error, UnicodeDecodeError) as e:
        raise DeltastoreError(f"cannot read the format-1 catalog {path} ({e}); nothing was changed") from None
    finally:
        conn.close()
