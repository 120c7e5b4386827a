"""To and from PEFT LoRA adapter folders.

This module owns the mapping between a stored version and a PEFT LoRA adapter:

- ``plan``: which of a fine-tune's changed tensors a LoRA adapter can hold, and how: a low-rank
  pair for each changed 2-D weight of a Linear, Embedding or (GPT-2) Conv1D module; a whole
  copy (``modules_to_save``) for the changed tensors of other modules (norms); the biases of
  LoRA-wrapped modules (``bias="lora_only"``). Everything else is reported as dropped, never
  lost silently. ``compare`` prices its LoRA rows with the same plan.
- ``export_lora``: a version -> ``adapter_config.json`` + ``adapter_model.safetensors``, the
  factors from the truncated SVD of each delta, ``lora_alpha = r`` so that the scaling is 1.
- ``import_lora``: an adapter folder -> a new version of a stance. The folder is untrusted:
  only safetensors are read, every name, shape and size is checked against the base before
  any arithmetic, and a key the adapter format does not explain is refused.

Adapter layout (what PEFT's ``save_pretrained`` writes and ``PeftModel.from_pretrained`` reads),
for a module ``M`` of the base model::

    base_model.model.M.lora_A.weight          r x in     Linear: dW = scaling * B @ A
    base_model.model.M.lora_B.weight          out x r    (Conv1D, fan_in_fan_out: dW = (B @ A)^T)
    base_model.model.M.lora_embedding_A       r x num    Embedding: dW = scaling * (B @ A)^T
    base_model.model.M.lora_embedding_B       dim x r
    base_model.model.M.base_layer.bias        a LoRA-wrapped module's bias (bias="lora_only")
    base_model.model.M.<param>                a module in modules_to_save, whole

It never loads a pickle (``adapter_model.bin`` is refused) and imports peft nowhere: the files
are written and read here, so that exporting needs no peft installed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..metrics.analysis import energy_fraction, locate, rank_for, singular_values
from ..core.pools import in_order
from ..core.durable import new_folder
from ..core.errors import DeltastoreError, PickleRefused, UnsafeInput
from ..weights.models import TensorInfo, TensorSource, open_model, read_header, read_tensor
from ..codecs.quantize import FACTOR_DTYPES, randomized_svd, truncated_svd

# transformers (optional, seconds to import) is imported only inside module_types: a model's
# Conv1D layers are transformers' own class.

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterPlan",
    "LoraError",
    "LoraExport",
    "LoraImport",
    "AdapterWeights",
    "adapter_weights",
    "export_lora",
    "import_lora",
    "module_types",
    "plan",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Bounds on what an adapter from outside may declare, checked before any allocation.
MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 1 << 16
# rank_pattern and alpha_pattern keys that are regexes each cost a compile, and a match per module.
MAX_PATTERN_REGEXES = 1024

LINEAR, EMBEDDING, CONV1D = "linear", "embedding", "conv1d"


class LoraError(DeltastoreError, ValueError):
    """An adapter that cannot be written or read: a bad rank, a malformed or foreign adapter."""


# ---------------------------------------------------------------------------------------------
# Which tensors an adapter can hold


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


def factors(delta: torch.Tensor, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter pair whose product (as PEFT forms it for ``kind``) is the best
    rank-``rank`` approximation of ``delta``, in float32."""
    us, vh = truncated_svd(delta.to(torch.float32), rank)  # delta ~ us @ vh
    if kind == LINEAR:
        return vh, us  # A: r x in, B: out x r
    # Embedding (num x dim) and Conv1D (in x out): PEFT forms (B @ A)^T.
    return us.T.contiguous(), vh.T.contiguous()


