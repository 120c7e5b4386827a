"""History: what differs between two versions (diff), renaming and deleting stances, and the
metadata a user attaches to a version (key=value, or a JSON file of training facts).

diff compares the tensors apply would produce, so it works across encodings: an int4 version
and a lossless one of the same fine-tune differ by the int4 error. It streams: one tensor of
each version is in memory at a time, and tensors whose result ids are equal are never loaded.
Deleting a stance is one ref record (and its catalog rows); its objects stay until gc, which
removes those no other version shares. Nothing here speaks SQL (the catalog does) or prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

from .chain import ChainError, dependents
from ..core.errors import MetadataError, OptionConflict, RefNotFound, VersionNeeded
from ..core.names import check_metadata, check_stance_name
from ..core.pools import in_order
from ..repo.records import Version

from .reader import Reader

# norms.py (delta_stats) is imported inside difference: it imports torch, and the store, which
# read commands load, imports this module (tests/test_startup.py).

if TYPE_CHECKING:
    import torch

MAX_METADATA_FILE = 1 << 20


@dataclass(frozen=True)
class TensorDiff:
    """One tensor that differs between version A and version B.

    status: `added` (B stores a delta for it, or has the tensor at all, and A does not),
    `removed` (the other way round), `changed` (both have it, with other values).
    encoding_a / encoding_b: how each version stores it; None where it applies as the base.
    rel_change: ||A - B|| / ||B|| of the tensors apply produces; None where one side lacks the
    tensor, shapes differ or B is all zeros.
    energy: ||A - B||^2 (what the tensor adds to the whole difference); None where one side
    lacks the tensor or shapes differ."""

    name: str
    status: str
    dtype: str | None
    shape: tuple[int, ...] | None
    encoding_a: str | None
    encoding_b: str | None
    rel_change: float | None
    energy: float | None = None


@dataclass(frozen=True)
class Diff:
    a: str  # ref, STANCE@N
    b: str
    a_id: str
    b_id: str
    tensors: tuple[TensorDiff, ...]  # only those that differ, by name
    unchanged: int  # tensors equal in both

    def count(self, status: str) -> int:
        return sum(1 for t in self.tensors if t.status == status)

    def largest(self, n: int | None = None) -> list[TensorDiff]:
        """The tensors with the largest ||A - B||^2, largest first (those without one last, by
        name); the first `n` of them."""
        ranked = sorted(self.tensors, key=lambda t: (t.energy is None, -(t.energy or 0.0), t.name))
        return ranked if n is None else ranked[:n]

    @property
    def energy(self) -> float:
        """||A - B||^2 over every tensor measured."""
        return sum(t.energy for t in self.tensors if t.energy is not None)


@dataclass(frozen=True)
class StanceRenamed:
    old: str
    new: str
    versions: int


@dataclass(frozen=True)
class StanceMerged:
    old: str
    into: str
    versions: tuple[str, ...]  # ids of the versions moved, in their old order
    numbers: tuple[int, ...]  # the number each took in `into`


@dataclass(frozen=True)
class StanceDeleted:
    stance: str
    versions: tuple[str, ...]  # ids of the versions removed
    numbers: tuple[int, ...]
    bytes_only_here: int  # object bytes no other version shares: what gc frees now
    orphaned: tuple[str, ...]  # versions of other stances whose parent was removed


def diff(reader: Reader, a: str | Version, b: str | Version, *, base_weights: Any = None,
         progress: Callable[[int, int], None] | None = None) -> Diff:
    """`progress(done, total)`: tensors compared so far, of those both versions hold."""
    va, vb = reader.resolve(a), reader.resolve(b)
    side_a, side_b = _Side(reader, va, base_weights), _Side(reader, vb, base_weights)
    rows, unchanged = [], 0
    for name in sorted(set(side_a.results) | set(side_b.results)):
        ra, rb = side_a.results.get(name), side_b.results.get(name)
        if ra == rb:
            unchanged += 1
            continue
        ea, eb = side_a.entries.get(name), side_b.entries.get(name)
        if ra is None or rb is None:
            status = "added" if ra is None else "removed"
        elif (ea is None) != (eb is None):
            status = "added" if ea is None else "removed"
        else:
            status = "changed"
        rows.append((name, status, ea, eb, ra is not None and rb is not None))
    # Both sides' tensors decoded and compared two at a time: the decoding and the norms
    # release the GIL, and each result is one number.
    measured = [name for name, *_, both in rows if both]
    found: dict[str, tuple[float | None, float | None]] = {}
    for name, figures in in_order(measured, lambda name: difference(side_a.tensor(name), side_b.tensor(name)),
                                  ahead=len(measured)):
        found[name] = figures
        if progress:
            progress(len(found), len(measured))
    out = []
    for name, status, ea, eb, _ in rows:
        dtype, shape = side_b.describe(name) if name in side_b.results else side_a.describe(name)
        rel, energy = found.get(name, (None, None))
        out.append(TensorDiff(name, status, dtype, shape, ea.encoding if ea else None,
                              eb.encoding if eb else None, rel, energy))
    return Diff(va.ref, vb.ref, va.id, vb.id, tuple(out), unchanged)


class _Side:
    """One version's tensors as apply would produce them: result ids known without loading."""

    def __init__(self, reader: Reader, version: Version, base_weights: Any):
        self.reader, self.version, self.base_weights = reader, version, base_weights
        self.entries = {e.name: e for e in version.tensors}
        self.base = reader.base_tensors(version.base_id)
        self.results = {n: r["tensor_id"] for n, r in self.base.items()}
        self.results.update({n: e.result_tensor_id for n, e in self.entries.items()})
        self._tensor = None

    def describe(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self.entries.get(name)
        if e is not None:
            return e.dtype, tuple(e.shape)
        row = self.base[name]
        return row["dtype"], tuple(json.loads(row["shape"]))

    def tensor(self, name: str) -> torch.Tensor:
        if self._tensor is None:
            # The base weights are opened only when a tensor is needed.
            _, self._tensor = self.reader.materialize(self.version, base_weights=self.base_weights)
        return self._tensor(name)


def rel_difference(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """||a - b|| / ||b||; None where shapes differ or b is zero. Two tensors of one float dtype
    are subtracted in it (exact for nearby floats) and their norms taken in float32, as commit
    takes ||dW||/||W||: float64 copies of every chunk took 4x longer."""
    return difference(a, b)[0]


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float | None, float | None]:
    """(||a - b|| / ||b||, ||a - b||^2), as `rel_difference` takes them; (None, None) where
    shapes differ, None for either figure that is not finite."""
    if tuple(a.shape) != tuple(b.shape):
        return None, None
    from ..metrics.norms import delta_stats

    rel, energy = delta_stats(b, a)
    return (None if rel is None or not math.isfinite(rel) else float(f"{rel:.6g}"),
            float(f"{energy:.6g}") if math.isfinite(energy) else None)


# -- stances ---------------------------------------------------------------------------------


def rename_stance(reader: Reader, old: str, new: str) -> StanceRenamed:
    check_stance_name(new)
    if old == new:
        if not reader.repo.catalog.has_stance(old):
            raise RefNotFound(old, reader.close_refs(old))
        return StanceRenamed(old, new, len(reader.repo.catalog.versions(old)))
    try:
        moved = reader.repo.catalog.rename_stance(old, new)
    except RefNotFound:
        raise RefNotFound(old, reader.close_refs(old)) from None
    return StanceRenamed(old, new, moved)


def merge_stance(reader: Reader, old: str, into: str) -> StanceMerged:
    """Move every version of `old` into `into`, numbered after `into`'s newest in their order,
    with their ids, tags and parents; `old` is gone afterwards. One ref record: all or nothing."""
    if old == into:
        raise OptionConflict(f"cannot merge {old} into itself")
    try:
        moves = reader.repo.catalog.merge_stance(old, into)
    except RefNotFound as e:
        raise RefNotFound(e.ref, reader.close_refs(e.ref)) from None
    return StanceMerged(old, into, tuple(vid for vid, _ in moves), tuple(n for _, n in moves))


def delete_stance(reader: Reader, name: str) -> StanceDeleted:
    if not reader.repo.catalog.has_stance(name):
        raise RefNotFound(name, reader.close_refs(name))
    ids = [r["id"] for r in reader.repo.catalog.versions(name)]
    # What only this stance holds, and who builds on it, seen before it goes. A commit landing
    # in between can only add sharers, so the figure is at most what gc frees.
    only_here = sum(r["size"] for r in reader.repo.catalog.objects_only_of(ids))
    # Their manifests are objects too, and no other version's.
    only_here += sum(_size_of(reader, vid) for vid in ids)
    orphaned = tuple(f"{r['stance']}@{r['number']}" for r in reader.repo.catalog.children_outside(name))

    def keep_chains(going: list[str]) -> None:
        # A version stored against one of these would lose what its deltas are against.
        needed = dependents(reader, set(going))
        if needed:
            raise ChainError(f"{', '.join(v.ref for v in needed[:5])} "
                             f"{'is' if len(needed) == 1 else 'are'} stored against versions of {name}: deleting "
                             f"{name} would lose {'it' if len(needed) == 1 else 'them'}; delete "
                             f"{'it' if len(needed) == 1 else 'them'} first, or keep {name}")
    gone = reader.repo.catalog.delete_stance(name, keep_chains)
    return StanceDeleted(name, tuple(r["id"] for r in gone), tuple(r["number"] for r in gone),
                         only_here, orphaned)


@dataclass(frozen=True)
class VersionDeleted:
    ref: str  # STANCE@N of the version removed
    id: str
    newest: str  # the stance's newest version now
    bytes_only_here: int  # object bytes no other version shares: what gc frees now
    orphaned: tuple[str, ...]  # versions whose parent it was


def delete_version(reader: Reader, ref: str | Version) -> VersionDeleted:
    """Remove one version that nothing else needs, recorded in the ref log ("drop"). Its
    number is not given again; its objects stay until gc."""
    v = reader.resolve(ref)
    only_here = sum(r["size"] for r in reader.repo.catalog.objects_only_of([v.id])) + _size_of(reader, v.id)
    orphaned = tuple(f"{r['stance']}@{r['number']}" for r in reader.repo.catalog.children_of(v.id))

    def nothing_needs(row: dict) -> None:
        # Inside the delete's transaction: a tag, an apply or a chained commit landing while
        # this ran is seen.
        needs = _what_needs(reader, row)
        if needs:
            raise VersionNeeded(v.ref, needs)
    reader.repo.catalog.delete_version(v.id, nothing_needs)
    newest = reader.repo.catalog.latest(v.stance)
    return VersionDeleted(v.ref, v.id, f"{newest['stance']}@{newest['number']}", only_here, orphaned)


def _what_needs(reader: Reader, row: dict) -> list[str]:
    cat = reader.repo.catalog
    needs = []
    if len(cat.versions(row["stance"])) == 1:
        needs.append(f"it is the only version of {row['stance']} (`deltastore stance delete {row['stance']}` "
                     "deletes the stance)")
    for t in cat.tags(row["id"]):
        # As in git, a tag keeps what it names: it is dropped only by asking for it.
        needs.append(f"tag {t['stance']}@{t['name']} points at it (`deltastore tag --delete "
                     f"{t['stance']}@{t['name']}` first)")
    for j in cat.open_journals():
        if j["version_id"] == row["id"]:
            needs.append(f"{j['target']} is patched with it (`deltastore revert {j['target']}` first)")
    chained = dependents(reader, {row["id"]})
    if chained:
        needs.append(f"{', '.join(c.ref for c in chained[:5])} {'is' if len(chained) == 1 else 'are'} stored "
                     f"against it (delete {'it' if len(chained) == 1 else 'them'} first)")
    return needs


def _size_of(reader: Reader, object_id: str) -> int:
    try:
        return reader.repo.objects.size(object_id)
    except FileNotFoundError:
        return 0


# -- metadata (its rules and bounds: names.check_metadata) ------------------------------------


def read_metadata_file(path: str | Path) -> dict[str, str]:
    """Training facts from a JSON file: a flat object such as
    `{"learning_rate": 1e-4, "epochs": 3, "examples": 120, "loss": 0.41}`. Values are kept as
    text exactly as written (`1e-4` stays `1e-4`, so `log --where learning_rate=1e-4` finds it);
    booleans become `true` / `false`. Nested values and null are refused."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_FILE:
            raise MetadataError(f"metadata file {path} has {size} bytes; at most {MAX_METADATA_FILE} are read")
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise MetadataError(f"cannot read metadata file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MetadataError(f"metadata file {path} is not UTF-8 text") from None

    def refuse(constant: str) -> None:
        raise MetadataError(f"metadata file {path}: {constant} is not a JSON number; write a number or a string")

    try:
        value = json.loads(text, parse_float=str, parse_int=str, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise MetadataError(f"metadata file {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                            f"column {e.colno}); write a flat object such as "
                            '{"learning_rate": 1e-4, "epochs": 3}') from None
    except RecursionError:
        raise MetadataError(f"metadata file {path} is nested too deeply; write a flat object such as "
                            '{"learning_rate": 1e-4, "epochs": 3}') from None
    if not isinstance(value, dict):
        raise MetadataError(f"metadata file {path} holds {_json_type(value)}, not a JSON object; write a flat "
                            'object such as {"learning_rate": 1e-4, "epochs": 3}')
    out = {}
    for key, v in value.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif not isinstance(v, str):
            raise MetadataError(f"metadata file {path}: {key!r} is {_json_type(v)}; values must be strings, "
                                "numbers or booleans (a flat object)")
        out[key] = v
    return check_metadata(out, source=f"metadata file {path}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a " + type(value).__name__
