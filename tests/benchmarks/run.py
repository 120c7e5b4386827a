"""deltastore against its peers, measured in one run (ratios, since absolute times drift on
shared machines).

    python tests/benchmarks/run.py [--model tiny|qwen0.5b] [--runs 5] [--json]

Each timing is min/median/max over `--runs` runs after a warm-up; peak memory is measured in a
fresh child process per figure. Figures (see the README for the latest table):
- lossless commit of the Adam-like fine-tune: stored bytes (vs the bf16 file) and time, against
  `zstd -3 -T2` of the fine-tuned .safetensors file; peak RSS against the model's size;
- apply and revert of the surgical (two-tensor) stance on the loaded model, against
  `safetensors.torch.load_model` of the whole fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import build  # noqa: E402


def timed(fn, runs: int, setup=None) -> dict:
    """min/median/max seconds of fn() over `runs` runs after one warm-up."""
    samples = []
    for i in range(runs + 1):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        dt = time.perf_counter() - t0
        if i:
            samples.append(dt)
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "runs": runs}


def child_peak_rss(code: str) -> tuple[int, dict]:
    """Run `code` in a fresh interpreter; its peak RSS in bytes, and the JSON it printed last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result.pop("peak_rss"), result


PEAK = "import resource, json; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"


def bench_commit(paths: dict[str, Path], runs: int) -> dict:
    fine_tune = paths["adam"] / "model.safetensors"
    file_bytes = fine_tune.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    try:
        def fresh_store():
            shutil.rmtree(work / "store", ignore_errors=True)
            from deltastore import Store

            store = Store.init(work / "store")
            store.add_base(paths["base"], name="base")
            return store

        result = {}

        def commit(store):
            result["r"] = store.commit("adam", paths["adam"], base="base")
            store.close()

        t_commit = timed(commit, runs, setup=fresh_store)
        stored = result["r"].bytes_stored

        if shutil.which("zstd"):
            zstd_cmd = ["zstd", "-3", "-T2", "-q", "-f", "-o", str(work / "ft.zst"), str(fine_tune)]
            t_zstd = timed(lambda: subprocess.run(zstd_cmd, check=True), runs)
            zstd_bytes = (work / "ft.zst").stat().st_size
        else:  # the same library, two threads
            import zstandard

            data = fine_tune.read_bytes()
            holder = {}
            t_zstd = timed(lambda: holder.__setitem__("c", zstandard.ZstdCompressor(level=3, threads=2).compress(data)), runs)
            zstd_bytes = len(holder["c"])

        code = f"""
from deltastore import Store
s = Store.init({str(work / 'rss')!r}); s.add_base({str(paths['base'])!r}, name='base')
import resource; before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
s.commit('adam', {str(paths['adam'])!r}, base='base')
{PEAK}
print(json.dumps({{'peak_rss': peak, 'before': before}}))
"""
        shutil.rmtree(work / "rss", ignore_errors=True)
        peak, extra = child_peak_rss(code)
        return {
            "model_bytes": file_bytes, "lossless_bytes": stored, "lossless_fraction": stored / file_bytes,
            "zstd_bytes": zstd_bytes, "zstd_fraction": zstd_bytes / file_bytes,
            "commit_s": t_commit, "zstd_s": t_zstd,
            "commit_vs_zstd": t_commit["median"] / t_zstd["median"],
            "commit_peak_rss": peak, "commit_peak_rss_vs_model": peak / file_bytes,
            "rss_before_commit": extra["before"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_surgical_apply(paths: dict[str, Path], runs: int) -> dict:
    import torch
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    from deltastore import Store

    work = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    try:
        store = Store.init(work / "store")
        store.add_base(paths["base"], name="base")
        store.commit("surgical", paths["surgical"], base="base")
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
        # apply and revert alternate, so each apply starts from the base
        apply_s, revert_s = [], []
        for i in range(runs + 1):
            t0 = time.perf_counter()
            handle = store.apply(model, "surgical")
            t1 = time.perf_counter()
            handle.revert()
            t2 = time.perf_counter()
            if i:
                apply_s.append(t1 - t0)
                revert_s.append(t2 - t1)
        fine_tune = paths["adam"] / "model.safetensors"
        t_load = timed(lambda: load_model(model, fine_tune, strict=False), runs)

        def stats(xs):
            return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": len(xs)}
        t_apply, t_revert = stats(apply_s), stats(revert_s)
        store.close()
        return {"apply_s": t_apply, "revert_s": t_revert, "load_model_s": t_load,
                "apply_vs_load_model": t_apply["median"] / t_load["median"],
                "revert_vs_load_model": t_revert["median"] / t_load["median"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fmt_t(t: dict) -> str:
    return f"{t['median'] * 1000:.1f} ms ({t['min'] * 1000:.1f}-{t['max'] * 1000:.1f})"


def markdown(model: str, r: dict) -> str:
    c, a = r["commit"], r["apply"]
    rows = [
        ("lossless commit: bytes stored", f"{c['lossless_bytes'] / 1e6:.1f} MB ({c['lossless_fraction']:.3f} of the bf16 file)",
         f"zstd -3 -T2 of the file: {c['zstd_bytes'] / 1e6:.1f} MB ({c['zstd_fraction']:.3f})", "<= 0.17 of the file",
         c["lossless_fraction"] <= 0.17),
        ("lossless commit: time", fmt_t(c["commit_s"]), f"zstd -3 -T2: {fmt_t(c['zstd_s'])}",
         "<= 1.0x zstd", c["commit_vs_zstd"] <= 1.0),
        ("lossless commit: peak RSS", f"{c['commit_peak_rss'] / 1e6:.0f} MB ({c['commit_peak_rss_vs_model']:.2f}x the model; "
         f"{c['rss_before_commit'] / 1e6:.0f} MB before the commit)",
         f"model file: {c['model_bytes'] / 1e6:.0f} MB", "<= 1.25x the model", c["commit_peak_rss_vs_model"] <= 1.25),
        ("surgical apply (2 tensors)", fmt_t(a["apply_s"]), f"load_model of the full fine-tune: {fmt_t(a['load_model_s'])}",
         "<= 2% of load_model", a["apply_vs_load_model"] <= 0.02),
        ("surgical revert", fmt_t(a["revert_s"]), f"ratio {a['revert_vs_load_model']:.2%}", "<= 2% of load_model",
         a["revert_vs_load_model"] <= 0.02),
    ]
    lines = [f"Model `{model}`, {r['machine']}, {r['date']}.", "",
             "| figure | deltastore | peer (same run) | target | met |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {f} | {d} | {p} | {t} | {'yes' if ok else 'no'} |" for f, d, p, t, ok in rows]
    lines.append(f"\nRatios: commit/zstd {c['commit_vs_zstd']:.2f}x, apply/load_model {a['apply_vs_load_model']:.2%}, "
                 f"revert/load_model {a['revert_vs_load_model']:.2%}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen0.5b", choices=["tiny", "qwen0.5b"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    paths = build(args.model)
    result = {"model": args.model, "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "commit": bench_commit(paths, args.runs), "apply": bench_surgical_apply(paths, args.runs)}
    print(json.dumps(result, indent=2) if args.json else markdown(args.model, result))


if __name__ == "__main__":
    main()