def factors_randomized(delta: torch.Tensor, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As ``factors``, by a randomized SVD (``quantize.randomized_svd``): (A, B, the share of
    the delta's energy the pair holds, measured)."""
    us, vh, held = randomized_svd(delta.to(torch.float32), rank)
    if kind == LINEAR:
        return vh, us, held
    return us.T.contiguous(), vh.T.contiguous(), held


def product(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """The delta (before scaling) that an adapter pair stands for, in float32."""
    out = b.to(torch.float32) @ a.to(torch.float32)
    return out if kind == LINEAR else out.T.contiguous()


def _keys(module: str, kind: str) -> tuple[str, str]:
    if kind == EMBEDDING:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


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


def check_rank_options(rank: int | None, energy: float | None) -> None:
    """An export's --rank / --energy, as every adapter format takes them."""
    if rank is None and energy is None:
        raise LoraError("give a rank (--rank R) or an energy fraction (--energy F)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_RANK):
        raise LoraError(f"the rank must be a whole number from 1 to {MAX_RANK}, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise LoraError(f"--energy must be a fraction above 0 and at most 1, got {energy!r}")


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
    check_rank_options(rank, energy)
    if dtype not in FACTOR_DTYPES:
        raise LoraError(f"the adapter dtype must be one of {', '.join(FACTOR_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{out} exists and is not an empty folder; choose a new one")

    version = store.resolve(ref)
    base = store.base(version.base_id)
    source = store.base_source(base, base_weights)
    infos, tensor = store.materialize(version, base_weights=source)
    base_ids = {n: r["tensor_id"] for n, r in store.base_tensors(base).items()}
    changed = [e.name for e in version.tensors if e.result_tensor_id != base_ids.get(e.name)]
    the_plan = plan(infos, changed, types=module_types(source.folder))
    if plan_filter is not None:
        the_plan = plan_filter(the_plan, source)

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kept_energy = total_energy = dropped_energy = 0.0
    shares: list[float] = []
    target_dtype = FACTOR_DTYPES[dtype]
    # The exact truncated SVD needs each delta's whole spectrum (an eigendecomposition per
    # matrix); a randomized one a few thin products: 3-4x less work, at an energy held within
    # a few 1e-4 of the exact one on SmolLM2's deltas, and measured, not estimated.
    exact = exact or energy is not None
    steps = len(the_plan.targets) + len(the_plan.saved)

    def pair(module: str) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        kind, shape = the_plan.targets[module]
        name = f"{module}.weight"
        delta = tensor(name).to(torch.float32) - source.get(name).to(torch.float32)
        r = min(shape) if rank is None else min(rank, min(shape))
        total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        if exact:
            spectrum = singular_values(delta)
            if energy is not None:
                r = min(r, max(1, rank_for(spectrum, energy)))
            a, b = factors(delta, r, kind)
            held = energy_fraction(spectrum, r)
        else:
            a, b, held = factors_randomized(delta, r, kind)
        return a.to(target_dtype).contiguous(), b.to(target_dtype).contiguous(), r, held, total

    for k, (module, (a, b, r, held, total)) in enumerate(in_order(list(the_plan.targets), pair)):
        key_a, key_b = _keys(module, the_plan.targets[module][0])
        state[key_a], state[key_b] = a, b
        ranks[module] = r
        shares.append(held)
        total_energy += total
        kept_energy += held * total
        if progress:
            progress(k + 1, steps)
    for k, name in enumerate(the_plan.saved):
        if progress:
            progress(len(the_plan.targets) + k + 1, steps)
    for name in the_plan.saved:
        module, _, leaf = name.rpartition(".")
        key = f"{PREFIX}{module}.base_layer.bias" if name in the_plan.target_biases else f"{PREFIX}{name}"
        state[key] = tensor(name).contiguous()
    dropped_squares = delta_energies(the_plan.dropped, tensor, source, infos)
    dropped_energy = sum(dropped_squares.values())

    if not ranks:
        raise LoraError(f"{version.ref} changed no 2-D weight of a Linear or Embedding module: "
                        "there is nothing a LoRA adapter could hold")
    top = max(ranks.values())
    differ = {m: r for m, r in ranks.items() if r != top}
    all_modules = {n.rpartition(".")[0] for n in infos}
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
    if any(kind == CONV1D for kind, _ in the_plan.targets.values()) and \
            any(kind == LINEAR for kind, _ in the_plan.targets.values()):
        raise LoraError("the fine-tune changed both Conv1D and Linear weights: one PEFT adapter "
                        "cannot hold both (fan_in_fan_out is one setting)")

    with new_folder(out) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "deltastore.version": version.id})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # As export writes a model folder: readable by all.
        for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.chmod(tmp / file, 0o644)

    all_energy = total_energy + dropped_energy
    warning = None
    if the_plan.dropped:
        shown = ", ".join(the_plan.dropped[:5]) + (f" and {len(the_plan.dropped) - 5} more"
                                                  if len(the_plan.dropped) > 5 else "")
        warning = (f"{len(the_plan.dropped)} changed tensors a LoRA adapter cannot hold were left out "
                   f"({dropped_energy / all_energy:.2%} of the squared delta): {shown}")
    return LoraExport(
        ref=version.ref, out=out, rank=top, dtype=dtype, targets=tuple(ranks), ranks=ranks,
        saved=the_plan.saved, dropped=the_plan.dropped,
        dropped_energy_fraction=dropped_energy / all_energy if all_energy > 0 else 0.0,
        energy_kept=sum(shares) / len(shares) if shares else 1.0,
        energy_kept_total=kept_energy / total_energy if total_energy > 0 else 1.0,
        exact=exact, bytes=(out / ADAPTER_WEIGHTS).stat().st_size, warning=warning,
        dropped_shares={n: e / all_energy if all_energy > 0 else 0.0 for n, e in dropped_squares.items()})


# ---------------------------------------------------------------------------------------------
# Import


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
class _Adapter:
    config: dict[str, Any]
    infos: dict[str, TensorInfo]
    pairs: dict[str, tuple[str, str, str]]  # module -> (kind, key of A, key of B)
    whole: dict[str, str]  # base tensor name -> key
    base_copies: dict[str, str]  # base tensor name -> key of PEFT's copy of a wrapped layer's weight
    tied_copies: tuple[str, ...]  # keys of a tied head's pair, which repeat the embedding's


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise LoraError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UnsafeInput(f"{path} has {size} bytes; an adapter config of at most {MAX_CONFIG_BYTES} is read")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # a megabyte of '[' recurses out
        raise LoraError(f"{path} is not JSON: {str(e)[:120]}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{folder} is a {config.get('peft_type')!r} adapter; only LoRA adapters are read")
    for flag in ("use_dora", "use_qalora", "use_bdlora"):
        if config.get(flag):
            raise LoraError(f"{folder} is a {flag[4:]} adapter, whose update is not B @ A; only plain LoRA is read")
    if config.get("layer_replication") or config.get("target_parameters"):
        raise LoraError(f"{folder} uses layer_replication or target_parameters, which import-lora does not read")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise LoraError(f"{path}: r must be a whole number from 1 to {MAX_RANK}, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()):
            raise LoraError(f"{path}: {key} must map module patterns to numbers")
        regexes = [pattern for pattern in value if _literal(pattern) is None]
        if len(regexes) > MAX_PATTERN_REGEXES:
            raise LoraError(f"{path}: {key} holds {len(regexes)} regular expressions, more than the "
                            f"{MAX_PATTERN_REGEXES} read; give module names (as export-lora writes them)")
        for pattern in regexes:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError):
                raise LoraError(f"{path}: {key} key {pattern[:80]!r} is not a regular expression") from None
            why = _backtracking(pattern)
            if why:
                raise LoraError(f"{path}: {key} key {pattern[:80]!r} {why}; give module names (as export-lora "
                                "writes them) or simple patterns")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise LoraError(f"{path}: modules_to_save must be a list of module names")
    return config


def _backtracking(pattern: str) -> str | None:
    """Why matching `pattern` could take time without bound, or None. PEFT matches these keys as
    regexes against every module name, and Python's re has no time limit: a repeat of something
    that can itself repeat or branch ((a+)+, (a|a)*) backtracks exponentially, a backreference
    likewise, and each unbounded repeat multiplies the work by the name's length."""
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover (3.10)
        import sre_parse  # type: ignore[no-redef]
    if len(pattern) > 256:
        return "is longer than 256 characters"
    unbounded = 0

    def walk(items, in_repeat: bool) -> str | None:  # noqa: ANN001 (sre's parse tree)
        nonlocal unbounded
        for op, av in items:
            name = str(op)
            if name.endswith("REPEAT"):
                lo, hi, sub = av
                many = hi == sre_parse.MAXREPEAT or hi > 1
                if many and in_repeat:
                    return "repeats a repeat"
                unbounded += hi == sre_parse.MAXREPEAT
                found = walk(sub, in_repeat or many)
            elif name == "SUBPATTERN":
                found = walk(av[-1], in_repeat)
            elif name == "BRANCH":
                if in_repeat:
                    return "repeats an alternation"
                found = next((w for w in (walk(b, in_repeat) for b in av[1]) if w), None)
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(av[1], in_repeat)
            elif name.startswith("GROUPREF"):
                return "holds a backreference"
            else:
                found = None
            if found:
                return found
        return None

    try:
        why = walk(sre_parse.parse(pattern), False)
    except (re.error, RecursionError, OverflowError, ValueError):
        return "is not a regular expression"
    return why or (f"has {unbounded} unbounded repeats (at most 2)" if unbounded > 2 else None)


class _Patterns:
    """rank_pattern or alpha_pattern, matched as PEFT matches them: the first key, in order,
    whose regex matches the end of the module name after a dot, or the whole name. Each regex
    is compiled once (re's own cache holds 512, and an adapter may hold more keys), and the
    keys export-lora writes, `^` + an escaped module name, are looked up instead."""

    def __init__(self, patterns: Mapping[str, Any]):
        self.exact: dict[str, tuple[int, Any]] = {}
        self.regexes: list[tuple[int, re.Pattern, Any]] = []
        for i, (key, value) in enumerate(patterns.items()):
            name = _literal(key)
            if name is not None:
                self.exact.setdefault(name, (i, value))
            else:
                self.regexes.append((i, re.compile(rf"(.*\.)?({key})$"), value))

    def value(self, module: str, default: Any) -> Any:
        exact = self.exact.get(module)
        for i, regex, value in self.regexes:
            if exact is not None and i > exact[0]:
                break
            if regex.match(module):
                return value
        return exact[1] if exact is not None else default


def _literal(key: str) -> str | None:
    """The module name that key `^` + re.escape(name) matches, and only it; None for any other key."""
    if not key.startswith("^"):
        return None
    name = re.sub(r"\\(.)", r"\1", key[1:], flags=re.S)
    return name if re.escape(name) == key[1:] else None


def _read_adapter(folder: Path, base_names: set[str]) -> _Adapter:
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraError(f"{folder} is not a folder; give a PEFT adapter folder")
    config = _read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if any((folder / n).exists() for n in ("adapter_model.bin", "adapter_model.pt")):
            raise PickleRefused(str(folder / "adapter_model.bin"))
        raise LoraError(f"{folder} has no {ADAPTER_WEIGHTS}")
    infos, _, _ = read_header(weights)  # every name, dtype, shape and offset checked
    pairs: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    copies: dict[str, str] = {}
    tied: list[str] = []
    saved_modules = config.get("modules_to_save") or []
    for key in infos:
        if not key.startswith(PREFIX):
            raise LoraError(f"{weights}: tensor {key[:120]!r} does not start with {PREFIX!r}; "
                            "is it a PEFT LoRA adapter?")
        rest = key[len(PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.weight)?|(.+)\.(lora_embedding_A|lora_embedding_B)", rest)
        if match:
            module = match.group(1) or match.group(3)
            part = match.group(2) or match.group(4)
            kind = EMBEDDING if part.startswith("lora_embedding") else "matrix"
            pairs.setdefault(module, {})["kind"] = kind
            pairs[module][part[-1]] = key
            continue
        module, _, leaf = rest.rpartition(".")
        if module.endswith(".base_layer"):
            name = f"{module[:-len('.base_layer')]}.{leaf}"
        else:
            name = rest
        if name not in base_names:
            if module.endswith(".base_layer") and leaf == "weight" and config.get("ensure_weight_tying", True):
                # PEFT saves the base weights of embedding-like layers it wraps; a tied head's
                # is the embedding itself, which the base holds under the embedding's name.
                tied.append(key)
                continue
            raise LoraError(f"{weights}: tensor {key[:120]!r} names {name[:120]!r}, which the base does not have")
        if module.endswith(".base_layer") and leaf == "weight":
            copies[name] = key  # what the base holds already, unless the vocabulary was resized
            continue
        owner = name.rpartition(".")[0]
        is_saved = any(owner == m or owner.endswith("." + m) for m in saved_modules)
        if leaf == "bias" or is_saved or module.endswith(".base_layer"):
            whole[name] = key
        else:
            raise LoraError(f"{weights}: tensor {key[:120]!r} is neither a LoRA factor, a bias nor part of "
                            "a module in modules_to_save")
    out_pairs = {}
    for module, parts in pairs.items():
        if "A" not in parts or "B" not in parts:
            raise LoraError(f"{weights}: module {module[:120]!r} has lora_{'A' if 'A' not in parts else 'B'} missing")
        if f"{module}.weight" not in base_names:
            if config.get("ensure_weight_tying") or module.endswith("lm_head"):
                # The tied head's pair is the embedding's, transposed; the tensor is one.
                tied += [parts["A"], parts["B"]]
                continue
            raise LoraError(f"{weights}: the adapter changes {module[:120]!r}, which the base does not have "
                            "(an adapter for another model?)")
        out_pairs[module] = (parts["kind"], parts["A"], parts["B"])
    return _Adapter(config, infos, out_pairs, whole, copies, tuple(tied))


@dataclass(frozen=True)
class AdapterWeights:
    """What a PEFT adapter folder makes of a base: ``target``, the base with every pair merged
    (W + scaling * B @ A, in float32, rounded once to W's dtype) and every tensor held whole in
    place; ``deltas``: weight name -> (kind, key A, key B, scaling); ``replaced``: weight name ->
    key of its whole copy; the pairs' ranks and dtypes."""

    target: TensorSource
    parsed: _Adapter
    deltas: dict[str, tuple[str, str, str, float]]
    replaced: dict[str, str]
    ranks: list[int]
    dtypes: set[str]


def adapter_weights(folder: str | os.PathLike, base_src: TensorSource) -> AdapterWeights:
    """The weights a PEFT LoRA adapter folder gives ``base_src``, as PEFT's merge computes
    them; every name, shape and rank of the (untrusted) folder checked first."""
    folder = Path(folder)
    parsed = _read_adapter(folder, set(base_src.names))
    config = parsed.config
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    use_rslora = bool(config.get("use_rslora"))
    r_default, alpha_default = config["r"], config.get("lora_alpha", config["r"])
    ranks, dtypes = [], set()

    rank_patterns = _Patterns(config.get("rank_pattern") or {})
    alpha_patterns = _Patterns(config.get("alpha_pattern") or {})
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
