"""Turning a fine-tuned model into tensor entries: compare it with its base tensor by tensor,
choose what to store, encode it and write the objects.

Streams: at most one base tensor and one fine-tuned tensor (plus their encoding) are in memory
at a time. Every object is written (fsynced, renamed) and shielded from gc by a pending row
before the version that references it can land.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, TYPE_CHECKING

import torch

from ..codecs import encodings
from .chain import reference_tensor
from ..core.errors import BaseMismatch, EncodingError, NonFiniteTensor, short, shown_names
from ..core.hashing import base_id as compute_base_id
from ..core.hashing import bytes_id, dtype_name, tensor_id
from ..weights.models import TensorSource
from ..core.pools import in_order
from ..repo.records import Base, ObjectRef, TensorEntry, Version
from ..codecs.selection import Selector, TensorDelta, parse_encoding_rules, select

if TYPE_CHECKING:  # store.py imports this module: Store for types only
    from ..store import Store

# Norms are taken a cache-sized slice at a time (2x faster than 4M-element slices here).
CHUNK = 1 << 18
# A fine-tune moves a tensor by 0.0001-0.003 of its norm (SmolLM2, Adam, lr 2e-5); another model
# of the same shape, or a random init, by about 1.4. Above this median, it is not a fine-tune.
NOT_A_FINE_TUNE = 0.3


@dataclass
class Change:
    name: str
    base_id: str | None
    target_id: str
    rel_change: float | None
    energy: float


@dataclass(frozen=True)
class Stored:
    entry: TensorEntry
    sizes: dict[str, int]  # object id -> bytes on disk
    bytes_new: int


@dataclass
class Built:
    entries: list[TensorEntry] = field(default_factory=list)
    unchanged: int = 0
    bytes_new: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # object id -> bytes on disk
    selection: dict[str, Any] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    left_out_energy_fraction: float = 0.0
    median_rel_change: float | None = None  # over every tensor, unchanged ones at 0

    def add(self, stored: Stored) -> None:
        self.entries.append(stored.entry)
        self.sizes.update(stored.sizes)
        self.bytes_new += stored.bytes_new


def delta_stats(base: torch.Tensor | None, target: torch.Tensor,
                base_sq_norm: float | None = None) -> tuple[float | None, float]:
    """(||dW|| / ||W||, ||dW||^2); (None, ||target||^2) where no base tensor matches.

    The difference is taken in the tensors' own dtype: for two nearby floats it is exact
    (Sterbenz), and it avoids fp32 copies of a 150M-element embedding. Norms accumulate in
    fp32; ||W||^2 comes from `base add` when it recorded it."""
    if not (target.is_floating_point() and base is not None and base.shape == target.shape
            and base.dtype == target.dtype) or target.element_size() == 1:
        # No matching base, an integer tensor, or float8 (which torch cannot subtract).
        if base is None or base.shape != target.shape:
            return None, float(torch.linalg.vector_norm(target.double())) ** 2
        d2 = float(torch.linalg.vector_norm(target.double() - base.double())) ** 2
        w2 = float(torch.linalg.vector_norm(base.double())) ** 2
        return (math.sqrt(d2 / w2) if w2 > 0 and math.isfinite(d2 / w2) else None), d2
    d2 = sum(_sq(tc - bc) for bc, tc in zip(_chunks(base), _chunks(target)))
    w2 = base_sq_norm if base_sq_norm is not None else sq_norm(base)
    rel = math.sqrt(d2 / w2) if w2 and math.isfinite(d2 / w2) else None
    return rel, d2


def sq_norm(t: torch.Tensor) -> float | None:
    """||t||^2 of a float tensor, accumulated in fp32 (fp64 for fp64); None for other tensors
    or where it is not finite."""
    if not t.is_floating_point():
        return None
    value = sum(_sq(c) for c in _chunks(t))
    return value if math.isfinite(value) else None


def _sq(c: torch.Tensor) -> float:
    if c.element_size() == 1:  # float8 promotes to nothing: widen it first
        c = c.float()
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(c, dtype=acc)) ** 2


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Norms of a 150M-element embedding, chunk by chunk: the fp32 temporaries stay small.
    return t.reshape(-1).split(CHUNK)


def check_names(store: Store, base: Base, expected: dict[str, dict], target: TensorSource) -> None:
    """Refuse (`BaseMismatch`) a model whose tensors are not those of `base` (`expected`: its
    tensors' rows) by name, or mostly by shape: it was not made from that base. The message
    names the registered base it fits, when one does."""
    missing = sorted(set(expected) - set(target.names))
    extra = sorted(set(target.names) - set(expected))
    reshaped = sorted(n for n in set(expected) & set(target.names)
                      if list(target.infos[n].shape) != json.loads(expected[n]["shape"]))
    if len(reshaped) > len(expected) // 2:
        # A resized embedding is a fine-tune; most tensors of another shape is another model.
        names, what = reshaped, "most tensors have other shapes"
    elif missing or extra:
        names = missing or extra
        what = "the model lacks tensors of the base" if missing else "the model has tensors the base lacks"
    else:
        return
    actual = compute_base_id((n, tensor_id(target.get(n))) for n in target.names)
    fits = fitting_base(store, target, other_than=base.id)
    hint = (f"it fits base {_shown(fits)}: commit it with --base {fits.name or short(fits.id)}" if fits else
            f"no registered base fits it (as a base it would be {short(actual)}): give --base the model it was "
            "made from")
    raise BaseMismatch(base.id, actual, names, message=(
        f"this fine-tune was not made from base {_shown(base)}: {what} ({shown_names(names)}); {hint}"))


def fitting_base(store: Store, target: TensorSource, *, other_than: str) -> Base | None:
    """A registered base (other than `other_than`) with the model's tensor names and shapes
    (read from the catalog, no weights): the one a fine-tune was likely made from."""
    shapes = {n: list(info.shape) for n, info in target.infos.items()}
    for candidate in store.bases():
        if candidate.id == other_than or candidate.tensor_count != len(shapes):
            continue
        rows = store.base_tensors(candidate)
        if rows.keys() == shapes.keys() and all(json.loads(r["shape"]) == shapes[n] for n, r in rows.items()):
            return candidate
    return None


def _shown(base: Base) -> str:
    return f"{base.name + ' ' if base.name else ''}{short(base.id)}"


def build_entries(store: Store, base: Base, base_src: TensorSource, target: TensorSource, *, token: str,
                  encoding: str, encoding_for: list[tuple[str, str]] | None, encoding_options: dict,
                  selector: Selector, progress: Callable[[int, int], None] | None,
                  allow_nonfinite: bool = False, base_hashed: bool = False, against: Version | None = None) -> Built:
    """The tensor entries of `target` against `base` (whose weights `base_src` holds), their
    objects written. `base_hashed`: the caller hashed `base_src` itself to find `base` (a
    commit from a base path), so its tensors are not hashed again; the final
    `check_unchanged` still refuses files written in between. `against`: each delta is taken
    against what apply of that version gives (chain.py), and every tensor it stores is listed."""
    expected = store.base_tensors(base)
    check_names(store, base, expected, target)
    spec_for = spec_chooser(encoding, encoding_for, encoding_options, target)
    by_stats = selector.by_stats
    by_name = selector.by_name()
    built = Built()
    changes: dict[str, Change] = {}
    names = target.names
    total = len(names) * (2 if by_stats else 1)

    def base_tensor(name: str) -> torch.Tensor:
        t = base_src.get(name) if name in base_src else None
        if t is None or (not base_hashed and tensor_id(t) != expected[name]["tensor_id"]):
            raise store.base_changed(base, base_src, [name])
        return t

    def scan(name: str) -> tuple[Change | None, Stored | None]:
        try:
            return _scan(name)
        finally:
            base_src.release(name)
            target.release(name)

    def _scan(name: str) -> tuple[Change | None, Stored | None]:
        b = base_tensor(name)
        t = target.get(name)
        tid = tensor_id(t)
        if tid == expected[name]["tensor_id"] and (against is None or against.entry(name) is None):
            return None, None
        if against is not None:
            return _chained(name, b, t, tid)
        rel, e = delta_stats(b, t, expected[name].get("sq_norm"))
        # A nan or inf anywhere in the tensor makes its delta's norm one too; only then is
        # the tensor itself checked (a finite norm can still overflow).
        if not math.isfinite(e) and not allow_nonfinite:
            _check_finite(name, t)
        change = Change(name, expected[name]["tensor_id"], tid, rel, e)
        if by_stats or not by_name(name):
            return change, None
        return change, _store_tensor(store, name, b, t, change, spec_for(name, b, t), token)

    def _chained(name: str, b: torch.Tensor, t: torch.Tensor, tid: str) -> tuple[Change, Stored]:
        # The delta against the other version's result (verified), which is what apply adds it to.
        r, rid = reference_tensor(store, against, name, b)
        rel, e = delta_stats(r, t, expected[name].get("sq_norm"))
        if not math.isfinite(e) and not allow_nonfinite:
            _check_finite(name, t)
        change = Change(name, expected[name]["tensor_id"], tid, rel, e)
        stored = _store_tensor(store, name, r, t, change, spec_for(name, r, t), token)
        entry = dataclasses.replace(stored.entry, against=rid, against_version=against.id)
        return change, Stored(entry, stored.sizes, stored.bytes_new)

    def encode_kept(name: str) -> Stored:
        b, t = base_src.get(name), target.get(name)
        try:
            return _store_tensor(store, name, b, t, changes[name], spec_for(name, b, t), token)
        finally:
            base_src.release(name)
            target.release(name)

    # Pass 1: what changed, and by how much. Encodes right away unless the selection
    # needs every tensor's change first (top-k, energy, min-rel-change).
    # Each result is a small record (the objects are written already): workers run ahead.
    for k, (name, (change, stored)) in enumerate(in_order(names, scan, ahead=len(names))):
        if change is None:
            built.unchanged += 1
        else:
            changes[name] = change
        if stored is not None:
            built.add(stored)
        if progress:
            progress(k + 1, total)

    built.median_rel_change = median_rel_change(
        [changes[n].rel_change if n in changes else 0.0 for n in names])
    selected = select({c.name: TensorDelta.of(c.rel_change, c.energy) for c in changes.values()}, selector) \
        if selector else None
    if selected is not None:
        built.selection = selected.policy
        built.left_out = list(selected.left_out)
        built.left_out_energy_fraction = selected.left_out_energy_fraction
    if by_stats:
        kept = [n for n in names if n in set(selected.kept)]
        for k, (name, stored) in enumerate(in_order(kept, encode_kept, ahead=len(kept))):
            built.add(stored)
            if progress:
                progress(len(names) + k + 1, total)
    # What was hashed and what was stored came from the same bytes only if nobody wrote the
    # files meanwhile (they are read through memory maps).
    base_src.check_unchanged()
    target.check_unchanged()
    store.objects.sync()
    return built


def median_rel_change(values: list[float | None]) -> float | None:
    """The median ||dW||/||W|| of a model's tensors (None where no base tensor matches: left out)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def same_content(entries: list[TensorEntry], newest: Any, *, base_id: str, encoding: str,
                 selection: dict[str, Any], against: str | None = None) -> bool:
    """Whether a version made of ``entries`` would store exactly what version ``newest`` does:
    the same base, encoding, selection, version it is against and tensor entries (its number,
    message, metadata and time aside)."""
    if newest.base_id != base_id or newest.encoding != encoding or (newest.selection or {}) != (selection or {}) \
            or newest.against != against:
        return False
    ours = {e.name: e.to_manifest() for e in entries}
    theirs = {e.name: e.to_manifest() for e in newest.tensors}
    return ours == theirs


