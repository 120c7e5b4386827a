"""deltastore against its alternatives, measured side by side in one run.

    python tests/benchmarks/run.py [--model tiny|smollm|qwen0.5b] [--runs 5] [--json] [--growth]

Absolute times drift on a shared machine, so every figure comes with its peers measured in the
same run, in the same rounds (measure.py): each timing is min/median/max over `--runs` rounds
after a warm-up round. Figures (the targets they are held to at the end):
- bytes stored: each encoding of the fine-tune against the full copy, `zstd -3` of it, ZipNN of
  it, and a rank-32 PEFT LoRA adapter of the same delta (all linear layers, the truncated SVD
  of each delta), plus what `deltastore export-lora --rank 32` writes (every changed tensor);
- time to store: commit per encoding against safetensors save_file of the full fine-tune,
  `zstd -3 -T2` of its file and ZipNN compress of its bytes;
- time to switch a loaded model to the stance: apply (lossless, int4, surgical) against
  load_model of the full fine-tune, PEFT load_adapter + set_adapter, set_adapter between two
  loaded adapters, and hotswap_adapter;
- time to switch back: revert against PEFT disable_adapter, unload, and load_model of the base;
- peak RSS of commit and apply against the same peers, one fresh process per figure;
- with --growth: commit and apply times at every model size (tiny, smollm, qwen0.5b) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from measure import Step, child_rss, rounds  # noqa: E402
from models import MODELS, build  # noqa: E402

ENCODINGS = ("lossless", "int8", "int4", "nf4", "1bit", "lowrank:32")
# stance name in the benchmark store -> (label, the fine-tune it stores, encoding)
STANCES = {"adam": ("lossless", "adam", "lossless"), "adam-int4": ("int4", "adam", "int4"),
           "surgical": ("surgical", "surgical", "lossless")}
# A second int4 stance of the whole model, for switching between two packed stances.
INT4_OTHER = "adam-int4-g128"
RANK = 32


class Bench:
    """One model's folders, a scratch folder, and the stores and adapters made once per run."""

    def __init__(self, name: str, work: Path, runs: int):
        self.name, self.work, self.runs = name, work, runs
        self.paths = build(name)
        self.base_file = self.paths["base"] / "model.safetensors"
        self.tuned_file = self.paths["adam"] / "model.safetensors"
        self.file_bytes = self.tuned_file.stat().st_size
        self.file_dtype = peers.file_dtype(self.tuned_file)
        self.dtype = peers.torch_dtype(self.tuned_file)
        self.template = work / "template"  # a store with only the base added
        self.store = work / "store"  # ... and the stances of STANCES committed
        self.adapter = work / "adapter"

    def prepare(self, stances=STANCES, adapter: bool = True, second_int4: bool = True) -> None:
        from deltastore import Store

        with Store.init(self.template) as s:
            s.add_base(self.paths["base"], name="base")
        shutil.copytree(self.template, self.store)
        with Store.open(self.store) as s:
            for stance, (_, which, encoding) in stances.items():
                s.commit(stance, self.paths[which], base="base", encoding=encoding)
            if second_int4:
                s.commit(INT4_OTHER, self.paths["adam"], base="base", encoding="int4",
                         encoding_options={"group_size": 128})
        if adapter:
            peers.lora_adapter(self.paths["base"], self.paths["adam"], self.adapter, RANK)

    def fresh_store(self):
        from deltastore import Store

        shutil.rmtree(self.work / "commit", ignore_errors=True)
        shutil.copytree(self.template, self.work / "commit")
        return Store.open(self.work / "commit")


# -- storing -----------------------------------------------------------------------------------


