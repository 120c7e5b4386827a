"""Versions at any strength, and mixed: ``base + a*dW1 + b*dW2 + ...``, on a live module or
into a new model folder.

dW_i is what apply produces for version i minus the base. Each tensor is computed in float64 as
``base + (a*dW1 + b*dW2 + ...)``, summed in the order the versions were given, and rounded once
to the tensor's dtype. On a live module it is written like a plain apply (apply.py's
``install``): everything is read, verified and computed before the first parameter is touched,
and revert puts the saved base bytes back, never subtracting anything. One version at weight 1
is the plain apply itself, so that it is bit for bit the version's result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core import checked
from .apply import ApplyHandle, apply_module, install, match_names, module_tensors
from ..core.errors import BaseMismatch, DeltastoreError, short
from ..core.hashing import dtype_name, tensor_id
from .patch import write_model
from ..engine.reader import Reader
from ..repo.records import TensorEntry, Version

if TYPE_CHECKING:
    from ..weights.models import TensorInfo

__all__ = ["MixError", "MixHandle", "apply_mix", "export_mix", "mix_tensor", "mixed", "resolve_weights"]


class MixError(DeltastoreError, ValueError):
    """A mix that cannot be made: versions of different bases, a weight that is not a finite
    number, or a tensor whose delta is not defined (a changed shape or dtype)."""


def resolve_weights(reader: Reader, weights: Mapping[Any, float]) -> list[tuple[Version, float]]:
    """(version, weight) for each ref of ``weights``, in order; all of one base, each once."""
    if not weights:
        raise MixError("a mix needs at least one ref and its weight")
    out: list[tuple[Version, float]] = []
    for ref, weight in weights.items():
        version = reader.resolve(ref)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise MixError(f"the weight of {version.ref} must be a finite number, got {weight!r}")
        if any(v.id == version.id for v, _ in out):
            raise MixError(f"{version.ref} is in the mix twice: give each version once")
        if out and version.base_id != out[0][0].base_id:
            raise MixError(f"{version.ref} is on base {short(version.base_id)}, {out[0][0].ref} on "
                           f"{short(out[0][0].base_id)}: a mix is of versions of one base")
        out.append((version, float(weight)))
    return out


def mix_tensor(base: torch.Tensor, parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``base + (a1*(r1 - base) + a2*(r2 - base) + ...)`` in float64, rounded once to base's dtype,
    for ``parts`` = [(a_i, r_i)]."""
    b = base.detach().to(device="cpu", dtype=torch.float64)
    delta = torch.zeros_like(b)
    for weight, result in parts:
        delta += weight * (result.detach().to(device="cpu", dtype=torch.float64) - b)
    return (b + delta).to(base.dtype)


def _entries(versions: list[tuple[Version, float]]) -> dict[str, list[tuple[float, TensorEntry, str]]]:
    """Tensor name -> (weight, entry, ref) of each version that stores it, refusing tensors the
    base lacks (they have no delta)."""
    found: dict[str, list[tuple[float, TensorEntry, str]]] = {}
    for version, weight in versions:
        for entry in version.tensors:
            if entry.base_tensor_id is None:
                raise MixError(f"{version.ref} adds tensor {entry.name}, which its base lacks: it has no delta to "
                               "scale")
            found.setdefault(entry.name, []).append((weight, entry, version.ref))
    return found


# safetensors' names of the floating-point dtypes: the only deltas a weight can scale.
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _check_scalable(entry: TensorEntry, dtype: str, shape: tuple[int, ...], ref: str) -> None:
    """Refuse an entry whose delta is not a floating-point tensor of the base's dtype and shape."""
    if entry.dtype != dtype or tuple(entry.shape) != tuple(shape) or dtype not in _FLOATS:
        raise MixError(f"{ref} changes {entry.name} to {entry.dtype} {tuple(entry.shape)} from the base's "
                       f"{dtype} {tuple(shape)}: only a floating-point delta of one shape can be scaled")


