"""Timing and memory measurement for the benchmarks.

Timings run in rounds: every round runs each step once, in order, so that a figure and its
peers see the same load on a shared machine; the first round is a warm-up and is dropped.
Peak memory is measured in a process of its own per figure (child.py): its peak RSS is reset
after the setup (loading a model, opening a store), so the figure is the peak of the operation
itself, with the RSS it started from alongside.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CHILD = Path(__file__).resolve().with_name("child.py")


@dataclass
class Step:
    """One timed operation. `setup` (untimed) makes its argument; `teardown` (untimed) gets
    what it returned."""

    label: str
    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], None] | None = None


def stats(samples: list[float]) -> dict:
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples),
            "runs": len(samples)}


def rounds(steps: list[Step], runs: int) -> dict[str, dict]:
    """label -> min/median/max seconds over `runs` rounds after one warm-up round."""
    samples: dict[str, list[float]] = {s.label: [] for s in steps}
    for i in range(runs + 1):
        for s in steps:
            arg = s.setup() if s.setup else None
            t0 = time.perf_counter()
            out = s.fn(arg)
            dt = time.perf_counter() - t0
            if s.teardown:
                s.teardown(out)
            if i:
                samples[s.label].append(dt)
    return {label: stats(xs) for label, xs in samples.items()}


# -- peak RSS, read by the child itself ----------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs); that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def child_rss(figures: dict[str, tuple[str, dict]], jobs: int = 2) -> dict[str, dict]:
    """label -> {"start": RSS when the operation began, "peak": its peak RSS} of each
    (child.py figure, arguments), each in a process of its own, `jobs` at a time.

    The processes fork from a server that has imported torch and deltastore once (saving each
    figure the import, which takes seconds on a busy machine) but nothing else: a figure's
    process holds what a fresh one would after importing those. The zstd figure runs from a
    bare interpreter instead, since the zstd process starts as a copy of its parent."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import child

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["child", "torch", "deltastore", "safetensors.torch"])
    with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        done = {label: pool.submit(child.run, figure, args) for label, (figure, args) in figures.items()
                if figure not in child.BARE}
        bare = {label: _bare(figure, args) for label, (figure, args) in figures.items() if figure in child.BARE}
    out = {label: future.result() for label, future in done.items()} | bare
    return {label: out[label] for label in figures}


def _bare(figure: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, str(CHILD), figure, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child {figure} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