def bench_store(b: Bench, encodings=ENCODINGS, with_peers: bool = True) -> dict:
    stored: dict[str, int] = {}

    def commit_step(encoding: str) -> Step:
        def commit(store):
            with store:
                return store.commit("bench", b.paths["adam"], base="base", encoding=encoding)
        return Step(f"commit {encoding}", commit, setup=b.fresh_store,
                    teardown=lambda r: stored.__setitem__(encoding, r.bytes_stored))

    steps = [commit_step(e) for e in encodings]
    out: dict = {"full_copy_bytes": b.file_bytes, "full_copy_dtype": b.file_dtype}
    if with_peers:
        from safetensors.torch import load_file, save_file

        state = load_file(b.tuned_file)
        data = b.tuned_file.read_bytes()
        compressor = peers.zipnn_compressor(b.file_dtype)
        zipped = {}
        steps += [
            Step("safetensors save_file", lambda _: save_file(state, b.work / "copy.safetensors",
                                                              metadata={"format": "pt"})),
            Step("zstd -3 -T2", lambda _: peers.zstd_file(b.tuned_file, b.work / "ft.zst")),
            # ZipNN's compress rewrites the buffer it is given (even `bytes`): each round gets a
            # fresh copy of the file, made before the clock starts.
            Step("ZipNN compress", lambda copy: zipped.__setitem__("data", compressor.compress(copy)),
                 setup=lambda: bytearray(data)),
        ]
    times = rounds(steps, b.runs)
    out["encodings"] = {e: {"bytes": stored[e], "fraction": stored[e] / b.file_bytes,
                            "commit_s": times[f"commit {e}"]} for e in encodings}
    if with_peers:
        from deltastore import Store
        from deltastore.exports.lora import export_lora

        with Store.open(b.store) as s:
            exported = export_lora(s, "adam", b.work / "export-lora", rank=RANK)
        adapter_bytes = (b.adapter / "adapter_model.safetensors").stat().st_size
        zstd_bytes = (b.work / "ft.zst").stat().st_size
        out["peers"] = {
            "save_file": {"bytes": b.file_bytes, "s": times["safetensors save_file"]},
            "zstd": {"bytes": zstd_bytes, "s": times["zstd -3 -T2"]},
            "zipnn": {"bytes": len(zipped["data"]), "s": times["ZipNN compress"],
                      "roundtrip": peers.zipnn_roundtrips(data, zipped["data"], b.file_dtype)},
            "peft_lora": {"bytes": adapter_bytes, "rank": RANK},
            "export_lora": {"bytes": exported.bytes, "rank": RANK, "energy_kept": exported.energy_kept},
        }
        for p in out["peers"].values():
            p["fraction"] = p["bytes"] / b.file_bytes
        del state, data
    return out


# -- switching -----------------------------------------------------------------------------------


def bench_switch(b: Bench, stances=STANCES, with_peft: bool = True, with_prepared: bool = True,
                 device: str = "cpu") -> dict:
    """Cold applies (nothing of the module checked before in the process: each one hashes the
    base), their reverts, switches between prepared stances, and the peers, in the same rounds.
    `device`: where the model lives ("cuda": load_model loads onto it, no PEFT peers)."""
    import torch
    from safetensors.torch import load_model as load_into

    from deltastore import Store
    from deltastore.core import checked, spare

    def load_model(model, file, strict):
        load_into(model, file, strict=strict, device=device)

    model = peers.load_lm(b.paths["base"], b.dtype).to(device)
    store = Store.open(b.store)
    handles = {}
    steps = []
    for stance, (label, _, _) in stances.items():
        steps += [Step(f"apply {label}", lambda _, s=stance: handles.__setitem__(s, store.apply(model, s)),
                       setup=checked.forget_all),
                  Step(f"revert {label}", lambda _, s=stance: handles[s].revert())]
    for stance in ("adam", "adam-int4"):
        if stance in stances:
            # A user switching back and forth: the base was hashed by an earlier apply in this
            # process (the setup's), and a revert leaves it known (checked.py), so only the
            # objects and lossy results are hashed.
            steps += [Step(f"apply {stances[stance][0]}, base checked before", lambda _, s=stance: store.apply(model, s),
                           setup=lambda s=stance: store.apply(model, s).revert(), teardown=lambda h: h.revert())]
    if "adam-int4" in stances:
        # The first apply in a process writes fresh memory: no revert has given buffers back yet.
        steps += [Step("apply int4, fresh memory", lambda _: store.apply(model, "adam-int4"),
                       setup=lambda: (checked.forget_all(), spare.release()), teardown=lambda h: h.revert())]
    prepared = {}
    if with_prepared:
        prepared = {"full": store.prepare("adam", device=device), "full int4": store.prepare("adam-int4", device=device),
                    "packed int4": store.prepare("adam-int4", mode="packed", device=device),
                    "packed int4 g128": store.prepare(INT4_OTHER, mode="packed", device=device)}
        steps += _prepared_steps(store, model, prepared)
    steps += [Step("load_model fine-tune", lambda _: load_model(model, b.tuned_file, strict=False)),
              Step("load_model base", lambda _: load_model(model, b.base_file, strict=False))]
    if with_peft:
        steps += _peft_steps(b)
    if device != "cpu":
        # A GPU's copies and kernels run after the call returns: each step ends when they do.
        steps = [dataclasses.replace(s, fn=lambda arg, fn=s.fn: (fn(arg), torch.cuda.synchronize())[0])
                 for s in steps]
    times = rounds(steps, b.runs)
    store.close()
    out = {"apply": {}, "revert": {}}
    for label, _, _ in stances.values():
        out["apply"][label], out["revert"][label] = times[f"apply {label}"], times[f"revert {label}"]
    out["apply_base_checked"] = {label: times[f"apply {label}, base checked before"] for label in ("lossless", "int4")
                                 if f"apply {label}, base checked before" in times}
    if "adam-int4" in stances:
        out["apply_fresh_memory"] = {"int4": times["apply int4, fresh memory"]}
    if with_prepared:
        out["prepared"] = {label: times[label] for label in PREPARED_STEPS}
        out["prepared_bytes"] = {mode: p.nbytes for mode, p in prepared.items()}
    out["load_model_fine_tune"], out["load_model_base"] = times["load_model fine-tune"], times["load_model base"]
    if with_peft:
        out["peft"] = {k: times[f"peft {k}"] for k in ("load_adapter+set_adapter", "set_adapter", "hotswap_adapter",
                                                        "disable_adapter", "unload")}
    return out


