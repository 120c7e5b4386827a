"""How long `deltastore log` takes as a command, next to the floor any click program on this
Python pays: `python -c "import sqlite3, click"`. Both run in the same run, interleaved, so
that the machine's load falls on both alike.

    python tests/benchmarks/startup.py [--runs 15] [--versions 20] [--json]

The store holds one stance of `--versions` versions of a tiny model (committed once, before
timing). Each figure is the median of `--runs` fresh interpreters, wall time and CPU time
(user + system of the child), with every module's bytecode cached as after an install.
Target: `log` within 2x the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE = [sys.executable, "-c", "import sqlite3, click"]


def make_store(folder: Path, versions: int) -> Path:
    """A store with one stance of `versions` versions (torch is imported here, never in the
    timed commands)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import torch

    from deltastore import Store
    from helpers import make_model, write_folder

    pair = make_model(folder)
    with Store.init(folder / "store") as store:
        for k in range(versions):
            state = {n: t.clone() for n, t in pair.ft_state.items()}
            state["head.weight"] = state["head.weight"] + 1e-3 * (k + 1) * torch.ones_like(state["head.weight"])
            store.commit("curious", write_folder(folder / f"v{k}", state), base=pair.base, message=f"step {k}")
    return folder / "store"


def once(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(store: Path, runs: int) -> dict:
    # Compiled modules cached as an installed package has them (the warm-up writes them), in a
    # folder of the run's own, for the baseline's modules too.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(store.parent / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    log = [sys.executable, "-c", "from cli.main import main; main()", "--store", str(store), "log"]
    once(BASELINE, env), once(log, env)  # warm the file cache
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "log": []}
    for _ in range(runs):
        times["baseline"].append(once(BASELINE, env))
        times["log"].append(once(log, env))
    out = {}
    for name, pairs in times.items():
        out[name] = {"wall_ms": round(1000 * statistics.median(w for w, _ in pairs), 1),
                     "cpu_ms": round(1000 * statistics.median(c for _, c in pairs), 1)}
    out["ratio_wall"] = round(out["log"]["wall_ms"] / out["baseline"]["wall_ms"], 2)
    out["ratio_cpu"] = round(out["log"]["cpu_ms"] / out["baseline"]["cpu_ms"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="deltastore-startup-"))
    try:
        result = {"runs": args.runs, "versions": args.versions, **measure(make_store(folder, args.versions), args.runs)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("baseline", "log"):
            print(f"{name:9} {result[name]['wall_ms']:7.1f} ms wall  {result[name]['cpu_ms']:7.1f} ms CPU")
        print(f"log / baseline: {result['ratio_wall']}x wall, {result['ratio_cpu']}x CPU (target: 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
