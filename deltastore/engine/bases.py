"""Registering bases: a model's weights hashed into its record (each tensor's id and squared
norm), or a record made in another store; a record its weights contradict, replaced; a base a
commit names by its weights, read as registered until the version lands (landing.py)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from ..core import names
from ..core.errors import BaseMismatch, JournalError, UnsafeInput, short
from ..core.hashing import base_id as compute_base_id
from ..core.hashing import bytes_id, canonical_json
from ..core.limits import is_text
from ..repo import index, trust
from ..repo.catalog import dumps, now
from ..repo.openjournals import open_journal_on
from ..repo.records import Base, hub_origin, split_hub_origin
from .reader import ModelLike, Reader

# torch and numpy, and the modules that import them when loaded (models, baseweights), are
# imported inside the functions that read weights: the store imports this module, and read
# commands load neither.
if TYPE_CHECKING:
    from ..weights.models import TensorSource

Progress = Callable[[int, int], None]
Weight = tuple[str, "float | None"]  # a tensor's id and squared norm


def add_base(reader: Reader, model: ModelLike, notes: list[str], *, name: str | None = None,
             hub_id: str | None = None, hub_revision: str | None = None, expected_id: str | None = None,
             progress: Progress | None = None, verify: bool = False) -> Base:
    """Register a base from its weights (the store's `add_base` says how); a note in `notes` where
    its weights replaced a record that disagreed with them. `verify`: hash even the files this
    store trusts."""
    from ..weights.models import open_model

    repo = reader.repo
    repo.check_writable()
    refuse_patched(reader, model)
    source = open_model(model, mapped=True)
    _check_base_names(name, hub_id, hub_revision)
    if name is not None:
        _refuse_name_of_another(reader, name, source)
    known = trusted(reader, source, verify)
    row, tensors = describe_base(source, name=name, hub_id=hub_origin(hub_id, hub_revision), progress=progress,
                                 known=known)
    if expected_id is not None and row["id"] != expected_id:
        raise BaseMismatch(expected_id, row["id"], [], message=(
            f"{source.path or 'these weights'} hold base {short(row['id'])}, not the expected base "
            f"{short(expected_id)}; nothing was registered"))
    if name is not None:
        other = repo.catalog.base_named(name, other_than=row["id"])
        if other:
            raise UnsafeInput(f"base name {name!r} already names base {other}; choose another name")
    # The base's tensor list and record are objects (the truth a rebuild reads), shielded
    # from gc until the base's ref record lands.
    listing, record = base_objects(row, tensors)
    wrong = _record_disagrees(reader, row, tensors)
    if wrong is None and repo.catalog.has_base(row["id"]):
        row["record"] = repo.catalog.base_record_id(row["id"])  # kept: it agrees with the weights
    repo.put_base(row, tensors, listing, record)
    trust_hashed(reader, source, tensors, known)
    if wrong is not None:
        notes.append(_replaced_note(reader, row["id"], wrong))
    return reader.base(row["id"])


def _refuse_name_of_another(reader: Reader, name: str, source: TensorSource) -> None:
    """Refuse, before any tensor is hashed, a name that a base with other tensors (by name,
    dtype or shape) holds: these weights cannot be that base. Weights that could be it are
    hashed, and the name checked against the id they give."""
    holder = reader.repo.catalog.base_named(name, other_than="")
    if holder is None:
        return
    rows = {r["name"]: r for r in reader.repo.catalog.base_tensors(holder)}
    if rows.keys() != set(source.infos) or any(
            rows[n]["dtype"] != i.dtype or json.loads(rows[n]["shape"]) != list(i.shape) for n, i in source.infos.items()):
        raise UnsafeInput(f"base name {name!r} already names base {holder}; choose another name")


def _check_base_names(name: str | None, hub_id: str | None, hub_revision: str | None) -> None:
    """Refuse a base name, Hub id or Hub revision that the store cannot hold."""
    if name is not None:
        names.check_base_name(name)
    if hub_id is not None and not is_text(hub_id):
        raise UnsafeInput("the Hub id holds bytes that are not UTF-8 text; write it as UTF-8")
    if hub_revision is not None and (hub_id is None or split_hub_origin(hub_origin(hub_id, hub_revision))
                                     != (hub_id, hub_revision)):
        raise UnsafeInput(f"a base's Hub revision is a full commit hash (40 hex digits) of its Hub id, "
                          f"not {hub_revision[:80]!r}")


def add_base_record(reader: Reader, listing: bytes, record: bytes, *, name: str | None = None,
                    hub_id: str | None = None) -> Base:
    """Register a base from its tensor list and base record (made in another store, checked
    by the caller): no weights are read. Its weights are found later (`--base-path`)."""
    repo = reader.repo
    repo.check_writable()
    bid, rid = bytes_id(listing), bytes_id(record)
    problem = index.base_record_problem(listing, record, bid)
    if problem is not None:
        raise UnsafeInput(f"base record {rid} is not the record of base {bid}: {problem}; nothing was stored")
    row, tensors = index.base_rows(bid, rid, json.loads(record), name=name, source=None, hub_id=hub_id,
                                   created=now())
    if repo.catalog.has_base(bid):
        row["record"] = repo.catalog.base_record_id(bid)  # the one here: it may come from the weights
    repo.put_base(row, tensors, listing, record)
    return reader.base(bid)


def remove_base(reader: Reader, ref: str | Base) -> Base:
    """Forget a base no version uses (refused, naming them, while any does)."""
    reader.repo.check_writable()
    base = reader.base(ref)
    reader.repo.catalog.remove_base(base.id, base.name or base.id[:19])
    return base


def describe_base(source: TensorSource, *, name: str | None = None, hub_id: str | None = None,
                  progress: Progress | None = None, known: Mapping[str, Weight] | None = None
                  ) -> tuple[dict, list[dict]]:
    """Hash every tensor of a base: its catalog row and its tensors' rows. `known`: the ids and
    squared norms of tensors not read again (those of files the store trusts, `trusted`)."""
    from .baseweights import weigh

    weights = weigh(source, known or {}, progress)
    source.check_unchanged()
    bid = compute_base_id((n, tid) for n, (tid, _) in weights.items())
    row = {"id": bid, "name": name, "tensor_count": len(weights), "bytes": source.nbytes,
           "source": str(source.path.resolve()) if source.path else None, "hub_id": hub_id,
           "created": now()}
    tensors = [{"base_id": bid, "name": n, "dtype": i.dtype, "shape": dumps(list(i.shape)),
                "tensor_id": weights[n][0], "sq_norm": weights[n][1]} for n, i in source.infos.items()]
    return row, tensors


def trusted(reader: Reader, source: TensorSource, verify: bool) -> dict[str, Weight]:
    """The tensors of `source` whose files this store trusts (none with `verify`: all are hashed)."""
    return {} if verify else trust.trusted(reader.repo, source)


def trust_hashed(reader: Reader, source: TensorSource, tensors: list[dict], known: Mapping[str, Weight]) -> None:
    """Once what hashed them succeeded: trust `source`'s files whose tensors were all just hashed
    (not in `known`). A command that fails leaves no trace, this record included."""
    trust.record(reader.repo, source, {t["name"]: (t["tensor_id"], t["sq_norm"]) for t in tensors
                                       if t["name"] not in known})


def base_objects(row: dict, tensors: list[dict]) -> tuple[bytes, bytes]:
    """The base's tensor list and base record (FORMAT.md §5); sets the row's `record`."""
    record = canonical_json(index.base_record(row["id"], row["bytes"], tensors))
    row["record"] = bytes_id(record)
    return index.base_list(tensors), record


def _record_disagrees(reader: Reader, row: dict, tensors: list[dict]) -> str | None:
    """Where the record of a registered base says other than its weights (described as
    `row`, `tensors`) do; None when they agree or the base is new. A record from another
    store (a remote's) is checked against the base's tensor list only: what it says of each
    tensor (its squared norm, which a commit's not-a-fine-tune check divides by) only the
    weights can confirm."""
    catalog = reader.repo.catalog
    if not catalog.has_base(row["id"]):
        return None
    return index.weights_disagree(catalog.base_tensors(row["id"]), reader.base(row["id"]).bytes,
                                  tensors, row["bytes"])


def _replaced_note(reader: Reader, base_id: str, wrong: str) -> str:
    base = reader.base(base_id)
    return (f"the record of base {base.name or base.id[:19]} disagreed with its weights ({wrong}): replaced by "
            "the record the weights give")


def refuse_patched(reader: Reader, model: ModelLike) -> None:
    """A model with a stance applied in place holds no base's weights: never register it."""
    if isinstance(model, (str, os.PathLike)):
        line = open_journal_on(reader.repo.catalog, model)
        if line:
            raise JournalError(f"{model} cannot be a base now: {line}")


def resolve_base(reader: Reader, base: ModelLike | str | Base, notes: list[str], *, verify: bool = False
                 ) -> tuple[Base, TensorSource | None, bool]:
    """A base record, those weights when the caller handed us weights, and whether this call
    registered the base (in `reader.unregistered` until its version lands). `verify`: weights
    handed us are hashed even where this store trusts their files."""
    if isinstance(base, (Base,)):
        return base, None, False
    if isinstance(base, str) and not _looks_like_path(base):
        return reader.base(base), None, False
    from ..weights.models import open_model

    refuse_patched(reader, base)
    source = open_model(base, mapped=True)
    row, tensors = describe_base(source, known=trusted(reader, source, verify))
    if not reader.repo.catalog.has_base(row["id"]):
        # Registered only when the version lands (in its transaction): a commit that fails
        # leaves no trace of it.
        reader.unregistered[row["id"]] = (row, tensors)
        return Base.from_row(row), source, True
    wrong = _record_disagrees(reader, row, tensors)
    if wrong is not None:
        # The weights are at hand: the commit measures against what they are, and so does
        # every later one (only the record changes: not the base's name, source or Hub id).
        fixed = {**row, "name": None, "source": None, "hub_id": None}
        listing, record = base_objects(fixed, tensors)
        reader.repo.put_base(fixed, tensors, listing, record)
        notes.append(_replaced_note(reader, row["id"], wrong))
    return reader.base(row["id"]), source, False


@contextmanager
def base_for_commit(reader: Reader, base: ModelLike | str | Base, notes: list[str]
                    ) -> Iterator[tuple[Base, dict[str, dict]]]:
    """The base a commit names (registered, or weights it would register) and its tensors'
    rows, for checks made before the commit: a base given as weights is not registered."""
    record, _, registered = resolve_base(reader, base, notes)
    try:
        yield record, reader.base_tensors(record)
    finally:
        if registered:
            reader.unregistered.pop(record.id, None)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.endswith(".safetensors") or Path(text).exists()


__all__ = ["add_base", "add_base_record", "base_for_commit", "base_objects", "describe_base",
           "refuse_patched", "remove_base", "resolve_base", "trust_hashed", "trusted"]
