"""Turning a fine-tuned model into tensor entries: compare it with its base tensor by tensor,
choose what to store, encode it and write the objects.

Streams: at most one base tensor and one fine-tuned tensor (plus their encoding) are in memory
at a time. Every object is written (fsynced, renamed) and shielded from gc by a pending row
before the version that references it can land.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import encodings
from .errors import BaseMismatch, ModelFormatError, SelectionError
from .hashing import base_id as compute_base_id
from .hashing import bytes_id, tensor_id
from .models import TensorSource
from .records import Base, ObjectRef, TensorEntry

# Norms are computed in float64 over chunks of this many elements, so that a 150M-element
# embedding does not need two fp32 copies of itself at once.
CHUNK = 1 << 24


@dataclass
class Change:
    name: str
    base_id: str | None
    target_id: str
    rel_change: float | None
    energy: float


@dataclass
class Built:
    entries: list[TensorEntry] = field(default_factory=list)
    unchanged: int = 0
    bytes_new: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # object id -> bytes on disk
    selection: dict[str, Any] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    left_out_energy_fraction: float = 0.0


def delta_stats(base: torch.Tensor | None, target: torch.Tensor) -> tuple[float | None, float]:
    """(||dW|| / ||W||, ||dW||^2), chunked; (None, ||target||^2) where no base tensor matches."""
    t = target.reshape(-1)
    if base is None or base.shape != target.shape:
        return None, sum(float(c.double().square().sum()) for c in t.split(CHUNK))
    b = base.reshape(-1)
    d2 = w2 = 0.0
    for bc, tc in zip(b.split(CHUNK), t.split(CHUNK)):
        bd = bc.double()
        d2 += float((tc.double() - bd).square().sum())
        w2 += float(bd.square().sum())
    rel = math.sqrt(d2 / w2) if w2 > 0 else None
    if rel is not None and not math.isfinite(rel):
        rel = None
    return rel, d2


def check_names(base: Base, expected: dict[str, dict], target: TensorSource) -> None:
    missing = sorted(set(expected) - set(target.names))
    extra = sorted(set(target.names) - set(expected))
    reshaped = sorted(n for n in set(expected) & set(target.names)
                      if list(target.infos[n].shape) != json.loads(expected[n]["shape"]))
    if len(reshaped) > len(expected) // 2:
        # A resized embedding is a fine-tune; most tensors of another shape is another model.
        actual = compute_base_id((n, tensor_id(target.get(n))) for n in target.names)
        raise BaseMismatch(base.id, actual, reshaped, "most tensors have other shapes")
    if missing or extra:
        actual = compute_base_id((n, tensor_id(target.get(n))) for n in target.names)
        names = missing or extra
        what = "the model lacks tensors of the base" if missing else "the model has tensors the base lacks"
        raise BaseMismatch(base.id, actual, names, what)


def build_entries(store: Any, base: Base, base_src: TensorSource, target: TensorSource, *, token: str,
                  encoding: str, encoding_for: list[tuple[str, str]] | None, encoding_options: dict,
                  include: str | None, exclude: str | None, top_k: int | None,
                  min_rel_change: float | None, energy: float | None,
                  progress: Callable[[int, int], None] | None) -> Built:
    expected = store.base_tensors(base)
    check_names(base, expected, target)
    spec_for = _spec_chooser(encoding, encoding_for, encoding_options)
    by_stats = any(x is not None for x in (top_k, min_rel_change, energy))
    by_name = _name_filter(include, exclude)
    built = Built()
    changes: dict[str, Change] = {}
    names = target.names
    total = len(names) * (2 if by_stats else 1)

    def base_tensor(name: str) -> torch.Tensor:
        t = base_src.get(name) if name in base_src else None
        if t is None or tensor_id(t) != expected[name]["tensor_id"]:
            raise BaseMismatch(base.id, None, [name], "the base weights differ from those registered")
        return t

    # Pass 1: what changed, and by how much. Encodes right away unless the selection
    # needs every tensor's change first (top-k, energy, min-rel-change).
    for k, name in enumerate(names):
        b = base_tensor(name)
        t = target.get(name)
        tid = tensor_id(t)
        if tid == expected[name]["tensor_id"]:
            built.unchanged += 1
        else:
            rel, e = delta_stats(b, t)
            changes[name] = Change(name, expected[name]["tensor_id"], tid, rel, e)
            if not by_stats and by_name(name):
                _store_tensor(store, built, name, b, t, changes[name], spec_for(name, b, t), token)
        if progress:
            progress(k + 1, total)

    selected = _select(changes, include, exclude, top_k, min_rel_change, energy)
    if selected is not None:
        built.selection = selected.policy
        built.left_out = list(selected.left_out)
        built.left_out_energy_fraction = selected.left_out_energy_fraction
    if by_stats:
        kept = set(selected.kept)
        for k, name in enumerate(names):
            if name in kept:
                b, t = base_src.get(name), target.get(name)
                _store_tensor(store, built, name, b, t, changes[name], spec_for(name, b, t), token)
            if progress:
                progress(len(names) + k + 1, total)
    return built


def _select(changes: dict[str, Change], include, exclude, top_k, min_rel_change, energy):
    if all(x is None for x in (include, exclude, top_k, min_rel_change, energy)):
        return None
    from .selection import TensorDelta, select

    deltas = {c.name: TensorDelta(rel_change=c.rel_change if c.rel_change is not None else math.inf,
                                  energy=c.energy) for c in changes.values()}
    return select(deltas, include=include, exclude=exclude, top_k=top_k,
                  min_rel_change=min_rel_change, energy=energy)


def _name_filter(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise SelectionError(f"not a regular expression: {e}") from None
    return lambda name: (inc is None or bool(inc.search(name))) and (exc is None or not exc.search(name))


def _spec_chooser(encoding: str, rules: list[tuple[str, str]] | None, options: dict):
    compiled = []
    for pattern, spec in rules or []:
        try:
            compiled.append((re.compile(pattern), spec))
        except re.error as e:
            raise SelectionError(f"--encoding-for {pattern!r} is not a regular expression: {e}") from None
        encodings.get(spec, **options)  # refuse a bad spec before any work
    encodings.get(encoding, **options)

    def choose(name: str, base: torch.Tensor, target: torch.Tensor) -> encodings.Encoding:
        spec = next((s for p, s in compiled if p.search(name)), encoding)
        enc = encodings.get(spec, **options)
        # Norms and biases are tiny and hurt most when quantised; a changed dtype or shape
        # has no delta to quantise.
        if not enc.exact and (target.dim() < 2 or base.dtype != target.dtype or base.shape != target.shape):
            return encodings.get("lossless")
        return enc
    return choose


def _store_tensor(store: Any, built: Built, name: str, base: torch.Tensor, target: torch.Tensor,
                  change: Change, enc: encodings.Encoding, token: str) -> None:
    encoded = enc.encode(base, target)
    if enc.exact:
        result_id, rel_error = change.target_id, 0.0
    else:
        result = enc.decode(base, encoded, dtype=target.dtype, shape=tuple(target.shape))
        result_id = tensor_id(result)
        err2, _ = _sq_diff(result, target)
        rel_error = math.sqrt(err2 / change.energy) if change.energy > 0 else 0.0
    ids = {part: bytes_id(data) for part, data in encoded.parts.items()}
    store.catalog.add_pending(token, sorted(set(ids.values())))
    refs = {}
    for part, data in encoded.parts.items():
        put = store.objects.put(data, object_id=ids[part])
        built.sizes[put.id] = put.size
        if put.new:
            built.bytes_new += put.size
        refs[part] = ObjectRef(put.id, put.raw_size)
    from .hashing import dtype_name

    built.entries.append(TensorEntry(
        name, dtype_name(target.dtype), tuple(target.shape), enc.spec, encoded.params, refs,
        change.base_id, change.target_id, result_id,
        _round(change.rel_change), _round(rel_error)))


def _sq_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    total = 0.0
    for ac, bc in zip(a.reshape(-1).split(CHUNK), b.reshape(-1).split(CHUNK)):
        total += float((ac.double() - bc.double()).square().sum())
    return total, a.numel()


def _round(x: float | None) -> float | None:
    # Manifests are hashed: keep floats short and stable (6 significant digits).
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
