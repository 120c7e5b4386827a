"""The ref log, `refs.log`: the store's truth about stances, versions, tags and bases, one
canonical-JSON record per line, only ever appended (schema/FORMAT.md §6).

Writers append while holding the catalog's write lock, so the log's order is the commit order;
this module only reads, appends, fsyncs and truncates the file. It knows nothing of SQL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from ..core.durable import fsync_dir, replace_file
from ..core.errors import DeltastoreError, DiskFull, is_disk_full
from ..core.hashing import bytes_id, canonical_json

LOG_FILE = "refs.log"
OPS = {
    "base": {"id", "record", "name", "source", "hub_id", "created"},
    "version": {"id", "stance", "number"},
    "tag": {"stance", "name", "version", "created"},
    "untag": {"stance", "name"},
    "rename": {"old", "new"},
    "merge": {"old", "into", "versions"},
    "delete": {"stance"},
    "drop": {"id", "stance", "number"},
    "unbase": {"id"},
}
# The catalog finds the line it last indexed by reading back from its offset; no record is
# anywhere near this long.
MAX_LINE = 1 << 16


class RefLogError(DeltastoreError, ValueError):
    def __init__(self, path: Path, detail: str):
        self.path = path
        super().__init__(f"the ref log {path} is unreadable ({detail}); it is the store's record of its "
                         "stances and versions: restore it from a backup")


def line_of(record: dict) -> bytes:
    return canonical_json(record) + b"\n"


def tail_id(line: bytes) -> str:
    """What the catalog records of the last line it indexed."""
    return bytes_id(line)


class RefLog:
    def __init__(self, root: Path, *, path: Path | None = None):
        """`path`: a log other than the store's (a rebuild replays a copy before it replaces it)."""
        self.path = Path(path) if path is not None else Path(root) / LOG_FILE

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def line_before(self, offset: int) -> bytes | None:
        """The whole line that ends at `offset` (None when `offset` ends no line)."""
        if offset == 0:
            return b""
        start = max(0, offset - MAX_LINE)
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                chunk = f.read(offset - start)
        except FileNotFoundError:
            return None
        if len(chunk) != offset - start or not chunk.endswith(b"\n"):
            return None
        cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
        if cut < 0 and start > 0:
            return None
        return chunk[cut + 1:]

    def records(self, start: int = 0) -> Iterator[tuple[int, dict, bytes]]:
        """(offset just past it, record, line) of every whole record from `start` on. A last line
        without its newline is a torn append of a writer that died: not a record."""
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return
        offset = start
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield offset, parse(line, self.path, offset), line

    def deleted_at(self, stance: str, number: int) -> str | None:
        """The id of the version deleted as `stance@number` (its drop record), or None. A drop
        follows its stance through renames (the number stays taken under the new name) and is
        forgotten with it when the stance is merged away or deleted (its numbers are free again)."""
        drops: dict[tuple[str, int], str] = {}
        for _, r, _ in self.records():
            op = r["op"]
            if op == "drop":
                drops[(r["stance"], r["number"])] = r["id"]
            elif op in ("rename", "merge", "delete"):
                old = r["old"] if op != "delete" else r["stance"]
                moved = {n: i for (s, n), i in drops.items() if s == old}
                drops = {k: i for k, i in drops.items() if k[0] != old}
                if op == "rename":
                    drops.update({(r["new"], n): i for n, i in moved.items()})
        return drops.get((stance, number))

    def line_number(self, end: int) -> int:
        """The 1-based number of the line that ends at offset `end`."""
        with open(self.path, "rb") as f:
            return f.read(end).count(b"\n")

    def whole_size(self) -> int:
        """The log's size without a torn last line."""
        size = self.size()
        if size == 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(max(0, size - MAX_LINE))
            chunk = f.read()
        if chunk.endswith(b"\n"):
            return size
        return size - len(chunk) + chunk.rfind(b"\n") + 1

    def append(self, records: list[dict]) -> tuple[int, int, bytes]:
        """Append records with one write, fsynced (the caller holds the write lock). Cuts a torn
        line off first. Returns (offset before, offset after, last line)."""
        data = b"".join(line_of(r) for r in records)
        new = not self.path.exists()
        before = self.whole_size()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, before)
            os.lseek(fd, before, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:
            # A part-written record (a full disk) must not stay for the next reader.
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass
            if is_disk_full(e):
                raise DiskFull() from None
            raise
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)
        return before, before + len(data), line_of(records[-1])

    def truncate(self, offset: int) -> None:
        """Undo an append whose catalog transaction failed (the caller still holds the lock)."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_all(self, records: list[dict], tmp: Path) -> None:
        """Write a whole new log atomically (upgrade): to `tmp`, fsynced, renamed."""
        replace_file(self.path, b"".join(line_of(r) for r in records), tmp)


def parse(line: bytes, path: Path, offset: int) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        raise RefLogError(path, f"the record ending at byte {offset} is not JSON") from None
    if not isinstance(record, dict) or OPS.get(record.get("op")) != set(record) - {"op"}:
        raise RefLogError(path, f"the record ending at byte {offset} is not a ref record of this version")
    return record
