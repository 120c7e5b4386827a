"""A stored version as a PEFT LoRA adapter that vLLM loads (``--enable-lora``, ``--max-lora-rank``).

vLLM reads a PEFT adapter folder, with rules of its own (vllm/lora/peft_helper.py,
vllm/lora/lora_model.py, vllm/lora/layers/base_linear.py; links and lines in
tests/test_vllm_lora.py):

- ``r`` at most the server's ``--max-lora-rank`` (16 by default): PEFTHelper.validate_legal;
- no ``modules_to_save``, no DoRA, ``bias`` "none" (a bias needs a server flag): the same;
- one scaling for every pair, ``lora_alpha / r`` from adapter_config.json (rank_pattern and
  alpha_pattern are not read); each pair may be of a smaller rank than ``r`` (it is copied into
  the first rows of a slot ``max_lora_rank`` wide);
- tensors only for modules the model class lists for LoRA, checked by the last part of the
  module's name: for Llama and Qwen2 the attention and MLP projections (q/k/v/o, gate/up/down);
  vLLM's GPT-2 has no LoRA support at all.

So the profile keeps pairs for those projections only, each of rank at most ``max_rank``
(smaller where ``energy`` says so), with ``lora_alpha = r``: the scaling is 1 in vLLM, and the
rank_pattern/alpha_pattern written for PEFT give each pair a scaling of 1 there too. Embeddings,
the output head, norms and biases that changed are listed as dropped, with their share of the
squared delta. This module never imports click, prints or exits.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, TYPE_CHECKING

from .export_source import architecture, model_config
from .lora import LoraExport, export_lora
from .lora_plan import LINEAR, AdapterPlan, LoraError

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["DEFAULT_MAX_RANK", "VLLM_ARCHITECTURES", "VLLM_MODULES", "export_vllm_lora"]

#: vLLM's default --max-lora-rank.
DEFAULT_MAX_RANK = 16
#: Hugging Face architectures whose vLLM model class supports LoRA, and that deltastore tests.
VLLM_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
#: The modules vLLM applies a LoRA to in those models (packed as qkv_proj and gate_up_proj).
VLLM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_architecture(folder: Path | None) -> None:
    name = architecture(model_config(folder, LoraError, "a vLLM adapter needs the base's config.json to know its "
                                     "architecture (register the base from a model folder, or give --base-path)"))
    if name not in VLLM_ARCHITECTURES:
        raise LoraError(f"a vLLM adapter is written for {', '.join(VLLM_ARCHITECTURES)} bases only; this base "
                        f"is {name[:80]!r} (export-lora without --for writes a plain PEFT adapter)")


def vllm_plan(the_plan: AdapterPlan, source: Any) -> AdapterPlan:
    """``the_plan`` narrowed to what vLLM loads: pairs for the projections only; the rest dropped."""
    _check_architecture(source.folder)
    keep = {m: t for m, t in the_plan.targets.items()
            if t[0] == LINEAR and m.rpartition(".")[2] in VLLM_MODULES}
    dropped = [f"{m}.weight" for m in the_plan.targets if m not in keep]
    dropped += list(the_plan.saved)  # modules_to_save and biases: vLLM refuses both
    dropped += list(the_plan.dropped)
    return replace(the_plan, targets=keep, saved=(), modules_to_save=(), target_biases=(),
                   dropped=tuple(dict.fromkeys(dropped)), tied=False)


def export_vllm_lora(store: Store, ref: str, out: str | os.PathLike, *, max_rank: int = DEFAULT_MAX_RANK,
                     rank: int | None = None, energy: float | None = None, dtype: str = "bf16",
                     base_weights: Any = None, progress: Any = None) -> LoraExport:
    """Write version ``ref`` as a PEFT adapter folder that vLLM loads with ``--max-lora-rank
    max_rank``: each changed projection a pair of rank ``min(rank, max_rank)``, or with
    ``energy`` F the smallest rank holding F of its delta's energy, capped at that."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LoraError(f"--max-rank must be a whole number of at least 1, got {max_rank!r}")
    cap = max_rank if rank is None else min(rank, max_rank)
    return export_lora(store, ref, out, rank=cap, energy=energy, dtype=dtype, base_weights=base_weights,
                       exact=energy is not None, progress=progress, plan_filter=vllm_plan)
