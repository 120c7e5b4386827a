"""Versions landing in the store: the refusals a commit makes before it reads a tensor, a
commit (its entries built, then its version landed in one transaction, or nothing changed),
and versions made in another store (ingest: a pull), each keeping its id and number."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..core import names
from ..core.errors import (BaseMismatch, BaseNotFound, IdenticalVersion, NotAFineTune, NothingToCommit,
                           StanceNameClose, UnsafeInput, VersionConflict)
from ..core.hashing import bytes_id
from ..core.limits import is_text
from ..repo.catalog import now
from ..repo.records import Base, CommitResult, Version, check_manifest, manifest
from ..repo import trust
from ..repo.repo import quietly
from .bases import base_objects, resolve_base
from .chain import ChainError, check_depth
from .reader import ModelLike, Reader
from .tags import check_tag_free

# commit.py (build_entries, same_content) and models.py are imported inside the functions that
# read a model: they load torch, and the store, which read commands load, imports this module.
if TYPE_CHECKING:
    from ..codecs.selection import Selector
    from .commit import Built

Progress = Callable[[int, int], None]


def check_commit(reader: Reader, stance: str, *, tag: str | None = None, metadata: Mapping[str, str] | None = None,
                 message: str = "", selector: Selector | None = None, new_stance: bool = False,
                 against: str | Version | None = None,
                 move_tag: bool = False) -> tuple[dict[str, str], Version | None]:
    """The refusals of a commit that read no tensor (the store's `check_commit` lists them).
    Returns the metadata as stored and the version the commit is against."""
    catalog = reader.repo.catalog
    reader.repo.check_writable()
    names.check_stance_name(stance)
    if not new_stance and not catalog.has_stance(stance):
        close = names.close_names(stance, [row["name"] for row in catalog.stances()], series=False)
        if close:
            raise StanceNameClose(stance, close[0])
    if tag is not None:
        names.check_tag_name(tag)
        if not move_tag:
            check_tag_free(reader, stance, tag, None, "--move-tag")
    checked = names.check_metadata({str(k): str(v) for k, v in (metadata or {}).items()})
    names.check_message(message)
    for what, texts in (("--include", selector.include if selector else None),
                        ("--exclude", selector.exclude if selector else None)):
        for text in [texts] if isinstance(texts, str) else texts or ():
            if not is_text(text):
                raise UnsafeInput(f"{what} holds bytes that are not UTF-8 text; write it as UTF-8")
    against_version = reader.resolve(against) if against is not None else None
    if against_version is not None and selector:
        raise ChainError("--against stores every tensor that differs from the other version's result; "
                         "leave out the selection options (--include, --exclude, --top-k, ...)")
    return checked, against_version


@dataclasses.dataclass(frozen=True)
class Request:
    """What a commit stores, beyond its stance and model: the store's `commit` names each."""

    base: ModelLike | str | Base
    selector: Selector
    encoding: str = "lossless"
    encoding_for: list[tuple[str, str]] | None = None
    encoding_options: Mapping[str, Any] | None = None
    message: str = ""
    metadata: Mapping[str, str] | None = None
    tag: str | None = None
    base_weights: ModelLike | None = None
    progress: Progress | None = None
    allow_nonfinite: bool = False
    allow_empty: bool = False
    force: bool = False
    new_stance: bool = False
    against: str | Version | None = None
    move_tag: bool = False
    verify: bool = False  # hash the base's weights even where this store trusts their files


def commit(reader: Reader, notes: list[str], stance: str, model: ModelLike, request: Request) -> CommitResult:
    """Keep `model` as the next version of `stance` (the store's `commit` says how): its
    refusals, its entries built and its objects written, then its version landed. A commit
    that fails changes nothing."""
    r = request
    metadata, against_version = check_commit(reader, stance, tag=r.tag, metadata=r.metadata, message=r.message,
                                             selector=r.selector, new_stance=r.new_stance, against=r.against,
                                             move_tag=r.move_tag)
    base_rec, given, registered = resolve_base(reader, r.base, notes, verify=r.verify)
    repo = reader.repo
    token = uuid.uuid4().hex
    try:
        built = _build(reader, base_rec, given, model, r, token, against_version)
        version = land(reader, stance, base_rec, built, r.encoding, r.message, metadata, r.tag, token,
                       allow_empty=r.allow_empty, against=against_version.id if against_version else None)
    except BaseException:
        # A commit that fails changes nothing: not the objects it wrote for the tensors it
        # stored before the failure (those nothing else uses), not the base it registered.
        # Best effort (on a full disk the clean-up may fail too): the first error is the one
        # to report, and what is left is harmless (fsck notes it, gc and --repair clear it).
        written = quietly(repo.catalog.pending_of, token) or []
        quietly(repo.catalog.drop_pending, token)
        repo.remove_unreferenced(written)
        raise
    finally:
        if registered:
            reader.unregistered.pop(base_rec.id, None)
        # Whether it landed or not, this commit no longer needs its objects shielded from gc.
        quietly(repo.catalog.drop_pending, token)
    return CommitResult(version, len(built.entries), built.unchanged, version.bytes, built.bytes_new,
                        tuple(built.left_out), built.left_out_energy_fraction,
                        median_rel_change=built.median_rel_change)


def _build(reader: Reader, base: Base, given: Any, model: ModelLike, r: Request, token: str,
           against: Version | None) -> Built:
    """A commit's entries, their objects written (shielded by `token`), refused when there is
    nothing to store or the model is not a fine-tune of `base`."""
    from ..weights.models import open_model
    from .commit import NOT_A_FINE_TUNE, build_entries

    if against is not None:
        check_depth(reader, against, base.id)
    base_src = given or reader.base_source(base, r.base_weights, mapped=True)
    # The base's files this store hashed whole and that have not changed since (trust.py) are
    # not hashed again to check that they hold the base; `build_entries` checks their stamps.
    trusted = {} if given is not None or r.verify else \
        {name: tid for name, (tid, _) in trust.trusted(reader.repo, base_src).items()}
    target = open_model(model, mapped=True)
    built = build_entries(reader, base, base_src, target, token=token, encoding=r.encoding,
                          encoding_for=r.encoding_for, encoding_options=dict(r.encoding_options or {}),
                          selector=r.selector, progress=r.progress, allow_nonfinite=r.allow_nonfinite,
                          base_hashed=given is not None, trusted=trusted, against=against)
    if not built.entries and not built.unchanged:
        raise NothingToCommit("the model has no tensors")
    if against is not None:
        reader.repo.mark_chained()
    median = built.median_rel_change
    if not r.force and median is not None and median > NOT_A_FINE_TUNE:
        raise NotAFineTune(median, NOT_A_FINE_TUNE, base.name or base.id[:19])
    return built


def land(reader: Reader, stance: str, base: Base, built: Built, encoding: str, message: str,
         metadata: dict[str, str], tag: str | None, token: str, *, allow_empty: bool = False,
         against: str | None = None) -> Version:
    """The version of a commit, in one transaction: its base registered if the commit gave it
    as weights, its manifest, its rows, its tag and its ref records."""
    from .commit import same_content

    repo, catalog = reader.repo, reader.repo.catalog
    with catalog.transaction():
        # Stamped under the write lock, so that a stance's versions are in time order too.
        created = now()
        records = _land_base(reader, base)
        if against is not None and catalog.version(against) is None:
            raise ChainError(f"the version this commit is stored against ({against[:19]}) was deleted while it "
                             "ran; nothing was stored")
        latest = catalog.latest(stance)
        if latest and not allow_empty:
            newest = reader.resolve(latest["id"])
            if same_content(built.entries, newest, base_id=base.id, encoding=encoding,
                            selection=built.selection, against=against):
                raise IdenticalVersion(newest.ref, newest.id)
        number = catalog.last_number(stance) + 1  # never a deleted version's number
        if number > names.MAX_NUMBER:
            raise UnsafeInput(f"stance {stance!r} has reached version number {names.MAX_NUMBER}, the last a ref "
                              "can name; commit to another stance; nothing was stored")
        m = manifest(stance=stance, number=number, parent=latest["id"] if latest else None,
                     base_id=base.id, encoding=encoding, selection=built.selection, message=message,
                     metadata=metadata, created=created, tensors=built.entries, against=against)
        vid = repo.insert_version(m, stance=stance, number=number, sizes=built.sizes)
        records.append({"op": "version", "id": vid, "stance": stance, "number": number})
        if tag:
            catalog.put_tag(stance, tag, vid, created)
            records.append({"op": "tag", "stance": stance, "name": tag, "version": vid, "created": created})
        catalog.forget_pending(token)
        catalog.record(*records)
    return reader.resolve(vid)


def _land_base(reader: Reader, base: Base) -> list[dict]:
    """Inside a commit's transaction: the base it was given as weights, registered (its ref
    records); refused when the base was removed while the commit read the model."""
    repo, catalog = reader.repo, reader.repo.catalog
    if base.id in reader.unregistered and not catalog.has_base(base.id):
        row, tensors = reader.unregistered[base.id]
        listing, record = base_objects(row, tensors)
        repo.objects.put(listing, object_id=row["id"])
        repo.objects.put(record, object_id=row["record"])
        return [catalog.register_base(row, tensors)]
    if not catalog.has_base(base.id):  # removed while this commit read the model
        raise BaseNotFound(base.name or base.id[:19], [b["name"] or b["id"][:19] for b in catalog.bases()])
    return []


# -- versions made elsewhere (a pull, see hub.py) ----------------------------------------------


def ingest(reader: Reader, manifests: list[dict], payload: Callable[[str, int], bytes | memoryview], *,
           into: Mapping[str, str] | None = None, numbers: Mapping[str, int] | None = None,
           stances: Mapping[str, str] | None = None) -> list[tuple[Version, bool]]:
    """Land versions made in another store, each keeping its id and its number, all in one
    transaction or none (the store's `ingest` says how). Returns (version, whether it is new
    here) per manifest."""
    reader.repo.check_writable()
    versions = _placed([check_manifest(m) for m in manifests], into, numbers, stances)
    todo: dict[str, tuple[Version, dict]] = {}
    slots: dict[tuple[str, int], str] = {}  # (stance, number) -> the version landing there
    for v, m in zip(versions, manifests):
        check_ingest(reader, v)
        if is_new(reader, v, slots):
            todo.setdefault(v.id, (v, m))
            slots.setdefault((v.stance, v.number), v.id)
    inserted = _land_ingested(reader, list(todo.values()), payload)
    return [(reader.resolve(v.id), v.id in inserted) for v in versions]


def _placed(versions: list[Version], into: Mapping[str, str] | None, numbers: Mapping[str, int] | None,
            stances: Mapping[str, str] | None) -> list[Version]:
    """The versions under the stance and number they land at here: `into` renames a manifest's
    stance, `numbers` and `stances` (by version id) give one version another number and stance."""
    if into:
        for local in into.values():
            names.check_stance_name(local)
        versions = [dataclasses.replace(v, stance=into[v.stance], committed_as=v.stance) if v.stance in into
                    else v for v in versions]
    if numbers or stances:
        numbers, stances = numbers or {}, stances or {}
        for vid, number in numbers.items():
            names.check_number(number, f"version {vid[:19]}")
        for local in set(stances.values()):
            names.check_stance_name(local)
        versions = [dataclasses.replace(v, stance=stances.get(v.id, v.stance), number=numbers.get(v.id, v.number))
                    for v in versions]
    return versions


def _land_ingested(reader: Reader, todo: list[tuple[Version, dict]],
                   payload: Callable[[str, int], bytes | memoryview]) -> set[str]:
    """Write the objects the new versions need (each hashed again), then land the versions
    still new in one transaction; on failure, remove the objects written. Returns the ids
    of the versions inserted."""
    repo, catalog = reader.repo, reader.repo.catalog
    needed = {o.id: o.size for v, _ in todo for e in v.tensors for o in e.objects.values()}
    token = uuid.uuid4().hex
    written: list[str] = []
    landed = False
    try:
        catalog.add_pending(token, sorted(needed))
        sizes = {}
        for oid, size in needed.items():
            data = payload(oid, size)
            if len(data) != size or bytes_id(data) != oid:
                raise UnsafeInput(f"object {oid} does not match its id and size")
            put = repo.objects.put(data, object_id=oid)
            sizes[oid] = put.size
            if put.new:
                written.append(oid)
        inserted = set()
        with catalog.transaction():
            records = []
            for v, m in todo:
                # Another process may have landed something since the checks above.
                if is_new(reader, v):
                    repo.insert_version(m, stance=v.stance, number=v.number, sizes=sizes)
                    records.append({"op": "version", "id": v.id, "stance": v.stance, "number": v.number})
                    inserted.add(v.id)
            if records:
                catalog.record(*records)
        landed = True
    finally:
        quietly(catalog.drop_pending, token)
        if not landed:
            repo.remove_unreferenced(written)
    return inserted


def check_ingest(reader: Reader, v: Version) -> None:
    """Refuse a version from elsewhere whose entries name other base tensors, or other shapes
    or dtypes, than its base's."""
    base = reader.base(v.base_id)
    tensors = reader.base_tensors(base)
    wrong = sorted(e.name for e in v.tensors if e.base_tensor_id is not None and
                   e.base_tensor_id != tensors.get(e.name, {}).get("tensor_id"))
    if wrong:
        raise BaseMismatch(base.id, None, wrong, f"{v.ref}'s entries name other base tensors than this base's")
    # Only a raw copy may give a tensor another shape or dtype than its base's: every other
    # entry decodes onto the base tensor, so a shape it contradicts could never apply.
    for e in v.tensors:
        row = tensors.get(e.name)
        if row is None or (e.encoding == "lossless" and e.params.get("mode") == "raw"):
            continue
        if e.dtype != row["dtype"] or list(e.shape) != json.loads(row["shape"]):
            raise UnsafeInput(f"{v.ref}: tensor {e.name!r} is {e.dtype} {list(e.shape)[:8]} in the version but "
                              f"{row['dtype']} {row['shape']} in its base; only a raw lossless entry may "
                              "change a tensor's shape or dtype")


def is_new(reader: Reader, v: Version, landing: Mapping[tuple[str, int], str] | None = None) -> bool:
    """Whether a version from another store would be new here (the store's `is_new` says how)."""
    catalog = reader.repo.catalog
    if catalog.version(v.id):
        return False
    row = catalog.version_at(v.stance, v.number)
    if row is not None:
        raise VersionConflict(v.stance, v.number, row["id"], v.id)
    if v.stance in catalog.numbers_given() and reader.repo.deleted_at(v.stance, v.number) not in (None, v.id):
        # The number was another version's, deleted here: it names that one for good. The
        # same version may come back under it; a gap a pull left may be filled.
        raise VersionConflict(v.stance, v.number, None, v.id)
    other = (landing or {}).get((v.stance, v.number))
    if other is not None and other != v.id:
        raise VersionConflict(v.stance, v.number, other, v.id, "in what is being stored")
    return True
