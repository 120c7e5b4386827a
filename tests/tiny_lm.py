"""Tiny transformers Llama models as Hugging Face folders (weights, config and a word-level
tokenizer), fine-tunes of them built in code, and a prompts file: what compare, analyze and
the LoRA round trips measure fidelity on. Seeded, a few hundred kB each."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltastore import Store

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


def tuned(model, delta: Delta, *, seed: int):
    """A copy of `model` fine-tuned by `delta`, drawing from a generator seeded `seed`."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, p in out.named_parameters():
            moved = delta(param_name, p.detach().clone(), gen)
            if moved is not None:
                p.copy_(moved)
    return out


def pair(tmp_path: Path, delta: Delta, *, name: str = "lm", seed: int = 0, **options) -> tuple[Path, Path]:
    """`{name}-base/` and `{name}-ft/`: a tiny Llama and its fine-tune by `delta`."""
    base = llama(seed, **options)
    return save(base, tmp_path / f"{name}-base"), save(tuned(base, delta, seed=seed + 1), tmp_path / f"{name}-ft")


def committed(tmp_path: Path, model) -> tuple[Store, Path, dict, dict]:
    """A store holding stance `s`: a fine-tune of `model` that moved every tensor (norms,
    embeddings, biases too), stored lossless. Returns the store, the base's folder, and the
    base's and the fine-tune's tensors."""
    base = save(model, tmp_path / "base")
    ft = save(tuned(model, adam_like(0.05), seed=7), tmp_path / "ft")
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    return store, base, load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")


def kl_top1(reference, model, *, tokenizer=None, prompts: list[str] = PROMPTS) -> tuple[float, float]:
    """Mean KL(reference || model) over every position of every prompt, and top-1 agreement,
    one prompt at a time (no batching, no padding); the word tokenizer unless another is given."""
    tokenizer = tokenizer or word_tokenizer()
    total, agree, positions = 0.0, 0, 0
    for text in prompts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            p = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
            q = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        total += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        positions += ids.shape[1]
    return total / positions, agree / positions


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path
