"""Journals of in-place applies as files, `journals/<id>.json` (schema/FORMAT.md §7): the
truth that the catalog's `journals` rows copy, so that a rebuilt catalog keeps every open
apply; beside each, `<id>.originals`, the original bytes of the regions it overwrites
(journals written before it keep them as objects, which gc keeps). Reads and hashes bytes;
never imports torch."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..core.durable import fsync_dir, replace_file
from ..core.errors import DeltastoreError, DiskFull, ModelFormatError, is_disk_full
from ..core.hashing import canonical_json, hasher, hexdigest_id, id_header
from ..core.pools import WORKERS, pipelined
from ..weights.target import FileId, file_id
from . import knownstores

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
    knownstores.remember(root)  # so that `revert` from another folder finds this store


def remove(root: Path, journal_id: str) -> None:
    """Its `.reverting` mark first (dropped once every region holds the base, so a journal
    left without it reverts by writing nothing), then the journal's file (then nothing refers
    to its originals), then its originals."""
    path = folder(root) / f"{journal_id}.json"
    saved, mark = originals(root, journal_id), _mark(root, journal_id)
    if path.exists() or saved.exists() or mark.exists():
        mark.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        saved.unlink(missing_ok=True)
        fsync_dir(path.parent)


# -- a revert under way: `journals/<id>.reverting`, an empty file ------------------------------
# Made before a revert's first write: a revert killed in the middle of a region leaves it half
# the base's bytes, half the version's, which only a write under way explains. An empty file
# needs no data block, so a revert still marks itself on a full disk.

REVERTING = ".reverting"


def _mark(root: Path, journal_id: str) -> Path:
    return folder(root) / f"{journal_id}{REVERTING}"


def mark_reverting(root: Path, journal_id: str) -> None:
    path = _mark(root, journal_id)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        fsync_dir(path.parent)


def is_reverting(root: Path, journal_id: str) -> bool:
    return _mark(root, journal_id).exists()


def ids(root: Path) -> set[str]:
    where = folder(root)
    return {p.stem for p in where.glob("*.json")} if where.is_dir() else set()


def files_gone(record: dict) -> str | None:
    """What became of a journal's weight files when revert cannot find them where they were:
    one missing, or another file now (another device or inode; for a journal from before file
    identities, another header); None while every one is there as apply left it. Reads only
    their metadata and headers: cheap enough for fsck."""
    plan = json.loads(record["plan"])
    recorded = [FileId.from_json(d) for d in plan["identity"]] if "identity" in plan else None
    root = Path(plan.get("root") or _old_root(record["target"], plan["files"]))
    for name, header in sorted(plan["files"].items()):
        path = root / name
        try:
            now = file_id(path)
        except (ModelFormatError, OSError):
            return f"{path} is gone"
        if now.symlink:
            return f"{path} is a symlink now"
        was = next((f for f in recorded if f.name == name), None) if recorded is not None else None
        if (not now.unchanged(was)) if was is not None else now.header != header:
            return f"{path} is another file now"
    return None


def _old_root(target: str, files: dict) -> str:
    """The folder of a journal's files when its plan predates `root`: the target, or the
    folder of a lone file."""
    return os.path.dirname(target) if os.path.basename(target) in files and not os.path.isdir(target) else target


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
# tmp/, fsynced once and renamed in just before the journal's own file. A region whose bytes
# a registered base file held at apply is not copied: the journal points to that file.

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


def original_at(root: Path, journal_id: str, region: dict) -> tuple[Path, int]:
    """Where a region's original bytes are: its journal's `.originals` at `offset`, or a base
    file (`base_file`, a real path) at `base_start`."""
    if "base_file" in region:
        return Path(region["base_file"]), region["base_start"]
    return originals(root, journal_id), region["offset"]


def base_files_problem(record: dict) -> str | None:
    """Why the base files a journal takes original bytes from cannot serve now: one gone, a
    symlink now, or another file (device, inode), size or header than at apply; None while
    each is as apply found it. Reads only metadata and headers."""
    for d in json.loads(record["plan"]).get("base_files", []):
        path = Path(d["path"])
        try:
            now = file_id(path)
        except (ModelFormatError, OSError):
            return f"{path} is gone"
        if now.symlink or not now.unchanged(FileId.from_json(d)):
            return f"{path} was replaced or changed since apply"
    return None


def damaged_originals(root: Path, record: dict) -> list[str]:
    """The regions of a journal whose original bytes are missing or are not their base
    tensor's, in `.originals` or in the base files it points to (an empty list for a journal
    that keeps its originals as objects). Two regions hashed at a time."""
    plan = json.loads(record["plan"])
    regions = [r for r in plan["regions"] if "offset" in r or "base_file" in r]
    if not regions:
        return []
    gone = base_files_problem(record) is not None
    fds: dict[Path, int | None] = {}
    lock = threading.Lock()

    def fd_of(path: Path) -> int | None:
        with lock:
            if path not in fds:
                try:
                    fds[path] = os.open(path, os.O_RDONLY)
                except OSError:
                    fds[path] = None
            return fds[path]

    def intact(k: int) -> bool:
        r = regions[k]
        if gone and "base_file" in r:
            return False
        path, offset = original_at(root, record["id"], r)
        fd = fd_of(path)
        try:
            return fd is not None and region_id(fd, offset, r["end"] - r["start"], r["dtype"], r["shape"]) == r["base"]
        except (OSError, EOFError):
            return False

    try:
        return [regions[k]["name"] for k, ok in pipelined(list(range(len(regions))), intact, WORKERS, 2 * WORKERS)
                if not ok]
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def orphan_originals(root: Path) -> list[Path]:
    """`.originals` files without their journal: an apply killed between renaming them in and
    writing its journal (or a revert killed between removing the two). Young ones may be an
    apply's in progress; the caller judges by age."""
    where = folder(root)
    if not where.is_dir():
        return []
    return sorted(p for p in where.glob(f"*{ORIGINALS}") if not (where / f"{p.name[:-len(ORIGINALS)]}.json").exists())
