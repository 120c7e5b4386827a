"""The repository on disk, composed: its folder, objects, ref log and catalog (kept caught up
with the log), and the writes that keep their order: objects durable before any row or ref
record points at them, a version visible in one transaction.

Layout on disk (see schema/FORMAT.md)::

    .deltastore/
      STORE           {"format": "deltastore/store/2"}
      refs.log        every change of stances, versions, tags and bases, appended
      journals/       open in-place applies
      catalog.db      SQLite (WAL): an index of the rest, rebuilt from it on demand
      locks/          one lock file per folder patched in place (target.py)
      objects/ab/...  content-addressed objects: tensors' parts, manifests, bases
      tmp/            objects being written

The truth is objects/, refs.log and journals/: every ref change is appended to the log, inside
the catalog's write transaction, after the objects it names are durable.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core.durable import replace_file
from ..core.errors import DeltastoreError, ReadOnlyStore
from ..core.hashing import bytes_id, canonical_json
from . import index
from .catalog import Catalog
from .locate import CHAINED_STORE_FORMAT, STORE_FILE, store_format
from .objects import ObjectStore
from .reflog import RefLog


class Repo:
    """One store's files, opened: `objects`, `refs` (the log) and `catalog`."""

    def __init__(self, root: Path, *, readonly: bool | None = None):
        self.root = Path(root)
        if readonly is None:
            readonly = not os.access(self.root, os.W_OK)
        self.readonly = readonly
        self.objects = ObjectStore(self.root)
        self.refs = RefLog(self.root)
        self.catalog = Catalog(self.root / "catalog.db", readonly=readonly, refs=self.refs,
                               replay=self.catch_up)

    def catch_up(self, catalog: Catalog) -> None:
        """Index the ref records a writer that died appended but never committed to the
        catalog. A record whose object is missing or damaged is left out: fsck reports it. One
        the catalog cannot index (a number another version holds: a line written by hand) stops
        the write, naming it: the rebuild sets it aside."""
        unindexed = index.Unindexed()
        index.replay(catalog, self.objects, self.refs, unindexed=unindexed)
        if unindexed.rejected:
            raise index.UnindexableRecord(unindexed.rejected[0])

    def check_writable(self) -> None:
        """Refuse (`ReadOnlyStore`) a write to a store opened read-only."""
        if self.readonly:
            raise ReadOnlyStore(str(self.root))

    def close(self) -> None:
        self.catalog.close()

    @property
    def holds_chains(self) -> bool:
        """Whether a version stored against another was ever committed here (the store's
        format says so): only then do delete and fsck read every manifest for chains."""
        return store_format(self.root) == CHAINED_STORE_FORMAT

    def mark_chained(self) -> None:
        """Mark the store as one that holds chains (durably, before the first lands), so that
        builds that do not know them refuse it."""
        if not self.holds_chains:
            replace_file(self.root / STORE_FILE, (json.dumps({"format": CHAINED_STORE_FORMAT}) + "\n").encode(),
                         self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-STORE.tmp")

    def put_base(self, row: dict, tensors: list[dict], listing: bytes, record: bytes) -> None:
        """Write a base's two objects (shielded from gc until its ref record lands), then its
        rows and ref record."""
        token = uuid.uuid4().hex
        try:
            self.catalog.add_pending(token, [row["id"], row["record"]])
            self.objects.put(listing, object_id=row["id"])
            if bytes_id(record) == row["record"]:
                self.objects.put(record, object_id=row["record"])
            self.catalog.add_base(row, tensors)
        finally:
            self.catalog.drop_pending(token)

    def insert_version(self, m: dict, *, stance: str, number: int, sizes: Mapping[str, int]) -> str:
        """Inside a transaction: write the manifest object (durable before its ref record), then
        index the version."""
        vid = self.objects.put(canonical_json(m)).id
        row, objects, links, by_encoding = index.version_rows(m, vid, stance, number, sizes)
        self.catalog.insert_version(row, objects, links, by_encoding, m["metadata"])
        return vid

    def deleted_at(self, stance: str, number: int) -> str | None:
        """The id of the version deleted as `stance@number`, or None. Read from the ref log:
        only a version landing on a deleted number asks."""
        return self.refs.deleted_at(stance, number)

    def remove_unreferenced(self, object_ids: list[str]) -> None:
        """Undo the objects a failed commit or ingest wrote, sparing any that something else now
        uses. Best effort: an object left behind is gc's."""
        for oid in object_ids:
            # Inside a write transaction, so no commit can start re-using it in between.
            def remove(oid: str = oid) -> None:
                with self.catalog.transaction():
                    if not self.catalog.is_referenced(oid):
                        self.objects.remove(oid)
            quietly(remove)


def quietly(call: Callable[..., Any], *args: Any) -> Any:
    """A clean-up step after a failure: never a second error in place of the first."""
    try:
        return call(*args)
    except (DeltastoreError, OSError):
        return None
