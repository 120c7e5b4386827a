"""The catalog: an SQLite index of bases, stances, versions, the objects each version needs,
tags, metadata, pending objects and apply journals. Rows are written through sqlite-utils;
reads are plain SELECTs on the same sqlite3 connection, so a command that only reads starts
without importing sqlite-utils.

It is a cache of the store's truth (objects, `refs.log`, `journals/`, schema/FORMAT.md §6):
every ref change is appended to the ref log inside the same write transaction that updates
these rows, and `fsck --rebuild-catalog` rebuilds it all from the truth. It is the only module
that speaks SQL but two: index.py compares a catalog with one rebuilt from the truth table by
table, and upgrade.py reads catalogs of older formats. It runs in WAL mode with a busy
timeout, so many processes can read and write one store; every write is one short
`BEGIN IMMEDIATE` transaction, never held while tensors are hashed or compressed. SQLite's
failures leave here as `CatalogError`s (a damaged catalog names the rebuild, a full disk says
so), never as sqlite3 exceptions.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from . import journalfiles
from ..core.errors import (BaseInUse, CatalogDamaged, CatalogError, DiskFull, ReadOnlyStore, RefNotFound, StanceExists,
                     TagsClash, UnsafeInput)
from ..core.names import MAX_NUMBER
from .reflog import RefLog, RefLogError, tail_id


class IndexConflict(CatalogDamaged):
    """A row the catalog's constraints refuse (two versions under one number, a base name two
    bases hold, a base versions still use): the catalog is sound, and a replay sets aside the
    ref record that brought the row (index.py)."""

    def __init__(self, root: str, detail: str):
        self.detail = detail
        super().__init__(root, f"is unreadable ({detail})")


def _import_sqlite_utils() -> Any:
    """sqlite_utils, without the pandas and numpy it imports when they are installed (1.2 s of
    imports) only to convert their values on insert: the catalog stores plain Python values.
    Where they are imported already, it gets them as usual."""
    blocked = [name for name in ("pandas", "numpy") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        import sqlite_utils
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return sqlite_utils


# The catalog's schema. It is a cache: a catalog of another schema is rebuilt, never migrated.
SCHEMA_VERSION = "2"
SCHEMA = """
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE bases (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    tensor_count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    source TEXT,
    hub_id TEXT,
    created TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE base_tensors (
    base_id TEXT NOT NULL REFERENCES bases(id),
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    tensor_id TEXT NOT NULL,
    sq_norm REAL,
    PRIMARY KEY (base_id, name)
);
CREATE TABLE stances (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE versions (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stance TEXT NOT NULL REFERENCES stances(name),
    number INTEGER NOT NULL,
    parent TEXT,
    base_id TEXT NOT NULL REFERENCES bases(id),
    encoding TEXT NOT NULL,
    message TEXT NOT NULL,
    created TEXT NOT NULL,
    tensors INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
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
CREATE INDEX entry_objects_object ON entry_objects(object);
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
SQLITE_MAGIC = b"SQLite format 3\x00"

BUSY_TIMEOUT_S = 60


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. In WAL mode even a reader needs the -shm file, which a folder
    this process cannot write to cannot get; there, when no write-ahead log is left to read,
    the database is opened as immutable (nothing can change it while its folder is read-only)."""
    def connect(query: str) -> sqlite3.Connection:
        return sqlite3.connect(f"{path.absolute().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)

    conn = connect("mode=ro")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise ReadOnlyStore(str(path.parent), detail="its catalog has a write-ahead log that was never "
                            "checkpointed, which a read-only folder cannot replay; open the store once "
                            "with write access")
    return connect("mode=ro&immutable=1")


class Catalog:
    """`create`: make a new, empty catalog (a new store, or a rebuild into a temporary file).
    Otherwise the catalog must exist and pass the checks of FORMAT.md §6 (`_check_file`,
    `_check_state`), and `refs` is the ref log it indexes. `replay(catalog)` is called inside a
    write transaction whenever the log holds records the catalog lacks (a writer died between
    its append and its commit)."""

    # SQLite's structural check of every page on open: a catalog damaged in place is refused
    # before any command reads it.
    quick_check_on_open = True

    def __init__(self, path: Path, *, readonly: bool = False, create: bool = False,
                 refs: RefLog | None = None, replay: Any = None):
        self.path = Path(path)
        self.root = self.path.parent
        self.readonly = readonly
        self.refs = refs
        self.replay = replay
        self._log_undo: int | None = None  # where the log was before this transaction appended
        self._open = False  # inside transaction() or snapshot()
        if not create:
            _check_file(self.path)
        try:
            if readonly:
                conn = _open_readonly(self.path)
            else:
                # Autocommit mode: transactions are explicit (`transaction()`), so none is ever
                # left open by accident between statements.
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives any process crash; a power cut may roll back the
                # last transactions, which leaves the ref log ahead (replayed on the next open).
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise _translated(e, self.root) from None
        self.conn = conn
        self._lock = threading.RLock()
        if create:
            with self.transaction():
                for statement in _statements(SCHEMA):
                    self.conn.execute(statement)
                self._set_state({"schema": SCHEMA_VERSION, "log_offset": "0", "log_tail": ""})
        else:
            self._check_state()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that two writers never deadlock. The lock
        serialises threads of this process that share the connection (a commit's workers). If
        it fails after appending to the ref log, the append is undone before the lock goes."""
        with self._lock:
            outer = self._log_undo
            try:
                self._drop_leftover()
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise _translated(e, self.root) from None
            self._open = True
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as e:
                if outer is None and self._landed():
                    raise  # a Ctrl-C after COMMIT: the log's records are the catalog's now
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled back already (a full disk, an I/O error)
                if self._log_undo is not None and outer is None:
                    self.refs.truncate(self._log_undo)
                if isinstance(e, (sqlite3.Error, UnicodeDecodeError)):
                    raise _translated(e, self.root) from None
                raise
            finally:
                self._open = False
                self._log_undo = outer

    def _landed(self) -> bool:
        """Whether this transaction's COMMIT went through before what interrupted it (a
        KeyboardInterrupt between COMMIT and the end of the block). The catalog then indexes
        the records this transaction appended to the ref log: undoing the append would leave a
        catalog ahead of the log, and the record lost. Read from the catalog itself, since the
        interruption may come before any flag could be set."""
        if self._log_undo is None or self.conn.in_transaction:
            return False
        try:
            return self.log_position()[0] > self._log_undo
        except sqlite3.Error:
            return False

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside `transaction()`: what the block writes lands whole or, when it raises, not at
        all, while the transaction goes on (a replay setting one ref record aside)."""
        try:
            self.conn.execute("SAVEPOINT record")
        except sqlite3.Error as e:
            raise _translated(e, self.root) from None
        try:
            yield
        except BaseException:
            try:
                self.conn.execute("ROLLBACK TO record")
                self.conn.execute("RELEASE record")
            except sqlite3.Error:
                pass  # SQLite rolled the transaction back already; the outer one fails
            raise
        try:
            self.conn.execute("RELEASE record")
        except sqlite3.Error as e:
            raise _translated(e, self.root) from None

    def _drop_leftover(self) -> None:
        """Before a transaction starts (under the lock): a rollback refused earlier (another
        thread's statement was still running) can have left one open; nothing of it committed.
        A transaction of this catalog's own still open is a nesting, which SQLite refuses."""
        if self.conn.in_transaction and not self._open:
            self.conn.execute("ROLLBACK")

    # -- what the catalog has indexed of the ref log --------------------------------------------

    def _state(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM state").fetchall())

    def _set_state(self, values: dict[str, str]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", list(values.items()))

    def log_position(self) -> tuple[int, str]:
        s = self._state()
        return int(s.get("log_offset", "0")), s.get("log_tail", "")

    def set_log_position(self, offset: int, line: bytes) -> None:
        """Inside `transaction()`: the catalog now holds every record up to `offset`."""
        self._set_state({"log_offset": str(offset), "log_tail": tail_id(line) if line else ""})

    def _check_state(self) -> None:
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "state" not in tables:
                raise CatalogDamaged(str(self.root), "holds no index (it is empty or of another program)")
            state = self._state()
        except sqlite3.Error as e:
            raise _translated(e, self.root) from None
        except UnicodeDecodeError:
            raise CatalogDamaged(str(self.root), "is unreadable (text that is not UTF-8)") from None
        if self.quick_check_on_open:
            try:
                damage = self.quick_check()
            except sqlite3.Error as e:
                raise _translated(e, self.root) from None
            if damage:
                raise CatalogDamaged(str(self.root), f"is damaged ({'; '.join(damage[:2])[:160]})")
        if state.get("schema") != SCHEMA_VERSION:
            raise CatalogDamaged(str(self.root), f"is of catalog schema {state.get('schema')!r}, not {SCHEMA_VERSION!r}")
        if self.refs is None:
            return
        offset, tail = int(state.get("log_offset", "0")), state.get("log_tail", "")
        size = self.refs.whole_size()
        if offset > size:
            raise RefLogError(self.refs.path, f"it has {size} bytes, but the catalog indexed {offset}: it was "
                              "truncated or replaced, and rebuilding the catalog from it would lose versions")
        line = self.refs.line_before(offset)
        if line is None or (tail_id(line) if line else "") != tail:
            raise CatalogDamaged(str(self.root), "disagrees with the store's ref log (refs.log)")
        if not self.readonly and self.replay is not None:
            if offset < size:
                self.catch_up()
            self._reconcile_journals()

    def catch_up(self) -> None:
        """Replay the records of the log the catalog lacks, under the write lock (idempotent)."""
        with self.transaction():
            if self.log_position()[0] < self.refs.whole_size():
                self.replay(self)

    def record(self, *records: dict) -> None:
        """Inside `transaction()`: append ref records to the log (one write, fsynced) and note
        that the catalog holds them. The caller updates the rows in the same transaction."""
        if self.refs is None:
            return
        if self.log_position()[0] != self.refs.whole_size() and self.replay is not None:
            self.replay(self)
        before, after, last = self.refs.append(list(records))
        if self._log_undo is None:
            self._log_undo = before
        self.set_log_position(after, last)

    def schema(self) -> str:
        rows = self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY type DESC, name")
        return ";\n".join(r[0] for r in rows) + ";\n"

    def quick_check(self) -> list[str]:
        """SQLite's own check of the database's structure: [] when sound."""
        rows = [r[0] for r in self.conn.execute("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def query(self, sql: str, params: Any = ()) -> list[dict]:
        cursor = self.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    @functools.cached_property
    def db(self) -> Any:
        """The connection as sqlite-utils sees it, for the catalog's writes. Made on the first
        write: importing sqlite-utils (and the scan of installed packages' entry points its
        plugins make) was a third of the start of a command that only reads, and reads are
        plain SELECTs on the same connection."""
        return _import_sqlite_utils().Database(self.conn)

    def insert(self, table: str, rows: list[dict], *, replace: bool = False) -> int | None:
        """Inside `transaction()`: rows of one table (a dict or list value is stored as its JSON
        text, as sqlite-utils does). Returns the row's key when there is one row."""
        if not rows:
            return None
        if len(rows) == 1:
            return self.db[table].insert(rows[0], replace=replace).last_rowid
        self.db[table].insert_all(rows, replace=replace, batch_size=500)
        return None

    def one(self, sql: str, params: Any = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # -- bases ---------------------------------------------------------------------------------

    def add_base(self, row: dict, tensors: list[dict]) -> None:
        """Register a base (or update its name, source and Hub id), with its ref record."""
        with self.transaction():
            self.record(self.register_base(row, tensors))

    def register_base(self, row: dict, tensors: list[dict]) -> dict:
        """Inside `transaction()`: the base's rows; returns its ref record (for `record`)."""
        self.put_base(row, tensors)
        current = self.one("SELECT * FROM bases WHERE id = ?", [row["id"]])
        return {"op": "base", **{k: current[k] for k in ("id", "record", "name", "source", "hub_id", "created")}}

    def put_base(self, row: dict, tensors: list[dict]) -> None:
        """Inside `transaction()`: the rows of a base (no ref record: `add_base` and replay). A
        row naming another base record than the one indexed replaces it, tensors and all (the
        record the weights give, where the one indexed disagreed with them)."""
        existing = self.one("SELECT id, record FROM bases WHERE id = ?", [row["id"]])
        if existing:
            updates = {k: row[k] for k in ("name", "source", "hub_id") if row.get(k)}
            if row.get("record") and row["record"] != existing["record"]:
                updates.update({k: row[k] for k in ("record", "bytes", "tensor_count")})
                self.conn.execute("DELETE FROM base_tensors WHERE base_id = ?", [row["id"]])
                self.insert("base_tensors", tensors)
            if updates:
                self.db["bases"].update(row["id"], updates)
            return
        self.insert("bases", [row])
        self.insert("base_tensors", tensors)

    def remove_base(self, base_id: str, shown: str) -> None:
        """Remove a base's rows, with its ref record, in one transaction; refused (BaseInUse,
        naming them) while versions use it. Its two objects stay until gc."""
        with self.transaction():
            users = self.query("SELECT stance, number FROM versions WHERE base_id = ? ORDER BY stance, number",
                               [base_id])
            if users:
                raise BaseInUse(shown, [f"{r['stance']}@{r['number']}" for r in users])
            self.drop_base(base_id)
            self.record({"op": "unbase", "id": base_id})

    def drop_base(self, base_id: str) -> None:
        """Inside `transaction()`: the rows of a base removal (no ref record)."""
        self.conn.execute("DELETE FROM base_tensors WHERE base_id = ?", [base_id])
        self.conn.execute("DELETE FROM bases WHERE id = ?", [base_id])

    def bases(self) -> list[dict]:
        return self.query("SELECT * FROM bases ORDER BY created")

    def base_record_id(self, base_id: str) -> str | None:
        """The id of the base record indexed for a base (None: no such base)."""
        row = self.one("SELECT record FROM bases WHERE id = ?", [base_id])
        return row["record"] if row else None

    def has_base(self, base_id: str) -> bool:
        return self.one("SELECT 1 FROM bases WHERE id = ?", [base_id]) is not None

    def base_named(self, name: str, *, other_than: str) -> str | None:
        """The id of another base that already holds `name` (base names are unique)."""
        row = self.one("SELECT id FROM bases WHERE name = ? AND id != ?", [name, other_than])
        return row["id"] if row else None

    def base_tensors(self, base_id: str) -> list[dict]:
        return self.query("SELECT * FROM base_tensors WHERE base_id = ? ORDER BY name", [base_id])

    # -- pending objects: written by a commit that has not landed yet -------------------------

    def add_pending(self, token: str, object_ids: list[str]) -> None:
        rows = [{"token": token, "object_id": oid, "pid": os.getpid(), "host": os.uname().nodename,
                 "created": now()} for oid in object_ids]
        with self.transaction():
            self.insert("pending", rows, replace=True)

    def drop_pending(self, token: str) -> None:
        with self.transaction():
            self.forget_pending(token)

    def forget_pending(self, token: str) -> None:
        """Inside `transaction()`: a landed commit's objects are no longer pending."""
        self.conn.execute("DELETE FROM pending WHERE token = ?", [token])

    def pending_of(self, token: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT object_id FROM pending WHERE token = ?", [token])]

    # -- versions ------------------------------------------------------------------------------

    def insert_version(self, version: dict, objects: list[dict], links: list[str], by_encoding: list[dict],
                       metadata: dict[str, str]) -> None:
        """Inside `transaction()`: the version becomes visible all at once. `objects`: (id, size,
        raw_size) of every object it needs; `links`: their ids; `by_encoding`: (encoding,
        tensors, bytes)."""
        if not self.one("SELECT 1 FROM stances WHERE name = ?", [version["stance"]]):
            self.insert("stances", [{"name": version["stance"], "created": version["created"]}])
        self.conn.executemany("INSERT OR IGNORE INTO objects (digest, size, raw_size) VALUES (?, ?, ?)",
                              [(_digest(o["id"]), o["size"], o["raw_size"]) for o in objects])
        key = self.insert("versions", [version])
        self.conn.executemany("INSERT OR IGNORE INTO entry_objects (version, object) "
                              "SELECT ?, key FROM objects WHERE digest = ?", [(key, _digest(oid)) for oid in links])
        self.conn.executemany("INSERT INTO version_encodings (version, encoding, tensors, bytes) VALUES (?, ?, ?, ?)",
                              [(key, e["encoding"], e["tensors"], e["bytes"]) for e in by_encoding])
        self.insert("metadata", [{"version_id": version["id"], "key": k, "value": v} for k, v in metadata.items()])

    def latest(self, stance: str) -> dict | None:
        return self.one("SELECT * FROM versions WHERE stance = ? ORDER BY number DESC LIMIT 1", [stance])

    def last_number(self, stance: str) -> int:
        """The highest number `stance` has given a version, deleted ones included (0 if none): a
        number is never given twice, so STANCE@N names one version for good."""
        latest = self.latest(stance)
        top = self.one("SELECT value FROM state WHERE key = ?", [_top_key(stance)])
        return max(latest["number"] if latest else 0, int(top["value"]) if top else 0)

    def delete_version(self, version_id: str, check: Callable[[dict], None]) -> dict:
        """Remove one version with its entries, metadata and tags, in one transaction; the
        stance remembers its number. ``check``, given its row, runs inside the transaction and
        may refuse. Objects stay until gc. Returns the removed row."""
        with self.transaction():
            row = self.version(version_id)
            if row is None:
                raise RefNotFound(version_id[:19])
            check(row)
            self.remove_version(row["id"], row["stance"], row["number"])
            self.record({"op": "drop", "id": row["id"], "stance": row["stance"], "number": row["number"]})
        return row

    def remove_version(self, version_id: str, stance: str, number: int) -> None:
        """Inside `transaction()`: the rows of a version delete (no ref record). A replay may
        not hold the version (its manifest was gone); the stance's numbers and creation time
        come out the same either way: the highest number given, and the oldest version kept."""
        if not self.has_stance(stance):
            return
        top = max(self.last_number(stance), number)
        key = self.one("SELECT key FROM versions WHERE id = ?", [version_id])
        if key is not None:
            for table in ("tags", "metadata"):
                self.conn.execute(f"DELETE FROM {table} WHERE version_id = ?", [version_id])
            for table in ("entry_objects", "version_encodings"):
                self.conn.execute(f"DELETE FROM {table} WHERE version = ?", [key["key"]])
            self.conn.execute("DELETE FROM versions WHERE id = ?", [version_id])
        self.conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", [_top_key(stance), str(top)])
        self.conn.execute("UPDATE stances SET created = (SELECT min(created) FROM versions WHERE stance = ?1) "
                          "WHERE name = ?1 AND EXISTS (SELECT 1 FROM versions WHERE stance = ?1)", [stance])

    def numbers_given(self) -> dict[str, str]:
        """stance -> the highest number given, for stances that deleted a version."""
        return {r["key"][len(_TOP):]: r["value"] for r in self.query(
            "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?", [len(_TOP), _TOP])}

    def version(self, version_id: str) -> dict | None:
        return self.one("SELECT * FROM versions WHERE id = ?", [version_id])

    def version_at(self, stance: str, number: int) -> dict | None:
        return self.one("SELECT * FROM versions WHERE stance = ? AND number = ?", [stance, number])

    def versions(self, stance: str | None = None, *, where: dict[str, str] | None = None,
                 columns: str = "*") -> list[dict]:
        """Versions, newest first, of one stance or all, with the metadata `where` names."""
        sql = f"SELECT {columns} FROM versions"
        clauses, params = [], []
        if stance is not None:
            clauses.append("stance = ?")
            params.append(stance)
        for key, value in (where or {}).items():
            clauses.append("id IN (SELECT version_id FROM metadata WHERE key = ? AND value = ?)")
            params += [key, value]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        order = " ORDER BY number DESC" if stance is not None else " ORDER BY created DESC, number DESC"
        cursor = self.conn.execute(sql + order, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def referenced_bytes(self) -> int:
        """The bytes all versions need, counting an object once per version that needs it."""
        return self.one("SELECT coalesce(sum(bytes), 0) AS b FROM versions")["b"]

    def bytes_by_stance(self) -> list[dict]:
        return self.query("SELECT stance, count(*) AS versions, sum(bytes) AS bytes FROM versions "
                          "GROUP BY stance ORDER BY stance")

    def bytes_by_encoding(self) -> list[dict]:
        return self.query("SELECT encoding, sum(tensors) AS tensors, sum(bytes) AS bytes FROM version_encodings "
                          "GROUP BY encoding ORDER BY encoding")

    def stances(self) -> list[dict]:
        return self.query(
            "SELECT s.name, s.created, count(v.id) AS versions, max(v.number) AS latest "
            "FROM stances s LEFT JOIN versions v ON v.stance = s.name GROUP BY s.name ORDER BY s.name")

    def tags(self, version_id: str | None = None) -> list[dict]:
        if version_id is None:
            return self.query("SELECT * FROM tags ORDER BY stance, name")
        return self.query("SELECT * FROM tags WHERE version_id = ? ORDER BY name", [version_id])

    def set_tag(self, stance: str, name: str, version_id: str) -> None:
        with self.transaction():
            created = now()
            self.put_tag(stance, name, version_id, created)
            self.record({"op": "tag", "stance": stance, "name": name, "version": version_id, "created": created})

    def put_tag(self, stance: str, name: str, version_id: str, created: str) -> None:
        """Inside `transaction()`: the tag's row (no ref record)."""
        self.insert("tags", [{"stance": stance, "name": name, "version_id": version_id, "created": created}],
                    replace=True)

    def versions_with_prefix(self, prefix: str) -> list[dict]:
        return self.query("SELECT * FROM versions WHERE id LIKE ? ORDER BY id", [prefix + "%"])

    # -- history: tags and stances renamed or deleted -------------------------------------------

    def has_stance(self, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM stances WHERE name = ?", [name]).fetchone())

    def tag_target(self, stance: str, name: str) -> str | None:
        row = self.conn.execute("SELECT version_id FROM tags WHERE stance = ? AND name = ?",
                                [stance, name]).fetchone()
        return row[0] if row else None

    def tags_by_version(self, version_ids: list[str] | None = None) -> dict[str, list[str]]:
        """version id -> its tag names, for the given versions (None: every version)."""
        if version_ids is None:
            rows = self.conn.execute("SELECT version_id, name FROM tags ORDER BY name")
        else:
            rows = self.conn.execute(
                "SELECT version_id, name FROM tags WHERE version_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY name", [json.dumps(version_ids)])
        out: dict[str, list[str]] = {}
        for vid, name in rows:
            out.setdefault(vid, []).append(name)
        return out

    def version_summaries(self, stance: str | None = None, *, where: dict[str, str] | None = None) -> list[dict]:
        """What `versions` returns, without the surrogate key."""
        return self.versions(stance, where=where, columns="id, stance, number, parent, base_id, encoding, "
                                                          "message, created, tensors, bytes")

    def metadata_by_version(self, version_ids: list[str] | None = None) -> dict[str, dict[str, str]]:
        """version id -> its metadata, for the given versions (None: every version)."""
        if version_ids is None:
            rows = self.conn.execute("SELECT version_id, key, value FROM metadata ORDER BY key")
        else:
            rows = self.conn.execute(
                "SELECT version_id, key, value FROM metadata WHERE version_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY key", [json.dumps(version_ids)])
        out: dict[str, dict[str, str]] = {}
        for vid, key, value in rows:
            out.setdefault(vid, {})[key] = value
        return out

    def delete_tag(self, stance: str, name: str) -> str | None:
        """Remove one tag; the id of the version it named, or None when there was no such tag."""
        with self.transaction():
            vid = self.tag_target(stance, name)
            if vid is not None:
                self.remove_tag(stance, name)
                self.record({"op": "untag", "stance": stance, "name": name})
        return vid

    def remove_tag(self, stance: str, name: str) -> None:
        self.conn.execute("DELETE FROM tags WHERE stance = ? AND name = ?", [stance, name])

    def rename_stance(self, old: str, new: str) -> int:
        """Move every version and tag of `old` to `new`, in one transaction. Versions keep their
        ids (manifests are immutable): the catalog's stance column says where a version lives.
        Returns the number of versions moved."""
        with self.transaction():
            if not self.has_stance(old):
                raise RefNotFound(old)
            if self.has_stance(new):
                raise StanceExists(new, old)
            moved = self.move_stance(old, new)
            self.record({"op": "rename", "old": old, "new": new})
        return moved

    def move_stance(self, old: str, new: str) -> int:
        """Inside `transaction()`: the rows of a rename (no ref record)."""
        created = self.conn.execute("SELECT created FROM stances WHERE name = ?", [old]).fetchone()[0]
        self.conn.execute("INSERT INTO stances (name, created) VALUES (?, ?)", [new, created])
        moved = self.conn.execute("UPDATE versions SET stance = ? WHERE stance = ?", [new, old]).rowcount
        self.conn.execute("UPDATE tags SET stance = ? WHERE stance = ?", [new, old])
        self.conn.execute("UPDATE state SET key = ? WHERE key = ?", [_top_key(new), _top_key(old)])
        self.conn.execute("DELETE FROM stances WHERE name = ?", [old])
        return moved

    def merge_stance(self, old: str, into: str) -> list[tuple[str, int]]:
        """Move every version and tag of `old` into `into`, numbered after `into`'s newest in
        their order, and remove `old`, in one transaction. Returns (version id, new number)
        of each version moved."""
        with self.transaction():
            for name in (old, into):
                if not self.has_stance(name):
                    raise RefNotFound(name)
            both = self.query("SELECT name FROM tags WHERE stance = ? AND name IN "
                              "(SELECT name FROM tags WHERE stance = ?) ORDER BY name", [old, into])
            if both:
                raise TagsClash(old, into, [r["name"] for r in both])
            top = self.last_number(into)
            rows = self.query("SELECT id FROM versions WHERE stance = ? ORDER BY number", [old])
            moves = [(r["id"], top + k) for k, r in enumerate(rows, start=1)]
            if moves and moves[-1][1] > MAX_NUMBER:
                raise UnsafeInput(f"merging {len(moves)} versions into {into!r} would number them past {MAX_NUMBER}, "
                                  "the last number a ref can name; nothing was changed")
            self.move_versions(old, into, moves)
            self.record({"op": "merge", "old": old, "into": into, "versions": [[vid, n] for vid, n in moves]})
        return moves

    def move_versions(self, old: str, into: str, moves: list[tuple[str, int]]) -> None:
        """Inside `transaction()`: the rows of a merge (no ref record). `into` keeps its creation
        time; a version of `old` that the catalog does not hold (its manifest was unreadable
        when indexed) is passed over."""
        if not self.has_stance(into):
            created = self.conn.execute("SELECT created FROM stances WHERE name = ?", [old]).fetchone()
            if created is None:
                return
            self.conn.execute("INSERT INTO stances (name, created) VALUES (?, ?)", [into, created[0]])
        self.conn.executemany("UPDATE versions SET stance = ?, number = ? WHERE id = ? AND stance = ?",
                              [(into, number, vid, old) for vid, number in moves])
        self.conn.execute("UPDATE tags SET stance = ? WHERE stance = ?", [into, old])
        self.conn.execute("DELETE FROM state WHERE key = ?", [_top_key(old)])
        self.conn.execute("DELETE FROM stances WHERE name = ?", [old])

    def delete_stance(self, name: str, check: Callable[[list[str]], None] | None = None) -> list[dict]:
        """Remove a stance with its versions, entries, metadata and tags, in one transaction.
        Objects stay (gc removes those nothing else references). Returns the removed versions'
        rows (id, number, bytes). ``check``, given the ids of the versions to go, runs inside
        the transaction and may refuse."""
        with self.transaction():
            if not self.has_stance(name):
                raise RefNotFound(name)
            if check is not None:
                check([r["id"] for r in self.versions(name)])
            gone = self.remove_stance(name)
            self.record({"op": "delete", "stance": name})
        return gone

    def remove_stance(self, name: str) -> list[dict]:
        """Inside `transaction()`: the rows of a delete (no ref record)."""
        gone = self.query("SELECT id, key, number, bytes FROM versions WHERE stance = ? ORDER BY number", [name])
        ids = json.dumps([r["id"] for r in gone])
        keys = json.dumps([r["key"] for r in gone])
        in_ids = "IN (SELECT value FROM json_each(?))"
        for table in ("tags", "metadata"):
            self.conn.execute(f"DELETE FROM {table} WHERE version_id {in_ids}", [ids])
        for table in ("entry_objects", "version_encodings"):
            self.conn.execute(f"DELETE FROM {table} WHERE version {in_ids}", [keys])
        self.conn.execute("DELETE FROM tags WHERE stance = ?", [name])
        self.conn.execute(f"DELETE FROM versions WHERE id {in_ids}", [ids])
        self.conn.execute("DELETE FROM state WHERE key = ?", [_top_key(name)])
        self.conn.execute("DELETE FROM stances WHERE name = ?", [name])
        return [{k: r[k] for k in ("id", "number", "bytes")} for r in gone]

    def children_of(self, version_id: str) -> list[dict]:
        """Versions whose parent is `version_id`."""
        return self.query("SELECT id, stance, number FROM versions WHERE parent = ? ORDER BY stance, number",
                          [version_id])

    def children_outside(self, stance: str) -> list[dict]:
        """Versions of other stances whose parent is a version of `stance`."""
        return self.query(
            "SELECT c.id, c.stance, c.number FROM versions c JOIN versions p ON p.id = c.parent "
            "WHERE p.stance = ? AND c.stance != ? ORDER BY c.stance, c.number", [stance, stance])

    def objects_only_of(self, version_ids: list[str]) -> list[dict]:
        """Objects (id, size) that the given versions reference and nothing else does."""
        rows = self.conn.execute(
            "SELECT o.digest, o.size FROM objects o WHERE o.key IN (SELECT e.object FROM entry_objects e JOIN "
            "versions v ON v.key = e.version WHERE v.id IN (SELECT value FROM json_each(:ids))) AND NOT EXISTS "
            "(SELECT 1 FROM entry_objects e JOIN versions v ON v.key = e.version WHERE e.object = o.key AND "
            "v.id NOT IN (SELECT value FROM json_each(:ids))) ORDER BY o.digest", {"ids": json.dumps(version_ids)})
        journal = self._journal_objects()
        return [{"id": _oid(d), "size": s} for d, s in rows if _oid(d) not in journal]

    def _journal_objects(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT object_id FROM journal_objects")}

    # -- objects -------------------------------------------------------------------------------

    def object_rows(self, *, needed_only: bool = False) -> list[dict]:
        """Every object row, or (`needed_only`) those of objects a version needs."""
        where = " WHERE key IN (SELECT object FROM entry_objects)" if needed_only else ""
        return [{"id": _oid(d), "size": s, "raw_size": r} for d, s, r in
                self.conn.execute(f"SELECT digest, size, raw_size FROM objects{where} ORDER BY digest")]

    def version_objects(self) -> dict[str, set[str]]:
        """version id -> the ids of the objects the catalog says it needs."""
        out: dict[str, set[str]] = {}
        for vid, digest in self.conn.execute(
                "SELECT v.id, o.digest FROM entry_objects e JOIN versions v ON v.key = e.version "
                "JOIN objects o ON o.key = e.object"):
            out.setdefault(vid, set()).add(_oid(digest))
        return out

    def referenced_objects(self) -> set[str]:
        return self.live_references([])

    def is_referenced(self, object_id: str) -> bool:
        """Whether a version (its manifest or an entry), a base, a journal or a pending commit
        needs this object."""
        return bool(self.conn.execute(
            "SELECT 1 FROM objects o JOIN entry_objects e ON e.object = o.key WHERE o.digest = ?2 UNION ALL "
            "SELECT 1 FROM versions WHERE id = ?1 UNION ALL "
            "SELECT 1 FROM bases WHERE id = ?1 OR record = ?1 UNION ALL "
            "SELECT 1 FROM journal_objects WHERE object_id = ?1 UNION ALL "
            "SELECT 1 FROM pending WHERE object_id = ?1 LIMIT 1", [object_id, _digest(object_id)]).fetchone())

    # -- what fsck and gc read ----------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every query inside sees the same state of the catalog. Under
        the lock, like a write: threads share the connection, and so its transaction."""
        with self._lock:
            try:
                self._drop_leftover()
                self.conn.execute("BEGIN")
            except sqlite3.Error as e:
                raise _translated(e, self.root) from None
            self._open = True
            try:
                yield
            except (sqlite3.Error, UnicodeDecodeError) as e:
                raise _translated(e, self.root) from None
            finally:
                self._open = False
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def version_rows(self) -> list[dict]:
        return self.query("SELECT id, stance, number, parent, base_id, tensors, bytes FROM versions "
                          "ORDER BY stance, number")

    def metadata_rows(self) -> list[dict]:
        return self.query("SELECT version_id, key, value FROM metadata")

    def foreign_key_problems(self) -> list[dict]:
        """Rows whose declared reference (version, base, stance, journal) points nowhere."""
        rows = self.conn.execute("PRAGMA foreign_key_check").fetchall()
        return [{"table": r[0], "rowid": r[1], "parent": r[2]} for r in rows]

    def missing_parents(self) -> list[dict]:
        return self.query("SELECT v.id, v.stance, v.number, v.parent FROM versions v WHERE v.parent IS NOT NULL "
                          "AND NOT EXISTS (SELECT 1 FROM versions p WHERE p.id = v.parent) ORDER BY v.stance, v.number")

    def journal_object_rows(self) -> list[dict]:
        return self.query("SELECT j.id AS journal_id, j.target, o.object_id FROM journal_objects o "
                          "JOIN journals j ON j.id = o.journal_id ORDER BY j.created")

    def pending_commits(self) -> list[dict]:
        """Writers with objects shielded from gc: (token, pid, host, created, objects)."""
        return self.query("SELECT token, pid, host, min(created) AS created, count(*) AS objects FROM pending "
                          "GROUP BY token, pid, host ORDER BY created")

    def live_references(self, dead_tokens: list[str]) -> set[str]:
        """Every object something needs, not counting the pending rows of the given dead writers."""
        out = {_oid(r[0]) for r in self.conn.execute(
            "SELECT digest FROM objects WHERE key IN (SELECT object FROM entry_objects)")}
        rows = self.conn.execute(
            "SELECT id FROM versions UNION SELECT id FROM bases UNION SELECT record FROM bases "
            "UNION SELECT object_id FROM journal_objects "
            "UNION SELECT object_id FROM pending WHERE token NOT IN (SELECT value FROM json_each(?))",
            [json.dumps(dead_tokens)])
        return out | {r[0] for r in rows}

    def drop_pending_of(self, tokens: list[str]) -> None:
        """Inside `transaction()`: forget the pending rows of writers that are gone."""
        self.conn.execute("DELETE FROM pending WHERE token IN (SELECT value FROM json_each(?))", [json.dumps(tokens)])

    def delete_object_row(self, object_id: str) -> None:
        """Inside `transaction()`, after the object's file is gone."""
        self.conn.execute("DELETE FROM objects WHERE digest = ?", [_digest(object_id)])

    # -- journals of in-place applies: journals/<id>.json is the truth, these rows its index ---

    def open_journals(self, target: str | None = None) -> list[dict]:
        if target is None:
            return self.query("SELECT * FROM journals ORDER BY created")
        return self.query("SELECT * FROM journals WHERE target = ? ORDER BY created", [target])

    def add_journal(self, row: dict, object_ids: list[str], token: str) -> None:
        with self.transaction():
            journalfiles.write(self.root, row, object_ids)
            self.put_journal(row, object_ids)
            self.conn.execute("DELETE FROM pending WHERE token = ?", [token])

    def put_journal(self, row: dict, object_ids: list[str]) -> None:
        self.insert("journals", [row], replace=True)
        self.insert("journal_objects", [{"journal_id": row["id"], "object_id": oid} for oid in sorted(set(object_ids))],
                    replace=True)

    def set_journal_state(self, journal_id: str, state: str) -> None:
        with self.transaction():
            row = self.one("SELECT * FROM journals WHERE id = ?", [journal_id])
            if row is None:
                return
            objects = [r[0] for r in self.conn.execute("SELECT object_id FROM journal_objects WHERE journal_id = ?",
                                                       [journal_id])]
            journalfiles.write(self.root, {**row, "state": state}, objects)
            self.conn.execute("UPDATE journals SET state = ? WHERE id = ?", [state, journal_id])

    def drop_journal(self, journal_id: str) -> None:
        # The file first: it is the truth, and removing it needs no room. Rows its removal
        # leaves behind (a crash, a full disk) are dropped by the next writable open.
        journalfiles.remove(self.root, journal_id)
        try:
            with self.transaction():
                self.conn.execute("DELETE FROM journal_objects WHERE journal_id = ?", [journal_id])
                self.conn.execute("DELETE FROM journals WHERE id = ?", [journal_id])
        except DiskFull:
            pass

    def _reconcile_journals(self) -> None:
        """Make the journal rows say what journals/ says (a writable open, when they differ)."""
        files = journalfiles.ids(self.root)
        rows = {r[0] for r in self.conn.execute("SELECT id FROM journals")}
        if files == rows:
            return
        with self.transaction():
            for gone in rows - files:
                self.conn.execute("DELETE FROM journal_objects WHERE journal_id = ?", [gone])
                self.conn.execute("DELETE FROM journals WHERE id = ?", [gone])
            for j in journalfiles.read_all(self.root):
                if j["id"] not in rows:
                    self.put_journal({k: j[k] for k in ("id", "target", "version_id", "state", "plan", "created")},
                                     j["objects"])


def _digest(object_id: str) -> bytes:
    return bytes.fromhex(object_id.partition(":")[2])


def _oid(digest: bytes) -> str:
    return "b3:" + digest.hex()


def _check_file(path: Path) -> None:
    """The checks that need no SQLite: the file is there, whole, and an SQLite database."""
    root = str(path.parent)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        raise CatalogDamaged(root, "is missing (catalog.db)") from None
    except OSError as e:
        raise CatalogDamaged(root, f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise CatalogDamaged(root, "is empty (catalog.db has 0 bytes)")
    if not head.startswith(SQLITE_MAGIC) or len(head) < 100:
        raise CatalogDamaged(root, "is not an SQLite database")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    # The header's page count is valid when its change counter matches (SQLite file format §1.3.7).
    if head[24:28] == head[92:96] and size < pages * page_size:
        raise CatalogDamaged(root, f"is truncated ({size} bytes, its header says {pages * page_size})")


# I/O errors of a write: what a file-size limit (EFBIG) or a quota gives where a full disk
# gives SQLITE_FULL; the user's remedy is the same.
_WRITE_FAILED = {sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC, sqlite3.SQLITE_IOERR_TRUNCATE,
                 sqlite3.SQLITE_IOERR_SHMSIZE}


def _translated(e: BaseException, root: Path) -> Exception:
    """A CatalogError for what SQLite (or the text it holds) raised."""
    if isinstance(e, UnicodeDecodeError):
        return CatalogDamaged(str(root), "holds text that is not UTF-8 (it was damaged)")
    if isinstance(e, sqlite3.IntegrityError):
        return IndexConflict(str(root), str(e))
    extended = getattr(e, "sqlite_errorcode", None)
    code = extended & 0xFF if extended is not None else None  # the primary code of an extended one
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(e) or extended in _WRITE_FAILED:
        return DiskFull()
    if code == sqlite3.SQLITE_BUSY or "database is locked" in str(e):
        return CatalogError(f"the catalog of the store at {root} stayed locked by another process for "
                            f"{BUSY_TIMEOUT_S} s; run the command again when it is done")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return CatalogError(f"cannot write to the catalog of the store at {root} ({e}); check the folder's "
                            "permissions and free space")
    # Anything else, an I/O error included (what a write-ahead log removed under a reader
    # gives), means the catalog cannot be trusted.
    return CatalogDamaged(str(root), f"is unreadable ({e})")


def _translating(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: Catalog, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, UnicodeDecodeError) as e:
            raise _translated(e, self.root) from None
    return wrapper


# Every public query speaks CatalogError, never sqlite3 (the context managers translate their own).
for _name, _value in list(vars(Catalog).items()):
    if callable(_value) and not _name.startswith("__") and _name not in ("transaction", "snapshot", "savepoint"):
        setattr(Catalog, _name, _translating(_value))


# The state key that keeps, for a stance that deleted a version, the highest number it gave.
_TOP = "top:"


def _top_key(stance: str) -> str:
    return _TOP + stance


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