PREPARED_STEPS = ("first switch (checks the base, keeps its bytes)", "switch full: lossless -> int4",
                  "switch full: int4 -> lossless", "switch full -> packed int4", "switch packed int4 -> int4 g128",
                  "revert of a prepared switch")


def _prepared_steps(store, model, p: dict) -> list[Step]:
    """Switches between prepared stances, from the base and back to it each round.
    Every other step leaves the module at its base; the first switch of a round checks it."""
    targets = [p["full"], p["full int4"], p["full"], p["packed int4"], p["packed int4 g128"]]
    steps = [Step(label, lambda _, t=t: store.switch(model, t)) for label, t in zip(PREPARED_STEPS, targets)]
    return steps + [Step(PREPARED_STEPS[-1], lambda _: store.revert(model))]


def _peft_steps(b: Bench) -> list[Step]:
    """PEFT on its own copies of the base: one wrapped model with the adapter loaded twice
    ("default", "other"), and one that each round wraps and then unloads."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    def wrap(model):
        return PeftModel.from_pretrained(model, b.adapter, adapter_name="default", autocast_adapter_dtype=False)

    pm = wrap(peers.load_lm(b.paths["base"], b.dtype))
    pm.load_adapter(b.adapter, adapter_name="other", autocast_adapter_dtype=False)
    pm.set_adapter("default")
    plain = peers.load_lm(b.paths["base"], b.dtype)

    def load_and_set(_):
        pm.load_adapter(b.adapter, adapter_name="new", autocast_adapter_dtype=False)
        pm.set_adapter("new")

    def drop_new(_):
        pm.set_adapter("default")
        pm.delete_adapter("new")

    def enter(context):
        context.__enter__()
        return context

    return [
        Step("peft load_adapter+set_adapter", load_and_set, teardown=drop_new),
        Step("peft set_adapter", lambda _: pm.set_adapter("other"), teardown=lambda _: pm.set_adapter("default")),
        Step("peft hotswap_adapter", lambda _: hotswap_adapter(pm, b.adapter, adapter_name="default")),
        Step("peft disable_adapter", enter, setup=pm.disable_adapter, teardown=lambda cm: cm.__exit__(None, None, None)),
        Step("peft unload", lambda wrapped: wrapped.unload(), setup=lambda: wrap(plain)),
    ]


# -- in place on files ---------------------------------------------------------------------------

REPO = HERE.parents[1]
# The command, as a user runs it: a fresh interpreter (this repository's code), its imports included.
COMMAND = [sys.executable, "-c", "from cli.main import main; main()"]
INPLACE = {"lossless": "adam", "int4": "adam-int4", "surgical": "surgical"}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def bench_inplace(b: Bench) -> dict:
    """`deltastore apply STANCE FOLDER` in place: the library call and the whole
    command, with `cp` of the same weight files (and `cp` followed by `sync` of the copies, as
    apply makes its writes durable) in the same rounds; each round patches a fresh copy of the
    base, made and reverted outside the clock; then peak RSS, one fresh process per figure."""
    import subprocess

    from deltastore import Store

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    target, copies = b.work / "target", b.work / "cp"
    files = [str(f) for f in _weight_files(b.paths["base"])]

    def fresh_target():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(b.paths["base"], target)
        shutil.rmtree(copies, ignore_errors=True)
        copies.mkdir()
        # The copy's dirty pages written out before the clock starts: left in the page cache,
        # their writeback stalled whichever step came next (cp took 0.18 to 1.2 s).
        os.sync()

    def cp(sync: bool):
        subprocess.run(["cp", *files, str(copies)], check=True)
        if sync:
            subprocess.run(["sync", *[str(copies / Path(f).name) for f in files]], check=True)

    def revert(_):
        with Store.open(b.store) as s:
            s.revert_files(target)

    def apply_library(stance: str):
        def run(_):
            with Store.open(b.store) as s:
                s.apply_files(stance, target)
        return run

    def apply_command(stance: str):
        def run(_):
            subprocess.run([*COMMAND, "--store", str(b.store), "apply", stance, str(target)], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        return run

    steps = [Step("cp", lambda _: cp(False), setup=fresh_target), Step("cp + sync", lambda _: cp(True), setup=fresh_target)]
    for label, stance in INPLACE.items():
        steps += [Step(f"apply {label} (library)", apply_library(stance), setup=fresh_target, teardown=revert),
                  Step(f"apply {label} (command)", apply_command(stance), setup=fresh_target, teardown=revert)]
    steps += [Step("revert lossless (library)", revert,
                   setup=lambda: (fresh_target(), apply_library("adam")(None), os.sync()))]
    times = rounds(steps, b.runs)
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(copies, ignore_errors=True)
    out = {"times": times, "files_bytes": sum(Path(f).stat().st_size for f in files)}
    # Peak RSS of each whole command, from a process that runs only it (RUSAGE_CHILDREN).
    copied = str(b.work / "inplace-rss-cp")
    figures = {"cp": ("command", dict(cmd=["cp", *files, copied], mkdir=copied))}
    for label, stance in INPLACE.items():
        folder = b.work / f"inplace-rss-{label}"
        shutil.copytree(b.paths["base"], folder)
        figures[f"deltastore apply {label}"] = ("command", dict(
            cmd=[*COMMAND, "--store", str(b.store), "apply", stance, str(folder)], env=env))
    out["rss"] = child_rss(figures, jobs=1)
    with Store.open(b.store) as s:
        for label in INPLACE:
            s.revert_files(b.work / f"inplace-rss-{label}")
            shutil.rmtree(b.work / f"inplace-rss-{label}")
    return out


def inplace_targets(ip: dict, model_bytes: int) -> list[dict]:
    t, rss = ip["times"], ip["rss"]
    cp = med(t["cp"])
    rows = []
    for label in ("lossless", "int4"):
        rows += [("17", f"apply {label} in place, library call / cp", med(t[f"apply {label} (library)"]) / cp, 3.0),
                 ("17", f"apply {label} in place, the command / cp", med(t[f"apply {label} (command)"]) / cp, 3.0),
                 ("17", f"apply {label} in place, the command's peak RSS / model",
                  rss[f"deltastore apply {label}"]["peak"] / model_bytes, 1.25)]
    return [{"issues": i, "target": x, "value": v, "limit": lim, "met": v <= lim} for i, x, v, lim in rows]


def inplace_markdown(ip: dict, model_bytes: int) -> list[str]:
    t, cp, synced = ip["times"], med(ip["times"]["cp"]), med(ip["times"]["cp + sync"])
    lines = [f"**Applying a stance to model files in place** (weight files {mb(ip['files_bytes'])}; each round a "
             "fresh copy of the base, reverted after). A durable in-place write of every byte writes and syncs "
             "the bytes twice, its journal of the originals before the files: about two `cp + sync`", ""]
    rows = [[k, fmt_t(v), f"{med(v) / cp:.2f}x", f"{med(v) / synced:.2f}x"] for k, v in t.items()]
    lines += table(["operation", "time", "of cp", "of cp + sync"], rows)
    rows = [[k, f"{v['peak'] / 1e6:.0f} MB", f"{v['peak'] / model_bytes:.2f}x"] for k, v in ip["rss"].items()]
    lines += ["Peak RSS of each whole command (interpreter and imports included):", ""]
    return lines + table(["command", "peak RSS", "of the model file"], rows)


# -- peak memory ---------------------------------------------------------------------------------


def bench_rss(b: Bench) -> dict:
    base, tuned = str(b.paths["base"]), str(b.paths["adam"])
    zstd = peers.zstd_command(b.tuned_file, b.work / "rss.zst")
    figures = {
        "commit lossless": ("commit", dict(store_template=str(b.template), store=str(b.work / "rss-lossless"),
                                           fine_tune=tuned, encoding="lossless")),
        "commit int4": ("commit", dict(store_template=str(b.template), store=str(b.work / "rss-int4"),
                                       fine_tune=tuned, encoding="int4")),
        "safetensors save_file": ("save_file", dict(fine_tune=tuned, out=str(b.work / "rss.safetensors"))),
        **({"zstd -3 -T2": ("zstd", dict(cmd=zstd))} if zstd else {}),
        "ZipNN compress": ("zipnn", dict(src=str(b.tuned_file), dtype=b.file_dtype)),
        "apply lossless": ("apply", dict(store=str(b.store), base=base, fine_tune=tuned, ref="adam")),
        "apply int4": ("apply", dict(store=str(b.store), base=base, fine_tune=tuned, ref="adam-int4")),
        "apply surgical": ("apply", dict(store=str(b.store), base=base, fine_tune=tuned, ref="surgical")),
        "load_model fine-tune": ("load_model", dict(base=base, fine_tune=tuned)),
        "peft load_adapter+set_adapter": ("peft_load", dict(base=base, fine_tune=tuned, adapter=str(b.adapter))),
        "peft hotswap_adapter": ("peft_hotswap", dict(base=base, fine_tune=tuned, adapter=str(b.adapter))),
    }
    # Each figure has a process to itself, so they may run side by side: a peak is the process's
    # own. Two at a time for models of a GB or so, to leave memory for everyone else.
    return child_rss(figures, jobs=4 if b.file_bytes < 300e6 else 2)


# -- growth --------------------------------------------------------------------------------------


def bench_growth(runs: int, work: Path) -> dict:
    """Commit and apply (lossless, int4) at each model size, with load_model for scale."""
    out = {}
    stances = {k: v for k, v in STANCES.items() if k != "surgical"}
    for name in MODELS:
        b = Bench(name, work / name, runs)
        b.work.mkdir()
        b.prepare(stances, adapter=False, second_int4=False)
        store = bench_store(b, ("lossless", "int4"), with_peers=False)
        switch = bench_switch(b, stances, with_peft=False, with_prepared=False)
        out[name] = {"model_bytes": b.file_bytes, "dtype": b.file_dtype,
                     "commit": {e: r["commit_s"] for e, r in store["encodings"].items()},
                     "apply": switch["apply"], "revert": switch["revert"],
                     "load_model": switch["load_model_fine_tune"]}
        shutil.rmtree(b.work, ignore_errors=True)
    return out


# -- targets and report --------------------------------------------------------------------------


def med(t: dict) -> float:
    return t["median"]


def targets(r: dict) -> list[dict]:
    """Each target (numbered by the issue that set it): the measured ratio, the limit, and whether it is met."""
    enc, p = r["store"]["encodings"], r["store"]["peers"]
    sw, rss = r["switch"], r["rss"]
    load = med(sw["load_model_fine_tune"])
    rows = [
        ("2, 8", "lossless stored / full copy", enc["lossless"]["fraction"], 0.17),
        ("2, 8", "lossless commit time / zstd -3 -T2", med(enc["lossless"]["commit_s"]) / med(p["zstd"]["s"]), 1.0),
        ("2", "lossless commit peak RSS / model file", rss["commit lossless"]["peak"] / r["store"]["full_copy_bytes"], 1.25),
        ("2, 8", "surgical apply / load_model of the fine-tune", med(sw["apply"]["surgical"]) / load, 0.02),
        ("2, 8", "surgical revert / load_model of the fine-tune", med(sw["revert"]["surgical"]) / load, 0.02),
        ("3, 8", "int4 stored / full copy", enc["int4"]["fraction"], 0.30),
        ("8", "int4 stored / ZipNN of the full copy", enc["int4"]["bytes"] / p["zipnn"]["bytes"], 1.0),
        ("3", "int4 apply / load_model of the fine-tune", med(sw["apply"]["int4"]) / load, 1.5),
        ("8", "int4 apply / load_model of the fine-tune", med(sw["apply"]["int4"]) / load, 1.0),
        ("8", "int4 apply / PEFT hotswap_adapter (rank 32)", med(sw["apply"]["int4"]) / med(sw["peft"]["hotswap_adapter"]), 1.0),
        ("3", "int8 stored / full copy", enc["int8"]["fraction"], 0.55),
    ]
    # "less than ZipNN" is strict; the other limits are "at most"
    return [{"issues": i, "target": t, "value": v, "limit": lim,
             "met": v < lim if "ZipNN" in t else v <= lim} for i, t, v, lim in rows] + switch_targets(sw)


def switch_targets(sw: dict) -> list[dict]:
    """The prepared-switch targets, from the switching figures alone (`--only switch` has no others)."""
    load = med(sw["load_model_fine_tune"])
    pr = sw["prepared"]
    full = max(med(pr["switch full: lossless -> int4"]), med(pr["switch full: int4 -> lossless"]))
    surgical = med(sw["apply"]["surgical"])
    rows = [
        ("17", "switch between prepared stances, full / load_model of the fine-tune", full / load, 1.0),
        ("17", "switch between prepared stances, packed int4 / load_model",
         med(pr["switch packed int4 -> int4 g128"]) / load, 3.0),
        ("17", "cold apply int4 / load_model", med(sw["apply"]["int4"]) / load, 3.0),
        ("17", "cold apply lossless / load_model", med(sw["apply"]["lossless"]) / load, 3.0),
    ]
    out = [{"issues": i, "target": t, "value": v, "limit": lim, "met": v <= lim} for i, t, v, lim in rows]
    out.append({"issues": "17", "target": "surgical cold apply / load_model (or under 1 ms)", "value": surgical / load,
                "limit": 0.02, "met": surgical / load <= 0.02 or surgical < 0.001})
    return out


def fmt_t(t: dict) -> str:
    def ms(x):
        return f"{x * 1000:.0f}" if x >= 1 else f"{x * 1000:.1f}" if x >= 0.001 else f"{x * 1000:.3f}"
    return f"{ms(t['median'])} ms ({ms(t['min'])}-{ms(t['max'])})"


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def markdown(r: dict) -> str:
    size = f"{r['dtype']} full copy, {mb(r['model_bytes'])}"
    lines = [f"Model `{r['model']}` ({size}), {r['machine']}, {r['date']}; load average {r['load_before'][0]:.1f} "
             f"before and {r['load_after'][0]:.1f} after; times are median (min-max) of {r['runs']} rounds after "
             "a warm-up.", ""]
    if "store" in r:
        lines += store_markdown(r["store"])
    if "switch" in r:
        lines += switch_markdown(r["switch"], r.get("store"), r["model_bytes"])
    if "inplace" in r:
        lines += inplace_markdown(r["inplace"], r["model_bytes"])
    if "rss" in r:
        lines += ["**Peak RSS** (a fresh process per figure; the RSS it started from, after loading the model "
                  "or opening the store, in brackets)", ""]
        rows = [[k, f"{v['peak'] / 1e6:.0f} MB", f"{v['start'] / 1e6:.0f} MB",
                 f"{v['peak'] / r['model_bytes']:.2f}x"] for k, v in r["rss"].items()]
        lines += table(["operation", "peak RSS", "at start", "of the model file"], rows)

    lines += ["**Targets** (issues 2, 3, 8, 17; set for `qwen0.5b`, a bf16 fine-tune)", ""]
    rows = [[t["issues"], t["target"], f"{t['value']:.3f}", ("< " if "ZipNN" in t["target"] else "<= ") + f"{t['limit']:g}",
             "yes" if t["met"] else "no"] for t in r["targets"]]
    lines += table(["issue", "target", "measured", "limit", "met"], rows)
    if r.get("growth"):
        lines += growth_markdown(r["growth"])
    return "\n".join(lines)


def store_markdown(st: dict) -> list[str]:
    enc, p = st["encodings"], st["peers"]
    zstd = med(p["zstd"]["s"])
    lines = ["**Bytes stored and time to store**", ""]
    rows = [[f"deltastore commit `{e}`", mb(x["bytes"]), f"{x['fraction']:.3f}", fmt_t(x["commit_s"]),
             f"{med(x['commit_s']) / zstd:.2f}x"] for e, x in enc.items()]
    zipnn_note = "" if p["zipnn"]["roundtrip"] else " (its round trip gave other bytes)"
    rows += [[f"full copy (safetensors save_file)", mb(st["full_copy_bytes"]), "1.000", fmt_t(p["save_file"]["s"]),
              f"{med(p['save_file']['s']) / zstd:.2f}x"],
             ["`zstd -3 -T2` of the full copy", mb(p["zstd"]["bytes"]), f"{p['zstd']['fraction']:.3f}",
              fmt_t(p["zstd"]["s"]), "1.00x"],
             [f"ZipNN of the full copy{zipnn_note}", mb(p["zipnn"]["bytes"]), f"{p['zipnn']['fraction']:.3f}",
              fmt_t(p["zipnn"]["s"]), f"{med(p['zipnn']['s']) / zstd:.2f}x"],
             [f"PEFT LoRA adapter, rank {RANK}, all linear layers", mb(p["peft_lora"]["bytes"]),
              f"{p['peft_lora']['fraction']:.3f}", "", ""],
             [f"`deltastore export-lora --rank {RANK}` (every changed tensor)", mb(p["export_lora"]["bytes"]),
              f"{p['export_lora']['fraction']:.3f}", "", ""]]
    return table(["stored as", "bytes", "of the full copy", "time to store", "vs zstd"], rows)


def switch_markdown(sw: dict, st: dict | None, model_bytes: int) -> list[str]:
    load = med(sw["load_model_fine_tune"])
    lines = ["**Switching a loaded model to the stance, and back**", ""]
    rows = [[f"deltastore apply `{k}` (cold: hashes the base)", fmt_t(t), f"{med(t) / load:.2%}"]
            for k, t in sw["apply"].items()]
    rows += [[f"deltastore apply `{k}`, first in the process (fresh memory)", fmt_t(t), f"{med(t) / load:.2%}"]
             for k, t in sw.get("apply_fresh_memory", {}).items()]
    rows += [[f"deltastore apply `{k}`, base checked before in the process", fmt_t(t), f"{med(t) / load:.2%}"]
             for k, t in sw.get("apply_base_checked", {}).items()]
    rows += [[f"prepared: {k}", fmt_t(t), f"{med(t) / load:.2%}"] for k, t in sw.get("prepared", {}).items()]
    rows += [["load_model of the full fine-tune", fmt_t(sw["load_model_fine_tune"]), "100.00%"]]
    rows += [[f"PEFT {k}", fmt_t(t), f"{med(t) / load:.2%}"] for k, t in sw.get("peft", {}).items()
             if k in ("load_adapter+set_adapter", "set_adapter", "hotswap_adapter")]
    rows += [[f"deltastore revert `{k}`", fmt_t(t), f"{med(t) / load:.2%}"] for k, t in sw["revert"].items()]
    rows += [["load_model of the base", fmt_t(sw["load_model_base"]), f"{med(sw['load_model_base']) / load:.2%}"]]
    rows += [[f"PEFT {k}", fmt_t(t), f"{med(t) / load:.2%}"] for k, t in sw.get("peft", {}).items()
             if k in ("disable_adapter", "unload")]
    lines += table(["switch", "time", "of load_model"], rows)
    adapter = f" ({mb(st['peers']['peft_lora']['bytes'])})" if st else ""
    if "peft" in sw:
        lines.append("PEFT's set_adapter switches between two adapters already in memory; load_adapter reads one "
                     f"from disk. The adapter is a rank-{RANK} one on all linear layers{adapter}.")
    if "prepared_bytes" in sw:
        held = ", ".join(f"{k} {mb(v)} ({v / model_bytes:.2f}x)" for k, v in sw["prepared_bytes"].items())
        lines.append(f"Memory a prepared stance holds (of the model file): {held}; the first switch also keeps "
                     "the base bytes of every tensor it touches, until revert.")
    return lines + [""]


def growth_markdown(g: dict) -> list[str]:
    lines = ["**Growth** (seconds per GB of the model file and per billion elements: flat means "
             "linear in what a delta touches)", ""]
    rows = []
    for name, x in g.items():
        gb = x["model_bytes"] / 1e9
        giga_elements = x["model_bytes"] / ITEMSIZE.get(x["dtype"], 2) / 1e9
        for what, t in [("commit lossless", x["commit"]["lossless"]), ("commit int4", x["commit"]["int4"]),
                        ("apply lossless", x["apply"]["lossless"]), ("apply int4", x["apply"]["int4"]),
                        ("load_model", x["load_model"])]:
            rows.append([name, f"{mb(x['model_bytes'])} {x['dtype']}", what, fmt_t(t), f"{med(t) / gb:.2f}",
                         f"{med(t) / giga_elements:.2f}"])
    return lines + table(["model", "file", "operation", "time", "s per GB", "s per G elements"], rows)


ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


@contextmanager
def phase(what: str):
    """Say on stderr how long each part of the run took."""
    t0 = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - t0:.1f} s (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen0.5b", choices=MODELS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--growth", action="store_true", help="commit and apply times at every model size only")
    parser.add_argument("--only", choices=("switch", "inplace"),
                        help="only the switching figures, or only apply in place on files (and their targets)")
    parser.add_argument("--device", default="cpu",
                        help="with --only switch: the device the model lives on (cuda: no PEFT peers)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.device != "cpu" and args.only != "switch":
        parser.error("--device needs --only switch")
    result = {"model": args.model, "date": date.today().isoformat(), "runs": args.runs,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "load_before": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    try:
        if args.growth:
            result["growth"] = bench_growth(args.runs, work)
        else:
            b = Bench(args.model, work, args.runs)
            with phase("prepare: stores, adapter"):
                if args.only == "inplace":
                    b.prepare({k: v for k, v in STANCES.items()}, adapter=False, second_int4=False)
                else:
                    b.prepare(adapter=args.device == "cpu")
            result["model_bytes"], result["dtype"] = b.file_bytes, b.file_dtype
            if args.only in (None, "inplace"):
                with phase("in place on files"):
                    result["inplace"] = bench_inplace(b)
            if args.only is None:
                with phase("time to store"):
                    result["store"] = bench_store(b)
            if args.only in (None, "switch"):
                with phase("time to switch"):
                    result["switch"] = bench_switch(b, with_peft=args.device == "cpu", device=args.device)
                if args.device != "cpu":
                    import torch
                    result["machine"] += f", the model on {torch.cuda.get_device_name(args.device)}"
            if args.only is None:
                with phase("peak RSS"):
                    result["rss"] = bench_rss(b)
            result["targets"] = targets(result) if args.only is None else switch_targets(result["switch"]) \
                if args.only == "switch" else []
            if "inplace" in result:
                result["targets"] += inplace_targets(result["inplace"], b.file_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.growth:
        print(f"{result['machine']}, {result['date']}; load average {result['load_before'][0]:.1f} before and "
              f"{result['load_after'][0]:.1f} after; median (min-max) of {args.runs} rounds after a warm-up.\n")
        print("\n".join(growth_markdown(result["growth"])))
    else:
        print(markdown(result))


if __name__ == "__main__":
    main()
