"""One peak-RSS figure in a process of its own (run by measure.child_rss).

    python child.py FIGURE '{"arg": ...}'

Prints {"start": RSS when the operation began, "peak": its peak RSS} as one JSON line. The
setup (loading a model, opening a store) happens before the peak is reset. Nothing heavy is
imported at the top: the zstd figure's process stays a bare interpreter, whose size its child
inherits until it execs zstd.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import peak, reset_peak  # noqa: E402


def _measured(operation) -> dict:
    start = reset_peak()
    operation()
    # The kernel counts RSS per thread and adds it up lazily (a few pages' slack): an
    # operation that never grows past its start can read a peak a page below it.
    return {"start": start, "peak": max(peak(), start)}


def commit(store_template: str, store: str, fine_tune: str, encoding: str) -> dict:
    from deltastore import Store

    shutil.copytree(store_template, store)
    s = Store.open(store)
    return _measured(lambda: s.commit("bench", fine_tune, base="base", encoding=encoding))


def save_file(fine_tune: str, out: str) -> dict:
    from safetensors.torch import load_file, save_file

    state = load_file(Path(fine_tune) / "model.safetensors")
    return _measured(lambda: save_file(state, out, metadata={"format": "pt"}))


def zstd(cmd: list[str]) -> dict:
    subprocess.run(cmd, check=True)
    # The zstd process's own peak; it starts from nothing.
    return {"start": 0, "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def zipnn(src: str, dtype: str) -> dict:
    from peers import zipnn_compressor

    data = Path(src).read_bytes()
    compressor = zipnn_compressor(dtype)
    return _measured(lambda: compressor.compress(data))


def _model(base: str, fine_tune: str):
    from peers import load_lm, torch_dtype

    return load_lm(Path(base), torch_dtype(Path(fine_tune) / "model.safetensors"))


def apply(store: str, base: str, fine_tune: str, ref: str) -> dict:
    from deltastore import Store

    model, s = _model(base, fine_tune), Store.open(store)
    return _measured(lambda: s.apply(model, ref))


def load_model(base: str, fine_tune: str) -> dict:
    from safetensors.torch import load_model as load

    model = _model(base, fine_tune)
    return _measured(lambda: load(model, Path(fine_tune) / "model.safetensors", strict=False))


def _peft(base: str, fine_tune: str, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_model(base, fine_tune), adapter, adapter_name="default",
                                     autocast_adapter_dtype=False)


def peft_load(base: str, fine_tune: str, adapter: str) -> dict:
    model = _peft(base, fine_tune, adapter)

    def switch():
        model.load_adapter(adapter, adapter_name="other", autocast_adapter_dtype=False)
        model.set_adapter("other")
    return _measured(switch)


def peft_hotswap(base: str, fine_tune: str, adapter: str) -> dict:
    from peft.utils.hotswap import hotswap_adapter

    model = _peft(base, fine_tune, adapter)
    return _measured(lambda: hotswap_adapter(model, adapter, adapter_name="default"))


def command(cmd: list[str], env: dict | None = None, mkdir: str | None = None) -> dict:
    """A whole command's own peak (interpreter and imports included), as a user runs it."""
    if mkdir:
        Path(mkdir).mkdir(exist_ok=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return {"start": 0, "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


FIGURES = {f.__name__: f for f in (commit, save_file, zstd, zipnn, apply, load_model, peft_load, peft_hotswap,
                                   command)}
# Figures to run from a bare interpreter, not from measure's fork server.
BARE = {"zstd", "command"}


def run(figure: str, args: dict) -> dict:
    return FIGURES[figure](**args)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