def _result(reader: Reader, entry: TensorEntry, base: torch.Tensor, ref: str, untouched: str) -> torch.Tensor:
    result = reader.decode_entry(entry, base)
    entry.check_result(result, ref, untouched=untouched)
    return result


def apply_mix(reader: Reader, module: torch.nn.Module, weights: Mapping[Any, float]) -> ApplyHandle:
    """Apply ``base + sum a_i dW_i`` to ``module`` in place; the handle's ``revert`` puts the base
    bytes back. One version at weight 1 is a plain apply."""
    versions = resolve_weights(reader, weights)
    if len(versions) == 1 and versions[0][1] == 1.0:
        return apply_module(reader, module, versions[0][0])
    by_name = _entries(versions)
    current = module_tensors(module, list(by_name))
    mapping = match_names(list(by_name), set(current))
    for name, parts in by_name.items():
        live = current[mapping[name]]
        for _, entry, ref in parts:
            _check_scalable(entry, dtype_name(live.dtype), tuple(live.shape), ref)
    plan = []
    wrong = []
    for name, parts in by_name.items():
        live = current[mapping[name]]
        base = live.detach().to("cpu")
        entry = parts[0][1]
        # Hashed (or written with known bytes) earlier in this process and unchanged since: no
        # second hashing, as in a plain apply.
        if checked.known_id(live) != entry.base_tensor_id and tensor_id(base) != entry.base_tensor_id:
            wrong.append(name)
            continue
        results = [(weight, _result(reader, e, base, ref, "nothing was changed")) for weight, e, ref in parts]
        plan.append((entry, live, mix_tensor(base, results)))
    if wrong:
        raise BaseMismatch(versions[0][0].base_id, None, wrong,
                           "these tensors are not the base's (is another stance applied? revert it first)")
    handle = MixHandle(versions[0][0], module, weights=tuple((v.ref, w) for v, w in versions))
    return install(handle, plan, [None] * len(plan))


def mixed(reader: Reader, weights: Mapping[Any, float], *, base_weights: Any = None
          ) -> tuple[dict[str, TensorInfo], Callable[[str], torch.Tensor]]:
    """Like the reader's ``materialize``, for a mix: every tensor's description, and a function that
    produces one mixed tensor at a time (each version's result verified). Every entry is
    checked to be scalable before the first tensor is produced."""
    versions = resolve_weights(reader, weights)
    source = reader.base_source(reader.base(versions[0][0].base_id), base_weights)
    by_name = _entries(versions)
    for version, _ in versions:
        for e in version.tensors:
            info = source.infos[e.name]
            _check_scalable(e, info.dtype, info.shape, version.ref)
    infos, base_tensor = reader.materialize(versions[0][0], base_weights=source)
    producers = [reader.materialize(v, base_weights=source)[1] for v, _ in versions]
    stored = [{e.name for e in v.tensors} for v, _ in versions]

    def tensor(name: str) -> torch.Tensor:
        if name not in by_name:
            return base_tensor(name)  # the base's own (verified by materialize)
        base = source.get(name)
        return mix_tensor(base, [(weight, produce(name)) for (_, weight), produce, names
                                 in zip(versions, producers, stored) if name in names])

    return infos, tensor


class MixHandle(ApplyHandle):
    """What a mix changed in a module; ``weights``: (ref, weight) of each version in it."""

    def __init__(self, version: Version, module: torch.nn.Module, *, weights: tuple[tuple[str, float], ...]):
        super().__init__(version, module)
        self.weights = weights

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]


def export_mix(reader: Reader, weights: Mapping[Any, float], out: str | os.PathLike, *, base_weights: Any = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the mixed model as a Hugging Face model folder (the base's other files beside it),
    like the store's ``export`` of one version."""
    versions = resolve_weights(reader, weights)
    source = reader.base_source(reader.base(versions[0][0].base_id), base_weights)
    infos, tensor = mixed(reader, weights, base_weights=source)
    return write_model(Path(out), infos, tensor, files_from=source.folder, progress=progress)
