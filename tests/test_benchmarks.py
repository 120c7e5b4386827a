"""The benchmark script runs end to end on the tiny model and reports every figure (its
timings are not checked: they depend on the machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent / "benchmarks" / "run.py"

pytest.importorskip("peft")
pytest.importorskip("zipnn")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

TIMING = {"min", "median", "max", "runs"}


def _timing(t):
    assert TIMING <= set(t) and t["runs"] == 1 and 0 <= t["min"] <= t["median"] <= t["max"]


def test_tiny_run_reports_every_figure():
    out = subprocess.run([sys.executable, str(RUN), "--model", "tiny", "--runs", "1", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)

    store = r["store"]
    assert set(store["encodings"]) == {"lossless", "int8", "int4", "nf4", "1bit", "lowrank:32"}
    for e in store["encodings"].values():
        assert e["bytes"] > 0 and 0 < e["fraction"]
        _timing(e["commit_s"])
    assert set(store["peers"]) == {"save_file", "zstd", "zipnn", "peft_lora", "export_lora"}
    for p in store["peers"].values():
        assert p["bytes"] > 0
    for name in ("save_file", "zstd", "zipnn"):
        _timing(store["peers"][name]["s"])
    # The peer's bytes are those of the file itself (ZipNN rewrites the buffer it compresses).
    assert store["peers"]["zipnn"]["roundtrip"] is True

    switch = r["switch"]
    assert set(switch["apply"]) == set(switch["revert"]) == {"lossless", "int4", "surgical"}
    for t in [*switch["apply"].values(), *switch["revert"].values(), switch["load_model_fine_tune"],
              switch["load_model_base"], *switch["peft"].values()]:
        _timing(t)
    assert set(switch["peft"]) == {"load_adapter+set_adapter", "set_adapter", "hotswap_adapter",
                                   "disable_adapter", "unload"}
    # Switches between prepared stances, each step timed in the same rounds.
    assert len(switch["prepared"]) == 6
    assert set(switch["apply_base_checked"]) == {"lossless", "int4"}
    for t in [*switch["prepared"].values(), switch["apply_fresh_memory"]["int4"], *switch["apply_base_checked"].values()]:
        _timing(t)
    held = switch["prepared_bytes"]
    assert held["packed int4"] < held["full int4"] / 3 and held["full"] == held["full int4"]

    expected_rss = {"commit lossless", "commit int4", "safetensors save_file", "ZipNN compress",
                    "apply lossless", "apply int4", "apply surgical", "load_model fine-tune",
                    "peft load_adapter+set_adapter", "peft hotswap_adapter"}
    assert expected_rss <= set(r["rss"])
    for v in r["rss"].values():
        assert v["peak"] > 0 and v["peak"] >= v["start"]

    # Apply in place on files against cp of the same files, in the same rounds.
    inplace = r["inplace"]
    assert set(inplace["times"]) == {"cp", "cp + sync", "revert lossless (library)"} | {
        f"apply {k} ({how})" for k in ("lossless", "int4", "surgical") for how in ("library", "command")}
    for t in inplace["times"].values():
        _timing(t)
    assert set(inplace["rss"]) == {"cp", "deltastore apply lossless", "deltastore apply int4",
                                   "deltastore apply surgical"}
    # A whole command's peak: an interpreter with torch imported is far above cp's.
    assert all(v["peak"] > inplace["rss"]["cp"]["peak"] > 0 for k, v in inplace["rss"].items() if k != "cp")

    assert len(r["targets"]) == 22
    assert sum(t["issues"] == "17" for t in r["targets"]) == 11
    for t in r["targets"]:
        assert set(t) == {"issues", "target", "value", "limit", "met"} and isinstance(t["met"], bool)
    assert len(r["load_before"]) == len(r["load_after"]) == 3


def test_startup_benchmark_reports_both_commands_and_their_ratio():
    script = RUN.parent / "startup.py"
    out = subprocess.run([sys.executable, str(script), "--runs", "1", "--versions", "2", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for name in ("baseline", "log"):
        assert r[name]["wall_ms"] > 0 and r[name]["cpu_ms"] >= 0
    assert r["ratio_wall"] == round(r["log"]["wall_ms"] / r["baseline"]["wall_ms"], 2)
