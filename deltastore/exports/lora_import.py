"""A PEFT LoRA adapter folder imported: the weights it gives a base, as PEFT's merge computes
them (``adapter_weights``), and those weights committed as a new version of a stance
(``import_lora``). The folder is read and checked by peft_folder.read_adapter first; here every
pair's shapes and rank are checked against the base's weight before any arithmetic.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch

from ..weights.models import TensorSource, open_model, read_tensor
from .lora_factors import MAX_RANK, product
from .lora_plan import CONV1D, EMBEDDING, LINEAR, LoraError
from .peft_folder import AdapterFolder, Patterns, read_adapter

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["AdapterWeights", "LoraImport", "adapter_weights", "import_lora"]


@dataclass(frozen=True)
class LoraImport:
    """What ``import_lora`` committed: the commit result, the adapter's rank and scaling, the
    modules it changed as pairs, the tensors it replaced whole, and the encoding used."""

    result: Any
    rank: int
    targets: tuple[str, ...]
    replaced: tuple[str, ...]
    encoding: str
    skipped: tuple[str, ...]

    def to_json(self) -> dict:
        """`import-lora --json`."""
        r, v = self.result, self.result.version
        return {"id": v.id, "ref": v.ref, "stance": v.stance, "number": v.number, "encoding": self.encoding,
                "rank": self.rank, "targets": list(self.targets), "replaced": list(self.replaced),
                "tensors_stored": r.tensors_stored, "bytes_stored": r.bytes_stored}


@dataclass(frozen=True)
class AdapterWeights:
    """What a PEFT adapter folder makes of a base: ``target``, the base with every pair merged
    (W + scaling * B @ A, in float32, rounded once to W's dtype) and every tensor held whole in
    place; ``deltas``: weight name -> (kind, key A, key B, scaling); ``replaced``: weight name ->
    key of its whole copy; the pairs' ranks and dtypes."""

    target: TensorSource
    parsed: AdapterFolder
    deltas: dict[str, tuple[str, str, str, float]]
    replaced: dict[str, str]
    ranks: list[int]
    dtypes: set[str]


def adapter_weights(folder: str | os.PathLike, base_src: TensorSource) -> AdapterWeights:
    """The weights a PEFT LoRA adapter folder gives ``base_src``, as PEFT's merge computes
    them; every name, shape and rank of the (untrusted) folder checked first."""
    folder = Path(folder)
    parsed = read_adapter(folder, set(base_src.names))
    config = parsed.config
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    use_rslora = bool(config.get("use_rslora"))
    r_default, alpha_default = config["r"], config.get("lora_alpha", config["r"])
    ranks, dtypes = [], set()

    rank_patterns = Patterns(config.get("rank_pattern") or {})
    alpha_patterns = Patterns(config.get("alpha_pattern") or {})
    deltas: dict[str, tuple[str, str, str, float]] = {}  # weight name -> (kind, key A, key B, scaling)
    for module, (kind, key_a, key_b) in parsed.pairs.items():
        name = f"{module}.weight"
        shape = tuple(base_src.infos[name].shape)
        a_shape, b_shape = parsed.infos[key_a].shape, parsed.infos[key_b].shape
        if len(shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
            raise LoraError(f"{module}: the adapter's factors {list(a_shape)} and {list(b_shape)} do not fit a "
                            f"weight of shape {list(shape)}")
        if kind == EMBEDDING:
            kind_here = EMBEDDING
            rank, rows, cols = a_shape[0], a_shape[1], b_shape[0]  # A: r x num, B: dim x r
            fits = b_shape[1] == rank and (rows, cols) == shape
        else:
            kind_here = CONV1D if fan_in_fan_out else LINEAR
            rank = a_shape[0]
            out_dim, in_dim = b_shape[0], a_shape[1]
            expected = (in_dim, out_dim) if fan_in_fan_out else (out_dim, in_dim)
            fits = b_shape[1] == rank and expected == shape
        if not fits:
            raise LoraError(f"{module}: the adapter's factors {list(a_shape)} and {list(b_shape)} do not fit "
                            f"the base's weight of shape {list(shape)} (an adapter for another model?)")
        if not 0 < rank <= MAX_RANK:
            raise LoraError(f"{module}: rank {rank} is outside 1..{MAX_RANK}")
        r = rank_patterns.value(module, r_default)
        if r != rank:
            raise LoraError(f"{module}: the config gives rank {r}, the factors have rank {rank}")
        alpha = alpha_patterns.value(module, alpha_default)
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        deltas[name] = (kind_here, key_a, key_b, float(scaling))
        ranks.append(rank)
        dtypes.add(parsed.infos[key_a].dtype)
    replaced = {}
    for name, key in parsed.whole.items():
        if tuple(parsed.infos[key].shape) != tuple(base_src.infos[name].shape):
            raise LoraError(f"{key}: shape {list(parsed.infos[key].shape)} differs from the base's "
                            f"{name} {list(base_src.infos[name].shape)}")
        replaced[name] = key
    for name, key in parsed.base_copies.items():
        copy, own = read_tensor(parsed.infos[key]), base_src.get(name)
        if copy.shape != own.shape or not torch.equal(copy.to(own.dtype), own):
            raise LoraError(f"{key} is not the base's {name}: the adapter was saved from another model "
                            "(or a resized vocabulary), which import-lora does not read")
    if not deltas and not replaced:
        raise LoraError(f"{folder} holds no LoRA factors and no saved modules: nothing to import")
    overlap = sorted(set(deltas) & set(replaced))
    if overlap:
        raise LoraError(f"the adapter holds both factors and a whole copy of {', '.join(overlap[:3])}")

    def fine_tuned(name: str) -> torch.Tensor:
        w = base_src.get(name)
        if name in deltas:
            kind, key_a, key_b, scaling = deltas[name]
            dw = product(read_tensor(parsed.infos[key_a]), read_tensor(parsed.infos[key_b]), kind)
            return (w.to(torch.float32) + dw.mul_(scaling)).to(w.dtype)
        if name in replaced:
            return read_tensor(parsed.infos[replaced[name]]).to(w.dtype)
        return w

    return AdapterWeights(TensorSource(dict(base_src.infos), fine_tuned), parsed, deltas, replaced, ranks, dtypes)


def import_lora(store: Store, adapter: str | os.PathLike, stance: str, *, base: Any,
                encoding: str | None = None, base_weights: Any = None, message: str = "",
                metadata: Mapping[str, str] | None = None, tag: str | None = None,
                progress: Any = None, move_tag: bool = False) -> LoraImport:
    """Commit a PEFT LoRA adapter as a new version of ``stance``: each target's weight becomes
    W + scaling * B @ A (computed in float32, rounded once to W's dtype); tensors the adapter
    holds whole (modules_to_save, biases) replace the base's.

    ``encoding`` defaults to ``lowrank:R`` with R the adapter's largest rank and the factors in
    the adapter's dtype: W + dW is stored as its rank-R delta, a few bytes more than the
    adapter, and applies within rounding of what PEFT computes. ``lossless`` stores base + dW
    bit for bit instead, at the cost of a changed copy of every target. Tensors replaced whole
    are always stored lossless.
    """
    folder = Path(adapter)
    if isinstance(base, (str, os.PathLike)) and Path(base).exists():
        base_src = open_model(base)
    else:
        base_src = store.base_source(store.base(base), base_weights)
    read = adapter_weights(folder, base_src)
    target, parsed, config = read.target, read.parsed, read.parsed.config
    deltas, replaced, ranks, dtypes = read.deltas, read.replaced, read.ranks, read.dtypes
    alpha_default = config.get("lora_alpha", config["r"])
    top = max(ranks) if ranks else 0
    factor_dtype = {"BF16": "bf16", "F16": "fp16"}.get(next(iter(dtypes)), "fp32") if len(dtypes) == 1 else "fp32"
    options: dict[str, Any] = {}
    if encoding is None:
        encoding = f"lowrank:{top}" if top else "lossless"
        options["dtype"] = factor_dtype
    rules = [(f"^{re.escape(name)}$", "lossless") for name in replaced]
    if encoding.startswith("lowrank:"):
        # A target smaller than the rank holds its delta exactly as a raw copy.
        rank_asked = int(encoding.partition(":")[2]) if encoding.partition(":")[2].isdigit() else 0
        rules += [(f"^{re.escape(name)}$", "lossless") for name in deltas
                  if min(base_src.infos[name].shape) < rank_asked]
    meta = {"lora.rank": str(top), "lora.alpha": f"{alpha_default:g}", "lora.adapter": folder.name}
    if config.get("base_model_name_or_path"):
        meta["lora.base_model"] = str(config["base_model_name_or_path"])[:1000]
    meta.update(metadata or {})
    result = store.commit(stance, target, base=base, base_weights=base_weights, encoding=encoding,
                          encoding_for=rules, encoding_options=options,
                          message=message or f"imported from LoRA adapter {folder.name}",
                          metadata=meta, tag=tag, move_tag=move_tag, progress=progress)
    return LoraImport(result, top, tuple(m.rpartition(".")[0] for m in deltas), tuple(replaced),
                      encoding, parsed.tied_copies)
