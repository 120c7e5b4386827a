"""The catalog: an SQLite database (through sqlite-utils) of bases, stances, versions, tensor
entries, objects, tags, metadata, pending objects and apply journals.

This is the only module that speaks SQL. It runs in WAL mode with a busy timeout, so many
processes can read and write one store; every write is one short `BEGIN IMMEDIATE`
transaction, never held while tensors are hashed or compressed. The schema only grows:
`MIGRATIONS` is append-only, each step runs in its own transaction, and `schema/catalog.sql`
is the schema they produce (a test keeps the two in step).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

MIGRATIONS: list[str] = [
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
        from .errors import ReadOnlyStore

        raise ReadOnlyStore(str(path.parent), detail="its catalog has a write-ahead log that was never "
                            "checkpointed, which a read-only folder cannot replay; open the store once "
                            "with write access")
    return connect("mode=ro&immutable=1")


class Catalog:
    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            conn = _open_readonly(self.path)
        else:
            # Autocommit mode: transactions are explicit (`transaction()`), so none is ever
            # left open by accident between statements.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives any process crash; a power cut may roll back the
            # last transactions, which only leaves their objects unreferenced (gc removes them).
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        conn.execute("PRAGMA foreign_keys=ON")
        self.conn = conn
        self._lock = threading.RLock()
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            self._migrate()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that two writers never deadlock. The lock
        serialises threads of this process that share the connection (a commit's workers)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS migrations (number INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
        done = {r[0] for r in self.conn.execute("SELECT number FROM migrations")}
        for number, script in enumerate(MIGRATIONS, start=1):
            if number in done:
                continue
            with self.transaction():
                # Another process may have migrated between our read and our lock.
                if self.conn.execute("SELECT 1 FROM migrations WHERE number = ?", [number]).fetchone():
                    continue
                for statement in _statements(script):
                    self.conn.execute(statement)
                self.conn.execute("INSERT INTO migrations VALUES (?, ?)", [number, now()])

    def schema(self) -> str:
        rows = self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY type DESC, name")
        return ";\n".join(r[0] for r in rows) + ";\n"

    def query(self, sql: str, params: Any = ()) -> list[dict]:
        return list(self.db.query(sql, params))

    def one(self, sql: str, params: Any = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # -- bases ---------------------------------------------------------------------------------

    def add_base(self, row: dict, tensors: list[dict]) -> None:
        with self.transaction():
            existing = self.one("SELECT id FROM bases WHERE id = ?", [row["id"]])
            if existing:
                updates = {k: row[k] for k in ("name", "source", "hub_id") if row.get(k)}
                if updates:
                    self.db["bases"].update(row["id"], updates)
                return
            self.db["bases"].insert(row)
            self.db["base_tensors"].insert_all(tensors, batch_size=500)

    def drop_base_if_unused(self, base_id: str) -> bool:
        """Unregister a base that no version uses (one a failed commit registered on its way)."""
        with self.transaction():
            if self.conn.execute("SELECT 1 FROM versions WHERE base_id = ? LIMIT 1", [base_id]).fetchone():
                return False
            self.conn.execute("DELETE FROM base_tensors WHERE base_id = ?", [base_id])
            self.conn.execute("DELETE FROM bases WHERE id = ?", [base_id])
        return True

    def bases(self) -> list[dict]:
        return self.query("SELECT * FROM bases ORDER BY created")

    def base_tensors(self, base_id: str) -> list[dict]:
        return self.query("SELECT * FROM base_tensors WHERE base_id = ? ORDER BY name", [base_id])

    # -- pending objects: written by a commit that has not landed yet -------------------------

    def add_pending(self, token: str, object_ids: list[str]) -> None:
        rows = [{"token": token, "object_id": oid, "pid": os.getpid(), "host": os.uname().nodename,
                 "created": now()} for oid in object_ids]
        with self.transaction():
            self.db["pending"].insert_all(rows, replace=True)

    def drop_pending(self, token: str) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM pending WHERE token = ?", [token])

    # -- versions ------------------------------------------------------------------------------

    def insert_version(self, version: dict, entries: list[dict], entry_objects: list[dict],
                       objects: list[dict], metadata: dict[str, str]) -> None:
        """Called inside `transaction()`: the version becomes visible all at once."""
        if not self.one("SELECT 1 FROM stances WHERE name = ?", [version["stance"]]):
            self.db["stances"].insert({"name": version["stance"], "created": version["created"]})
        self.db["objects"].insert_all(objects, ignore=True, batch_size=500)
        self.db["versions"].insert(version)
        self.db["entries"].insert_all(entries, batch_size=500)
        self.db["entry_objects"].insert_all(entry_objects, batch_size=500)
        self.db["metadata"].insert_all(
            [{"version_id": version["id"], "key": k, "value": v} for k, v in metadata.items()])

    def latest(self, stance: str) -> dict | None:
        return self.one("SELECT * FROM versions WHERE stance = ? ORDER BY number DESC LIMIT 1", [stance])

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

    def entries(self, version_id: str) -> list[dict]:
        return self.query("SELECT * FROM entries WHERE version_id = ? ORDER BY name", [version_id])

    def metadata(self, version_id: str) -> dict[str, str]:
        return {r["key"]: r["value"] for r in
                self.query("SELECT key, value FROM metadata WHERE version_id = ? ORDER BY key", [version_id])}

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
            self.db["tags"].insert({"stance": stance, "name": name, "version_id": version_id,
                                    "created": now()}, replace=True)

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
        """What `versions` returns, without the manifests (the bulk of a version's row)."""
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
            self.conn.execute("DELETE FROM tags WHERE stance = ? AND name = ?", [stance, name])
        return vid

    def rename_stance(self, old: str, new: str) -> int:
        """Move every version and tag of `old` to `new`, in one transaction. Versions keep their
        ids (manifests are immutable): the catalog's stance column says where a version lives.
        Returns the number of versions moved."""
        from .errors import RefNotFound, StanceExists

        with self.transaction():
            if not self.has_stance(old):
                raise RefNotFound(old)
            if self.has_stance(new):
                raise StanceExists(new)
            created = self.conn.execute("SELECT created FROM stances WHERE name = ?", [old]).fetchone()[0]
            self.conn.execute("INSERT INTO stances (name, created) VALUES (?, ?)", [new, created])
            moved = self.conn.execute("UPDATE versions SET stance = ? WHERE stance = ?", [new, old]).rowcount
            self.conn.execute("UPDATE tags SET stance = ? WHERE stance = ?", [new, old])
            self.conn.execute("DELETE FROM stances WHERE name = ?", [old])
        return moved

    def delete_stance(self, name: str) -> list[dict]:
        """Remove a stance with its versions, entries, metadata and tags, in one transaction.
        Objects stay (gc removes those nothing else references). Returns the removed versions'
        rows (id, number, bytes)."""
        from .errors import RefNotFound

        with self.transaction():
            if not self.has_stance(name):
                raise RefNotFound(name)
            gone = self.query("SELECT id, number, bytes FROM versions WHERE stance = ? ORDER BY number", [name])
            ids = json.dumps([r["id"] for r in gone])
            in_ids = "IN (SELECT value FROM json_each(?))"
            for table in ("tags", "metadata", "entry_objects", "entries"):
                self.conn.execute(f"DELETE FROM {table} WHERE version_id {in_ids}", [ids])
            self.conn.execute("DELETE FROM tags WHERE stance = ?", [name])
            self.conn.execute(f"DELETE FROM versions WHERE id {in_ids}", [ids])
            self.conn.execute("DELETE FROM stances WHERE name = ?", [name])
        return gone

    def children_outside(self, stance: str) -> list[dict]:
        """Versions of other stances whose parent is a version of `stance`."""
        return self.query(
            "SELECT c.id, c.stance, c.number FROM versions c JOIN versions p ON p.id = c.parent "
            "WHERE p.stance = ? AND c.stance != ? ORDER BY c.stance, c.number", [stance, stance])

    def objects_only_of(self, version_ids: list[str]) -> list[dict]:
        """Objects (id, size) that the given versions reference and nothing else does."""
        return self.query(
            "SELECT o.id, o.size FROM objects o WHERE o.id IN (SELECT object_id FROM entry_objects "
            "WHERE version_id IN (SELECT value FROM json_each(:ids))) AND NOT EXISTS (SELECT 1 FROM "
            "entry_objects e WHERE e.object_id = o.id AND e.version_id NOT IN (SELECT value FROM "
            "json_each(:ids))) AND NOT EXISTS (SELECT 1 FROM journal_objects j WHERE j.object_id = o.id) "
            "ORDER BY o.id", {"ids": json.dumps(version_ids)})

    # -- objects -------------------------------------------------------------------------------

    def object_rows(self) -> list[dict]:
        return self.query("SELECT * FROM objects ORDER BY id")

    def referenced_objects(self) -> set[str]:
        rows = self.conn.execute(
            "SELECT object_id FROM entry_objects UNION SELECT object_id FROM journal_objects "
            "UNION SELECT object_id FROM pending")
        return {r[0] for r in rows}

    def is_referenced(self, object_id: str) -> bool:
        return bool(self.conn.execute(
            "SELECT 1 FROM entry_objects WHERE object_id = ?1 UNION ALL "
            "SELECT 1 FROM journal_objects WHERE object_id = ?1 UNION ALL "
            "SELECT 1 FROM pending WHERE object_id = ?1 LIMIT 1", [object_id]).fetchone())

    # -- what fsck and gc read ----------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every query inside sees the same state of the catalog."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("ROLLBACK")

    def version_rows(self) -> list[dict]:
        return self.query("SELECT id, stance, number, parent, base_id, manifest FROM versions ORDER BY stance, number")

    def entry_object_rows(self) -> list[dict]:
        return self.query("SELECT version_id, name, part, object_id FROM entry_objects")

    def entry_names(self) -> list[dict]:
        return self.query("SELECT version_id, name FROM entries")

    def metadata_rows(self) -> list[dict]:
        return self.query("SELECT version_id, key, value FROM metadata")

    def foreign_key_problems(self) -> list[dict]:
        """Rows whose declared reference (version, base, stance, journal) points nowhere."""
        rows = self.conn.execute("PRAGMA foreign_key_check").fetchall()
        return [{"table": r[0], "rowid": r[1], "parent": r[2]} for r in rows]

    def objects_without_row(self) -> list[str]:
        """Object ids that entries reference but the objects table lacks."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT e.object_id FROM entry_objects e LEFT JOIN objects o ON o.id = e.object_id "
            "WHERE o.id IS NULL ORDER BY e.object_id")]

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
        rows = self.conn.execute(
            "SELECT object_id FROM entry_objects UNION SELECT object_id FROM journal_objects "
            "UNION SELECT object_id FROM pending WHERE token NOT IN (SELECT value FROM json_each(?))",
            [json.dumps(dead_tokens)])
        return {r[0] for r in rows}

    def drop_pending_of(self, tokens: list[str]) -> None:
        """Inside `transaction()`: forget the pending rows of writers that are gone."""
        self.conn.execute("DELETE FROM pending WHERE token IN (SELECT value FROM json_each(?))", [json.dumps(tokens)])

    def delete_object_row(self, object_id: str) -> None:
        """Inside `transaction()`, after the object's file is gone."""
        self.conn.execute("DELETE FROM objects WHERE id = ?", [object_id])

    # -- journals of in-place applies ----------------------------------------------------------

    def open_journals(self, target: str | None = None) -> list[dict]:
        if target is None:
            return self.query("SELECT * FROM journals ORDER BY created")
        return self.query("SELECT * FROM journals WHERE target = ? ORDER BY created", [target])

    def add_journal(self, row: dict, object_ids: list[str], token: str) -> None:
        with self.transaction():
            self.db["journals"].insert(row)
            self.db["journal_objects"].insert_all(
                [{"journal_id": row["id"], "object_id": oid} for oid in sorted(set(object_ids))])
            self.conn.execute("DELETE FROM pending WHERE token = ?", [token])

    def set_journal_state(self, journal_id: str, state: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE journals SET state = ? WHERE id = ?", [state, journal_id])

    def drop_journal(self, journal_id: str) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM journal_objects WHERE journal_id = ?", [journal_id])
            self.conn.execute("DELETE FROM journals WHERE id = ?", [journal_id])


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
