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
from typing import Any, Callable, Mapping

import torch

from ..codecs import encodings
from ..codecs.selection import Selection, Selector, TensorDelta, parse_encoding_rules, select
from ..core.errors import BaseMismatch, EncodingError, NonFiniteTensor, short, shown_names
from ..core.hashing import bytes_id, dtype_name, tensor_id
from ..core.pools import in_order
from ..metrics.norms import delta_stats, sq_diff
from ..repo.records import Base, ObjectRef, TensorEntry, Version
from ..weights.models import TensorSource
from .blockwise import Blockwise
from .reader import Reader

__all__ = ["NOT_A_FINE_TUNE", "Built", "build_entries", "check_names", "delta_stats", "fitting_base", "holds_what",
           "median_rel_change", "same_content", "spec_chooser"]

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


def check_names(reader: Reader, base: Base, expected: dict[str, dict], target: TensorSource) -> None:
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
    # Told by names and shapes alone, before any tensor is read or hashed.
    fits = fitting_base(reader, target, other_than=base.id)
    hint = (f"it fits base {_shown(fits)}: commit it with --base {fits.name or short(fits.id)}" if fits else
            "no registered base fits it: give --base the model it was made from")
    raise BaseMismatch(base.id, None, names, message=(
        f"this fine-tune was not made from base {_shown(base)}: {what} ({shown_names(names)}); {hint}"))


def fitting_base(reader: Reader, target: TensorSource, *, other_than: str) -> Base | None:
    """A registered base (other than `other_than`) with the model's tensor names and shapes:
    the one a fine-tune was likely made from."""
    return reader.fitting_base({n: list(info.shape) for n, info in target.infos.items()}, other_than=other_than)


def _shown(base: Base) -> str:
    return f"{base.name + ' ' if base.name else ''}{short(base.id)}"


def build_entries(reader: Reader, base: Base, base_src: TensorSource, target: TensorSource, *, token: str,
                  encoding: str, encoding_for: list[tuple[str, str]] | None, encoding_options: dict,
                  selector: Selector, progress: Callable[[int, int], None] | None,
                  allow_nonfinite: bool = False, base_hashed: bool = False, trusted: Mapping[str, str] | None = None,
                  against: Version | None = None) -> Built:
    """The tensor entries of `target` against `base` (whose weights `base_src` holds), their
    objects written. `base_hashed`: the caller hashed `base_src` itself to find `base` (a
    commit from a base path), so its tensors are not hashed again; the final
    `check_unchanged` still refuses files written in between. `trusted`: the tensor ids of base
    tensors whose files this store trusts (trust.py: hashed whole, unchanged since), not hashed
    again; `check_unchanged` refuses those written meanwhile too. `against`: each delta is taken
    against what apply of that version gives (chain.py), and every tensor it stores is listed."""
    expected = reader.base_tensors(base)
    check_names(reader, base, expected, target)
    work = _Comparison(reader, base, base_src, target, expected, spec_chooser(encoding, encoding_for,
                       encoding_options, target), token, encode_now=not selector.by_stats,
                       by_name=selector.by_name(), allow_nonfinite=allow_nonfinite, base_hashed=base_hashed,
                       trusted=dict(trusted or {}), against=against)
    built = Built()
    changes: dict[str, Change] = {}
    names = target.names
    total = len(names) * (2 if selector.by_stats else 1)
    # Pass 1: what changed, and by how much. Encodes right away unless the selection
    # needs every tensor's change first (top-k, energy, min-rel-change).
    # Each result is a small record (the objects are written already): workers run ahead.
    for k, (name, (change, stored)) in enumerate(in_order(names, work.scan, ahead=len(names))):
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
    selected = _selected(built, changes, selector)
    if selector.by_stats:
        kept = [n for n in names if n in set(selected.kept)]

        def encode(name: str) -> Stored:
            return work.encode_kept(name, changes[name])
        for k, (name, stored) in enumerate(in_order(kept, encode, ahead=len(kept))):
            built.add(stored)
            if progress:
                progress(len(names) + k + 1, total)
    # What was hashed and what was stored came from the same bytes only if nobody wrote the
    # files meanwhile (they are read through memory maps).
    base_src.check_unchanged()
    target.check_unchanged()
    reader.repo.objects.sync()
    return built


