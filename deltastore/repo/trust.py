"""Weight files trusted by their identity, as git's index trusts a file whose stat data is
unchanged: after a full hash, each file's (device, inode, size, mtime, ctime) is recorded with
the ids and squared norms of the tensors it holds; a file whose stat data still matches is not
hashed again, unless its mtime is not safely older than the record (git's "racy" rule).

A cache, never the truth, kept in its own file, `trusted.json` (FORMAT.md §1): not in the
catalog, whose open-time checks and rebuild are about the truth (a cache must never make the
store refuse to open, nor grow what those checks read). A file that is missing, unreadable or
damaged, or an entry whose checksum fails, trusts nothing; fsck never reads it; `--verify`
(base add, commit, apply) hashes every file regardless."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..core.durable import replace_file
from ..core.errors import DeltastoreError
from ..core.hashing import bytes_id, canonical_json, is_id
from ..core.limits import load_json, read_bounded

if TYPE_CHECKING:
    from ..weights.models import MappedFile, TensorSource
    from .repo import Repo

FILE = "trusted.json"
FORMAT = "deltastore/trusted/1"
# A file written within this long of the moment its stamp was taken may be written again
# without its mtime changing (coarse file-system clocks: FAT's 2 s, a kernel tick, a server's
# clock ahead of ours): such a file is racy, and hashed again. Git compares with the index's
# own mtime; a margin covers clocks that are not the file system's.
RACY_NS = 3_000_000_000
# The files remembered, newest first: some 200 bases of a dozen shards each.
MAX_FILES = 2048
MAX_BYTES = 64 << 20

Weight = tuple[str, "float | None"]  # a tensor's id and squared norm


def trusted(repo: Repo, source: TensorSource) -> dict[str, Weight]:
    """The tensors of `source`'s mapped files that need no hash: name -> (tensor id, squared
    norm), from the files whose stamp (taken when they were mapped, checked again by the
    caller's `check_unchanged`) is the one recorded after a full hash, and whose mtime was
    safely older than that record; each file's tensors exactly those recorded."""
    files = entries(repo.root)
    found: dict[str, Weight] = {}
    for mapped in source.mapped.values():
        entry = files.get(_key(mapped.stamp))
        if entry is None or [entry["size"], entry["mtime_ns"], entry["ctime_ns"]] != list(mapped.stamp[2:]):
            continue
        if not entry["mtime_ns"] < entry["hashed_ns"] - RACY_NS:
            continue  # racy: a write then may have left the stamp as it was
        if sorted(entry["tensors"]) != sorted(_names(source, mapped)):
            continue
        found.update((name, (tid, norm)) for name, (tid, norm) in entry["tensors"].items())
    return found


def record(repo: Repo, source: TensorSource, weights: Mapping[str, Weight]) -> None:
    """Trust `source`'s mapped files from now on whose every tensor was just hashed whole (in
    `weights`), the caller's `check_unchanged` having found their stamps as when they were
    mapped. A store that cannot be written records nothing; a failed write loses the cache only."""
    hashed = [m for m in source.mapped.values() if all(n in weights for n in _names(source, m))]
    if repo.readonly or not hashed:
        return
    files = entries(repo.root)
    for mapped in hashed:
        entry = {"size": mapped.stamp[2], "mtime_ns": mapped.stamp[3], "ctime_ns": mapped.stamp[4],
                 "hashed_ns": mapped.opened_ns, "tensors": {n: list(weights[n]) for n in _names(source, mapped)}}
        files[_key(mapped.stamp)] = {**entry, "check": _check(entry)}
    newest = sorted(files.items(), key=lambda kv: kv[1]["hashed_ns"], reverse=True)[:MAX_FILES]
    data = canonical_json({"format": FORMAT, "files": dict(newest)})
    tmp = repo.objects.tmp / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
    try:
        tmp.parent.mkdir(exist_ok=True)
        replace_file(repo.root / FILE, data, tmp)
    except OSError:
        pass  # (a full disk: the next full hash records it)


def _key(stamp: tuple[int, ...]) -> str:
    return f"{stamp[0]}:{stamp[1]}"


def _names(source: TensorSource, mapped: MappedFile) -> list[str]:
    return [name for name, info in source.infos.items() if info.file == mapped.path]


def _check(entry: dict) -> str:
    """An entry's checksum: a damaged entry is never trusted."""
    return bytes_id(canonical_json(entry))


def entries(root: Path) -> dict[str, dict]:
    """The entries recorded whose form and checksum are sound; none where the file is missing,
    too large or not ours."""
    try:
        raw = read_bounded(root / FILE, MAX_BYTES)
    except OSError:
        return {}
    if raw is None:
        return {}
    try:
        doc = load_json(raw, FILE, max_bytes=MAX_BYTES)
    except (DeltastoreError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        return {}
    return {k: e for k, e in doc["files"].items() if _sound(e)}


def _sound(entry: Any) -> bool:
    if not isinstance(entry, dict) or set(entry) != {"size", "mtime_ns", "ctime_ns", "hashed_ns", "tensors", "check"}:
        return False
    body = {k: v for k, v in entry.items() if k != "check"}
    if not all(isinstance(body[k], int) for k in ("size", "mtime_ns", "ctime_ns", "hashed_ns")) \
            or not isinstance(body["tensors"], dict) or entry["check"] != _check(body):
        return False
    return all(isinstance(w, list) and len(w) == 2 and is_id(w[0]) and
               (w[1] is None or (isinstance(w[1], float) and math.isfinite(w[1]) and w[1] >= 0))
               for w in body["tensors"].values())
