"""How pull time grows with the number of versions pulled: push N versions of one stance to a
local Hub server (tests/hubserver.py, with the real huggingface_hub client), then pull them into
a fresh store, for each N given.

    python tests/benchmarks/pull_scale.py [--versions 300,3000] [--profile N] [--json]

The versions share one tiny model's objects (one real commit; the others are its manifest with
another number, parent and message, so each has its own id and files on the Hub): what is
measured is the per-version work of a pull, not the bytes. Timings are one run each, wall
clock. Target: time per version flat as N grows (linear in N).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
import os  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


from deltastore import Store  # noqa: E402
from deltastore.core.hashing import manifest_id  # noqa: E402
from deltastore.sharing.hub import pull, push  # noqa: E402
from helpers import make_model  # noqa: E402
from hubserver import HubServer  # noqa: E402

TOKEN = "tok-bench"
REPO = "bench/stances"


def versions_of_one(store: Store, count: int, stance: str = "stance") -> list[str]:
    """`count` versions of `stance` sharing the objects of its version 1, landed in one ingest."""
    first = store.resolve(f"{stance}@1").manifest()
    manifests, parent = [], manifest_id(first)
    for n in range(2, count + 1):
        m = {**first, "number": n, "parent": parent, "message": f"checkpoint {n}"}
        parent = manifest_id(m)
        manifests.append(m)
    if manifests:
        store.ingest(manifests, lambda oid, size: store.objects.get(oid, raw_size=size))
    return [f"{stance}@{n}" for n in range(1, count + 1)]


def measure(tmp: Path, count: int, profile: bool) -> dict:
    pair = make_model(tmp / "models")
    source = Store.init(tmp / "source")
    source.add_base(pair.base, name="tiny")
    source.commit("stance", pair.ft, base="tiny")
    refs = versions_of_one(source, count)
    with HubServer(tmp / "hub", tokens={TOKEN: "bench"}) as hub:
        t = time.perf_counter()
        push(source, refs, REPO, token=TOKEN, endpoint=hub.url, progress=False)
        push_s = time.perf_counter() - t
        target = Store.init(tmp / "target")
        target.add_base(pair.base)
        profiler = cProfile.Profile() if profile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        r = pull(target, REPO, token=TOKEN, endpoint=hub.url, cache_dir=tmp / "cache", progress=False)
        if profiler:
            profiler.disable()
        pull_s = time.perf_counter() - t
        assert len(r.pulled) == count
        t = time.perf_counter()
        again = pull(target, REPO, token=TOKEN, endpoint=hub.url, cache_dir=tmp / "cache", progress=False)
        again_s = time.perf_counter() - t
        assert not again.pulled
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    source.close()
    target.close()
    return {"versions": count, "push_s": round(push_s, 2), "pull_s": round(pull_s, 2),
            "pull_ms_per_version": round(1000 * pull_s / count, 2), "pull_again_s": round(again_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default="300,3000", help="Counts to measure, comma-separated.")
    p.add_argument("--profile", type=int, metavar="N", help="Profile the pull of N versions (to stderr).")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for count in [int(c) for c in args.versions.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix="deltastore-pull-scale-"))
        try:
            rows.append(measure(tmp, count, profile=args.profile == count))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not args.json:
            print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        growth = rows[-1]["pull_ms_per_version"] / rows[0]["pull_ms_per_version"]
        report = {"runs": rows, "per_version_growth": round(growth, 2),
                  "linear": growth < 1.5}
    else:
        report = {"runs": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
