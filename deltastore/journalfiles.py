"""Journals of in-place applies as files, `journals/<id>.json` (schema/FORMAT.md §7): the
truth that the catalog's `journals` rows copy, so that a rebuilt catalog keeps every open
apply and gc keeps the objects that reverting it needs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .durable import fsync_dir, replace_file
from .errors import DeltastoreError, DiskFull, is_disk_full
from .hashing import canonical_json

FOLDER = "journals"
MAX_JOURNAL_FILE = 64 << 20


def folder(root: Path) -> Path:
    return Path(root) / FOLDER


def write(root: Path, row: dict, object_ids: list[str]) -> None:
    """Atomically: to tmp/, fsynced, renamed, folder fsynced."""
    where = folder(root)
    where.mkdir(exist_ok=True)
    record = {k: row[k] for k in ("id", "target", "version_id", "state", "plan", "created")}
    record["objects"] = sorted(set(object_ids))
    tmp = Path(root) / "tmp" / f"{os.getpid()}-journal-{row['id']}.tmp"
    try:
        replace_file(where / f"{row['id']}.json", canonical_json(record), tmp)
    except BaseException as e:
        if is_disk_full(e):
            raise DiskFull() from None
        raise


def remove(root: Path, journal_id: str) -> None:
    path = folder(root) / f"{journal_id}.json"
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def ids(root: Path) -> set[str]:
    where = folder(root)
    return {p.stem for p in where.glob("*.json")} if where.is_dir() else set()


def read_all(root: Path) -> list[dict]:
    """Every journal file, as its record (`objects` included), oldest first."""
    out = []
    where = folder(root)
    if not where.is_dir():
        return out
    for path in sorted(where.glob("*.json")):
        try:
            if path.stat().st_size > MAX_JOURNAL_FILE:
                raise ValueError("too large")
            record = json.loads(path.read_bytes())
            if not isinstance(record, dict) or record.get("id") != path.stem or not isinstance(record.get("objects"), list):
                raise ValueError("not a journal")
        except (OSError, ValueError, RecursionError) as e:
            raise DeltastoreError(f"the apply journal {path} is unreadable ({e}); it records how to revert "
                                  f"an in-place apply: restore it from a backup") from None
        out.append(record)
    return sorted(out, key=lambda r: (r.get("created", ""), r["id"]))
