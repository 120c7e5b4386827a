"""Locks on a remote (schema/FORMAT.md §10): a push holds a shared lock, a gc an exclusive one,
as restic's backup and prune do, so that gc never deletes while a push is choosing which
objects it relies on and making its refs.

Each lock is its own file, `locks/<kind>-<random>.json`, so taking one needs no conditional
write: a taker writes its file first and lists the others after, so of two that start at
once at least one sees the other (and backs off). A holder rewrites its file every
REFRESH_SECONDS; a lock whose file was last written more than STALE_SECONDS ago, by the
backend's clock as read against this machine's, is a dead holder's and is removed by whoever
finds it. A holder stops before its lock can look stale to anyone: `check` refuses once its
last refresh is older than half of STALE_SECONDS. This module never deletes another holder's
live lock, and never prints: the stale locks it removed are returned as lines.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.errors import RemoteError, RemoteLocked, UnsafeInput
from ..core.hashing import canonical_json
from ..core.limits import load_json

if TYPE_CHECKING:
    from .remotefs import Remote

REFRESH_SECONDS = 300.0  # restic's refresh interval
STALE_SECONDS = 1800.0  # restic's: six refreshes missed
LOCKS = "locks"
SHARED, EXCLUSIVE = "push", "gc"
MAX_LOCK_BYTES = 4096


@dataclass(frozen=True)
class LockFile:
    """Another holder's lock as a taker sees it."""

    name: str  # locks/<file>
    kind: str  # "push", "gc", or "unknown" (unreadable: it blocks both)
    holder: str  # host and pid, as the holder wrote them
    age: float | None  # seconds since it was last written; None when the backend gives no time

    @property
    def stale(self) -> bool:
        return self.age is not None and self.age > STALE_SECONDS

    def describe(self) -> str:
        age = "of unknown age" if self.age is None else f"refreshed {_duration(self.age)} ago"
        return f"{self.name} ({self.holder}, {age})"


class Lock:
    """One lock on a remote, held from `acquire` to `release`, refreshed meanwhile."""

    def __init__(self, remote: "Remote", kind: str):
        self.remote, self.kind = remote, kind
        self.name = f"{LOCKS}/{kind}-{uuid.uuid4().hex}.json"
        self.path = remote.path(self.name)
        self.data = canonical_json({"kind": kind, "host": socket.gethostname()[:64], "pid": os.getpid(),
                                    "time": int(time.time())}) + b"\n"
        self.stale_removed: list[str] = []
        self._refreshed = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lock":
        """Write this lock, then look at the others: a live one that excludes it makes it refuse
        (its own file removed first); a stale one is removed, and said so in `stale_removed`."""
        self.remote.put(self.path, self.data)
        self._refreshed = time.monotonic()
        try:
            for other in others(self.remote, self.name):
                if other.stale:
                    self._remove_stale(other)
                elif self.kind == EXCLUSIVE or other.kind != SHARED:
                    raise RemoteLocked(self.remote.url, other.kind, other.describe(), self.kind, _duration(STALE_SECONDS))
        except BaseException:
            self._delete()
            raise
        self._thread = threading.Thread(target=self._refresh_loop, name=f"deltastore-lock-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Refuse when this lock may no longer be held: its file was removed, or its last refresh
        is so old that another taker could soon judge it stale. Called before each step that
        makes something referenced (push) or deletes something (gc)."""
        since = time.monotonic() - self._refreshed
        if self._lost is None and since > STALE_SECONDS / 2:
            self._lost = f"not refreshed for {_duration(since)}"
        if self._lost is not None:
            raise RemoteError(f"the {self.kind} lost its lock {self.name} on {self.remote.url} ({self._lost}): it "
                              f"stopped; run it again", url=self.remote.url)

    def release(self) -> bool:
        """Stop refreshing and remove the lock. False when it was gone already (removed as stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self._delete() and self._lost is None

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.remote.fs.invalidate_cache()
                if not self.remote.fs.exists(self.path):
                    self._lost = "its file was removed, as a stale lock"
                    return
                self.remote.put(self.path, self.data)
                self._refreshed = time.monotonic()
            except OSError:
                continue  # a failed refresh is retried; `check` stops the holder when they keep failing

    def _remove_stale(self, other: LockFile) -> None:
        try:
            self.remote.fs.rm_file(self.remote.path(other.name))
        except FileNotFoundError:
            return  # another taker removed it first
        self.stale_removed.append(f"removed stale lock {other.describe()}: its holder stopped refreshing it "
                                  f"more than {_duration(STALE_SECONDS)} ago")

    def _delete(self) -> bool:
        try:
            self.remote.fs.rm_file(self.path)
            return True
        except FileNotFoundError:
            return False


def others(remote: "Remote", mine: str) -> list[LockFile]:
    """Every lock on the remote but `mine`, with its age by the backend's clock."""
    now = time.time()
    out = []
    for rel, info in sorted(remote.listing(LOCKS).items()):
        name = f"{LOCKS}/{rel}"
        if name == mine:
            continue
        modified = remote.modified(info)
        try:
            raw = remote.read(name, remote.path(name), MAX_LOCK_BYTES)
        except FileNotFoundError:
            continue  # released since the listing
        except RemoteError:
            raw = b""
        try:
            record = load_json(raw, name, max_bytes=MAX_LOCK_BYTES)
        except UnsafeInput:
            record = None
        kind, holder = "unknown", "unreadable"
        if isinstance(record, dict) and record.get("kind") in (SHARED, EXCLUSIVE):
            kind, holder = record["kind"], f"host {str(record.get('host'))[:64]}, pid {record.get('pid')}"
        out.append(LockFile(name, kind, holder, None if modified is None else max(0.0, now - modified)))
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
