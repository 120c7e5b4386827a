"""A stored version written as a PEFT LoRA adapter folder (``export_lora``), and the front of
the PEFT adapter modules: what callers import from here.

``export_lora`` writes ``adapter_config.json`` + ``adapter_model.safetensors``: the pairs of
lora_plan's plan, the factors from each delta's SVD (lora_factors), ``lora_alpha = r`` so that
the scaling is 1, the tensors the plan keeps whole, and the changed tensors it drops listed with
their share of the squared delta. The folder's format is peft_folder's; reading an adapter back
and committing it is lora_import's (``adapter_weights``, ``import_lora``, named here too).

It never loads a pickle and imports peft nowhere: the files are written and read by deltastore,
so that exporting needs no peft installed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..codecs.quantize import FACTOR_DTYPES
from ..core.durable import new_folder
from ..core.pools import in_order
from ..weights.models import TensorSource
from .export_source import changed_tensors
from .lora_factors import MAX_RANK, check_rank_options, factors, factors_randomized, fit_pair, product
from .lora_import import AdapterWeights, LoraImport, adapter_weights, import_lora
from .lora_plan import CONV1D, EMBEDDING, LINEAR, AdapterPlan, LoraError, delta_energies, module_types, plan
from .peft_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, pair_keys

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

# The names of lora_plan, lora_factors, peft_folder and lora_import that callers use are named
# here too: this module is where they import them from.
__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONV1D",
    "EMBEDDING",
    "LINEAR",
    "MAX_RANK",
    "PREFIX",
    "AdapterPlan",
    "AdapterWeights",
    "LoraError",
    "LoraExport",
    "LoraImport",
    "adapter_weights",
    "check_rank_options",
    "delta_energies",
    "export_lora",
    "factors",
    "factors_randomized",
    "import_lora",
    "module_types",
    "plan",
    "product",
]


def _short_targets(modules: Sequence[str], all_modules: Iterable[str]) -> list[str]:
    """target_modules as PEFT matches them (a name, or the end of one after a dot): the leaf
    name where every module of that leaf is a target, else the full names."""
    everything = list(all_modules)
    out = []
    by_leaf: dict[str, list[str]] = {}
    for module in modules:
        by_leaf.setdefault(module.rpartition(".")[2], []).append(module)
    for leaf, chosen in sorted(by_leaf.items()):
        every = [m for m in everything if m == leaf or m.endswith("." + leaf)]
        out += [leaf] if sorted(every) == sorted(chosen) else sorted(chosen)
    return out


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class LoraExport:
    """What ``export_lora`` wrote: the folder, its rank(s), the tensors it holds as pairs and
    whole, the changed tensors it could not hold and their share of the squared delta."""

    ref: str
    out: Path
    rank: int
    dtype: str
    targets: tuple[str, ...]
    ranks: dict[str, int]
    saved: tuple[str, ...]
    dropped: tuple[str, ...]
    dropped_energy_fraction: float
    #: The mean over the pairs of the share of each delta's energy its pair holds: compare's
    #: "energy" of a LoRA row. ``energy_kept_total``: the share of all the deltas' energy
    #: together (large matrices weigh more). ``exact``: whether the SVD was the exact one.
    energy_kept: float
    bytes: int
    warning: str | None
    energy_kept_total: float = 0.0
    exact: bool = False
    #: Each dropped tensor's share of the squared delta of all the tensors changed.
    dropped_shares: dict[str, float] = field(default_factory=dict)


def export_lora(store: Store, ref: str, out: str | os.PathLike, *, rank: int | None = None,
                energy: float | None = None, dtype: str = "bf16", base_weights: Any = None,
                exact: bool = False, progress: Any = None,
                plan_filter: Callable[[AdapterPlan, TensorSource], AdapterPlan] | None = None) -> LoraExport:
    """Write version ``ref`` as a PEFT LoRA adapter folder ``out`` (which must not exist, or be
    empty). Each changed 2-D weight of a Linear/Embedding/Conv1D module becomes a pair of rank
    ``rank`` (at most the matrix's smaller side), or with ``energy`` F the smallest rank whose
    approximation holds F of that delta's energy (``rank_pattern``), capped at ``rank`` if both
    are given. The pairs come from a randomized SVD of each delta, whose energy held is
    measured and reported; ``exact=True`` (and ``energy``) uses the exact truncated SVD.
    ``plan_filter`` narrows the plan for a server that accepts less (vllm_lora.py's profile):
    what it moves to ``dropped`` is listed and priced as dropped."""
    out = _check_export(out, rank, energy, dtype)
    version = store.resolve(ref)
    base = store.base(version.base_id)
    source = store.base_source(base, base_weights)
    infos, tensor, changed = changed_tensors(store, version, base, source)
    the_plan = plan(infos, changed, types=module_types(source.folder))
    if plan_filter is not None:
        the_plan = plan_filter(the_plan, source)
    # The exact truncated SVD needs each delta's whole spectrum (an eigendecomposition per
    # matrix); a randomized one a few thin products: 3-4x less work, at an energy held within
    # a few 1e-4 of the exact one on SmolLM2's deltas, and measured, not estimated.
    exact = exact or energy is not None
    pairs = _pairs(the_plan, tensor, source, rank=rank, energy=energy, exact=exact,
                   dtype=FACTOR_DTYPES[dtype], progress=progress)
    dropped_squares = delta_energies(the_plan.dropped, tensor, source, infos)
    if not pairs.ranks:
        raise LoraError(f"{version.ref} changed no 2-D weight of a Linear or Embedding module: "
                        "there is nothing a LoRA adapter could hold")
    config = _adapter_config(the_plan, pairs.ranks, base, all_modules={n.rpartition(".")[0] for n in infos})
    with new_folder(out) as tmp:
        save_file(pairs.state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "deltastore.version": version.id})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # As export writes a model folder: readable by all.
        for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.chmod(tmp / file, 0o644)
    return _exported(version.ref, out, dtype, the_plan, pairs, dropped_squares, exact)


def _check_export(out: str | os.PathLike, rank: int | None, energy: float | None, dtype: str) -> Path:
    check_rank_options(rank, energy)
    if dtype not in FACTOR_DTYPES:
        raise LoraError(f"the adapter dtype must be one of {', '.join(FACTOR_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{out} exists and is not an empty folder; choose a new one")
    return out


@dataclass
class _Pairs:
    """An adapter's tensors as they are made: ``state``, key -> tensor; each target's rank; each
    pair's share of its delta's energy; the energy held and the energy of the targets' deltas."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    shares: list[float] = field(default_factory=list)
    kept_energy: float = 0.0
    total_energy: float = 0.0


def _pairs(the_plan: AdapterPlan, tensor: Callable[[str], torch.Tensor], source: TensorSource, *,
           rank: int | None, energy: float | None, exact: bool, dtype: torch.dtype, progress: Any) -> _Pairs:
    """The pair of each of the plan's targets, in ``dtype``, then the tensors it keeps whole."""
    out = _Pairs()
    steps = len(the_plan.targets) + len(the_plan.saved)

    def pair(module: str) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        kind, shape = the_plan.targets[module]
        name = f"{module}.weight"
        delta = tensor(name).to(torch.float32) - source.get(name).to(torch.float32)
        total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        a, b, r, held = fit_pair(delta, kind, shape, rank, energy, exact)
        return a.to(dtype).contiguous(), b.to(dtype).contiguous(), r, held, total

    for k, (module, (a, b, r, held, total)) in enumerate(in_order(list(the_plan.targets), pair)):
        key_a, key_b = pair_keys(module, the_plan.targets[module][0])
        out.state[key_a], out.state[key_b] = a, b
        out.ranks[module] = r
        out.shares.append(held)
        out.total_energy += total
        out.kept_energy += held * total
        if progress:
            progress(k + 1, steps)
    for k, name in enumerate(the_plan.saved):
        if progress:
            progress(len(the_plan.targets) + k + 1, steps)
    for name in the_plan.saved:
        module, _, leaf = name.rpartition(".")
        key = f"{PREFIX}{module}.base_layer.bias" if name in the_plan.target_biases else f"{PREFIX}{name}"
        out.state[key] = tensor(name).contiguous()
    return out


def _adapter_config(the_plan: AdapterPlan, ranks: dict[str, int], base: Any, all_modules: set[str]) -> dict[str, Any]:
    """adapter_config.json: ``r`` and ``lora_alpha`` the largest rank, the others in rank_pattern
    and alpha_pattern (so that every scaling is 1)."""
    if any(kind == CONV1D for kind, _ in the_plan.targets.values()) and \
            any(kind == LINEAR for kind, _ in the_plan.targets.values()):
        raise LoraError("the fine-tune changed both Conv1D and Linear weights: one PEFT adapter "
                        "cannot hold both (fan_in_fan_out is one setting)")
    top = max(ranks.values())
    differ = {m: r for m, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.hub_id or base.source,
        "r": top,
        "lora_alpha": top,
        "target_modules": _short_targets(list(ranks), all_modules),
        # Patterns are regexes that PEFT matches at the end of a module's name.
        "rank_pattern": {f"^{re.escape(m)}": r for m, r in differ.items()},
        "alpha_pattern": {f"^{re.escape(m)}": r for m, r in differ.items()},
        "modules_to_save": list(the_plan.modules_to_save) or None,
        "bias": "lora_only" if the_plan.target_biases else "none",
        "fan_in_fan_out": any(kind == CONV1D for kind, _ in the_plan.targets.values()),
        "ensure_weight_tying": the_plan.tied,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if base.hub_id and base.hub_revision:
        # PEFT loads the base at this commit: the weights the delta was taken against.
        config["revision"] = base.hub_revision
    return config


def _exported(ref: str, out: Path, dtype: str, the_plan: AdapterPlan, pairs: _Pairs,
              dropped_squares: dict[str, float], exact: bool) -> LoraExport:
    """What was written, with the share of the squared delta the dropped tensors held."""
    dropped_energy = sum(dropped_squares.values())
    all_energy = pairs.total_energy + dropped_energy
    warning = None
    if the_plan.dropped:
        shown = ", ".join(the_plan.dropped[:5]) + (f" and {len(the_plan.dropped) - 5} more"
                                                  if len(the_plan.dropped) > 5 else "")
        warning = (f"{len(the_plan.dropped)} changed tensors a LoRA adapter cannot hold were left out "
                   f"({dropped_energy / all_energy:.2%} of the squared delta): {shown}")
    return LoraExport(
        ref=ref, out=out, rank=max(pairs.ranks.values()), dtype=dtype, targets=tuple(pairs.ranks),
        ranks=pairs.ranks, saved=the_plan.saved, dropped=the_plan.dropped,
        dropped_energy_fraction=dropped_energy / all_energy if all_energy > 0 else 0.0,
        energy_kept=sum(pairs.shares) / len(pairs.shares) if pairs.shares else 1.0,
        energy_kept_total=pairs.kept_energy / pairs.total_energy if pairs.total_energy > 0 else 1.0,
        exact=exact, bytes=(out / ADAPTER_WEIGHTS).stat().st_size, warning=warning,
        dropped_shares={n: e / all_energy if all_energy > 0 else 0.0 for n, e in dropped_squares.items()})
