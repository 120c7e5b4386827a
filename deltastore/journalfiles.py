"""Journals of in-place applies as files, `journals/<id>.json` (schema/FORMAT.md §7): the
truth that the catalog's `journals` rows copy, so that a rebuilt catalog keeps every open
apply; beside each, `<id>.originals`, the original bytes of the regions it overwrites
(journals written before it keep them as objects, which gc keeps). Reads and hashes bytes;
never imports torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .durable import fsync_dir, replace_file
from .errors import DeltastoreError, DiskFull, is_disk_full
from .hashing import canonical_json, hasher, hexdigest_id, id_header

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
    """The journal's file first (then nothing refers to its originals), then its originals."""
    path = folder(root) / f"{journal_id}.json"
    saved = originals(root, journal_id)
    if path.exists() or saved.exists():
        path.unlink(missing_ok=True)
        saved.unlink(missing_ok=True)
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


# -- the original bytes of a journal's regions ------------------------------------------------
# `journals/<id>.originals`: every region's original bytes, raw, one after another in the
# plan's order (each region's `offset`); a region's check is its base tensor id. Written to
# tmp/, fsynced once and renamed in just before the journal's own file.

ORIGINALS = ".originals"
SLICE = 64 << 20  # bytes hashed or copied at a time: what a check or a revert holds


def originals(root: Path, journal_id: str) -> Path:
    return folder(root) / f"{journal_id}{ORIGINALS}"


def region_id(fd: int, offset: int, size: int, dtype: str, shape: list[int]) -> str:
    """The tensor id of `size` bytes of an open file from `offset`, read a slice at a time."""
    h = hasher(size)
    h.update(id_header(dtype, shape))
    buf = bytearray(min(size, SLICE))
    done = 0
    while done < size:
        n = os.preadv(fd, [memoryview(buf)[:min(SLICE, size - done)]], offset + done)
        if n <= 0:
            raise EOFError(f"{size - done} bytes missing at offset {offset + done}")
        h.update(memoryview(buf)[:n])
        done += n
    return hexdigest_id(h)


def damaged_originals(root: Path, record: dict) -> list[str]:
    """The regions of a journal whose saved original bytes are missing or are not their base
    tensor's (an empty list for a journal that keeps its originals as objects)."""
    plan = json.loads(record["plan"])
    regions = [r for r in plan["regions"] if "offset" in r]
    if not regions:
        return []
    try:
        fd = os.open(originals(root, record["id"]), os.O_RDONLY)
    except OSError:
        return [r["name"] for r in regions]
    try:
        bad = []
        for r in regions:
            try:
                ok = region_id(fd, r["offset"], r["end"] - r["start"], r["dtype"], r["shape"]) == r["base"]
            except (OSError, EOFError):
                ok = False
            if not ok:
                bad.append(r["name"])
        return bad
    finally:
        os.close(fd)


def orphan_originals(root: Path) -> list[Path]:
    """`.originals` files without their journal: an apply killed between renaming them in and
    writing its journal (or a revert killed between removing the two). Young ones may be an
    apply's in progress; the caller judges by age."""
    where = folder(root)
    if not where.is_dir():
        return []
    return sorted(p for p in where.glob(f"*{ORIGINALS}") if not (where / f"{p.name[:-len(ORIGINALS)]}.json").exists())