def holds_what(version: Version, base_id: str, expected: dict[str, dict], target: TensorSource, spec: str,
               options: dict[str, Any]) -> bool:
    """Whether `target` committed in encoding `spec` (with `options`) against base `base_id` is
    sure to store `version`'s tensor entries: `version` is of that base, stored every tensor in
    that encoding with those options (or losslessly, as commit stores norms), and the model's
    every tensor is the one `version` was made from (its target where it stores one, the
    base's elsewhere). What `same_content` says after the commit, said before: tensors are
    hashed only until one differs."""
    if version.base_id != base_id or set(target.names) != set(expected):
        return False
    try:
        enc, lossless = encodings.get(spec, **options), encodings.get("lossless").spec
    except EncodingError:
        return False
    entries = {e.name: e for e in version.tensors}
    if any(e.encoding not in (enc.spec, lossless) or (e.encoding == enc.spec and any(
            e.params.get(k) != getattr(enc, k, None) for k in encodings.option_names(spec)))
           for e in entries.values()):
        return False
    for name in target.names:
        wanted = entries[name].target_tensor_id if name in entries else expected[name]["tensor_id"]
        try:
            if tensor_id(target.get(name)) != wanted:
                return False
        finally:
            target.release(name)
    return True


def spec_chooser(encoding: str, rules: list[tuple[str, str]] | None, options: dict, target: TensorSource):
    """name -> the Encoding that stores it; every spec and rank is checked before any work."""
    chosen = parse_encoding_rules([f"{pattern}={spec}" for pattern, spec in rules or []],
                                  default=encoding, names=target.names, **options)
    for name, info in target.infos.items():
        enc = encodings.get(chosen(name), **options)
        rank = getattr(enc, "rank", None)
        # An empty matrix is never encoded: it cannot differ from its base but by shape.
        if rank is not None and len(info.shape) == 2 and rank > min(info.shape) > 0:
            raise EncodingError(f"{enc.spec} needs a rank of at most {min(info.shape)} for {name} "
                                f"{list(info.shape)}; choose a smaller rank or --encoding-for '{name}=lossless'")

    def choose(name: str, base: torch.Tensor, target: torch.Tensor) -> encodings.Encoding:
        enc = encodings.get(chosen(name), **options)
        # Norms and biases are tiny and hurt most when quantised; a changed dtype or shape
        # has no delta to quantise, nor has an integer tensor; a low-rank factorisation needs
        # a matrix.
        if not enc.exact and (target.dim() < 2 or base.dtype != target.dtype or base.shape != target.shape
                              or not target.is_floating_point()
                              or (getattr(enc, "rank", None) is not None and target.dim() != 2)):
            return encodings.get("lossless")
        return enc
    return choose


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point():
        bad = int(t.numel() - torch.isfinite(t).sum())
        if bad:
            raise NonFiniteTensor(name, bad, t.numel())


