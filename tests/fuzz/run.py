"""Fuzz every reader of outside input for a fixed time each.

    python tests/fuzz/run.py [--seconds N] [--target NAME] [--seed S] [--crashes DIR]

Each target (targets.py) is fed mutations (mutate.py) of its valid seed files for N seconds.
An input fails the run when the reader raises anything but a `DeltastoreError`, allocates more
than the input's declared sizes allow (Python and numpy memory by tracemalloc, the rest by the
process's peak RSS), or takes longer than `--exec-limit` seconds. Failing inputs are written
under --crashes, one folder each. Prints, per target, how many inputs ran and how each ended;
exits 1 when any input failed.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fuzz` and the library importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deltastore.core.errors import DeltastoreError  # noqa: E402

from fuzz.mutate import mutate  # noqa: E402
from fuzz.targets import Target, build  # noqa: E402

RSS_SLACK = 64 << 20  # allocator and page-cache noise between two readings of the peak RSS


class Timeout(Exception):
    pass


@dataclass
class Stats:
    target: str
    reader: str
    execs: int = 0
    accepted: int = 0
    seeds: int = 0
    seeds_refused: list[str] = field(default_factory=list)
    refused: collections.Counter = field(default_factory=collections.Counter)
    messages: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)
    first_failures: dict[str, str] = field(default_factory=dict)
    peak_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        refused = ", ".join(f"{k} {v}" for k, v in self.refused.most_common())
        return (f"{self.target}: {self.execs} inputs in {self.seconds:.0f} s, {self.accepted} accepted, "
                f"{sum(self.refused.values())} refused ({refused}); {len(self.messages)} distinct refusals; "
                f"largest allocation {self.peak_bytes / (1 << 20):.1f} MiB; "
                f"{sum(self.failures.values())} failures")


def _signature(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "deltastore" in f.filename or "fuzz" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(e).__name__} at {where}"


def _normalised(e: BaseException) -> str:
    return type(e).__name__ + ": " + re.sub(r"\d+", "#", re.sub(r"/[^ ]*/", "/.../", str(e)))[:200]


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _alarm(signum, frame):  # noqa: ANN001
    raise Timeout("the reader took too long")


def run_target(target: Target, seconds: float, *, seed: int = 0, crashes: Path | None = None,
               exec_limit: float = 10.0) -> Stats:
    rng = random.Random(f"{target.name}:{seed}")
    stats = Stats(target.name, target.reader)
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    start = time.monotonic()
    try:
        for seed_files in target.seeds:  # every seed once, then mutations for `seconds`
            _one(target, seed_files, True, stats, crashes, exec_limit)
        fuzzing = time.monotonic()
        while time.monotonic() - fuzzing < seconds:
            _one(target, mutate(rng, rng.choice(target.seeds), target.seeds), False, stats, crashes, exec_limit)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
    stats.seconds = time.monotonic() - start
    return stats


def _one(target: Target, files: dict[str, bytes], is_seed: bool, stats: Stats, crashes: Path | None,
         exec_limit: float) -> None:
    bound = target.bound(files)
    rss_before = _maxrss()
    failure = None
    # Traced only while the reader runs: tracing the mutations would cost more than the reads.
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, exec_limit)
    try:
        target.run(files)
        outcome = None
    except DeltastoreError as e:
        outcome = e
    except Timeout as e:
        failure, outcome = e, None
    except Exception as e:  # noqa: BLE001 (anything else is what the fuzzer looks for)
        failure, outcome = e, None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    rss_growth = _maxrss() - rss_before
    stats.execs += 1
    stats.peak_bytes = max(stats.peak_bytes, peak)
    if failure is None and peak > bound:
        failure = MemoryError(f"allocated {peak} bytes, more than the {bound} its declared sizes allow")
    if failure is None and rss_growth > bound + RSS_SLACK:
        failure = MemoryError(f"the peak RSS grew by {rss_growth} bytes, more than the {bound} its sizes allow")
    if is_seed:
        stats.seeds += 1
        if outcome is not None:
            stats.seeds_refused.append(f"{type(outcome).__name__}: {outcome}")
    if failure is not None:
        sig = _signature(failure)
        stats.failures[sig] = stats.failures.get(sig, 0) + 1
        if sig not in stats.first_failures:
            detail = "".join(traceback.format_exception(failure))
            stats.first_failures[sig] = detail
            if crashes is not None:
                folder = crashes / f"{target.name}-{len(stats.first_failures)}"
                folder.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (folder / name).write_bytes(data)
                (folder / "failure.txt").write_text(detail)
        return
    if outcome is None:
        stats.accepted += 1
    else:
        stats.refused[type(outcome).__name__] += 1
        stats.messages.add(_normalised(outcome))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    parser.add_argument("--target", action="append", help="run only this target (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crashes", type=Path, help="where failing inputs go (default: a temporary folder)")
    parser.add_argument("--exec-limit", type=float, default=10.0, help="seconds one input may take")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deltastore-fuzz-") as tmp:
        targets = build(Path(tmp))
        if args.list:
            for t in targets.values():
                print(f"{t.name}: {t.reader}, {len(t.seeds)} seeds")
            return 0
        chosen = args.target or list(targets)
        unknown = [n for n in chosen if n not in targets]
        if unknown:
            parser.error(f"unknown target {', '.join(unknown)}; known: {', '.join(targets)}")
        crashes = args.crashes or Path(tempfile.mkdtemp(prefix="deltastore-fuzz-crashes-"))
        failed = 0
        for name in chosen:
            stats = run_target(targets[name], args.seconds, seed=args.seed, crashes=crashes,
                               exec_limit=args.exec_limit)
            print(stats.line(), flush=True)
            for refused in stats.seeds_refused:
                print(f"  a seed was refused: {refused}")
            for sig, count in stats.failures.items():
                print(f"  FAILURE x{count}: {sig}\n" + "    " + stats.first_failures[sig].replace("\n", "\n    "))
            failed += sum(stats.failures.values()) + len(stats.seeds_refused)
        if failed:
            print(f"failing inputs are under {crashes}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
