"""Durable writes: a file replaced whole or not at all, a new folder that appears whole or not
at all, and a folder's entries made durable.

A file is written beside its place (in the store's tmp/ or the same folder, so on the same file
system), fsynced, renamed over its place, and then its folder is fsynced, so that a crash leaves
the old file or the new one, never a part of either, and never loses the rename. A new folder
(an exported model, a LoRA adapter) is filled under a hidden name beside its place and renamed
into it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (a file created, renamed or removed) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, tmp: Path) -> None:
    """`data` as the whole content of `path`, through `tmp` (on the same file system); `tmp` is
    gone afterwards whether the write succeeds or fails."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A folder to fill, renamed to `out` when the block ends without an error: `out` (absent, or
    an empty folder that the caller checked) is then whole, and otherwise as it was; the hidden
    folder beside it is removed either way."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


@contextmanager
def new_file(out: Path, *, mode: int | None = 0o644) -> Iterator[Path]:
    """A file to write by name (for writers that open the path themselves), put in place as
    `out` when the block ends without an error: fsynced, given `mode` (0644, as every export
    writes; None: the mode the writer gave it), renamed over `out`, its folder fsynced. On an
    error the hidden file beside it is removed and `out` is as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
