"""Which of a fine-tune's changed tensors a LoRA adapter can hold, and how.

``plan`` gives a low-rank pair to each changed 2-D weight of a Linear, Embedding or (GPT-2)
Conv1D module; a whole copy (PEFT's ``modules_to_save``) to the changed tensors of other modules
(norms); the biases of LoRA-wrapped modules (``bias="lora_only"``). Everything else is reported
as dropped, never lost silently, and priced by ``delta_energies``. Every adapter format (PEFT,
vLLM's profile, GGUF) and ``compare``'s LoRA rows start from the same plan.

transformers (optional, seconds to import) is imported only inside ``module_types``: a model's
Conv1D layers are transformers' own class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import DeltastoreError
from ..metrics.analysis import locate
from ..weights.models import TensorInfo, TensorSource

__all__ = ["CONV1D", "EMBEDDING", "LINEAR", "AdapterPlan", "LoraError", "delta_energies", "module_types", "plan"]

LINEAR, EMBEDDING, CONV1D = "linear", "embedding", "conv1d"


class LoraError(DeltastoreError, ValueError):
    """An adapter that cannot be written or read: a bad rank, a malformed or foreign adapter."""


def module_types(folder: str | Path | None) -> tuple[dict[str, str], bool] | None:
    """(module name -> "linear" / "embedding" / "conv1d", whether the input and output
    embeddings are tied) of the model a Hugging Face folder's config.json describes, built on
    the meta device (no weights are read or allocated). None without a config.json or
    transformers."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            types[name] = CONV1D
        elif isinstance(module, torch.nn.Embedding):
            types[name] = EMBEDDING
        elif isinstance(module, torch.nn.Linear):
            types[name] = LINEAR
        else:
            types[name] = "other"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return types, tied


def _guess_type(module: str) -> str:
    """The module type where no config says it: embeddings by name, other matrices Linear."""
    return EMBEDDING if locate(module + ".weight").module == "embed" else LINEAR


@dataclass(frozen=True)
class AdapterPlan:
    """How an adapter holds a fine-tune. ``targets``: module -> (kind, weight shape) of the
    low-rank pairs; ``saved``: tensors kept whole (modules_to_save, or the biases of targets);
    ``modules_to_save``: their modules; ``dropped``: changed tensors no adapter holds."""

    targets: dict[str, tuple[str, tuple[int, ...]]]
    saved: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    target_biases: tuple[str, ...]
    dropped: tuple[str, ...]
    tied: bool = False


def plan(infos: Mapping[str, TensorInfo], changed: Iterable[str], *,
         types: tuple[dict[str, str], bool] | None = None) -> AdapterPlan:
    """Which of the ``changed`` tensors (of a model described by ``infos``) an adapter holds how.

    ``types`` is what ``module_types`` found (None: guessed from the names)."""
    kinds, tied = types if types is not None else ({}, False)
    changed = [n for n in infos if n in set(changed)]
    targets: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in changed:
        module, _, leaf = name.rpartition(".")
        info = infos[name]
        kind = kinds.get(module, _guess_type(module)) if module else "other"
        if leaf == "weight" and len(info.shape) == 2 and kind in (LINEAR, EMBEDDING, CONV1D) \
                and info.dtype in ("F32", "F16", "BF16", "F64"):
            targets[module] = (kind, tuple(info.shape))
    saved, to_save, biases, dropped = [], [], [], []
    for name in changed:
        module, _, leaf = name.rpartition(".")
        if module in targets:
            if leaf == "weight":
                continue
            if leaf == "bias":
                biases.append(name)
                saved.append(name)
            else:
                dropped.append(name)
        elif module and (not kinds or module in kinds) and leaf in ("weight", "bias"):
            if module not in to_save:
                to_save.append(module)
        else:
            dropped.append(name)
    # A module kept whole is saved with all of its tensors, changed or not.
    for module in to_save:
        saved += [n for n in infos if n.rpartition(".")[0] == module]
    return AdapterPlan(targets, tuple(saved), tuple(to_save), tuple(biases), tuple(dropped),
                       tied and any(kind == EMBEDDING for kind, _ in targets.values()))


def delta_energies(names: Iterable[str], tensor: Callable[[str], torch.Tensor], source: TensorSource,
                   infos: Mapping[str, TensorInfo]) -> dict[str, float]:
    """||dW||^2 of each named tensor as applied (`tensor`), in float64: against the base's where
    the shapes agree, the whole tensor where the version resized it. What an export leaves out
    is priced by it."""
    out = {}
    for name in names:
        delta = tensor(name).to(torch.float64) - source.get(name).to(torch.float64) \
            if tuple(infos[name].shape) == tuple(source.infos[name].shape) else tensor(name).to(torch.float64)
        out[name] = float((delta ** 2).sum())
    return out
