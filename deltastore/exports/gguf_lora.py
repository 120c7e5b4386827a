"""A stored version as a GGUF LoRA adapter that llama.cpp (``--lora``) and Ollama (``ADAPTER``) load.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for a PEFT adapter of the same
base, through the ``gguf`` package:

- metadata: ``general.architecture`` (the base's: ``llama``, ``qwen2``, ``gpt2``),
  ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
- tensors: ``<gguf name of the base weight>.lora_a`` of shape (r, in) and ``.lora_b`` of shape
  (out, r) (numpy order; GGUF stores the reverse), so that llama.cpp adds
  ``alpha / r * lora_b @ lora_a`` to a weight of shape (out, in). GPT-2's Conv1D weights, (in, out)
  in Hugging Face, are (out, in) in GGUF (the converter transposes them), and their pairs follow.
  (The converter transposes a PEFT GPT-2 pair too, which PEFT already shapes (out, in): its
  attn_qkv lora_a comes out (r, 3n), which llama.cpp's loader cannot take. Here the pair is the
  one llama.cpp runs: tests/test_llama_cpp.py.)
- a Llama's q_proj and k_proj pairs: ``lora_b``'s rows permuted as the converter permutes the
  weight's (LlamaModel.permute, by n_head for q and n_kv_head for k: llama.cpp's rope pairs
  adjacent values, Hugging Face's the two halves). The converter passes a PEFT pair through
  LlamaModel.modify_tensors, where that permutation reshapes and swaps only B's rows; without it
  llama.cpp loads the file and adds a scrambled q/k delta. Qwen2 and GPT-2 are not permuted.

One alpha serves every pair, and llama.cpp scales each by alpha / r with r its own rank: where
ranks differ, each B is scaled so that every pair stands for its delta exactly.

Which tensors become pairs is lora_plan.plan's choice; the factors are lora_factors.factors'
(the truncated SVD of each delta). A GGUF LoRA carries only matrices of Linear and Conv1D layers here: changed
embeddings, norms and biases are listed as dropped, with their share of the squared delta.
This module never imports click, prints or exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np
import torch

from ..metrics.analysis import singular_values
from ..core.durable import new_file
from .export_source import changed_tensors, model_config
from .lora_factors import check_rank_options, chosen_rank, factors
from .lora_plan import CONV1D, LINEAR, AdapterPlan, LoraError, delta_energies, module_types, plan

# gguf (optional: pip install 'deltastore[gguf]') is imported inside the functions that write or
# read a GGUF file, so that its absence is one clear error there and nowhere else.

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["ARCHITECTURES", "GGUF_DTYPES", "GgufLoraExport", "UnsupportedArchitecture", "export_gguf_lora",
           "read_gguf_lora"]

# Hugging Face architecture -> gguf-py's MODEL_ARCH member name.
ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2", "GPT2LMHeadModel": "GPT2"}
# The converter's --outtype choices.
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


class UnsupportedArchitecture(LoraError):
    def __init__(self, architecture: str):
        self.architecture = architecture
        super().__init__(f"a GGUF LoRA is written for {', '.join(ARCHITECTURES)} bases only; this base is "
                         f"{architecture[:80]!r} (export-lora without --format gguf writes a PEFT adapter)")


@dataclass(frozen=True)
class GgufLoraExport:
    """What ``export_gguf_lora`` wrote: the file, the architecture, the pairs (GGUF weight name ->
    rank), the changed tensors it could not hold and their share of the squared delta, and the
    share of the pairs' deltas' energy the pairs keep."""

    ref: str
    out: Path
    architecture: str
    rank: int
    dtype: str
    ranks: dict[str, int]
    dropped: tuple[str, ...]
    dropped_energy_fraction: float
    energy_kept: float
    bytes: int
    warning: str | None
    #: Each dropped tensor's share of the squared delta of all the tensors changed.
    dropped_shares: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Base:
    """What the base's config.json says a GGUF LoRA needs."""

    arch: Any  # gguf MODEL_ARCH
    blocks: int
    name: str  # the Hugging Face architecture
    config: dict[str, Any]


def _architecture(folder: Path | None) -> _Base:
    """The gguf architecture, number of blocks and config of the base's config.json."""
    import gguf

    config = model_config(folder, LoraError, "a GGUF LoRA needs the base's config.json (register the base from "
                                             "a model folder, or give --base-path)")
    names = config.get("architectures") or [str(config.get("model_type", "unknown"))]
    name = str(names[0]) if isinstance(names, list) else str(names)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitecture(name)
    blocks = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks <= 0:
        raise LoraError(f"{Path(folder) / 'config.json'} gives no number of layers (num_hidden_layers or n_layer)")
    return _Base(getattr(gguf.MODEL_ARCH, ARCHITECTURES[name]), blocks, name, config)


