"""The catalog's tables: today's schema (`SCHEMA`, schema/catalog.sql), how ids and a stance's
highest number are kept in them, and the catalog of store format 1 (its schema as its
migrations built it, and `read_format_1`, what `deltastore upgrade` reads of one). The tables
format 1 shares with today's catalog are written once, below, and used by both.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..core.errors import DeltastoreError

# The catalog's schema. It is a cache: a catalog of another schema is rebuilt, never migrated.
SCHEMA_VERSION = "2"

# Columns of a base and of its tensors that format 1 had too. Today's catalog adds the base
# record's id to a base; format 1's second migration gave a base tensor its squared norm.
_BASE_COLUMNS = """
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    tensor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    source TEXT,
    hub_id TEXT,
    created TEXT NOT NULL"""
_BASE_TENSOR_COLUMNS = """
    base_id TEXT NOT NULL REFERENCES bases(id),
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    tensor_id TEXT NOT NULL,"""

# What a version row says of it in both formats (format 1 keyed it by id and kept its manifest).
_VERSION_COLUMNS = """
    stance TEXT NOT NULL REFERENCES stances(name),
    number INTEGER NOT NULL,
    parent TEXT,
    base_id TEXT NOT NULL REFERENCES bases(id),
    encoding TEXT NOT NULL,
    message TEXT NOT NULL,
    created TEXT NOT NULL,
    tensors INTEGER NOT NULL,
    bytes INTEGER NOT NULL,"""

_STANCES = """
CREATE TABLE stances (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL
);"""

# Tags, metadata, pending objects and apply journals: the same in both formats.
_UNCHANGED_SINCE_FORMAT_1 = """
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
"""

SCHEMA = f"""
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE bases ({_BASE_COLUMNS},
    record TEXT NOT NULL
);
CREATE TABLE base_tensors ({_BASE_TENSOR_COLUMNS}
    sq_norm REAL,
    PRIMARY KEY (base_id, name)
);{_STANCES}
CREATE TABLE versions (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,{_VERSION_COLUMNS}
    UNIQUE (stance, number)
);
CREATE TABLE version_encodings (
    version INTEGER NOT NULL REFERENCES versions(key),
    encoding TEXT NOT NULL,
    tensors INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (version, encoding)
) WITHOUT ROWID;
CREATE TABLE objects (
    key INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    raw_size INTEGER NOT NULL
);
CREATE TABLE entry_objects (
    version INTEGER NOT NULL REFERENCES versions(key),
    object INTEGER NOT NULL REFERENCES objects(key),
    PRIMARY KEY (version, object)
) WITHOUT ROWID;
CREATE INDEX entry_objects_object ON entry_objects(object);{_UNCHANGED_SINCE_FORMAT_1}"""


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


# Objects are keyed by their digest's bytes, not by the id's text: less than half the room.
def digest_of(object_id: str) -> bytes:
    return bytes.fromhex(object_id.partition(":")[2])


def id_of(digest: bytes) -> str:
    return "b3:" + digest.hex()


# The state key that keeps, for a stance that deleted a version, the highest number it gave.
TOP = "top:"


def top_key(stance: str) -> str:
    return TOP + stance


# -- the catalog of store format 1 -------------------------------------------------------------

# Its schema, as its migrations built it: kept so that the upgrade (and its tests) know exactly
# what they read.
FORMAT_1_SCHEMA = [
    # 1: everything a store needs
    f"""
CREATE TABLE bases ({_BASE_COLUMNS}
);
CREATE TABLE base_tensors ({_BASE_TENSOR_COLUMNS}
    PRIMARY KEY (base_id, name)
);{_STANCES}
CREATE TABLE versions (
    id TEXT PRIMARY KEY,{_VERSION_COLUMNS}
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
);{_UNCHANGED_SINCE_FORMAT_1}""",
    # 2: each base tensor's squared norm, so a commit need not read the base twice over for
    # ||dW|| / ||W||
    """
    ALTER TABLE base_tensors ADD COLUMN sq_norm REAL;
    """,
]


def read_format_1(path: Path) -> dict[str, list[dict]]:
    """What the upgrade takes from a format-1 catalog, table by table: bases, their tensors,
    versions with their manifests, tags, journals and their objects."""
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
