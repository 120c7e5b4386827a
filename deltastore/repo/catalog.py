"""The catalog: an SQLite index of bases, stances, versions, the objects each version needs,
tags, metadata, pending objects and apply journals. `Catalog` opens one (checked against the
ref log, caught up with it) or makes a new one, and writes its rows through sqlite-utils;
its reads are catalog_queries.py's, plain SELECTs on the same connection, so a command that
only reads starts without importing sqlite-utils.

It is a cache of the store's truth (objects, `refs.log`, `journals/`, schema/FORMAT.md §6):
every ref change is appended to the ref log inside the same write transaction that updates
these rows (catalog_sqlite.py), and `fsck --rebuild-catalog` rebuilds it all from the truth.
With catalog_schema.py, catalog_sqlite.py and catalog_queries.py it is the only code that
speaks SQL. Every write is one short `BEGIN IMMEDIATE` transaction, never held while tensors
are hashed or compressed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import journalfiles
from ..core.errors import (BaseInUse, CatalogDamaged, DiskFull, RefNotFound, StanceExists, TagsClash,
                           UnsafeInput)
from ..core.names import MAX_NUMBER
from .catalog_queries import CatalogQueries
from .catalog_schema import SCHEMA, SCHEMA_VERSION, digest_of, statements, top_key
from .catalog_sqlite import check_file, speaking_catalog_errors, translated
from .reflog import RefLog, RefLogError, tail_id


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@speaking_catalog_errors
class Catalog(CatalogQueries):
    """`create`: make a new, empty catalog (a new store, or a rebuild into a temporary file).
    Otherwise the catalog must exist and pass the checks of FORMAT.md §6 (`check_file`,
    `_check_state`, `_check_log`), and `refs` is the ref log it indexes. `replay(catalog)` is
    called inside a write transaction whenever the log holds records the catalog lacks (a
    writer died between its append and its commit)."""

    # SQLite's structural check of every page on open: a catalog damaged in place is refused
    # before any command reads it.
    quick_check_on_open = True

    def __init__(self, path: Path, *, readonly: bool = False, create: bool = False,
                 refs: RefLog | None = None, replay: Any = None):
        if not create:
            check_file(Path(path))
        super().__init__(path, readonly=readonly, refs=refs, replay=replay)
        if create:
            with self.transaction():
                for statement in statements(SCHEMA):
                    self.conn.execute(statement)
                self.set_state({"schema": SCHEMA_VERSION, "log_offset": "0", "log_tail": ""})
        else:
            self._check_log(self._check_state())

    def _check_state(self) -> dict[str, str]:
        """The catalog's state, once it is known to hold an index of this schema, undamaged."""
        try:
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "state" not in tables:
                raise CatalogDamaged(str(self.root), "holds no index (it is empty or of another program)")
            state = self.state()
        except sqlite3.Error as e:
            raise translated(e, self.root) from None
        except UnicodeDecodeError:
            raise CatalogDamaged(str(self.root), "is unreadable (text that is not UTF-8)") from None
        if self.quick_check_on_open:
            try:
                damage = self.quick_check()
            except sqlite3.Error as e:
                raise translated(e, self.root) from None
            if damage:
                raise CatalogDamaged(str(self.root), f"is damaged ({'; '.join(damage[:2])[:160]})")
        if state.get("schema") != SCHEMA_VERSION:
            raise CatalogDamaged(str(self.root), f"is of catalog schema {state.get('schema')!r}, not {SCHEMA_VERSION!r}")
        return state

    def _check_log(self, state: dict[str, str]) -> None:
        """The ref log holds what the catalog indexed, up to the record it names last; a writable
        open then catches up with the rest of the log and with journals/."""
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

    # -- bases ------------------------------------------------------------------------------------

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

    # -- pending objects: written by a commit that has not landed yet -----------------------------

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

    def drop_pending_of(self, tokens: list[str]) -> None:
        """Inside `transaction()`: forget the pending rows of writers that are gone."""
        self.conn.execute("DELETE FROM pending WHERE token IN (SELECT value FROM json_each(?))", [json.dumps(tokens)])

    # -- versions ---------------------------------------------------------------------------------

    def insert_version(self, version: dict, objects: list[dict], links: list[str], by_encoding: list[dict],
                       metadata: dict[str, str]) -> None:
        """Inside `transaction()`: the version becomes visible all at once. `objects`: (id, size,
        raw_size) of every object it needs; `links`: their ids; `by_encoding`: (encoding,
        tensors, bytes)."""
        if not self.one("SELECT 1 FROM stances WHERE name = ?", [version["stance"]]):
            self.insert("stances", [{"name": version["stance"], "created": version["created"]}])
        self.conn.executemany("INSERT OR IGNORE INTO objects (digest, size, raw_size) VALUES (?, ?, ?)",
                              [(digest_of(o["id"]), o["size"], o["raw_size"]) for o in objects])
        key = self.insert("versions", [version])
        self.conn.executemany("INSERT OR IGNORE INTO entry_objects (version, object) "
                              "SELECT ?, key FROM objects WHERE digest = ?", [(key, digest_of(oid)) for oid in links])
        self.conn.executemany("INSERT INTO version_encodings (version, encoding, tensors, bytes) VALUES (?, ?, ?, ?)",
                              [(key, e["encoding"], e["tensors"], e["bytes"]) for e in by_encoding])
        self.insert("metadata", [{"version_id": version["id"], "key": k, "value": v} for k, v in metadata.items()])

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
        self.conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", [top_key(stance), str(top)])
        self.conn.execute("UPDATE stances SET created = (SELECT min(created) FROM versions WHERE stance = ?1) "
                          "WHERE name = ?1 AND EXISTS (SELECT 1 FROM versions WHERE stance = ?1)", [stance])

    # -- tags -------------------------------------------------------------------------------------

    def set_tag(self, stance: str, name: str, version_id: str) -> None:
        with self.transaction():
            created = now()
            self.put_tag(stance, name, version_id, created)
            self.record({"op": "tag", "stance": stance, "name": name, "version": version_id, "created": created})

    def put_tag(self, stance: str, name: str, version_id: str, created: str) -> None:
        """Inside `transaction()`: the tag's row (no ref record)."""
        self.insert("tags", [{"stance": stance, "name": name, "version_id": version_id, "created": created}],
                    replace=True)

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

    # -- stances renamed, merged or deleted -------------------------------------------------------

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
        self.conn.execute("UPDATE state SET key = ? WHERE key = ?", [top_key(new), top_key(old)])
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
        self.conn.execute("DELETE FROM state WHERE key = ?", [top_key(old)])
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
        self.conn.execute("DELETE FROM state WHERE key = ?", [top_key(name)])
        self.conn.execute("DELETE FROM stances WHERE name = ?", [name])
        return [{k: r[k] for k in ("id", "number", "bytes")} for r in gone]

    # -- objects ----------------------------------------------------------------------------------

    def delete_object_row(self, object_id: str) -> None:
        """Inside `transaction()`, after the object's file is gone."""
        self.conn.execute("DELETE FROM objects WHERE digest = ?", [digest_of(object_id)])

    # -- journals of in-place applies: journals/<id>.json is the truth, these rows its index ------

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
