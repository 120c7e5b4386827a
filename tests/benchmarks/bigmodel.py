"""deltastore on big models, against the plain tools on the same files, measured in one run.

    python tests/benchmarks/bigmodel.py --model qwen1.5b|qwen7b|tiny|qwen0.5b [--runs N] [--json FILE] [--markdown]
        [--no-live]

The models are synthetic (models.py): random bf16 weights of the shape of Qwen2.5-1.5B (3.09 GB)
or Qwen2.5-7B (15.2 GB), written in shards as the Hub ships them, and an Adam-like fine-tune
that moves 28% of every tensor's elements by one unit in the last place; `tiny` and `qwen0.5b`
(about 1 GB) check the script. Every figure runs beside its peer in the same rounds
(measure.py), each round on fresh copies made outside the clock:
- `base add` (the library call, on an empty store) against blake3 of the base's weight files
  on all cores;
- `commit` of the fine-tune, lossless and int4 (each on a copy of a store holding only the
  base) against `zstd -3 -T2` of the fine-tune's weight files;
- in-place `apply` of the int4 and the lossless version (Store.apply_files, onto a synced copy
  of the base folder), `revert` of the lossless one, and `export` of the int4 version to a new
  folder, each against `cp -r` of the base folder followed by `sync` of the copy;
- where memory allows: a cold apply of each version onto a live module loaded with transformers
  in bf16 (a module this process has never checked), against transformers' from_pretrained of
  the fine-tune (peers.load_lm) and safetensors load_model of its shards into the module.
Then the peak RSS of each deltastore command (`base add`, `commit`, `apply`, `revert`,
`export`), one fresh process each, and the targets of issue 32 with their values.
The report is markdown on stdout; `--json FILE` writes the result to FILE instead (and
`--markdown` prints the report as well). Scratch copies go under $TMPDIR and are removed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from measure import Step, child_rss, rounds  # noqa: E402
from models import SHAPES, build_sharded  # noqa: E402
from run import COMMAND, REPO, fmt_t, med, phase, table  # noqa: E402

# Shards of at most this many bytes, as the Hub ships each model (tiny: three small ones).
SHARD_BYTES = {"tiny": 100_000, "qwen0.5b": 500_000_000, "qwen1.5b": 2_000_000_000, "qwen7b": 4_000_000_000}
# label -> the stance that holds the fine-tune in that encoding
VERSIONS = {"lossless": "adam", "int4": "adam-int4"}
CHUNK = 64 << 20
RSS_LIMIT = 0.75e9
# A live module, the bytes apply keeps so that revert is exact, and its buffers: about 2.5 models.
LIVE_MEMORY = 3.0


class Bench:
    """One model's folders, the stores made once per run, and a scratch folder that every
    step that writes a model folder (cp, apply, revert, export) starts from empty."""

    def __init__(self, name: str, work: Path, runs: int):
        self.name, self.work, self.runs = name, work, runs
        self.paths = build_sharded(name, SHARD_BYTES[name])
        self.base_files, self.tuned_files = (weight_files(self.paths[k]) for k in ("base", "adam"))
        self.model_bytes = sum(f.stat().st_size for f in self.tuned_files)
        self.empty = work / "empty"  # a store with nothing in it
        self.template = work / "template"  # ... with only the base added
        self.store = work / "store"  # ... and the fine-tune committed in each encoding of VERSIONS
        self.scratch = work / "scratch"

    def prepare(self) -> None:
        from deltastore import Store

        Store.init(self.empty).close()
        shutil.copytree(self.empty, self.template)
        with Store.open(self.template) as s:
            s.add_base(self.paths["base"], name="base")
        shutil.copytree(self.template, self.store)
        with Store.open(self.store) as s:
            for encoding, stance in VERSIONS.items():
                s.commit(stance, self.paths["adam"], base="base", encoding=encoding)

    def store_copy(self, template: Path) -> Path:
        """A fresh copy of a store (outside the clock)."""
        copy = self.work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(template, copy)
        return copy

    def opened_copy(self, template: Path):
        from deltastore import Store

        return Store.open(self.store_copy(template))

    def clear_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.sync()

    def base_copy(self) -> Path:
        """A fresh copy of the base folder in the scratch folder, written out to disk."""
        self.clear_scratch()
        copy_folder(self.paths["base"], self.scratch)
        return self.scratch

    def applied(self, encoding: str) -> Path:
        """A fresh copy of the base with `encoding`'s version applied in place, written out."""
        from deltastore import Store

        target = self.base_copy()
        with Store.open(self.store) as s:
            s.apply_files(VERSIONS[encoding], target)
        os.sync()
        return target

    def revert_scratch(self, _=None) -> None:
        from deltastore import Store

        with Store.open(self.store) as s:
            s.revert_files(self.scratch)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# -- the peers -----------------------------------------------------------------------------------


