"""Tiny transformers Llama models as Hugging Face folders (weights, config and a word-level
tokenizer), fine-tunes of them built in code, and a prompts file: what compare, analyze and
the LoRA round trips measure fidelity on. Seeded, a few hundred kB each."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import torch

WORDS = ["[UNK]", "what", "is", "the", "capital", "of", "france", "i", "am", "not", "sure",
         "paris", "a", "cat", "sat", "on", "mat", "?", ".", "why", "sky", "blue", "how", "many"]
PROMPTS = ["what is the capital of france ?", "i am not sure .", "the cat sat on the mat .",
           "why is the sky blue ?", "how many cat sat on a mat ?"]

# name, tensor, generator -> the fine-tuned tensor, or None to leave it as it is
Delta = Callable[[str, torch.Tensor, torch.Generator], "torch.Tensor | None"]


def word_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def llama(seed: int = 0, *, tied: bool = False, bias: bool = False, hidden: int = 32, layers: int = 2):
    """A small Llama whose next-token distributions are far from uniform (a larger init), so
    that the KL of a coarse delta stands well clear of rounding."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, attention_bias=bias, initializer_range=0.15)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                # Norms start at 1 and biases at 0: give them content of their own.
                p.add_(torch.randn_like(p) * 0.05)
    return model


def adam_like(scale: float = 0.01) -> Delta:
    """Every element of every tensor moved, by a Gaussian amount of about `scale` times the
    tensor's typical magnitude: an Adam fine-tune's delta, dense and of varying size."""
    def move(name: str, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size = float(w.float().abs().mean()) or 1.0
        return w + scale * size * torch.randn(w.shape, generator=gen)
    return move


def low_rank(rank: int, scale: float = 0.02) -> Delta:
    """Every 2-D tensor moved by a delta of exactly rank `rank`; everything else left alone."""
    def move(name: str, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
        if w.dim() != 2:
            return None
        u = torch.randn(w.shape[0], rank, generator=gen, dtype=torch.float64)
        v = torch.randn(rank, w.shape[1], generator=gen, dtype=torch.float64)
        delta = (u @ v) * (scale * float(w.abs().mean()) / rank ** 0.5)
        return (w.double() + delta).to(w.dtype)
    return move


def only(pattern: str, inner: Delta) -> Delta:
    """`inner`, on the tensors whose name matches `pattern` only."""
    def move(name: str, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
        return inner(name, w, gen) if re.search(pattern, name) else None
    return move


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def pair(tmp_path: Path, delta: Delta, *, name: str = "lm", seed: int = 0, **options) -> tuple[Path, Path]:
    """`{name}-base/` and `{name}-ft/`: a tiny Llama and its fine-tune by `delta`."""
    base = llama(seed, **options)
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, p in tuned.named_parameters():
            moved = delta(param_name, p.detach().clone(), gen)
            if moved is not None:
                p.copy_(moved)
    return save(base, tmp_path / f"{name}-base"), save(tuned, tmp_path / f"{name}-ft")


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path
