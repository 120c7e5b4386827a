"""Long-lived thread pools, one of each kind per process: a surgical apply would spend more on
starting threads than on its work. And a few tasks that release the GIL, shared between the
calling thread and one pool thread (`two_threads`); and work on named tensors, a few at a
time, in order (`pipelined`, and `in_order` for torch tensors)."""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
# Two tensors in flight keep both cores busy on this kind of machine without holding more
# than two tensors (and their encodings) in memory.
WORKERS = 2
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


def two_threads(tasks: list[Callable[[], T]]) -> list[T]:
    """Every task's result, in order, the tasks run by this thread and one pool thread: this
    thread takes them from the end of the list, the pool thread from the start, each the next
    one neither has started. So a caller puts its largest task last (this thread starts it at
    once; the pool thread takes a moment to wake). A pool thread slow to wake (a busy machine)
    costs at most the tasks it took: this thread never waits for it to start. The first failed
    task's error in list order is raised, once no task is running (every task has run: which
    error comes first does not depend on timing)."""
    results: list = [None] * len(tasks)
    errors: list[Exception | None] = [None] * len(tasks)
    ends = [0, len(tasks)]  # the first task not taken from the start, one past the last from the end
    lock = threading.Lock()

    def take(from_end: bool) -> int | None:
        with lock:
            if ends[0] >= ends[1]:
                return None
            if from_end:
                ends[1] -= 1
                return ends[1]
            ends[0] += 1
            return ends[0] - 1

    def drain(from_end: bool) -> None:
        while (i := take(from_end)) is not None:
            try:
                results[i] = tasks[i]()
            except Exception as e:
                errors[i] = e

    helper = pool("two", workers=1).submit(drain, False) if len(tasks) > 1 else None
    try:
        drain(True)
    finally:  # (after Ctrl-C here, the pool thread starts nothing more)
        with lock:
            ends[0] = ends[1]
        if helper is not None and not helper.cancel():  # (one that never started is not waited for)
            helper.result()
    for error in errors:
        if error is not None:
            raise error
    return results


def _forget() -> None:
    # A forked child has none of its parent's threads: it starts its own pools when it needs them.
    global _LOCK
    _LOCK = threading.Lock()
    _POOLS.clear()


os.register_at_fork(after_in_child=_forget)


def pipelined(names: list[str], work: Callable[[str], T], workers: int, ahead: int) -> Iterator[tuple[str, T]]:
    """(name, work(name)) in order, `workers` at a time, with at most `ahead` names handed out
    but not yet yielded (see in_order, which also keeps torch's own threads out of the way)."""
    # The pool runs `workers` at a time, in order; names handed out beyond that wait in its
    # queue, holding nothing until they start. Once one fails, those that start later (all
    # after it, whose results are never yielded: its error is raised first) do no work.
    failed = threading.Event()

    def guarded(name: str) -> T | None:
        if failed.is_set():
            return None
        try:
            return work(name)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=workers) as executor:
        pending: deque = deque()
        try:
            it = iter(names)
            for name in it:
                pending.append((name, executor.submit(guarded, name)))
                if len(pending) >= ahead:
                    break
            while pending:
                name, future = pending.popleft()
                result = future.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, executor.submit(guarded, nxt)))
                yield name, result
        finally:
            # However it ends (an error, an interrupt, the caller stopping early), nothing
            # queued starts: leaving the pool waits only for the tensors in flight.
            failed.set()
            for _, f in pending:
                f.cancel()


def in_order(names: list[str], work: Callable[[str], T], *, workers: int | None = None,
             ahead: int | None = None) -> Iterator[tuple[str, T]]:
    """(name, work(name)) in order, with up to `workers` tensors in flight: reading and hashing
    one tensor overlaps compressing another (all of them release the GIL), while memory stays
    bounded to a few tensors.

    `ahead` (default `workers`) bounds the names handed out but not yet yielded: behind a
    large tensor (an embedding), the other workers go on with up to that many later ones and
    their results wait. Callers whose results are small, or kept anyway, pass a large one:
    otherwise one core idles for as long as the large tensor takes."""
    workers = WORKERS if workers is None else workers
    if workers <= 1:
        for name in names:
            yield name, work(name)
        return
    # Our workers are the parallelism: torch's own intra-op threads would only contend with them.
    # (torch imported here: every command loads this module, and the callers have loaded torch.)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield from pipelined(names, work, workers, max(workers, ahead or workers))
    finally:
        torch.set_num_threads(threads)
