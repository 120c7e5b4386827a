"""The stores this user has made or patched a folder from: one absolute path a line in
`$XDG_STATE_HOME/deltastore/stores` (default `~/.local/state/deltastore/stores`), so that
`revert PATH` and `status` work from any folder, and a command that finds no store names one.

A per-user list rather than a marker file in each patched folder: a marker would travel with
a `cp -a` copy of the folder (which is not patched by that journal), could not be written
beside a lone file in a folder the user does not own, and would be one more file inside a
model folder that tools list. The list is a hint, never the truth (the journals in each store
are): a line whose store is gone is skipped, and a list that cannot be written is left as it
is (a read-only home changes nothing else)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

STORE_FILE = "STORE"
MAX_LINES = 256  # the newest kept: each line costs one stat per lookup


def registry() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "deltastore" / "stores"


def known() -> list[Path]:
    """The stores listed that still hold a store, newest first."""
    try:
        lines = registry().read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out: list[Path] = []
    for line in reversed(lines):
        path = Path(line)
        if line and path.is_absolute() and path not in out and (path / STORE_FILE).is_file():
            out.append(path)
    return out


def remember(root: str | os.PathLike) -> None:
    """List the store at `root` (newest last), unless it is the newest already."""
    path = Path(os.path.abspath(root))
    where = registry()
    try:
        lines = where.read_text().splitlines() if where.exists() else []
        if lines and lines[-1] == str(path):
            return
        lines = [line for line in lines if line != str(path)][-(MAX_LINES - 1):] + [str(path)]
        where.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two threads of one process (two stores opened at once) must not
        # write into one temporary file.
        tmp = where.with_name(f"stores.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text("\n".join(lines) + "\n")
            os.replace(tmp, where)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, UnicodeDecodeError):
        pass  # a hint only: a read-only or full home must not stop an apply


def nearest(start: str | os.PathLike) -> Path | None:
    """The listed store closest to `start`: the one whose folder shares the longest leading
    part of the path with it (the newest of equals)."""
    here = Path(os.path.abspath(start)).parts
    best, shared = None, -1
    for store in known():
        n = 0
        for a, b in zip(store.parent.parts, here):
            if a != b:
                break
            n += 1
        if n > shared:
            best, shared = store, n
    return best
