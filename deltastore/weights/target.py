"""What an in-place apply or revert writes into, known by identity rather than by a path string,
and the lock that lets one of them at a time patch it.

A target is one model: a folder's weight files (one file, or a shard set), or a lone
safetensors file. Whichever path names it (the folder, one of its files, a path through a
symlinked folder), it resolves to the same folder and the same files, each known by device,
inode, size and the hash of its safetensors header (`FileId`). The journal records those; a
file is patched or reverted only while its identity is the one recorded.

This module reads files' metadata and headers; it never writes tensor bytes and never reads
the catalog.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from ..core.durable import new_file
from ..core.errors import ModelFormatError, PatchBusy, SharedFile
from ..core.hashing import bytes_id
from .models import MAX_HEADER_BYTES, weight_files

# How long an apply or revert waits for another one to finish before it refuses: long enough
# for a small model's patch, short enough that a stuck holder is reported, not waited on.
LOCK_WAIT_S = 10.0
LOCK_DIR = "locks"


@dataclass(frozen=True)
class FileId:
    """One weight file as it was checked: which file (device, inode), and what it held then."""

    name: str  # the file's name in the target's folder
    device: int
    inode: int
    size: int
    header: str  # bytes_id of the safetensors header (its JSON), "" when unreadable
    links: int = 1  # hard links to the inode; more than one means another path shares it
    symlink: bool = False

    def same_file(self, other: "FileId") -> bool:
        return (self.device, self.inode) == (other.device, other.inode) and not self.symlink

    def unchanged(self, other: "FileId") -> bool:
        """The same file, of the same size and header: the regions recorded still mean the same."""
        return self.same_file(other) and (self.size, self.header) == (other.size, other.header)

    def to_json(self) -> dict:
        return {"name": self.name, "device": self.device, "inode": self.inode, "size": self.size,
                "header": self.header}

    @classmethod
    def from_json(cls, d: dict) -> "FileId":
        return cls(d["name"], d["device"], d["inode"], d["size"], d["header"])


@dataclass(frozen=True)
class Target:
    given: Path  # the path as the user wrote it, for messages
    root: Path  # the folder holding the files, every symlink resolved
    files: tuple[FileId, ...]
    lone: bool = False  # a safetensors file that is not one of its folder's weight files

    @property
    def model(self) -> Path:
        """The folder, or the lone file: what the journal names as its target."""
        return self.root / self.files[0].name if self.lone else self.root

    def path(self, f: FileId) -> Path:
        return self.root / f.name

    def file(self, name: str) -> FileId | None:
        return next((f for f in self.files if f.name == name), None)

    def shares_a_file(self, ids: list[FileId]) -> bool:
        return any(mine.same_file(theirs) for mine in self.files for theirs in ids)

    def check_private(self, *, allow_links: bool = False) -> None:
        """Refuse a file another path shares: a symlink, or a hard link (unless `allow_links`)."""
        for f in self.files:
            if f.symlink:
                raise SharedFile(str(self.path(f)), "symlink",
                                 f"{self.path(f)} is a symlink (a Hugging Face cache file?): patching it would "
                                 "change every model that shares it; use `apply --out DIR`")
            if f.links > 1 and not allow_links:
                raise SharedFile(str(self.path(f)), "hardlink",
                                 f"{self.path(f)} has {f.links} hard links: another path (a copy made with "
                                 "`cp -al` or `ln`?) shares its bytes, and patching it would change that one "
                                 "too; use `apply --out DIR`, or `apply --break-links` to patch a private copy")


def resolve(path: str | os.PathLike) -> Target:
    """The model a path names, by identity. A file inside a model folder names that folder's
    model; a lone file (not among its folder's weight files) names itself."""
    given = Path(path)
    if not given.exists():  # a dangling symlink too
        raise ModelFormatError(f"{given} does not exist")
    if given.is_dir():
        root = Path(os.path.realpath(given))
        return Target(given, root, tuple(file_id(f) for f in weight_files(root)))
    weight_files(given)  # refuses a pickle checkpoint
    root = Path(os.path.realpath(given.parent))
    try:
        folder = [f.name for f in weight_files(root)]
    except ModelFormatError:
        folder = []
    if given.name in folder:
        return Target(given, root, tuple(file_id(root / n) for n in folder))
    return Target(given, root, (file_id(root / given.name),), lone=True)


def file_id(path: Path) -> FileId:
    """A weight file's identity, read without following a symlink at the file itself."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing (its model's index names it)") from None
    if stat.S_ISLNK(st.st_mode):
        return FileId(path.name, st.st_dev, st.st_ino, st.st_size, "", st.st_nlink, symlink=True)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        return fd_id(path.name, f)


def fd_id(name: str, f: BinaryIO) -> FileId:
    """The identity of an open file: what is checked is what is written through."""
    st = os.fstat(f.fileno())
    return FileId(name, st.st_dev, st.st_ino, st.st_size, _header_id(f), st.st_nlink)


def _header_id(f: BinaryIO) -> str:
    head = os.pread(f.fileno(), 8, 0)
    if len(head) < 8:
        return ""
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        return ""
    return bytes_id(os.pread(f.fileno(), n, 8))


def break_links(target: Target) -> Target:
    """Give each hard-linked file of the target a private copy under its name, so that the
    other paths keep the bytes they had. The copy is written beside it, fsynced and renamed
    over it: a crash leaves either the shared file or the whole copy."""
    for f in target.files:
        if f.links <= 1 or f.symlink:
            continue
        path = target.path(f)
        with new_file(path, mode=None) as tmp:
            shutil.copy2(path, tmp)
    return Target(target.given, target.root, tuple(file_id(target.path(f)) for f in target.files))


@contextmanager
def patch_lock(store_root: Path, target: Target, *, wait: float | None = None) -> Iterator[None]:
    """Hold the lock of one target's folder: one apply or revert at a time patches it, from its
    first check to its last write. Two OS locks (flock), so that a process that dies lets them
    go: one on a lock file in the store's `locks/`, named by the folder's device and inode (so
    that every path to the folder meets it), into which the holder writes its pid for the
    message of whoever waits; and one on the folder itself, which a process working from
    another store meets too. Lock files stay (deleting one that another process waits on would
    let two hold "the" lock)."""
    wait = LOCK_WAIT_S if wait is None else wait
    st = os.stat(target.root)
    folder = Path(store_root) / LOCK_DIR
    folder.mkdir(exist_ok=True)
    fds = [os.open(folder / f"{st.st_dev}-{st.st_ino}.lock", os.O_RDWR | os.O_CREAT, 0o644),
           os.open(target.root, os.O_RDONLY)]
    try:
        deadline = time.monotonic() + wait
        for k, fd in enumerate(fds):
            while not _try_lock(fd, required=k == 0):
                if time.monotonic() >= deadline:
                    raise PatchBusy(_holder(fds[0]) if k == 0 else None, wait, str(target.given)) from None
                time.sleep(0.02)
        os.ftruncate(fds[0], 0)
        os.pwrite(fds[0], f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # lets the lock go


def _try_lock(fd: int, *, required: bool) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        # A file system that cannot lock a folder (some network ones): the store's lock file
        # still keeps this store's processes apart.
        if required:
            raise
        return True


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