def _store_tensor(store: Store, name: str, base: torch.Tensor, target: torch.Tensor,
                  change: Change, enc: encodings.Encoding, token: str) -> Stored:
    streamed = enc.stream(base, target)
    if streamed is not None:
        put = store.objects.put_stream(streamed.chunks, streamed.size, sync_dir=False,
                                       claim=lambda oid: store.catalog.add_pending(token, [oid]))
        entry = TensorEntry(name, dtype_name(target.dtype), tuple(target.shape), enc.spec, streamed.params,
                            {streamed.part: ObjectRef(put.id, put.raw_size)}, change.base_id,
                            change.target_id, change.target_id, _round(change.rel_change), 0.0)
        return Stored(entry, {put.id: put.size}, put.size if put.new else 0)
    try:
        encoded = enc.encode(base, target)
    except EncodingError as e:
        raise EncodingError(f"tensor {name!r}: {e}") from None
    if enc.exact:
        result_id, rel_error = change.target_id, 0.0
    else:
        result = enc.decode(base, encoded, dtype=target.dtype, shape=tuple(target.shape))
        result_id = tensor_id(result)
        err2 = _sq_diff(result, target)
        rel_error = math.sqrt(err2 / change.energy) if change.energy > 0 else 0.0
    ids = {part: bytes_id(data) for part, data in encoded.parts.items()}
    # Shield the objects from gc before looking whether they already exist (FORMAT.md, rule 2).
    store.catalog.add_pending(token, sorted(set(ids.values())))
    refs, sizes, new = {}, {}, 0
    for part, data in encoded.parts.items():
        put = store.objects.put(data, object_id=ids[part], sync_dir=False)
        sizes[put.id] = put.size
        if put.new:
            new += put.size
        refs[part] = ObjectRef(put.id, put.raw_size)
    entry = TensorEntry(name, dtype_name(target.dtype), tuple(target.shape), enc.spec, encoded.params, refs,
                        change.base_id, change.target_id, result_id,
                        _round(change.rel_change), _round(rel_error))
    return Stored(entry, sizes, new)


def _sq_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(_sq(ac - bc) for ac, bc in zip(_chunks(a), _chunks(b)))


def _round(x: float | None) -> float | None:
    # Manifests are hashed: keep floats short and stable (6 significant digits).
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