def blake3_files(files: list[Path]) -> list[bytes]:
    """blake3 of each file on all cores, read in large chunks."""
    import blake3

    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    digests = []
    for path in files:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                h.update(view[:n])
        digests.append(h.digest())
    return digests


def copy_folder(src: Path, dst: Path) -> None:
    """`cp -r` of a folder, then `sync` of the files copied: the bytes on disk."""
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *map(str, sorted(dst.iterdir()))], check=True)


def zstd_files(files: list[Path], out: Path) -> int:
    out.mkdir(exist_ok=True)
    return sum(peers.zstd_file(f, out / (f.name + ".zst")) for f in files)


# -- timings -------------------------------------------------------------------------------------


def file_steps(b: Bench) -> list[Step]:
    """Each deltastore operation on files, beside its peer. What a step writes is removed before
    the next one, so that the 7B's scratch holds one copy of the model at a time."""
    from deltastore import Store

    def add_base(store):
        with store:
            store.add_base(b.paths["base"], name="base")

    def commit(encoding: str):
        def run(store):
            with store:
                store.commit("bench", b.paths["adam"], base="base", encoding=encoding)
        return run

    def apply(encoding: str):
        def run(target):
            with Store.open(b.store) as s:
                s.apply_files(VERSIONS[encoding], target)
        return run

    def export(_):
        with Store.open(b.store) as s:
            s.export(VERSIONS["int4"], b.scratch)

    cp = Step("cp -r + sync", lambda _: copy_folder(b.paths["base"], b.scratch), setup=b.clear_scratch)
    return [
        Step("base add", add_base, setup=lambda: b.opened_copy(b.empty)),
        Step("blake3", lambda _: blake3_files(b.base_files)),
        *[Step(f"commit {e}", commit(e), setup=lambda: b.opened_copy(b.template)) for e in VERSIONS],
        Step("zstd -3 -T2", lambda _: zstd_files(b.tuned_files, b.work / "zstd"),
             teardown=lambda _: shutil.rmtree(b.work / "zstd")),
        cp,
        *[Step(f"apply {e}", apply(e), setup=b.base_copy, teardown=b.revert_scratch) for e in ("int4", "lossless")],
        Step("revert", lambda target: b.revert_scratch(), setup=lambda: b.applied("lossless")),
        Step("export int4", export, setup=b.clear_scratch, teardown=lambda _: b.clear_scratch()),
    ]


def live_steps(b: Bench, store) -> list[Step]:
    """Cold applies onto a live bf16 module, and loading the fine-tune the plain ways. Each apply
    gets a module loaded afresh outside the clock: nothing in the process has checked its
    tensors, so apply hashes the whole base, as it does the first time in a process."""
    import torch
    from safetensors.torch import load_model

    live = {}

    def fresh_base():
        live.clear()
        gc.collect()
        live["model"] = peers.load_lm(b.paths["base"], torch.bfloat16)

    def load_shards(_):
        for f in b.tuned_files:
            load_model(live["model"], f, strict=False)

    def from_pretrained(_):
        live["model"] = peers.load_lm(b.paths["adam"], torch.bfloat16)

    steps = [Step(f"cold apply {e}", lambda _, stance=stance: store.apply(live["model"], stance), setup=fresh_base,
                  teardown=lambda handle: handle.revert()) for e, stance in VERSIONS.items()]
    # load_model gets a module loaded afresh too: transformers maps the checkpoint, so the first
    # write to each page copies it, for the peer as for an apply.
    return steps + [Step("safetensors load_model", load_shards, setup=fresh_base),
                    Step("from_pretrained", from_pretrained, setup=lambda: (live.clear(), gc.collect()))]


