"""Long-lived thread pools, one of each kind per process: a surgical apply would spend more on
starting threads than on its work."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def pool(kind: str, workers: int = 2) -> ThreadPoolExecutor:
    """The process's pool for `kind` of work (each kind its own: a task may wait on another
    kind's, never on its own)."""
    with _LOCK:
        found = _POOLS.get(kind)
        if found is None:
            found = _POOLS[kind] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"deltastore-{kind}")
        return found


def cores(most: int = 8) -> int:
    """The cores this process may run on, at most `most`: how many tensors an apply works on at
    once, where its results are kept anyway (a commit keeps to two, to bound its memory)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(most, n))


def _forget() -> None:
    # A forked child has none of its parent's threads: it starts its own pools when it needs them.
    global _LOCK
    _LOCK = threading.Lock()
    _POOLS.clear()


os.register_at_fork(after_in_child=_forget)
