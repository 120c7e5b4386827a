"""A store at scale: many stances, many versions each. How fast are log, show and ref
resolution, and how big is the store next to the unique bytes it holds?

    python tests/benchmarks/scale.py [--stances 50] [--versions 20] [--changed all|few] [--json]

The model is small and Qwen2-shaped (hidden 64, 2 layers, 26 tensors, bf16). Each version is
its own Adam-like fine-tune of the base (28% of the elements moved by one unit in the last
place): with `--changed all` every tensor changes, with `--changed few` (the surgical case)
two tensors do. Versions are committed from memory, lossless. Timings are the median of
`--runs` calls on an open store, after a warm-up, plus the time to open the store; the CLI
figures run the command in-process (click's runner), so they leave out the interpreter's start
(mostly importing torch), which no store layout can change.

Targets: each of log, show and ref resolution under 100 ms; store size =
unique object bytes (tensor data, manifests, base records) + the ref log + a catalog under 5 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, _write, adam_like, base_state  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import Store  # noqa: E402

SURGICAL = ("model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight")


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


def build(root: Path, models: Path, stances: int, versions: int, changed: str) -> dict:
    shape = SHAPES["tiny"]
    base = base_state(shape)
    _write(models / "base", base, shape)
    started = time.perf_counter()
    with Store.init(root) as store:
        store.add_base(models / "base", name="tiny")
        for s in range(stances):
            for n in range(versions):
                g = torch.Generator().manual_seed(1000 * s + n)
                names = SURGICAL if changed == "few" else tuple(base)
                state = dict(base)
                for k in names:
                    state[k] = adam_like(base[k], 0.28, g)
                store.commit(f"stance-{s:02d}", state, base="tiny", message=f"checkpoint {n + 1}",
                             metadata={"learning_rate": "1e-4", "epoch": str(n + 1)},
                             tag="best" if n == versions // 2 else None)
            print(f"\rcommitted {s + 1}/{stances} stances", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"commit_s_total": round(time.perf_counter() - started, 1)}


def sizes(root: Path) -> dict:
    with Store.open(root) as store:
        store.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Tensor data, plus the manifests and base records (objects too since store format 2).
        unique = sum(r["size"] for r in store.catalog.object_rows())
        index_objects = [row["id"] for row in store.catalog.query(
            "SELECT id FROM versions UNION SELECT id FROM bases UNION SELECT record FROM bases")]
        manifests = sum(store.objects.size(oid) for oid in index_objects)
        unique += manifests
        on_disk = sum(p.stat().st_size for p in (root / "objects").rglob("*") if p.is_file())
        catalog = sum(p.stat().st_size for p in root.glob("catalog.db*"))
        refs_log = store.refs.size()
        # Anything else (temporary files, strays) would be overhead; the STORE marker is 33 bytes.
        other = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "STORE") \
            - on_disk - catalog - refs_log
        referenced = store.catalog.one("SELECT sum(bytes) AS b FROM versions")["b"]
        tensors = store.catalog.one("SELECT coalesce(sum(tensors), 0) AS n FROM versions")["n"]
    return {"unique_object_bytes": unique, "manifest_and_base_object_bytes": manifests,
            "object_files_bytes": on_disk, "catalog_bytes": catalog, "refs_log_bytes": refs_log,
            "other_bytes": other, "store_bytes": on_disk + catalog + refs_log + other,
            "bytes_referenced_by_versions": referenced, "tensor_entries": tensors,
            "catalog_bytes_per_tensor_entry": round(catalog / max(tensors, 1))}


def timings(root: Path, runs: int, stance: str, number: int) -> dict:
    out = {}
    ref = f"{stance}@{number}"
    with Store.open(root) as store:
        prefix = store.resolve(ref).id[3:15]
        out["open_store"] = timed(lambda: Store.open(root).close(), runs)
        out["resolve_stance"] = timed(lambda: store.resolve(stance), runs)
        out["resolve_stance_at_n"] = timed(lambda: store.resolve(ref), runs)
        out["resolve_stance_at_tag"] = timed(lambda: store.resolve(f"{stance}@best"), runs)
        out["resolve_id_prefix"] = timed(lambda: store.resolve(prefix), runs)
        out["log_stance"] = timed(lambda: store.log(stance), runs)
        out["log_all"] = timed(lambda: store.log(), runs)
        out["log_where"] = timed(lambda: store.log(where={"epoch": str(number)}), runs)
    runner = CliRunner()

    def cli_run(*args: str) -> Callable[[], object]:
        def go() -> None:
            r = runner.invoke(cli, ["--store", str(root), *args])
            assert r.exit_code == 0, r.output
        return go

    out["cli_log_stance"] = timed(cli_run("log", stance), runs)
    out["cli_log_all"] = timed(cli_run("log"), runs)
    out["cli_show"] = timed(cli_run("show", ref), runs)
    out["cli_show_prefix"] = timed(cli_run("show", prefix), runs)
    out["cli_show_json"] = timed(cli_run("show", f"{stance}@best", "--json"), runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stances", type=int, default=50)
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--changed", choices=["all", "few"], default="all")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--dir", type=Path, help="Build the store here and keep it (default: a temporary folder).")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="deltastore-scale-")) if args.dir is None else args.dir
    try:
        report = {"stances": args.stances, "versions_each": args.versions, "changed": args.changed}
        report.update(build(tmp / "store", tmp / "models", args.stances, args.versions, args.changed))
        report.update(sizes(tmp / "store"))
        report["timings"] = timings(tmp / "store", args.runs, f"stance-{args.stances // 2:02d}",
                                    min(7, args.versions))
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    worst = max(v["median_ms"] for k, v in report["timings"].items() if k != "open_store")
    report["targets"] = {"log_show_resolve_under_100ms": worst < 100,
                         "catalog_under_5MB": report["catalog_bytes"] < 5e6,
                         "store_is_objects_catalog_and_refs": report["other_bytes"] == 0
                         and report["object_files_bytes"] == report["unique_object_bytes"]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            if k != "timings":
                print(f"{k:32} {v}")
        for k, v in report["timings"].items():
            print(f"{k:32} {v['median_ms']:8.2f} ms (max {v['max_ms']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