def _selected(built: Built, changes: dict[str, Change], selector: Selector) -> Selection | None:
    """The selection over every changed tensor, recorded in `built` (its policy, what it left
    out); None without a selector."""
    selected = select({c.name: TensorDelta.of(c.rel_change, c.energy) for c in changes.values()}, selector) \
        if selector else None
    if selected is not None:
        built.selection = selected.policy
        built.left_out = list(selected.left_out)
        built.left_out_energy_fraction = selected.left_out_energy_fraction
    return selected


@dataclass
class _Comparison:
    """One commit's tensors compared with their base (or, against another version, with its
    result), and encoded: the work each of `build_entries`' workers does for one name."""

    reader: Reader
    base: Base
    base_src: TensorSource
    target: TensorSource
    expected: dict[str, dict]
    spec_for: Callable[[str, torch.Tensor, torch.Tensor], encodings.Encoding]
    token: str
    encode_now: bool  # False: the selection needs every tensor's change before any is encoded
    by_name: Callable[[str], bool]
    allow_nonfinite: bool = False
    base_hashed: bool = False
    trusted: dict[str, str] = dataclasses.field(default_factory=dict)
    against: Version | None = None

    def scan(self, name: str) -> tuple[Change | None, Stored | None]:
        """What changed in one tensor (None: nothing), and its entry where it is stored now."""
        try:
            return self._scan(name)
        finally:
            self.base_src.release(name)
            self.target.release(name)

    def encode_kept(self, name: str, change: Change) -> Stored:
        """The entry of a tensor the selection kept, encoded in the second pass."""
        b, t = self.base_src.get(name), self.target.get(name)
        try:
            return _store_tensor(self.reader, name, b, t, change, self.spec_for(name, b, t), self.token,
                                 self._blockwise(name))
        finally:
            self.base_src.release(name)
            self.target.release(name)

    def _base_tensor(self, name: str, blocks: Blockwise | None) -> torch.Tensor:
        t = self.base_src.get(name) if name in self.base_src else None
        wanted = self.expected[name]["tensor_id"]
        if t is None or (not self.base_hashed and self.trusted.get(name) != wanted and
                         (self.base_src.tensor_id(name) if blocks else tensor_id(t)) != wanted):
            raise self.reader.base_changed(self.base, self.base_src, [name])
        return t

    def _blockwise(self, name: str) -> Blockwise | None:
        # (A delta against another version's result is taken from that result, in memory.)
        return None if self.against is not None else Blockwise.of(self.base_src, self.target, name)

    def _scan(self, name: str) -> tuple[Change | None, Stored | None]:
        blocks = self._blockwise(name)
        b = self._base_tensor(name, blocks)
        t = self.target.get(name)
        tid = self.target.tensor_id(name) if blocks else tensor_id(t)
        if tid == self.expected[name]["tensor_id"] and (self.against is None or self.against.entry(name) is None):
            return None, None
        if self.against is not None:
            return self._chained(name, b, t, tid)
        change = self._change(name, b, t, tid, blocks)
        if not self.encode_now or not self.by_name(name):
            return change, None
        return change, _store_tensor(self.reader, name, b, t, change, self.spec_for(name, b, t), self.token, blocks)

    def _chained(self, name: str, b: torch.Tensor, t: torch.Tensor, tid: str) -> tuple[Change, Stored]:
        # The delta against the other version's result (verified), which is what apply adds it to.
        r, rid = self.reader.reference_tensor(self.against, name, b)
        change = self._change(name, r, t, tid)
        stored = _store_tensor(self.reader, name, r, t, change, self.spec_for(name, r, t), self.token)
        entry = dataclasses.replace(stored.entry, against=rid, against_version=self.against.id)
        return change, Stored(entry, stored.sizes, stored.bytes_new)

    def _change(self, name: str, reference: torch.Tensor, t: torch.Tensor, tid: str,
                blocks: Blockwise | None = None) -> Change:
        rel, e = delta_stats(reference, t, self.expected[name].get("sq_norm"), blocks=blocks and blocks.pairs)
        # A nan or inf anywhere in the tensor makes its delta's norm one too; only then is
        # the tensor itself checked (a finite norm can still overflow).
        if not math.isfinite(e) and not self.allow_nonfinite:
            _check_finite(name, t)
        return Change(name, self.expected[name]["tensor_id"], tid, rel, e)


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
        if enc.needs_calibration and options.get("calibration") is None:
            raise EncodingError(f"{enc.spec} is fitted on the model's activations: give --calibration FILE "
                                "(prompts, one per line, that the encoding is fitted on)")
        rank = getattr(enc, "rank", None)
        # An empty matrix is never encoded: it cannot differ from its base but by shape.
        if rank is not None and len(info.shape) == 2 and rank > min(info.shape) > 0:
            raise EncodingError(f"{enc.spec} needs a rank of at most {min(info.shape)} for {name} "
                                f"{list(info.shape)}; choose a smaller rank or --encoding-for '{name}=lossless'")

    def choose(name: str, base: torch.Tensor, target: torch.Tensor) -> encodings.Encoding:
        enc = encodings.get(chosen(name), **options).for_tensor(name)
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


