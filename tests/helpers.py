"""Shared builders for the core tests: small seeded models written as Hugging Face folders, a
fine-tune of each, and ways to compare files, tensors and whole stores.

A fine-tune here moves weights the way Adam does: every element of every trained tensor by
about the learning rate. In bf16 most of those moves round away, so only about 28% of the
elements differ from the base, as measured on a real stance fine-tune of SmolLM2-135M
(tests/benchmarks/models.py, `smollm`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import _remove_duplicate_names, load_file, save_file
from torch import nn

from cli.main import cli
from deltastore.repo.objects import ObjectStore

# Tensors a fine-tune leaves alone unless told otherwise: norms are often frozen, and a
# commit must then skip them.
FROZEN = ("norm",)
INDEX = "model.safetensors.index.json"
# Files a model folder carries besides its weights; export must copy them.
EXTRA_FILES = {
    "config.json": json.dumps({"model_type": "tiny", "hidden_size": 16}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 32}),
}


class TinyNet(nn.Module):
    """A small language-model-shaped module: embedding, blocks of linears with norms, a head
    that may share the embedding's weight (tied)."""

    def __init__(self, *, vocab: int = 48, hidden: int = 16, layers: int = 3, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attn = nn.Linear(hidden, hidden)
            block.mlp = nn.Linear(hidden, 2 * hidden)
            block.out = nn.Linear(2 * hidden, hidden, bias=False)
            block.norm = nn.LayerNorm(hidden)
            self.blocks.append(block)
        self.final_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b.norm(x + b.out(torch.relu(b.mlp(b.attn(x)))))
        return self.head(self.final_norm(x))


def tiny_net(dtype: torch.dtype = torch.float32, *, tied: bool = False, seed: int = 0,
             layers: int = 3, hidden: int = 16) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(tied=tied, layers=layers, hidden=hidden)
    with torch.no_grad():
        for p in net.parameters():
            # Norm weights start at 1 and biases at 0: give every tensor distinct content.
            p.add_(torch.randn_like(p) * 0.05)
    return net.to(dtype)


def tiny_llama(dtype: torch.dtype = torch.float32, *, seed: int = 0, tied: bool = True):
    """A two-layer Llama with (by default) its input and output embeddings tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype).eval()


def finetune_(module: nn.Module, *, seed: int = 1, frozen: tuple[str, ...] = FROZEN,
              lr: float = 1e-3) -> list[str]:
    """Move the module's trained parameters in place as a few Adam steps would; return their
    names. Tied parameters are one parameter, moved once."""
    gen = torch.Generator().manual_seed(seed)
    moved = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(f in name for f in frozen):
                continue
            p.copy_(adam_like(p.detach(), gen, lr=lr))
            moved.append(name)
    return moved


def adam_like(w: torch.Tensor, gen: torch.Generator, *, lr: float = 1e-3) -> torch.Tensor:
    """Every element moved by about lr, either way. In bf16 only ~28% of the moves survive
    rounding (like a real fine-tune), so those are chosen at random and made large enough to
    change the stored value."""
    sign = torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1
    w32 = w.float()
    if w.dtype == torch.bfloat16:
        keep = (torch.rand(w.shape, generator=gen) < 0.28).float()
        step = torch.maximum(w32.abs() * 2 ** -6, torch.full_like(w32, 1e-6))
        return (w32 + keep * sign * step).to(w.dtype)
    # fp32 and fp16: an absolute move of lr, at least one unit in the last place of fp16.
    step = torch.maximum(torch.full_like(w32, lr), w32.abs() * 2 ** -9)
    return (w32 + sign * step).to(w.dtype)


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors safetensors' own saving writes for a module: tied tensors once."""
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    tied = getattr(module, "_tied_weights_keys", None) or []
    discard = list(tied.keys()) if isinstance(tied, dict) else list(tied)
    for kept, removed in _remove_duplicate_names(module.state_dict(), discard_names=discard).items():
        for name in removed:
            del state[name]
    return state


def write_folder(folder: Path, state: dict[str, torch.Tensor], *, shards: int = 1,
                 extra: dict[str, str] | None = None) -> Path:
    """A Hugging Face model folder: model.safetensors, or `shards` files and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[k::shards]}
            save_file(part, folder / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": dict(sorted(weight_map.items()))}))
    for name, text in (EXTRA_FILES if extra is None else extra).items():
        (folder / name).write_text(text)
    return folder


@dataclass
class ModelPair:
    """A base and a fine-tune of it, on disk and in memory."""

    base: Path  # folder
    ft: Path  # folder
    base_module: nn.Module
    ft_module: nn.Module
    base_state: dict[str, torch.Tensor]  # as saved: tied tensors once
    ft_state: dict[str, torch.Tensor]
    moved: list[str]  # names of the parameters the fine-tune moved

    @property
    def changed(self) -> list[str]:
        """Saved tensors whose bytes differ between base and fine-tune."""
        return sorted(n for n in self.base_state if not same_tensor(self.base_state[n], self.ft_state[n]))

    @property
    def unchanged(self) -> list[str]:
        return sorted(n for n in self.base_state if same_tensor(self.base_state[n], self.ft_state[n]))


def make_model(tmp_path: Path, dtype: torch.dtype = torch.float32, *, tied: bool = False,
               sharded: bool = False, llama: bool = False, seed: int = 0, name: str = "model",
               frozen: tuple[str, ...] = FROZEN, layers: int = 3, hidden: int = 16,
               shards: int = 3) -> ModelPair:
    """Write `{name}-base/` and `{name}-ft/` under tmp_path: a small seeded model and an
    Adam-like fine-tune of it. `llama` builds a transformers Llama (tied embeddings when
    `tied`) and saves it with save_pretrained; otherwise a TinyNet saved by hand, with
    config and tokenizer files. `sharded` splits the weights over `shards` files and an index."""
    if llama:
        base = tiny_llama(dtype, seed=seed, tied=tied)
    else:
        base = tiny_net(dtype, tied=tied, seed=seed, layers=layers, hidden=hidden)
    ft = copy.deepcopy(base)
    moved = finetune_(ft, seed=seed + 1000, frozen=frozen)
    base_dir, ft_dir = tmp_path / f"{name}-base", tmp_path / f"{name}-ft"
    for module, folder in ((base, base_dir), (ft, ft_dir)):
        if llama:
            kwargs = {"max_shard_size": "6KB"} if sharded else {}
            module.save_pretrained(folder, **kwargs)
            (folder / "tokenizer.json").write_text(EXTRA_FILES["tokenizer.json"])
        else:
            write_folder(folder, saved_state(module), shards=shards if sharded else 1)
    return ModelPair(base_dir, ft_dir, base, ft, load_folder(base_dir), load_folder(ft_dir), moved)


# -- the command line ------------------------------------------------------------------------


def run_cli(store: Any, *args: Any) -> Result:
    """One command through click's CliRunner, on `store` (a Store or its folder)."""
    root = store if isinstance(store, (str, os.PathLike)) else store.root
    return CliRunner().invoke(cli, ["--store", str(root), *map(str, args)])


def run_json(store: Any, *args: Any) -> Any:
    """One command with --json: it exits 0, and this is the one JSON value it printed."""
    result = run_cli(store, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def views(store: Any, commands: list[tuple[str, ...]]) -> list[Any]:
    """What each command shows (--json), to compare before and after a catalog rebuild: stats
    without `catalog_bytes`, the database file's size (a rebuilt one is packed tighter)."""
    shown = [run_json(store, *c) for c in commands]
    for c, out in zip(commands, shown):
        if c == ("stats",):
            out.pop("catalog_bytes")
    return shown


# -- comparing ---------------------------------------------------------------------------------


def commit_takes(store, pair: ModelPair, tmp: Path, encodings: dict[str, str]) -> None:
    """Two versions of each stance (its "takes"), each a seeded fine-tune of the pair's base,
    stored in the stance's encoding, against the base registered as "tiny"."""
    for k, (stance, encoding) in enumerate(encodings.items()):
        for n in (1, 2):
            ft = copy.deepcopy(pair.base_module)
            finetune_(ft, seed=100 * k + n)
            folder = write_folder(tmp / f"ft-{stance}-{n}", saved_state(ft))
            store.commit(stance, folder, base="tiny", encoding=encoding, message=f"{stance}, take {n}",
                         metadata={"lr": "2e-5"})


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy()) if t.numel() else b""


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and raw(a) == raw(b)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [n for n in a if not same_tensor(a[n], b[n])]
    assert not differ, f"tensors differ: {differ}"


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or model folder (all shards), by safetensors itself."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def module_snapshot(module: nn.Module) -> dict[str, bytes]:
    """name -> dtype, shape and bytes of every tensor in a module's state dict."""
    return {n: f"{t.dtype}{tuple(t.shape)}".encode() + raw(t) for n, t in module.state_dict().items()}


def file_bytes(path: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under a folder (or of one file)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def weight_bytes(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in file_bytes(path).items() if k.endswith(".safetensors")}


def store_snapshot(root: Path) -> tuple[dict[str, list], dict[str, str]]:
    """Everything a store holds: every catalog table's rows, and every file under objects/ and
    tmp/ with a hash of its bytes. Equal snapshots: the store was not changed."""
    root = Path(root)
    conn = sqlite3.connect(f"file:{root / 'catalog.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        rows = {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()
    files = {}
    for sub in ("objects", "tmp"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return rows, files


def object_files(root: Path) -> list[Path]:
    return sorted(p for p in (Path(root) / "objects").rglob("*") if p.is_file())


def index_object_ids(root: Path) -> set[str]:
    """The objects that are manifests, base tensor lists and base records (not tensor data)."""
    conn = sqlite3.connect(f"file:{Path(root) / 'catalog.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM versions UNION SELECT id FROM bases "
                                           "UNION SELECT record FROM bases")}
    finally:
        conn.close()


def data_object_files(root: Path) -> list[Path]:
    """Object files holding tensor data: every object but manifests and bases."""
    skip = index_object_ids(root)
    return [p for p in object_files(root) if f"b3:{p.parent.name}{p.name}" not in skip]


def flip_byte(path: Path, offset: int = -1) -> None:
    """Flip every bit of one byte of a file (default: the last)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def temporary_files(objects: ObjectStore) -> list[Path]:
    """The temporary files an object store's writes left in its tmp/ folder."""
    return sorted(objects.tmp.glob("*.tmp")) if objects.tmp.is_dir() else []


# Imports deltastore once, then forks one child per job, so that each child starts at once and
# can be killed at a chosen moment. A child is reaped only when the test asks for its status, so
# its pid cannot be reused before the test's kill lands, even when the child has finished.
# `{setup}` defines `run(job)`, what a child does with one job (a dict).
_FORK_DRIVER = r"""
import json, os, sys, traceback
{setup}
print("ready", flush=True)
while line := sys.stdin.readline():
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run(job)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class ForkDriver:
    """A process that runs jobs in forked children, for tests that kill -9 a job mid-way.
    `setup` is Python source that defines `run(job)`."""

    def __init__(self, folder: Path, setup: str):
        script = folder / "driver.py"
        script.write_text(_FORK_DRIVER.replace("{setup}", setup))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def start(self, **job) -> int:
        """Start a job in a new child; its pid."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def status(self) -> int:
        """Reap the last child: its wait status."""
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def run(self, **job) -> float:
        """Run a job to its end; how long it took."""
        started = time.monotonic()
        self.start(**job)
        assert self.status() == 0
        return time.monotonic() - started

    def kill_after(self, delay: float, **job) -> bool:
        """Start a job, SIGKILL it after `delay` seconds; whether the kill found it running."""
        pid = self.start(**job)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = self.status()
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"the job failed: status {status}"
        return os.WIFSIGNALED(status)

    def kill_when(self, ready: Callable[[], bool], timeout: float, **job) -> bool:
        """Start a job, SIGKILL it as soon as `ready()` holds (polled every half millisecond) or
        after `timeout` seconds; whether the kill found it running. Kills tied to what the job
        has done, rather than to a delay, land in the same phase however loaded the machine is."""
        pid = self.start(**job)
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        status = self.status()
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"the job failed: status {status}"
        return os.WIFSIGNALED(status)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ON_A_TERMINAL = """
import json, sys
from cli.main import cli
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args, prog_name="deltastore")
    except SystemExit as e:
        assert not e.code, e.code
"""


def run_on_terminal(store_root: Path, *commands: list[str], terminal: bool) -> tuple[str, bytes]:
    """stdout (piped) and stderr (a pseudo-terminal when `terminal`, else piped) of `deltastore`
    commands run one after another in a child process: progress bars show only on a terminal."""
    import pty

    repo = Path(__file__).resolve().parents[1]
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", _ON_A_TERMINAL,
                          json.dumps([["--store", str(store_root), *c] for c in commands])],
                         stdout=subprocess.PIPE, stderr=slave if terminal else subprocess.PIPE, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "80"})
    os.close(slave)
    err = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child is gone: the terminal is closed
            break
        if not chunk:
            break
        err += chunk
    out, piped_err = p.communicate(timeout=300)
    os.close(master)
    assert p.returncode == 0, piped_err
    return out.decode(), bytes(err) if terminal else piped_err
