"""What apply and revert in place share: the `Journal` they return, the files they write
opened and checked to be the very files checked, regions copied between files in the kernel
and fsynced, original bytes put back from where a journal keeps them, a journal dropped."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..core.errors import JournalError, SharedFile
from ..engine.maintenance import GcPlan, gc
from ..engine.reader import Reader
from ..repo import journalfiles
from ..weights.models import TensorInfo
from ..weights.target import FileId, Target, fd_id


@dataclass(frozen=True)
class Journal:
    id: str
    target: str
    version_id: str
    state: str
    regions: int
    written: int | None = None  # of a revert: the regions written back (the others held the base already)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + journalfiles.SLICE], offset + done)


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Have the kernel start writing these bytes of a file to disk now, while the work goes on,
    rather than all of them at its fsync. (Pages already written are let go too; those still
    being written, most of them, stay cached.)"""
    if size and hasattr(os, "posix_fadvise"):  # (a size of 0 would mean "to the end")
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def copy_range(src: int, dst: int, size: int, src_offset: int, dst_offset: int) -> None:
    """`size` bytes from one open file to another, in the kernel where it can (no buffer of
    ours; the page cache to the page cache), else through one bounded buffer."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, min(size - done, 1 << 30), src_offset + done, dst_offset + done)
            if n <= 0:
                break
            done += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(journalfiles.SLICE, size - done)) if done < size else b""
    while done < size:
        n = os.preadv(src, [memoryview(buf)[:min(len(buf), size - done)]], src_offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"{size - done} bytes missing from a journal file")
        pwrite_all(dst, memoryview(buf)[:n], dst_offset + done)
        done += n


def open_for_writing(target: Target, names: list[str], verb: str, journal: list[FileId] | None = None
                      ) -> dict[str, BinaryIO]:
    """Each file to be written, opened now, so that one that cannot be written stops the patch
    before its first byte; and checked to be the very file that was checked (or that the
    journal names): not replaced, not a symlink now, not shared."""
    handles: dict[str, BinaryIO] = {}
    try:
        for name in names:
            path = target.path(target.file(name))
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as e:
                raise JournalError(f"cannot {verb} {target.given}: {path} is not writable ({e.strerror}); "
                                   "nothing was changed") from None
            handles[name] = fh = os.fdopen(fd, "r+b")
            now = fd_id(name, fh)
            want = next(f for f in journal if f.name == name) if journal else target.file(name)
            if not now.unchanged(want):
                raise JournalError(f"{path} changed while {verb} checked it; nothing was changed; try again")
            if now.links > 1:
                raise SharedFile(str(path), "hardlink", f"{path} has {now.links} hard links: another path shares "
                                 f"its bytes and would change too; nothing was changed")
    except BaseException:
        for fh in handles.values():
            fh.close()
        raise
    return handles


def write_regions(fh: BinaryIO, source: int, regions: list[tuple[Any, int]],
                   tick: Callable[[int], None] | None = None) -> None:
    """Each (region, offset in `source`): the region's bytes from there; then fsync."""
    for info, offset in regions:
        size = info.nbytes if isinstance(info, TensorInfo) else info["end"] - info["start"]
        copy_range(source, fh.fileno(), size, offset, info.start if isinstance(info, TensorInfo) else info["start"])
        if tick:
            tick(size)
    fh.flush()
    os.fsync(fh.fileno())


def put_back(root: Path, journal_id: str, fh: BinaryIO, regions: list[dict],
             tick: Callable[[int], None] | None = None) -> None:
    """Each region's original bytes copied back from where its journal keeps them (its
    `.originals`, or a base file: journalfiles.original_at), then one fsync."""
    fds: dict[Path, int] = {}
    try:
        for r in regions:
            path, offset = journalfiles.original_at(root, journal_id, r)
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            copy_range(fds[path], fh.fileno(), r["end"] - r["start"], offset, r["start"])
            if tick:
                tick(r["end"] - r["start"])
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)


def write_objects(fh: BinaryIO, regions: list[tuple[int, Any]]) -> None:
    """A journal from before `.originals` files: each region's bytes from its object."""
    for start, data in regions:
        fh.seek(start)
        fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def drop(reader: Reader, journal_id: str, originals: list[str]) -> None:
    reader.repo.catalog.drop_journal(journal_id)  # its `.originals` file too
    # Originals saved as objects (journals from before `.originals` files) were this
    # journal's alone; remove them now unless shared.
    if originals:
        gc(reader, GcPlan(tuple(sorted(set(originals))), 0))


def region_now(fd: int, info: TensorInfo) -> str:
    return journalfiles.region_id(fd, info.start, info.nbytes, info.dtype, list(info.shape))