def _find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The converter's find_hparam: the value of the first of ``keys`` the config holds."""
    key = next((k for k in keys if k in config), None)
    return config[key] if key is not None else None


def rope_heads(architecture: str, name: str, config: dict[str, Any]) -> int | None:
    """The number of heads by which llama.cpp's converter permutes the rows of tensor ``name``
    (LlamaModel.modify_tensors: a Llama's q_proj by n_head, k_proj by n_kv_head), or None for a
    tensor it leaves as it is (every other one, and every one of Qwen2 and GPT-2)."""
    if architecture != "LlamaForCausalLM":
        return None
    n_head = _find(config, ("n_heads", "num_attention_heads"))
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _find(config, ("n_kv_heads", "num_key_value_heads")) or n_head
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from Hugging Face's rotary halves to llama.cpp's
    adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rows``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw type) as the converter stores a tensor of --outtype ``dtype``."""
    from gguf import GGMLQuantizationType as Q

    data = x.to(torch.float32).contiguous().numpy()
    return quantized(data, {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype])


def quantized(data: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    """(data, raw type) of ``data`` stored as ``qtype``: a q8_0 row that is not a whole number of
    blocks falls back to f16, as llama.cpp's converter does (for adapters and models alike)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from gguf.quants import QuantError

    try:
        return quants.quantize(data, qtype), qtype
    except QuantError:
        return quants.quantize(data, Q.F16), Q.F16


