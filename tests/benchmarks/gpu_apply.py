"""Where a cold apply onto a module on a GPU spends its time, for a machine that has one.

    python tests/benchmarks/gpu_apply.py [cuda|cpu] [qwen0.5b|tiny]

Copies of every parameter to the host through ordinary and page-locked memory and back, blake3
of them all, a surgical apply checked against the fine-tune's bytes, then cold applies
(checked.forget_all() before each) of the lossless and int4 stances with entries decoded on
the device or on the CPU, and two workers or eight, each split into apply's prepare and
install; last, load_model of the fine-tune onto the device. Medians of 3. It replaces
apply's and ondevice's functions in this process to time and steer them: a probe, not a test.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import run as bench
import peers
from deltastore import Store
from deltastore.codecs import ondevice
from deltastore.core import checked
import deltastore.patching.apply as A

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
name = sys.argv[2] if len(sys.argv) > 2 else "qwen0.5b"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
work = Path(tempfile.mkdtemp())
b = bench.Bench(name, work, 3)
t = time.perf_counter(); b.prepare(stances=bench.STANCES, adapter=False, second_int4=False)
print(f"prepare {time.perf_counter() - t:.1f} s", flush=True)
model = peers.load_lm(b.paths["base"], b.dtype).to(dev)
params = [p.detach() for p in model.parameters()]
nbytes = sum(p.numel() * p.element_size() for p in params)

def timed(label, fn, n=3):
    ts = []
    for _ in range(n):
        sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    print(f"{label}: {statistics.median(ts) * 1e3:.1f} ms (min {min(ts) * 1e3:.1f})", flush=True)

timed("D2H pageable, all params", lambda: [p.to("cpu") for p in params])
if dev == "cuda":
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]
    timed("D2H into pinned", lambda: [q.copy_(p) for q, p in zip(pinned, params)])
    cpu = [p.cpu() for p in params]
    timed("H2D pageable", lambda: [c.to(dev) for c in cpu])
    timed("H2D pinned", lambda: [c.to(dev, non_blocking=True) for c in pinned])
from deltastore.core.hashing import tensor_id
cpu = [p.cpu() for p in params]
timed("blake3 of every param, one thread at a time", lambda: [tensor_id(c) for c in cpu])
store = Store.open(b.store)
# A surgical apply on the GPU (its checks shared with a pool thread) gives the fine-tune's bytes.
from safetensors.torch import load_file
want = load_file(b.paths["surgical"] / "model.safetensors")
checked.forget_all()
h = store.apply(model, "surgical")
state = model.state_dict()
bad = [n for n in h.names if not torch.equal(state[n].cpu().view(torch.uint8), want[n].view(torch.uint8))]
print(f"surgical on {dev}: {len(h.names)} tensors, {len(bad)} differ from the fine-tune", flush=True)
h.revert()
phases = {}
real_prepare, real_install = A.prepare, A.install
def prep(*a, **k):
    t0 = time.perf_counter(); r = real_prepare(*a, **k); sync(); phases["prepare"] = time.perf_counter() - t0; return r
def inst(*a, **k):
    t0 = time.perf_counter(); r = real_install(*a, **k); sync(); phases["install"] = time.perf_counter() - t0; return r
A.prepare, A.install = prep, inst
real_decodes, real_cores = ondevice.decodes, A.cores
for ref in ("adam", "adam-int4"):
    for on_device in (True, False):
        for workers in (2, 8):
            ondevice.decodes = real_decodes if on_device else (lambda e, b: False)
            A.cores = lambda w=workers: w
            ts, ph = [], []
            for _ in range(3):
                checked.forget_all(); sync(); t0 = time.perf_counter(); h = store.apply(model, ref); sync()
                ts.append(time.perf_counter() - t0); ph.append(dict(phases)); h.revert(); sync()
            k = ts.index(sorted(ts)[1])
            print(f"apply {ref} decode {'on device' if on_device else 'on cpu'} workers {workers}: "
                  f"{sorted(ts)[1] * 1e3:.0f} ms (prepare {ph[k]['prepare'] * 1e3:.0f}, install {ph[k]['install'] * 1e3:.0f})", flush=True)
ondevice.decodes, A.cores = real_decodes, real_cores
print(f"model bytes {nbytes / 1e6:.0f} MB; load_model:")
from safetensors.torch import load_model
timed("load_model fine-tune", lambda: load_model(model, b.tuned_file, strict=False, device=dev))
store.close()
import shutil  # noqa: E402
shutil.rmtree(work, ignore_errors=True)
