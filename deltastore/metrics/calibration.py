"""Calibration: what each linear layer of a model meets on a few prompts.

An encoding fitted to a model's activations (``mixedrank-aw:R``) keeps the directions of a
delta that the layer's inputs use, which it learns from the sum of x x^T over the inputs x
each layer saw while the model read the calibration prompts (its input covariance, up to
scale). The prompts are part of what a version was made from, so the version records which
they were: the file's name and the id of its bytes (``Calibration.metadata``).

Like fidelity.py it loads a Hugging Face folder (float32, CPU, local only, safetensors only)
and never prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.hashing import bytes_id
from .fidelity import FidelityError, load_causal_lm, read_prompts

__all__ = ["Calibration", "calibrate"]


@dataclass(frozen=True)
class Calibration:
    """`covariances`: weight name (as the model's state dict names it) -> the float64 n x n sum
    of x x^T over every position of every prompt, for each linear layer with n inputs."""

    prompts: str  # the file's name
    prompts_id: str  # the id of its bytes
    positions: int
    covariances: dict[str, torch.Tensor] = field(repr=False)

    @property
    def metadata(self) -> dict[str, str]:
        """What a version fitted on these prompts records."""
        return {"calibration.prompts": self.prompts, "calibration.prompts_id": self.prompts_id,
                "calibration.positions": str(self.positions)}


def calibrate(model_folder: str | os.PathLike, prompts: str | os.PathLike, *, chat: bool = False,
              tokenizer: str | os.PathLike | None = None, max_tokens: int = 256) -> Calibration:
    """Run the model of `model_folder` over each prompt of the file `prompts` (one per line;
    with `chat`, each a user message through the tokenizer's chat template), summing each
    linear layer's inputs' outer products."""
    path = Path(prompts)
    texts = read_prompts(path)
    model, tok = load_causal_lm(model_folder, tokenizer=tokenizer)
    if chat and not getattr(tok, "chat_template", None):
        raise FidelityError("the tokenizer has no chat template: calibrate on the prompts as plain text "
                            "(without --chat)")
    sums: dict[str, torch.Tensor] = {}
    positions = 0

    def hook(name: str):
        def add(module: Any, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return add

    handles = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for text in texts:
                ids = _token_ids(tok, text, chat)[:max_tokens]
                positions += len(ids)
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return Calibration(path.name, bytes_id(path.read_bytes()), positions, sums)


def _token_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    else:
        ids = tokenizer(text)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise FidelityError(f"calibration prompt {text[:40]!r} gives no tokens")
    return ids
