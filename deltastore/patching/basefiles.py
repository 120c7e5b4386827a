"""The registered base's own weight files as where an in-place apply's journal finds a
region's original bytes (schema/FORMAT.md §7), instead of a copy in `<id>.originals`: the
usual `cp -r BASE WORK && deltastore apply STANCE WORK` then writes the changed bytes once.
A region is taken from a base file only where that file holds, at that moment, exactly the
target's bytes, whose base tensor id apply has just checked; the journal keeps each base
file's path and identity, and revert checks both, and every region's tensor id, before it
writes (journalfiles.base_files_problem, damaged_originals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DeltastoreError
from ..engine.reader import Reader
from ..repo import trust
from ..repo.records import Version
from ..weights.models import TensorSource
from ..weights.target import FileId, Target, file_id

# Bytes compared at a time: a bounded temporary, and the two slices still in the cache.
COMPARE = 1 << 22


class BaseFiles:
    """The base's files as `base add` found them, opened (mapped) for an apply to compare;
    each known by its real path (a Hub snapshot's files are symlinks to its blobs)."""

    def __init__(self, source: TensorSource, ids: dict[Path, tuple[Path, FileId]],
                 trusted: dict[str, str] | None = None):
        self.source, self.ids = source, ids
        # Tensor ids of the files this store hashed whole and trusts (trust.py): a target region
        # that `holds` finds equal to one of them needs no hash of its own.
        self.trusted = trusted or {}
        self.used: set[Path] = set()

    def holds(self, name: str, nbytes: int, target: TensorSource) -> tuple[str, int] | None:
        """(the base file's real path, where the region starts in it) when a base file holds
        exactly the bytes of tensor `name` of `target` (mapped); else None (the region is
        copied). Compared a block of each at a time, each block's pages let go once compared."""
        info = self.source.infos.get(name)
        if info is None or info.file not in self.ids or info.nbytes != nbytes:
            return None
        try:
            same = all(same_bytes(a, b) for a, b in zip(self.source.blocks(name), target.blocks(name)))
        finally:
            self.source.release(name)
        if not same:
            return None
        self.used.add(info.file)
        return str(self.ids[info.file][0]), info.start

    def check_unchanged(self) -> None:
        """Refuse base files written since they were opened (compared bytes may be stale)."""
        self.source.check_unchanged()

    def plan(self) -> list[dict]:
        """The plan's `base_files`: each file a region uses, its real path and identity."""
        return [{**fid.to_json(), "path": str(path)} for path, fid in sorted((self.ids[f] for f in self.used), key=lambda pf: str(pf[0]))]


def open_base_files(reader: Reader, version: Version, target: Target, *, verify: bool = False) -> BaseFiles | None:
    """The registered base's files, where they are there: regular files (symlinks followed),
    none of them one of the target's (the same device and inode: the target is the base
    folder itself, or shares its files). None: every region's original bytes are copied.
    `verify`: none of them trusted (BaseFiles.trusted)."""
    try:
        base = reader.base(version.base_id)
        if not base.source:
            return None
        source = reader.base_source(base, mapped=True)
        ids: dict[Path, tuple[Path, FileId]] = {}
        for f in {info.file for info in source.infos.values() if info.file is not None}:
            real = Path(f).resolve()
            fid = file_id(real)
            if not fid.symlink and not any(fid.same_file(t) for t in target.files):
                ids[f] = (real, fid)
    except (DeltastoreError, OSError):
        return None
    if not ids:
        return None
    trusted = {} if verify else {n: tid for n, (tid, _) in trust.trusted(reader.repo, source).items()}
    return BaseFiles(source, ids, trusted)


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two buffers hold the same bytes: compared as 8-byte words where the lengths
    allow (3x faster than byte by byte), a slice at a time."""
    if len(a) != len(b):
        return False
    word = np.uint64 if len(a) % 8 == 0 else np.uint8
    x, y = np.frombuffer(a, dtype=word), np.frombuffer(b, dtype=word)
    step = COMPARE // x.itemsize
    return all(np.array_equal(x[i:i + step], y[i:i + step]) for i in range(0, len(x), step))