def _store_tensor(reader: Reader, name: str, base: torch.Tensor, target: torch.Tensor,
                  change: Change, enc: encodings.Encoding, token: str, blocks: Blockwise | None = None) -> Stored:
    """`blocks`: the tensor read a block at a time by each pass (blockwise.py), where it is large."""
    refs: dict[str, ObjectRef] = {}
    sizes: dict[str, int] = {}
    try:
        streamed = enc.stream(base, target, reading=blocks)
        encoded = streamed or enc.encode(base, target)
        new = _put_whole(reader, token, streamed.parts if streamed else encoded.parts, refs, sizes)
        if streamed is not None:
            put = reader.repo.objects.put_stream(streamed.chunks, streamed.size, sync_dir=False,
                                                 claim=lambda oid: reader.repo.catalog.add_pending(token, [oid]))
            refs[streamed.part], sizes[put.id] = ObjectRef(put.id, put.raw_size), put.size
            new += put.size if put.new else 0
    except EncodingError as e:
        raise EncodingError(f"tensor {name!r}: {e}") from None
    if enc.exact:
        result_id, rel_error = change.target_id, 0.0
    else:
        if streamed is not None:  # its result was checked slice by slice as it was encoded
            result_id, err2 = blocks.checked()
        else:
            result = enc.decode(base, encoded, dtype=target.dtype, shape=tuple(target.shape))
            result_id, err2 = tensor_id(result), sq_diff(result, target)
        rel_error = math.sqrt(err2 / change.energy) if change.energy > 0 else 0.0
    entry = TensorEntry(name, dtype_name(target.dtype), tuple(target.shape), enc.spec, encoded.params, refs,
                        change.base_id, change.target_id, result_id,
                        _round(change.rel_change), _round(rel_error))
    return Stored(entry, sizes, new)


def _put_whole(reader: Reader, token: str, parts: Mapping[str, bytes | memoryview], refs: dict[str, ObjectRef],
               sizes: dict[str, int]) -> int:
    """Each part stored as one object (its ref and size added to `refs` and `sizes`); the bytes
    of the new ones."""
    ids = {part: bytes_id(data) for part, data in parts.items()}
    if ids:  # (a transaction for nothing would still wait for the catalog's lock)
        # Shield the objects from gc before looking whether they already exist (FORMAT.md, rule 2).
        reader.repo.catalog.add_pending(token, sorted(set(ids.values())))
    new = 0
    for part, data in parts.items():
        put = reader.repo.objects.put(data, object_id=ids[part], sync_dir=False)
        sizes[put.id] = put.size
        new += put.size if put.new else 0
        refs[part] = ObjectRef(put.id, put.raw_size)
    return new


def _round(x: float | None) -> float | None:
    # Manifests are hashed: keep floats short and stable (6 significant digits).
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
