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
from dataclasses import dataclass
from pathlib import Path

from .repo import index, journalfiles
from .core.durable import replace_file
from .core.errors import DeltastoreError
from .core.hashing import bytes_id, canonical_json
from .repo.catalog_schema import read_format_1
from .repo.objects import ObjectStore
from .repo.reflog import RefLog
from .store import OLD_FORMATS, READABLE_FORMATS, STORE_FILE, STORE_FORMAT, store_format

FORMAT_1 = "deltastore/store/1"


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
    old = read_format_1(root / "catalog.db")
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
