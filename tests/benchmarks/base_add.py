"""`base add` against blake3 of the same files, in one process, round after round (issue 32's
ratio); then a lossless commit against the registered (trusted) base, and with `verify=True`
where the code has it. Timings, not a test: run it with the tree to measure first on the path,

    PYTHONPATH=$PWD python tests/benchmarks/base_add.py [--model DIR] [--rounds 3] [--commit]

DIR holds `base/` and a fine-tune `adam/` (tests/benchmarks/bigmodel.py writes them under
~/.cache/deltastore/bench/<model>/shards-<bytes>/). Each figure comes with the load average
(1 min) when it was taken: the machine may be shared. The first `base add` of a process pays
for the imports it makes (torch, before issue 32); later rounds show the steady state."""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import blake3

DEFAULT = Path.home() / ".cache" / "deltastore" / "bench" / "qwen0.5b" / "shards-500000000"
CHUNK = 64 << 20


def blake3_files(files: list[Path]) -> None:
    """blake3 of each file on all cores, read in large chunks (bigmodel.py's baseline)."""
    for f in files:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        h.digest()


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commit", action="store_true", help="also time lossless commits against the base")
    args = ap.parse_args()
    from deltastore import Store

    base, ft = args.model / "base", args.model / "adam"
    files = sorted(base.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"{base}: {len(files)} files, {size / 1e9:.2f} GB; torch loaded: {'torch' in sys.modules}")
    can_verify = "verify" in inspect.signature(Store.add_base).parameters
    work = Path(tempfile.mkdtemp(prefix="base-add-bench-"))
    try:
        store = None
        for r in range(args.rounds):
            t_b3, _ = timed(lambda: blake3_files(files))
            lb = load()
            store = Store.init(work / f"store-{r}")
            t_add, b = timed(lambda: store.add_base(base))
            la = load()
            t_again, _ = timed(lambda: store.add_base(base))
            line = (f"round {r + 1}: blake3 {t_b3:.2f} s ({lb}); base add {t_add:.2f} s = {t_add / t_b3:.2f}x "
                    f"({la}); again {t_again:.3f} s = {t_again / t_b3:.3f}x")
            if can_verify:
                t_verify, _ = timed(lambda: store.add_base(base, verify=True))
                line += f"; again --verify {t_verify:.2f} s = {t_verify / t_b3:.2f}x"
            print(line + f" [{load()}]; torch loaded: {'torch' in sys.modules}", flush=True)
            if r + 1 < args.rounds:
                store.close()
        if args.commit:
            for r in range(args.rounds):
                t_c, res = timed(lambda: store.commit(f"s{r}", ft, base=b.id, allow_empty=True, new_stance=True))
                line = f"commit lossless {r + 1}: {t_c:.2f} s ({load()})"
                if can_verify:
                    t_v, _ = timed(lambda: store.commit(f"v{r}", ft, base=b.id, allow_empty=True, new_stance=True,
                                                        verify=True))
                    line += f"; with verify {t_v:.2f} s ({load()})"
                print(line, flush=True)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
