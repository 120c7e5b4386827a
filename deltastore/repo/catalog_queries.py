"""The catalog's reads: the queries behind `log`, `show`, `stats`, refs resolved, and what fsck
and gc read (references, rows to check, the rows a catalog and the truth's index must agree
on). Plain SELECTs on the connection (catalog_sqlite.py), so a command that only reads never
imports sqlite-utils; the writes are catalog.py's.
"""

from __future__ import annotations

import json

from .catalog_schema import TOP, digest_of, id_of, top_key
from .catalog_sqlite import CatalogConnection, speaking_catalog_errors

# The columns of each table that a catalog and the index the truth gives must agree on
# (`index.differences`). Not sizes on disk: the truth reads them from the files, and a damaged
# object (which fsck reports as such) is no fault of the index.
COMPARED_COLUMNS = {
    "versions": "id, stance, number, parent, base_id, encoding, message, created, tensors",
    "stances": "name, created",
    "tags": "stance, name, version_id",
    "bases": "id, name, tensor_count, bytes, source, hub_id, created, record",
    "base_tensors": "*",
    "journals": "id, target, version_id, state, plan, created",
    "journal_objects": "journal_id, object_id",
}


@speaking_catalog_errors
class CatalogQueries(CatalogConnection):
    """What the catalog says, read; `Catalog` (catalog.py) adds its writes."""

    # -- bases ------------------------------------------------------------------------------------

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

    # -- pending objects: written by a commit that has not landed yet -----------------------------

    def pending_of(self, token: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT object_id FROM pending WHERE token = ?", [token])]

    # -- versions ---------------------------------------------------------------------------------

    def latest(self, stance: str) -> dict | None:
        return self.one("SELECT * FROM versions WHERE stance = ? ORDER BY number DESC LIMIT 1", [stance])

    def last_number(self, stance: str) -> int:
        """The highest number `stance` has given a version, deleted ones included (0 if none): a
        number is never given twice, so STANCE@N names one version for good."""
        latest = self.latest(stance)
        top = self.one("SELECT value FROM state WHERE key = ?", [top_key(stance)])
        return max(latest["number"] if latest else 0, int(top["value"]) if top else 0)

    def numbers_given(self) -> dict[str, str]:
        """stance -> the highest number given, for stances that deleted a version."""
        return {r["key"][len(TOP):]: r["value"] for r in self.query(
            "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?", [len(TOP), TOP])}

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

    def version_summaries(self, stance: str | None = None, *, where: dict[str, str] | None = None) -> list[dict]:
        """What `versions` returns, without the surrogate key."""
        return self.versions(stance, where=where, columns="id, stance, number, parent, base_id, encoding, "
                                                          "message, created, tensors, bytes")

    def versions_with_prefix(self, prefix: str) -> list[dict]:
        return self.query("SELECT * FROM versions WHERE id LIKE ? ORDER BY id", [prefix + "%"])

    def referenced_bytes(self) -> int:
        """The bytes all versions need, counting an object once per version that needs it."""
        return self.one("SELECT coalesce(sum(bytes), 0) AS b FROM versions")["b"]

    def bytes_by_stance(self) -> list[dict]:
        return self.query("SELECT stance, count(*) AS versions, sum(bytes) AS bytes FROM versions "
                          "GROUP BY stance ORDER BY stance")

    def bytes_by_encoding(self) -> list[dict]:
        return self.query("SELECT encoding, sum(tensors) AS tensors, sum(bytes) AS bytes FROM version_encodings "
                          "GROUP BY encoding ORDER BY encoding")

    # -- stances, tags, metadata and who descends from whom ---------------------------------------

    def stances(self) -> list[dict]:
        return self.query(
            "SELECT s.name, s.created, count(v.id) AS versions, max(v.number) AS latest "
            "FROM stances s LEFT JOIN versions v ON v.stance = s.name GROUP BY s.name ORDER BY s.name")

    def has_stance(self, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM stances WHERE name = ?", [name]).fetchone())

    def tags(self, version_id: str | None = None) -> list[dict]:
        if version_id is None:
            return self.query("SELECT * FROM tags ORDER BY stance, name")
        return self.query("SELECT * FROM tags WHERE version_id = ? ORDER BY name", [version_id])

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

    def children_of(self, version_id: str) -> list[dict]:
        """Versions whose parent is `version_id`."""
        return self.query("SELECT id, stance, number FROM versions WHERE parent = ? ORDER BY stance, number",
                          [version_id])

    def children_outside(self, stance: str) -> list[dict]:
        """Versions of other stances whose parent is a version of `stance`."""
        return self.query(
            "SELECT c.id, c.stance, c.number FROM versions c JOIN versions p ON p.id = c.parent "
            "WHERE p.stance = ? AND c.stance != ? ORDER BY c.stance, c.number", [stance, stance])

    # -- objects ----------------------------------------------------------------------------------

    def objects_only_of(self, version_ids: list[str]) -> list[dict]:
        """Objects (id, size) that the given versions reference and nothing else does."""
        rows = self.conn.execute(
            "SELECT o.digest, o.size FROM objects o WHERE o.key IN (SELECT e.object FROM entry_objects e JOIN "
            "versions v ON v.key = e.version WHERE v.id IN (SELECT value FROM json_each(:ids))) AND NOT EXISTS "
            "(SELECT 1 FROM entry_objects e JOIN versions v ON v.key = e.version WHERE e.object = o.key AND "
            "v.id NOT IN (SELECT value FROM json_each(:ids))) ORDER BY o.digest", {"ids": json.dumps(version_ids)})
        journal = self._journal_objects()
        return [{"id": id_of(d), "size": s} for d, s in rows if id_of(d) not in journal]

    def _journal_objects(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT object_id FROM journal_objects")}

    def object_rows(self, *, needed_only: bool = False) -> list[dict]:
        """Every object row, or (`needed_only`) those of objects a version needs."""
        where = " WHERE key IN (SELECT object FROM entry_objects)" if needed_only else ""
        return [{"id": id_of(d), "size": s, "raw_size": r} for d, s, r in
                self.conn.execute(f"SELECT digest, size, raw_size FROM objects{where} ORDER BY digest")]

    def version_objects(self) -> dict[str, set[str]]:
        """version id -> the ids of the objects the catalog says it needs."""
        out: dict[str, set[str]] = {}
        for vid, digest in self.conn.execute(
                "SELECT v.id, o.digest FROM entry_objects e JOIN versions v ON v.key = e.version "
                "JOIN objects o ON o.key = e.object"):
            out.setdefault(vid, set()).add(id_of(digest))
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
            "SELECT 1 FROM pending WHERE object_id = ?1 LIMIT 1", [object_id, digest_of(object_id)]).fetchone())

    # -- what fsck and gc read --------------------------------------------------------------------

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
        out = {id_of(r[0]) for r in self.conn.execute(
            "SELECT digest FROM objects WHERE key IN (SELECT object FROM entry_objects)")}
        rows = self.conn.execute(
            "SELECT id FROM versions UNION SELECT id FROM bases UNION SELECT record FROM bases "
            "UNION SELECT object_id FROM journal_objects "
            "UNION SELECT object_id FROM pending WHERE token NOT IN (SELECT value FROM json_each(?))",
            [json.dumps(dead_tokens)])
        return out | {r[0] for r in rows}

    def open_journals(self, target: str | None = None) -> list[dict]:
        if target is None:
            return self.query("SELECT * FROM journals ORDER BY created")
        return self.query("SELECT * FROM journals WHERE target = ? ORDER BY created", [target])

    def rows_for_comparison(self, table: str) -> list[dict]:
        """The columns of `table` (one of COMPARED_COLUMNS) that must say what the truth says."""
        return self.query(f"SELECT {COMPARED_COLUMNS[table]} FROM {table}")