def live_fits(b: Bench) -> bool:
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available >= LIVE_MEMORY * b.model_bytes


def bench_live(b: Bench) -> dict:
    from deltastore import Store

    with Store.open(b.store) as store:
        return rounds(live_steps(b, store), b.runs)


# -- peak memory ---------------------------------------------------------------------------------


def bench_rss(b: Bench) -> dict:
    """The peak RSS of each deltastore command (interpreter and imports included), one process
    each; every command gets its store copy or target folder made before it starts."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def peak(label: str, store: Path, *args: str) -> dict:
        cmd = [*COMMAND, "--store", str(store), *args]
        return child_rss({label: ("command", dict(cmd=cmd, env=env))})[label]

    out = {"base add": peak("base add", b.store_copy(b.empty), "base", "add", str(b.paths["base"]),
                            "--name", "base")}
    for e in VERSIONS:
        out[f"commit {e}"] = peak(e, b.store_copy(b.template), "commit", "bench", str(b.paths["adam"]),
                                  "--base", "base", "--encoding", e)
    for e in ("int4", "lossless"):
        out[f"apply {e}"] = peak(e, b.store, "apply", VERSIONS[e], str(b.base_copy()))
        b.revert_scratch()
    out["revert"] = peak("revert", b.store, "revert", str(b.applied("lossless")))
    b.clear_scratch()
    out["export int4"] = peak("export", b.store, "export", VERSIONS["int4"], "--out", str(b.scratch))
    b.clear_scratch()
    return out


# -- targets and report --------------------------------------------------------------------------

# (figure, its peer, the limit on the ratio of their medians)
RATIO_TARGETS = [
    ("base add", "blake3", 1.5),
    ("commit lossless", "zstd -3 -T2", 1.0),
    ("commit int4", "zstd -3 -T2", 1.25),
    ("apply int4", "cp -r + sync", 1.25),
    ("apply lossless", "cp -r + sync", 1.25),
    ("revert", "cp -r + sync", 0.75),
    ("export int4", "cp -r + sync", 1.5),
    ("cold apply int4", "from_pretrained", 3.0),
    ("cold apply lossless", "from_pretrained", 3.0),
    ("cold apply int4", "safetensors load_model", 3.0),
    ("cold apply lossless", "safetensors load_model", 3.0),
]
PEER_NAMES = {
    "blake3": "blake3 of the base's weight files, all cores",
    "zstd -3 -T2": "`zstd -3 -T2` of the fine-tune's weight files",
    "cp -r + sync": "`cp -r` of the base folder + `sync`",
    "from_pretrained": "transformers from_pretrained of the fine-tune, bf16 (peers.load_lm)",
    "safetensors load_model": "safetensors load_model of the fine-tune's shards into the module",
}


def targets(times: dict, rss: dict) -> list[dict]:
    rows = [{"target": f"{figure} / {peer}", "value": med(times[figure]) / med(times[peer]), "limit": limit}
            for figure, peer, limit in RATIO_TARGETS if figure in times]
    rows += [{"target": f"peak RSS of `deltastore {command}`, GB", "value": r["peak"] / 1e9, "limit": RSS_LIMIT / 1e9}
             for command, r in rss.items()]
    return [{**row, "met": row["value"] <= row["limit"]} for row in rows]


def report(r: dict) -> str:
    times, shape = r["times"], r["shape"]
    lines = [f"## `bigmodel.py --model {r['model']}`, {r['date']}", "",
             f"Model: {r['model_bytes'] / 1e9:.2f} GB bf16 in {r['shards']} shards (hidden {shape['hidden']}, "
             f"{shape['layers']} layers, MLP {shape['mlp']}, vocab {shape['vocab']}, "
             f"{'tied' if shape['tied'] else 'untied'} embeddings); fine-tune: 28% of the elements moved one ulp.",
             f"Machine: {r['machine']}; load average {r['load_start'][0]:.2f} at the start, "
             f"{r['load_end'][0]:.2f} at the end.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
             f"Times: median (min-max) of {r['runs']} round{'s' * (r['runs'] > 1)} after a warm-up round; "
             "each figure beside its peer "
             "in every round.", ""]
    rows = [[f"deltastore {figure}", fmt_t(times[figure]), PEER_NAMES[peer], fmt_t(times[peer]),
             f"{med(times[figure]) / med(times[peer]):.2f}x"] for figure, peer, _ in RATIO_TARGETS if figure in times]
    lines += table(["operation", "time", "peer (same rounds)", "peer's time", "ratio"], rows)
    if not r["live"]:
        lines += [f"Cold apply onto a live module: not measured ({r['live_skipped']}).", ""]
    lines += ["Peak RSS of each command (a fresh process each, interpreter and imports included):", ""]
    lines += table(["command", "peak RSS", "of the model"],
                   [[f"deltastore {k}", f"{v['peak'] / 1e6:.0f} MB", f"{v['peak'] / r['model_bytes']:.3f}x"]
                    for k, v in r["rss"].items()])
    lines += ["Targets (issue 32):", ""]
    lines += table(["target", "measured", "limit", "met"],
                   [[t["target"], f"{t['value']:.3f}", f"<= {t['limit']:g}", "yes" if t["met"] else "no"]
                    for t in r["targets"]])
    return "\n".join(lines)


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) * 1024
    return f"{cpu}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> dict:
    import deltastore

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    zstd = subprocess.run(["zstd", "--version"], capture_output=True, text=True) if shutil.which("zstd") else None
    out = {"deltastore": f"{deltastore.__version__} ({commit.stdout.strip() or 'no git'})",
           "Python": platform.python_version()}
    out.update({p: metadata.version(p) for p in ("torch", "transformers", "safetensors", "blake3")})
    found = re.search(r"v(\d[\d.]*)", zstd.stdout) if zstd else None
    out["zstd"] = found.group(1) if found else "the zstandard library"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen1.5b", choices=sorted(SHARD_BYTES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the result as JSON to FILE")
    parser.add_argument("--markdown", action="store_true", help="with --json: print the report too")
    parser.add_argument("--no-live", action="store_true", help="skip the cold applies onto a live module")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    shape = SHAPES[args.model]
    result = {"model": args.model, "date": datetime.now().isoformat(timespec="minutes"), "machine": machine(),
              "versions": versions(), "runs": args.runs, "load_start": os.getloadavg(),
              "shape": {k: getattr(shape, k) for k in shape.__dataclass_fields__}}
    with phase("build or find the model"):
        b = Bench(args.model, Path(tempfile.mkdtemp(prefix="ds-bigmodel-")), args.runs)
    result.update(model_bytes=b.model_bytes, shards=len(b.tuned_files))
    try:
        with phase("prepare the stores"):
            b.prepare()
        with phase("files: timings"):
            result["times"] = rounds(file_steps(b), b.runs)
        result["live"] = not args.no_live and live_fits(b)
        if result["live"]:
            with phase("live module: timings"):
                result["times"].update(bench_live(b))
        else:
            result["live_skipped"] = "--no-live" if args.no_live else \
                f"needs about {LIVE_MEMORY * b.model_bytes / 1e9:.0f} GB of free memory"
        with phase("peak RSS"):
            result["rss"] = bench_rss(b)
    finally:
        shutil.rmtree(b.work, ignore_errors=True)
    result["load_end"] = os.getloadavg()
    result["targets"] = targets(result["times"], result["rss"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.json or args.markdown:
        print(report(result))


if __name__ == "__main__":
    main()
