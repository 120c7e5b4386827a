"""The PEFT LoRA adapter folder: its two files, the keys of its tensors, and a folder from outside
read and checked.

Layout (what PEFT's ``save_pretrained`` writes and ``PeftModel.from_pretrained`` reads), for a
module ``M`` of the base model::

    base_model.model.M.lora_A.weight          r x in     Linear: dW = scaling * B @ A
    base_model.model.M.lora_B.weight          out x r    (Conv1D, fan_in_fan_out: dW = (B @ A)^T)
    base_model.model.M.lora_embedding_A       r x num    Embedding: dW = scaling * (B @ A)^T
    base_model.model.M.lora_embedding_B       dim x r
    base_model.model.M.base_layer.bias        a LoRA-wrapped module's bias (bias="lora_only")
    base_model.model.M.<param>                a module in modules_to_save, whole

A folder from outside is untrusted (``read_adapter``): only safetensors are read (a pickle,
``adapter_model.bin``, is refused), the config's size, ranks and patterns are bounded, every
tensor key must be one this layout explains and name a tensor of the base, before any
arithmetic. ``Patterns`` matches rank_pattern and alpha_pattern as PEFT does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PickleRefused, UnsafeInput
from ..weights.models import TensorInfo, read_header
from .lora_factors import MAX_RANK
from .lora_plan import EMBEDDING, LoraError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX", "AdapterFolder", "Patterns", "pair_keys", "read_adapter",
           "read_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Bounds on what an adapter from outside may declare, checked before any allocation.
MAX_CONFIG_BYTES = 1 << 20
# rank_pattern and alpha_pattern keys that are regexes each cost a compile, and a match per module.
MAX_PATTERN_REGEXES = 1024


def pair_keys(module: str, kind: str) -> tuple[str, str]:
    """The keys of module ``module``'s pair (A, B), for a module of ``kind``."""
    if kind == EMBEDDING:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


@dataclass(frozen=True)
class AdapterFolder:
    """What ``read_adapter`` found in a folder, every key checked against the base."""

    config: dict[str, Any]
    infos: dict[str, TensorInfo]
    pairs: dict[str, tuple[str, str, str]]  # module -> (kind, key of A, key of B)
    whole: dict[str, str]  # base tensor name -> key
    base_copies: dict[str, str]  # base tensor name -> key of PEFT's copy of a wrapped layer's weight
    tied_copies: tuple[str, ...]  # keys of a tied head's pair, which repeat the embedding's


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter_config.json of ``folder``, bounded and checked: plain LoRA, its rank, alpha,
    patterns (no regex that could backtrack without bound) and modules_to_save well formed."""
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
    # A regex's parse tree has no public API: re's own parser is read (sre_parse, public until
    # 3.10, is a deprecated alias of it since), the same parser that compiles the pattern.
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


class Patterns:
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


def read_adapter(folder: Path, base_names: set[str]) -> AdapterFolder:
    """The config and tensor keys of the adapter in ``folder``, each key's role (a pair's factor, a
    tensor held whole, PEFT's copy of a base weight) checked against the base's ``base_names``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraError(f"{folder} is not a folder; give a PEFT adapter folder")
    config = read_config(folder)
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
    return AdapterFolder(config, infos, out_pairs, whole, copies, tuple(tied))
