"""Where a fine-tune changed a model, and how much: per tensor, per (layer, module), as a picture.

This module owns the measurements behind ``analyze`` and the low-rank half of ``compare``:

- ``locate``: a parameter name -> (layer number, module kind), for the common architectures,
  from one table of patterns (``MODULE_PATTERNS``);
- ``tensor_change``: relative change, delta energy, effective ranks and singular values of
  one tensor's delta;
- ``energy_fraction``, ``rank_for``, ``lowrank_energy`` and ``lora_bytes``: what a LoRA-sized
  factorisation of a delta would hold and cost (the one home of these for compare and export);
- ``summarize``: the per (layer, module) table (its picture is plots.py's ``heatmap``).

It is pure: it takes tensors, never the store, and never touches the disk. It never prints,
and never modifies a tensor it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import AnalysisError

__all__ = [
    "AnalysisError",
    "Location",
    "MODULE_KINDS",
    "MODULE_PATTERNS",
    "ModuleChange",
    "TensorChange",
    "energy_fraction",
    "locate",
    "lora_bytes",
    "lowrank_energy",
    "rank_for",
    "row_order",
    "singular_values",
    "summarize",
    "tensor_change",
    "tensor_changes",
]


# ---------------------------------------------------------------------------------------------
# Names -> (layer, module kind)

MODULE_KINDS: tuple[str, ...] = (
    "embed", "q", "k", "v", "qkv", "o", "gate", "up", "down", "mlp_in", "mlp_out",
    "norm", "lm_head", "other",
)

# The block a parameter belongs to: model.layers.N (Llama family, Phi, OPT), transformer.h.N
# (GPT-2, Falcon, Bloom), gpt_neox.layers.N, blocks.N. The first match wins, so nested
# numbering (experts.E inside layers.N) does not replace the layer.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# One row per naming convention, first match wins. Each pattern must match whole dotted
# components of the name (see _component), so "up_proj" never matches "gate_up_proj".
# Adding an architecture is adding a row.
MODULE_PATTERNS: tuple[tuple[str, str], ...] = (
    # Norms first: "post_attention_layernorm" and "self_attn_layer_norm" also name attention.
    (r"\w*norm\w*|ln(?:_\w+|\d*)", "norm"),
    (r"lm_head|embed_out", "lm_head"),
    (r"embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|embed_positions"
     r"|position_embeddings|embeddings", "embed"),
    # Fused query/key/value: GPT-2 c_attn, GPT-NeoX/Falcon/Bloom query_key_value, Phi-3 qkv_proj.
    (r"c_attn|query_key_value|qkv_proj|Wqkv", "qkv"),
    (r"q_proj|query", "q"),
    (r"k_proj|key", "k"),
    (r"v_proj|value", "v"),
    # Attention output: Llama o_proj, OPT/GPT-J/GPT-Neo out_proj, GPT-2 attn.c_proj,
    # GPT-NeoX attention.dense, Phi self_attn.dense, Falcon/Bloom self_attention.dense.
    (r"o_proj|out_proj|(?:attn|attention|self_attn|self_attention)\.(?:c_proj|dense)", "o"),
    # Gated MLPs (Llama family; Mixtral experts call them w1/w3/w2).
    (r"gate_proj|experts\.\d+\.w1", "gate"),
    (r"up_proj|experts\.\d+\.w3", "up"),
    (r"down_proj|experts\.\d+\.w2", "down"),
    # Ungated MLPs: GPT-2 c_fc/c_proj, GPT-NeoX/Falcon/Bloom dense_h_to_4h/dense_4h_to_h,
    # Phi/OPT fc1/fc2, GPT-J fc_in/fc_out; Phi-3's fused gate_up_proj is the MLP's input too.
    (r"gate_up_proj|c_fc|dense_h_to_4h|fc1|fc_in", "mlp_in"),
    (r"mlp\.c_proj|dense_4h_to_h|fc2|fc_out", "mlp_out"),
)


def _component(pattern: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|\.)(?:" + pattern + r")(?:\.|$)")


_MODULE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (_component(pattern), kind) for pattern, kind in MODULE_PATTERNS
)


@dataclass(frozen=True)
class Location:
    """Where a parameter sits: its block number (None outside the blocks) and module kind."""

    layer: int | None
    module: str


def locate(name: str) -> Location:
    """The layer number and module kind (one of ``MODULE_KINDS``) of a parameter name."""
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    for pattern, kind in _MODULE_RULES:
        if pattern.search(name):
            return Location(layer, kind)
    return Location(layer, "other")


# ---------------------------------------------------------------------------------------------
# One tensor's delta

# Rows of the delta converted to float64 at a time when forming its Gram matrix: about 32 MiB,
# so that a 150k-row embedding never needs a float64 copy of itself.
_GRAM_BLOCK_ELEMENTS = 1 << 22


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of a 2-D tensor, descending, as float64.

    Computed as the square roots of the eigenvalues of the smaller Gram matrix (dW^T dW or
    dW dW^T), accumulated in float64 block by block: a full SVD of a 49152x576 embedding takes
    tens of seconds on two cores, its 576x576 Gram matrix about one. Squaring costs accuracy
    only for singular values below about 1e-8 of the largest, far under anything an energy
    fraction can see.
    """
    if delta.ndim != 2:
        raise AnalysisError(f"singular values need a 2-D tensor, got shape {tuple(delta.shape)}")
    matrix = delta.detach()
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    rows, cols = matrix.shape
    if cols == 0:
        return torch.zeros(0, dtype=torch.float64)
    gram = torch.zeros(cols, cols, dtype=torch.float64)
    step = max(1, _GRAM_BLOCK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = matrix[start:start + step].to(device="cpu", dtype=torch.float64)
        gram.addmm_(block.T, block)
    eigenvalues = torch.linalg.eigvalsh(gram)
    # Rounding leaves the eigenvalues of a rank-deficient Gram matrix slightly negative.
    return eigenvalues.flip(0).clamp_min(0.0).sqrt()


def _values(spectrum: Sequence[float] | torch.Tensor) -> list[float]:
    return spectrum.double().tolist() if isinstance(spectrum, torch.Tensor) else [float(s) for s in spectrum]


def energy_fraction(spectrum: Sequence[float] | torch.Tensor, rank: int) -> float:
    """The fraction of a delta's energy (the sum of its squared singular values, ``spectrum``
    descending) that its best rank-``rank`` approximation holds; 1.0 for an all-zero delta
    (nothing to hold: any rank holds all of it)."""
    if rank < 0:
        raise AnalysisError(f"rank must be >= 0, got {rank}")
    values = _values(spectrum)
    total = math.fsum(s * s for s in values)
    if total == 0.0:
        return 1.0
    return min(1.0, math.fsum(s * s for s in values[:rank]) / total)


def rank_for(spectrum: Sequence[float] | torch.Tensor, fraction: float) -> int:
    """The smallest rank whose best approximation holds ``fraction`` of the energy; 0 for an
    all-zero delta (rank 0 already holds all of it, as ``energy_fraction`` says)."""
    energies = [s * s for s in _values(spectrum)]
    total = math.fsum(energies)
    if total == 0.0:
        return 0
    running = 0.0
    for rank, energy in enumerate(energies, start=1):
        running += energy
        # The relative slack absorbs float64 rounding for deltas that are exactly low-rank.
        if running >= fraction * total * (1.0 - 1e-12):
            return rank
    return len(energies)


@dataclass(frozen=True)
class TensorChange:
    """How one tensor moved from base to target.

    ``rel_change`` is ||dW||/||W|| (inf when the base is all zeros and the delta is not).
    ``rank90``/``rank99`` (2-D tensors only) are the smallest ranks whose best approximation
    holds 90%/99% of ``energy`` = ||dW||^2, and ``singular_values`` the largest few singular
    values of dW. ``spectrum`` keeps all of them so that ``energy_at`` needs no second SVD.
    """

    shape: tuple[int, ...]
    base_norm: float
    delta_norm: float
    rel_change: float
    energy: float
    rank90: int | None
    rank99: int | None
    singular_values: tuple[float, ...]
    spectrum: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def energy_at(self, rank: int) -> float:
        """Fraction of the delta's energy that its best rank-``rank`` approximation holds."""
        if len(self.shape) != 2:
            raise AnalysisError(f"low-rank energy needs a 2-D tensor, got shape {self.shape}")
        return energy_fraction(self.spectrum, rank)


def tensor_change(base: torch.Tensor, target: torch.Tensor, *, top: int = 5) -> TensorChange:
    """Measure target - base in float32 (and its spectrum in float64 for 2-D tensors)."""
    if base.shape != target.shape:
        raise AnalysisError(
            f"base and target shapes differ: {tuple(base.shape)} vs {tuple(target.shape)}"
        )
    with torch.no_grad():
        base32 = base.detach().to(torch.float32)
        delta = target.detach().to(torch.float32) - base32
        base_norm = float(torch.linalg.vector_norm(base32))
        delta_norm = float(torch.linalg.vector_norm(delta))
        del base32
        spectrum: tuple[float, ...] = ()
        rank90 = rank99 = None
        if delta.ndim == 2:
            spectrum = tuple(singular_values(delta).tolist())
            rank90, rank99 = rank_for(spectrum, 0.90), rank_for(spectrum, 0.99)
    if base_norm > 0.0:
        rel_change = delta_norm / base_norm
    else:
        rel_change = math.inf if delta_norm > 0.0 else 0.0
    return TensorChange(
        shape=tuple(base.shape),
        base_norm=base_norm,
        delta_norm=delta_norm,
        rel_change=rel_change,
        energy=delta_norm * delta_norm,
        rank90=rank90,
        rank99=rank99,
        singular_values=spectrum[:top],
        spectrum=spectrum,
    )


def tensor_changes(
    base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, top: int = 5
) -> dict[str, TensorChange]:
    """``tensor_change`` for every name of two state dicts, which must hold the same names."""
    missing, extra = sorted(set(base) - set(target)), sorted(set(target) - set(base))
    if missing or extra:
        raise AnalysisError(
            f"base and target hold different tensors: only in base {missing[:5]}, "
            f"only in target {extra[:5]}"
        )
    return {name: tensor_change(base[name], target[name], top=top) for name in base}


def lowrank_energy(delta: torch.Tensor, ranks: Iterable[int]) -> dict[int, float]:
    """For each rank R, the fraction of ||delta||^2 held by its best rank-R approximation."""
    spectrum = tuple(singular_values(delta).tolist())
    return {rank: energy_fraction(spectrum, rank) for rank in ranks}


def lora_bytes(shape: Sequence[int], rank: int, itemsize: int) -> int:
    """Bytes a LoRA pair (A: rank x n, B: m x rank) of an m x n matrix takes: R*(m+n)*itemsize."""
    if len(shape) != 2:
        raise AnalysisError(f"LoRA factors a 2-D matrix, got shape {tuple(shape)}")
    if rank < 0 or itemsize <= 0:
        raise AnalysisError(f"need rank >= 0 and itemsize > 0, got {rank} and {itemsize}")
    rows, cols = shape
    return rank * (rows + cols) * itemsize


# ---------------------------------------------------------------------------------------------
# Per (layer, module)


@dataclass(frozen=True)
class ModuleChange:
    """One row of the analysis table: all tensors of one module kind in one layer.

    ``rel_change`` is sqrt(sum ||dW||^2) / sqrt(sum ||W||^2) over the row's tensors (a weight
    and its bias together), ``energy_share`` the row's part of the whole model's delta energy.
    ``rank90``/``rank99``/``top_singular`` are the largest over the row's 2-D tensors (None
    when it has none).
    """

    layer: int | None
    module: str
    tensors: int
    numel: int
    rel_change: float
    energy: float
    energy_share: float
    rank90: int | None
    rank99: int | None
    top_singular: float | None
    #: The largest singular values of the row's tensor with the largest one (empty without a
    #: changed 2-D tensor).
    singular_values: tuple[float, ...] = ()


def row_order(key: tuple[int | None, str]) -> tuple[int, int, int]:
    """The order of the analysis rows: (layer, module kind) keys, blocks in order."""
    layer, module = key
    # Tensors outside the blocks (embeddings, final norm, head) come first.
    return (0 if layer is None else 1, layer or 0, MODULE_KINDS.index(module))


def _max_or_none(values: Iterable[float | int | None]) -> float | int | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def summarize(changes: Mapping[str, TensorChange]) -> list[ModuleChange]:
    """Group tensor changes by (layer, module kind): one row each, blocks in order."""
    groups: dict[tuple[int | None, str], list[TensorChange]] = {}
    for name, change in changes.items():
        where = locate(name)
        groups.setdefault((where.layer, where.module), []).append(change)
    total_energy = math.fsum(change.energy for change in changes.values())
    rows = []
    for key in sorted(groups, key=row_order):
        members = groups[key]
        energy = math.fsum(change.energy for change in members)
        base_energy = math.fsum(change.base_norm ** 2 for change in members)
        if base_energy > 0.0:
            rel_change = math.sqrt(energy / base_energy)
        else:
            rel_change = math.inf if energy > 0.0 else 0.0
        rows.append(ModuleChange(
            layer=key[0],
            module=key[1],
            tensors=len(members),
            numel=sum(change.numel for change in members),
            rel_change=rel_change,
            energy=energy,
            energy_share=energy / total_energy if total_energy > 0.0 else 0.0,
            rank90=_max_or_none(change.rank90 for change in members),
            rank99=_max_or_none(change.rank99 for change in members),
            top_singular=_max_or_none(
                change.singular_values[0] if change.singular_values else None
                for change in members
            ),
            singular_values=max((change.singular_values for change in members), default=(),
                                key=lambda values: values[0] if values else -1.0),
        ))
    return rows