def export_gguf_lora(store: Store, ref: str, out: str | os.PathLike, *, rank: int | None = None,
                     energy: float | None = None, dtype: str = "f16", base_weights: Any = None,
                     progress: Any = None) -> GgufLoraExport:
    """Write version ``ref`` as a GGUF LoRA file ``out`` (which must not exist): each changed
    weight of a Linear or Conv1D layer becomes a pair of rank ``rank`` (at most the matrix's
    smaller side), or with ``energy`` F the smallest rank holding F of its delta's energy."""
    try:
        import gguf
    except ImportError:
        raise LoraError("a GGUF LoRA is written with the gguf package: pip install 'deltastore[gguf]'") from None

    check_rank_options(rank, energy)
    if dtype not in GGUF_DTYPES:
        raise LoraError(f"a GGUF LoRA's dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists():
        raise LoraError(f"{out} exists; choose a new file")

    version = store.resolve(ref)
    base = store.base(version.base_id)
    source = store.base_source(base, base_weights)
    the_base = _architecture(source.folder)
    names = gguf.get_tensor_name_map(the_base.arch, the_base.blocks)
    infos, tensor, changed = changed_tensors(store, version, base, source)
    the_plan = plan(infos, changed, types=module_types(source.folder))
    pairs = _pairs(the_base, names, the_plan, tensor, source, rank=rank, energy=energy, progress=progress)
    dropped = pairs.dropped + [n for n in changed if n not in {f"{m}.weight" for m in the_plan.targets}]
    dropped_squares = delta_energies(dropped, tensor, source, infos)
    if not pairs.pairs:
        raise LoraError(f"{version.ref} changed no weight of a Linear or Conv1D layer: there is nothing a GGUF "
                        "LoRA could hold")
    ranks = {n: a.shape[0] for n, (a, _) in pairs.pairs.items()}
    _write(out, the_base, pairs.pairs, ranks, dtype)
    return _exported(version.ref, out, the_base, dtype, ranks, pairs, dropped, dropped_squares)


@dataclass
class _Pairs:
    """A GGUF LoRA's pairs as they are made (GGUF weight name -> (A, B)), the targets it cannot
    hold, the energy the pairs hold and the energy of their deltas."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    kept_energy: float = 0.0
    total_energy: float = 0.0


def _pairs(the_base: _Base, names: Any, the_plan: AdapterPlan, tensor: Callable[[str], torch.Tensor], source: Any,
           *, rank: int | None, energy: float | None, progress: Any) -> _Pairs:
    """The pair of each of the plan's targets that llama.cpp has a name for in ``names`` (gguf's
    tensor name map), as llama.cpp runs it."""
    out = _Pairs()
    for k, (module, (kind, shape)) in enumerate(the_plan.targets.items()):
        name = f"{module}.weight"
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if kind not in (LINEAR, CONV1D) or gguf_name is None:
            out.dropped.append(name)  # embeddings, and weights llama.cpp has no name for
            continue
        delta = tensor(name).to(torch.float32) - source.get(name).to(torch.float32)
        spectrum = singular_values(delta)
        r = chosen_rank(shape, rank, energy, spectrum)
        # PEFT's pair for a Conv1D (fan_in_fan_out) already has B @ A = delta^T: the (out, in) of GGUF.
        a, b = factors(delta, r, kind)
        if (heads := rope_heads(the_base.name, name, the_base.config)) is not None:
            b = permute_rows(b, heads)  # as the converter permutes PEFT's lora_B
        out.pairs[gguf_name] = (a, b)
        squares = spectrum ** 2
        out.total_energy += float(squares.sum())
        out.kept_energy += float(squares[:r].sum())
        if progress:
            progress(k + 1, len(the_plan.targets))
    return out


def _write(out: Path, the_base: _Base, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int],
           dtype: str) -> None:
    """The GGUF LoRA file: one alpha, the largest rank, for every pair."""
    import gguf

    alpha = max(ranks.values())
    with new_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[the_base.arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gguf_name, (a, b) in pairs.items():
            # llama.cpp scales by alpha / r; B carries r / alpha so that each pair is its delta.
            for suffix, x in ((".lora_a", a), (".lora_b", b * (ranks[gguf_name] / alpha))):
                data, qtype = _encode(x, dtype)
                writer.add_tensor(gguf_name + suffix, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _exported(ref: str, out: Path, the_base: _Base, dtype: str, ranks: dict[str, int], pairs: _Pairs,
              dropped: list[str], dropped_squares: dict[str, float]) -> GgufLoraExport:
    """What was written, with the share of the squared delta the dropped tensors held."""
    import gguf

    dropped_energy = sum(dropped_squares.values())
    all_energy = pairs.total_energy + dropped_energy
    share = dropped_energy / all_energy if all_energy > 0 else 0.0
    warning = None
    if dropped:
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warning = (f"{len(dropped)} changed tensors a GGUF LoRA cannot hold (embeddings, norms, biases) were "
                   f"left out ({share:.2%} of the squared delta): {shown}")
    return GgufLoraExport(
        ref=ref, out=out, architecture=gguf.MODEL_ARCH_NAMES[the_base.arch], rank=max(ranks.values()),
        dtype=dtype, ranks=ranks, dropped=tuple(dropped), dropped_energy_fraction=share,
        energy_kept=pairs.kept_energy / pairs.total_energy if pairs.total_energy > 0 else 1.0,
        bytes=out.stat().st_size, warning=warning,
        dropped_shares={n: e / all_energy if all_energy > 0 else 0.0 for n, e in dropped_squares.items()})


def read_gguf_lora(path: str | os.PathLike, source: Any) -> dict[str, torch.Tensor]:
    """What a GGUF LoRA file written for base ``source`` adds to it: Hugging Face weight name ->
    alpha / r * lora_b @ lora_a, dequantized, in the base weight's own layout (float32), as
    llama.cpp applies it, a Llama's q/k rows back in Hugging Face's order. Reads what
    ``export_gguf_lora`` writes; a tensor the base has no weight for is refused."""
    import gguf

    the_base = _architecture(source.folder)
    names = gguf.get_tensor_name_map(the_base.arch, the_base.blocks)
    found = module_types(source.folder)
    kinds = found[0] if found else {}
    by_gguf = {}
    for name, info in source.infos.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            gguf_name = names.get_name(name, try_suffixes=(".weight",))
            if gguf_name is not None:
                by_gguf[gguf_name] = name
    reader = gguf.GGUFReader(str(path))
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    if alpha_field is None:
        raise LoraError(f"{path} has no {gguf.Keys.Adapter.LORA_ALPHA}: it is not a GGUF LoRA")
    alpha = float(alpha_field.contents())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        weight, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b") or weight not in by_gguf:
            raise LoraError(f"{path}: tensor {t.name[:120]!r} is not a LoRA pair of a weight of this base")
        data = gguf.quants.dequantize(t.data, t.tensor_type).copy()
        parts.setdefault(weight, {})[part] = torch.from_numpy(data).to(torch.float32)
    deltas = {}
    for weight, pair in parts.items():
        if len(pair) != 2:
            raise LoraError(f"{path}: {weight[:120]} has lora_{'a' if 'lora_a' not in pair else 'b'} missing")
        a, b = pair["lora_a"], pair["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or \
                tuple(b.shape[:1] + a.shape[1:]) not in (tuple(source.infos[by_gguf[weight]].shape),
                                                          tuple(source.infos[by_gguf[weight]].shape)[::-1]):
            raise LoraError(f"{path}: the pair of {weight[:120]} does not fit the base's weight")
        delta = (b @ a) * (alpha / a.shape[0])
        name = by_gguf[weight]
        if (heads := rope_heads(the_base.name, name, the_base.config)) is not None:
            delta = unpermute_rows(delta, heads)
        # GGUF holds every matrix (out, in); a GPT-2 Conv1D weight is (in, out) in Hugging Face.
        deltas[name] = delta.T.contiguous() if kinds.get(name.rpartition(".")[0]) == CONV1D else delta
    return deltas
