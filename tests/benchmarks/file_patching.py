"""In-place apply, revert and export on a sharded model's files, against `cp -r` + `sync` of
the base folder, in the same rounds of one process (a timing script, not a timed test):

    python tests/benchmarks/file_patching.py [--model qwen0.5b] [--rounds 2] [--store DIR]

The model is bigmodel.py's (models.build_sharded, built once under ~/.cache). A store holding
the base and the fine-tune committed lossless and int4 is made in --store (kept, and reused
when it is there already). Each round: cp -r + sync; then for int4 and lossless, a fresh synced
copy of the base, `apply_files` timed, a sync, `revert_files` timed; then `export` of the int4
version to a new folder. Prints each step's times, its best against cp's best, and the load
average (the machine may be shared)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bigmodel import SHARD_BYTES, VERSIONS  # noqa: E402
from models import build_sharded  # noqa: E402


def copy_folder(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *map(str, sorted(dst.iterdir()))], check=True)


def make_store(root: Path, paths: dict) -> None:
    from deltastore import Store

    Store.init(root).close()
    with Store.open(root) as s:
        s.add_base(paths["base"], name="base")
        for encoding, stance in VERSIONS.items():
            s.commit(stance, paths["adam"], base="base", encoding=encoding)


def main() -> None:
    from deltastore import Store

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen0.5b", choices=sorted(SHARD_BYTES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "deltastore-file-patching")
    args = ap.parse_args()
    paths = build_sharded(args.model, SHARD_BYTES[args.model])
    store = args.store / args.model
    if not (store / "catalog.db").exists():
        shutil.rmtree(store, ignore_errors=True)
        make_store(store, paths)
    scratch = args.store / "scratch"
    times: dict[str, list[float]] = {}

    def clear() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        os.sync()

    def timed(label: str, step) -> None:
        started = time.perf_counter()
        step()
        times.setdefault(label, []).append(time.perf_counter() - started)

    for _ in range(args.rounds):
        clear()
        timed("cp -r + sync", lambda: copy_folder(paths["base"], scratch))
        for encoding in ("int4", "lossless"):
            clear()
            copy_folder(paths["base"], scratch)
            with Store.open(store) as s:
                timed(f"apply {encoding}", lambda: s.apply_files(VERSIONS[encoding], scratch))
            os.sync()
            with Store.open(store) as s:
                timed(f"revert {encoding}", lambda: s.revert_files(scratch))
        clear()
        with Store.open(store) as s:
            timed("export int4", lambda: s.export(VERSIONS["int4"], scratch))
    clear()
    cp = min(times["cp -r + sync"])
    print(f"{args.model}, {args.rounds} rounds, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for label, runs in times.items():
        print(f"{label:16s} best {min(runs):6.2f} s  ({' '.join(f'{x:.2f}' for x in runs)})  {min(runs) / cp:5.2f}x cp")


if __name__ == "__main__":
    main()
