"""The store: composes identity, encodings, objects and the catalog into bases, stances and
versions. It owns the order of writes (objects fsynced before any row points at them; a
version visible in one transaction) and the resolution of refs.

Layout on disk (see schema/FORMAT.md)::

    .deltastore/
      STORE           {"format": "deltastore/store/2"}
      refs.log        every change of stances, versions, tags and bases, appended
      journals/       open in-place applies
      catalog.db      SQLite (WAL): an index of the rest, rebuilt from it on demand
      locks/          one lock file per folder patched in place (target.py)
      objects/ab/...  content-addressed objects: tensors' parts, manifests, bases
      tmp/            objects being written

The truth is objects/, refs.log and journals/: every ref change is appended to the log, inside
the catalog's write transaction, after the objects it names are durable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .core import names
from .repo import index, journalfiles, knownstores
from .repo.catalog import Catalog, dumps, now
from .core.durable import replace_file
from .engine.chain import ChainError, check_depth, reference
from .core.errors import (AmbiguousRef, BaseMismatch, BaseNotFound, BaseWeightsMissing, DeltastoreError, IdenticalVersion,
                     JournalError, NotAFineTune, NothingToCommit, OldStoreFormat, ReadOnlyStore, RefNotFound,
                     StanceNameClose, StoreExists, StoreNotFound, TagExists, TagNotFound, UnsafeInput,
                     VersionConflict, cut, short, shown_names)
from .core.hashing import base_id as compute_base_id, bytes_id, canonical_json, tensor_id
from .engine.history import delete_stance, delete_version, diff, merge_stance, rename_stance
from .core.limits import is_text
from .engine.maintenance import FsckReport, fsck, gc, gc_plan, stats
from .repo.objects import ObjectStore
from .repo.records import (Base, CommitResult, TagChange, TensorEntry, Version, VersionInfo, check_manifest,
                      hub_origin, manifest, parse_manifest, split_hub_origin)
from .repo.reflog import RefLog

# torch, and the modules that import it when loaded (apply, commit, encodings, hashing.DTYPES, mix,
# models, patch, prepared, selection), are imported inside the methods where a tensor is at hand:
# read commands (log, show, stances, tag, stats, fsck, gc) then start without loading torch
# (tests/test_startup.py).
if TYPE_CHECKING:
    import torch

    from .weights.models import TensorInfo, TensorSource
    from .patching.prepared import PreparedStance
    from .codecs.selection import Selector

STORE_FILE = "STORE"
STORE_FORMAT = "deltastore/store/2"
# A store that holds (or held) a version stored against another (chain.py) is marked so by its
# first such commit: a build that does not know chains must not open it, for its delete and gc
# would not keep the versions a chained one needs.
CHAINED_STORE_FORMAT = "deltastore/store/3"
READABLE_FORMATS = (STORE_FORMAT, CHAINED_STORE_FORMAT)
OLD_FORMATS = ("deltastore/store/1",)
DEFAULT_DIR = ".deltastore"
STANCE_NAME = TAG_NAME = names.NAME
Progress = Callable[[int, int], None]
ModelLike = Any  # a path, a state dict, an nn.Module or a TensorSource


def find_store(start: str | os.PathLike | None = None, *, patched: str | os.PathLike | None = None) -> Path:
    """`$DELTASTORE_DIR`, else (given `patched`, a model path) the store whose open journal
    covers that model, else the nearest `.deltastore/` from `start` upwards. Refused, naming the
    nearest store this user has made or patched from (knownstores.py), when there is none."""
    env = os.environ.get("DELTASTORE_DIR")
    if env:
        return Path(env)
    here = Path(start or os.getcwd()).resolve()
    found = next((f / DEFAULT_DIR for f in (here, *here.parents) if (f / DEFAULT_DIR / STORE_FILE).is_file()), None)
    if patched is not None:
        owner = store_patching(patched, first=found)
        if owner is not None:
            return owner
    if found is not None:
        return found
    near = knownstores.nearest(here)
    raise StoreNotFound(str(here), searched_up=True, nearest=str(near) if near else None)


def store_patching(path: str | os.PathLike, *, first: Path | None = None, besides: Path | None = None) -> Path | None:
    """The store (`first`, then those of knownstores.py, but never `besides`) whose open
    journal covers the model at `path` (or has that id), found by identity as revert finds it (FORMAT.md §7)
    from the journal files alone; None where none does."""
    from .patching.patch import journals_covering
    skip = os.path.abspath(besides) if besides is not None else None
    for root in ([first] if first is not None else []) + knownstores.known():
        if skip is not None and os.path.abspath(root) == skip:
            continue
        try:
            rows = journalfiles.read_all(root)
            if journals_covering(rows, path) or any(r["id"] == str(path) for r in rows):  # `revert --forget ID`
                return root
        except (DeltastoreError, OSError):
            continue  # an unreadable store cannot be the one; its own commands say why
    return None


def store_at(path: str | os.PathLike) -> Path:
    """`--store PATH`: the store's folder, or a folder holding one as `.deltastore/` (what
    `init` in that folder made)."""
    path = Path(path)
    if not (path / STORE_FILE).is_file() and (path / DEFAULT_DIR / STORE_FILE).is_file():
        return path / DEFAULT_DIR
    return path


def store_format(root: Path) -> str | None:
    marker = Path(root) / STORE_FILE
    if not marker.is_file():
        near = knownstores.nearest(root)
        raise StoreNotFound(str(root), nearest=str(near) if near else None)
    try:
        return json.loads(marker.read_bytes()[:4096]).get("format")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object
        return None


def current_store(path: str | os.PathLike | None) -> Path:
    """The store's folder (`path`, else the one `find_store` finds), refused unless it holds a
    store of a format this deltastore reads."""
    root = store_at(path) if path is not None else find_store()
    fmt = store_format(root)
    if fmt in OLD_FORMATS:
        raise OldStoreFormat(str(root), fmt)
    if fmt not in READABLE_FORMATS:
        raise DeltastoreError(f"{root} is a store of format {fmt!r}; this deltastore reads "
                              f"{' and '.join(map(repr, READABLE_FORMATS))}")
    return root


check_stance_name = names.check_stance_name


class Store:
    def __init__(self, root: Path, *, readonly: bool | None = None):
        self.root = Path(root)
        if readonly is None:
            readonly = not os.access(self.root, os.W_OK)
        self.readonly = readonly
        self.objects = ObjectStore(self.root)
        self.refs = RefLog(self.root)
        self.catalog = Catalog(self.root / "catalog.db", readonly=readonly, refs=self.refs,
                               replay=self._catch_up)
        self._applied: dict[int, Any] = {}  # id(module) -> the ApplyHandle this store put there
        # Bases a commit in progress was given as weights: registered when the version lands.
        self._unregistered: dict[str, tuple[dict, list[dict]]] = {}
        # Versions others are stored against, each chain checked once (chain.py).
        self.chain_links: dict[str, Version] = {}
        # What a call did besides what it was asked, for the caller to show (one line each): a
        # base record its weights contradicted, replaced.
        self.notes: list[str] = []

    def _catch_up(self, catalog: Catalog) -> None:
        """Index the ref records a writer that died appended but never committed to the
        catalog. A record whose object is missing or damaged is left out: fsck reports it. One
        the catalog cannot index (a number another version holds: a line written by hand) stops
        the write, naming it: the rebuild sets it aside."""
        unindexed = index.Unindexed()
        index.replay(catalog, self.objects, self.refs, unindexed=unindexed)
        if unindexed.rejected:
            raise index.UnindexableRecord(unindexed.rejected[0])

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike = DEFAULT_DIR) -> "Store":
        root = Path(path)
        if (root / STORE_FILE).exists():
            raise StoreExists(str(root))
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects", "tmp", "journals"):
            (root / sub).mkdir(exist_ok=True)
        (root / "refs.log").touch()
        Catalog(root / "catalog.db", create=True).close()
        # The marker last: a folder without it is no store, whatever an interrupted init left.
        (root / STORE_FILE).write_text(json.dumps({"format": STORE_FORMAT}) + "\n")
        knownstores.remember(root)
        return cls(root, readonly=False)

    def to_json(self) -> dict:
        """`init --json`: the store's folder, absolute."""
        return {"store": str(self.root.absolute())}

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, readonly: bool | None = None) -> "Store":
        """`readonly`: open the catalog read-only (commands that only read: they then work on a
        full disk too); None: read-only where the folder cannot be written."""
        return cls(current_store(path), readonly=readonly)

    @staticmethod
    def rebuild_catalog(path: str | os.PathLike | None = None) -> "index.Rebuilt":
        """A new catalog from the store's objects, refs.log and journals/ alone (FORMAT.md §6).
        Run it with no other process using the store."""
        return index.rebuild(current_store(path))

    @staticmethod
    def check(path: str | os.PathLike | None = None, *, read_data: bool = False, repair: bool = False,
              rebuild_catalog: bool = False) -> "FsckReport":
        """fsck of the store at `path`, first rebuilding its catalog when asked (its report says
        what the rebuild found). The store is opened read-only unless it repairs or rebuilds, so
        that a check works on a full disk."""
        rebuilt = Store.rebuild_catalog(path) if rebuild_catalog else None
        with Store.open(path, readonly=None if repair or rebuild_catalog else True) as store:
            report = store.fsck(read_data=read_data, repair=repair)
        return dataclasses.replace(report, rebuilt=rebuilt)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bases ---------------------------------------------------------------------------------

    def add_base(self, model: ModelLike, *, name: str | None = None, hub_id: str | None = None,
                 hub_revision: str | None = None, expected_id: str | None = None,
                 progress: Progress | None = None) -> Base:
        """Register a base: hash every tensor, record names, dtypes, shapes and where it lives.
        `hub_id`, `hub_revision`: the Hub repo it is, and the commit its weights were fetched at.
        `expected_id`: refuse (BaseMismatch, nothing stored) weights whose base id is another."""
        from .weights.models import open_model

        self._writable()
        self._refuse_patched(model)
        source = open_model(model, mapped=True)
        if name is not None:
            names.check_base_name(name)
        if hub_id is not None and not is_text(hub_id):
            raise UnsafeInput("the Hub id holds bytes that are not UTF-8 text; write it as UTF-8")
        if hub_revision is not None and (hub_id is None or split_hub_origin(hub_origin(hub_id, hub_revision))
                                         != (hub_id, hub_revision)):
            raise UnsafeInput(f"a base's Hub revision is a full commit hash (40 hex digits) of its Hub id, "
                              f"not {hub_revision[:80]!r}")
        row, tensors = self._describe_base(source, name=name, hub_id=hub_origin(hub_id, hub_revision),
                                           progress=progress)
        if expected_id is not None and row["id"] != expected_id:
            raise BaseMismatch(expected_id, row["id"], [], message=(
                f"{source.path or 'these weights'} hold base {short(row['id'])}, not the expected base "
                f"{short(expected_id)}; nothing was registered"))
        if name is not None:
            other = self.catalog.base_named(name, other_than=row["id"])
            if other:
                raise UnsafeInput(f"base name {name!r} already names base {other}; choose another name")
        # The base's tensor list and record are objects (the truth a rebuild reads), shielded
        # from gc until the base's ref record lands.
        listing, record = self._base_objects(row, tensors)
        wrong = self._record_disagrees(row, tensors)
        if wrong is None and self.catalog.has_base(row["id"]):
            row["record"] = self.catalog.base_record_id(row["id"])  # kept: it agrees with the weights
        self._put_base(row, tensors, listing, record)
        if wrong is not None:
            self.notes.append(self._replaced_note(row["id"], wrong))
        return self.base(row["id"])

    def _put_base(self, row: dict, tensors: list[dict], listing: bytes, record: bytes) -> None:
        """Write a base's two objects (shielded from gc until its ref record lands), then its
        rows and ref record."""
        token = uuid.uuid4().hex
        try:
            self.catalog.add_pending(token, [row["id"], row["record"]])
            self.objects.put(listing, object_id=row["id"])
            if bytes_id(record) == row["record"]:
                self.objects.put(record, object_id=row["record"])
            self.catalog.add_base(row, tensors)
        finally:
            self.catalog.drop_pending(token)

    def _record_disagrees(self, row: dict, tensors: list[dict]) -> str | None:
        """Where the record of a registered base says other than its weights (described as
        `row`, `tensors`) do; None when they agree or the base is new. A record from another
        store (a remote's) is checked against the base's tensor list only: what it says of each
        tensor (its squared norm, which a commit's not-a-fine-tune check divides by) only the
        weights can confirm."""
        if not self.catalog.has_base(row["id"]):
            return None
        return index.weights_disagree(self.catalog.base_tensors(row["id"]), self.base(row["id"]).bytes,
                                      tensors, row["bytes"])

    def _replaced_note(self, base_id: str, wrong: str) -> str:
        base = self.base(base_id)
        return (f"the record of base {base.name or base.id[:19]} disagreed with its weights ({wrong}): replaced by "
                "the record the weights give")

    def _describe_base(self, source: TensorSource, *, name: str | None = None, hub_id: str | None = None,
                       progress: Progress | None = None) -> tuple[dict, list[dict]]:
        """Hash every tensor of a base: its catalog row and its tensors' rows."""
        from .engine.commit import sq_norm

        ids, sq_norms = {}, {}
        for k, tname in enumerate(source.names):
            t = source.get(tname)
            ids[tname] = tensor_id(t)
            sq_norms[tname] = sq_norm(t)
            source.release(tname)
            if progress:
                progress(k + 1, len(source.names))
        source.check_unchanged()
        bid = compute_base_id(ids.items())
        row = {"id": bid, "name": name, "tensor_count": len(ids), "bytes": source.nbytes,
               "source": str(source.path.resolve()) if source.path else None, "hub_id": hub_id,
               "created": now()}
        tensors = [{"base_id": bid, "name": n, "dtype": i.dtype, "shape": dumps(list(i.shape)),
                    "tensor_id": ids[n], "sq_norm": sq_norms[n]} for n, i in source.infos.items()]
        return row, tensors

    @staticmethod
    def _base_objects(row: dict, tensors: list[dict]) -> tuple[bytes, bytes]:
        """The base's tensor list and base record (FORMAT.md §5); sets the row's `record`."""
        record = canonical_json(index.base_record(row["id"], row["bytes"], tensors))
        row["record"] = bytes_id(record)
        return index.base_list(tensors), record

    def _refuse_patched(self, model: ModelLike) -> None:
        """A model with a stance applied in place holds no base's weights: never register it."""
        from .patching.patch import open_journal_on

        if isinstance(model, (str, os.PathLike)):
            line = open_journal_on(self, model)
            if line:
                raise JournalError(f"{model} cannot be a base now: {line}")

    def base_changed(self, base: Base, source: TensorSource, names: list[str]) -> BaseMismatch:
        """The error for base weights that are no longer those registered, naming the open
        journal when a stance applied in place to them is why."""
        from .patching.patch import open_journal_on

        line = None
        if source.path is not None:
            line = open_journal_on(self, source.path)
        if line is None:
            return BaseMismatch(base.id, None, names, "the base weights differ from those registered")
        return BaseMismatch(base.id, None, names, message=(
            f"the weights at {source.path} differ from those of base {base.name or base.id[:19]} "
            f"({shown_names(names)}): {line}"))

    def bases(self) -> list[Base]:
        return [Base.from_row(r) for r in self.catalog.bases()]

    def base(self, ref: str | Base) -> Base:
        """A base by id, id prefix (8+ hex digits) or name."""
        if isinstance(ref, Base):
            return ref
        rows = self.catalog.bases()
        exact = [r for r in rows if r["id"] == ref or r["name"] == ref]
        if not exact and len(ref.removeprefix("b3:")) >= 8:
            exact = [r for r in rows if r["id"].removeprefix("b3:").startswith(ref.removeprefix("b3:"))]
        if len(exact) == 1:
            return Base.from_row(exact[0])
        if len(exact) > 1:
            raise AmbiguousRef(ref, [r["id"][:19] for r in exact])
        known = [r["name"] or r["id"][:19] for r in rows]
        raise BaseNotFound(ref, known)

    def remove_base(self, ref: str | Base) -> Base:
        """Forget a base no version uses (refused, naming them, while any does): its ref record
        goes, and gc may then remove its two objects. Its weights, outside the store, are not
        touched. Returns the base removed."""
        self._writable()
        base = self.base(ref)
        self.catalog.remove_base(base.id, base.name or base.id[:19])
        return base

    def base_tensors(self, base: str | Base) -> dict[str, dict]:
        if isinstance(base, Base) and base.id in self._unregistered:
            return {r["name"]: r for r in self._unregistered[base.id][1]}
        bid = self.base(base).id
        return {r["name"]: r for r in self.catalog.base_tensors(bid)}

    def _resolve_base(self, base: ModelLike | str | Base) -> tuple[Base, TensorSource | None, bool]:
        """A base record, those weights when the caller handed us weights, and whether this call
        registered the base."""
        if isinstance(base, (Base,)):
            return base, None, False
        if isinstance(base, str) and not _looks_like_path(base):
            return self.base(base), None, False
        from .weights.models import open_model

        self._refuse_patched(base)
        source = open_model(base, mapped=True)
        row, tensors = self._describe_base(source)
        if not self.catalog.has_base(row["id"]):
            # Registered only when the version lands (in its transaction): a commit that fails
            # leaves no trace of it.
            self._unregistered[row["id"]] = (row, tensors)
            return Base.from_row(row), source, True
        wrong = self._record_disagrees(row, tensors)
        if wrong is not None:
            # The weights are at hand: the commit measures against what they are, and so does
            # every later one (only the record changes: not the base's name, source or Hub id).
            fixed = {**row, "name": None, "source": None, "hub_id": None}
            listing, record = self._base_objects(fixed, tensors)
            self._put_base(fixed, tensors, listing, record)
            self.notes.append(self._replaced_note(row["id"], wrong))
        return self.base(row["id"]), source, False

    @contextmanager
    def base_for_commit(self, base: ModelLike | str | Base) -> Iterator[tuple[Base, dict[str, dict]]]:
        """The base a commit names (registered, or weights it would register) and its tensors'
        rows, for checks made before the commit: a base given as weights is not registered."""
        record, _, registered = self._resolve_base(base)
        try:
            yield record, self.base_tensors(record)
        finally:
            if registered:
                self._unregistered.pop(record.id, None)

    def base_source(self, base: Base, weights: ModelLike | None = None, *, mapped: bool = False) -> TensorSource:
        """The base's weights: those given, else where `base add` found them (`mapped`: see
        models.open_files)."""
        from .weights.models import open_model

        if weights is not None:
            return open_model(weights, mapped=mapped)
        return open_model(self.base_folder(base), mapped=mapped)

    @staticmethod
    def base_folder(base: Base) -> str:
        """Where `base add` found the base's weights; refused (`BaseWeightsMissing`) when it was
        registered without them (a clone, a pull) or they are not there any more."""
        if not base.source or not Path(base.source).exists():
            raise BaseWeightsMissing(f"{base.name + ' ' if base.name else ''}{short(base.id)}", base.source)
        return base.source

    # -- refs ----------------------------------------------------------------------------------

    def resolve(self, ref: str | Version) -> Version:
        """`STANCE`, `STANCE@N`, `STANCE@TAG` or a version id prefix of 8+ hex digits (FORMAT.md,
        section 5, gives the order): `STANCE@...` when the ref holds an '@' (all digits: a number,
        else a tag); `b3:...`, always an id prefix; else a stance's newest version, and only
        when no stance has that name, an id prefix. New stance names of 8 or more hex digits are
        refused, so that the last two never compete; a store that holds such a name from before
        gets an ambiguity error when its ref is also a version id prefix."""
        if isinstance(ref, Version):
            return ref
        if isinstance(ref, VersionInfo):
            ref = ref.id
        parsed = names.parse_ref(ref)
        row = None
        if parsed.impossible:
            pass
        elif parsed.number is not None:
            row = self.catalog.version_at(parsed.stance, parsed.number)
        elif parsed.tag is not None:
            tagged = self.catalog.tag_target(parsed.stance, parsed.tag)
            row = self.catalog.version(tagged) if tagged else None
        else:
            row = self.catalog.latest(parsed.stance) if parsed.stance is not None else None
            rows = self.catalog.versions_with_prefix(parsed.id_prefix) if parsed.id_prefix else []
            if row and rows:
                raise AmbiguousRef(ref, [f"stance {ref} (write {ref}@N)"]
                                   + [f"{r['id'][:15]} ({r['stance']}@{r['number']})" for r in rows])
            if len(rows) > 1:
                raise AmbiguousRef(ref, [f"{r['id'][3:15]} ({r['stance']}@{r['number']})" for r in rows])
            row = row or (rows[0] if rows else None)
        if row:
            return self._version(row)
        raise RefNotFound(ref, self._close_refs(ref))

    def _close_refs(self, ref: str) -> list[str]:
        """What a ref that matches nothing may have meant: stances and tags a few edits away."""
        known = [s["name"] for s in self.catalog.stances()]
        known += [f"{t['stance']}@{t['name']}" for t in self.catalog.tags()]
        return names.close_names(ref, known)

    def _version(self, row: dict, tags: list[str] | None = None) -> Version:
        if tags is None:
            tags = [t["name"] for t in self.catalog.tags(row["id"])]
        # The manifest is the object the version id names; reading it verifies it.
        text = self.objects.get(row["id"])
        try:
            v = Version.from_manifest(row["id"], parse_manifest(text), tags=tuple(tags), bytes=row["bytes"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise DeltastoreError(f"the manifest of {row['stance']}@{row['number']} ({row['id'][:19]}) is "
                                  "malformed; run `deltastore fsck` to see what it breaks") from None
        if row["stance"] != v.stance or row["number"] != v.number:
            # Renamed or merged since it was committed: the refs say where it lives and its
            # number, the manifest (and so the id) keeps the name and number it was committed under.
            v = dataclasses.replace(v, stance=row["stance"], number=row["number"], committed_as=v.stance,
                                    committed_number=v.number)
        return v

    def log(self, stance: str | None = None, *, where: Mapping[str, str] | None = None) -> list[VersionInfo]:
        """Versions, newest first: of one stance, or of all; `where` keeps those whose metadata
        has every key=value given. Summaries without tensor entries (`resolve` gives those)."""
        if stance is not None and not self.catalog.has_stance(stance):
            raise RefNotFound(stance, self._close_refs(stance))
        rows = self.catalog.version_summaries(stance, where=dict(where or {}))
        # Every version listed: read every tag and metadata row rather than look each one up.
        ids = None if stance is None and not where else [r["id"] for r in rows]
        tags = self.catalog.tags_by_version(ids) if rows else {}
        meta = self.catalog.metadata_by_version(ids) if rows else {}
        return [VersionInfo(r["id"], r["stance"], r["number"], r["parent"], r["base_id"], r["encoding"],
                            r["message"], meta.get(r["id"], {}), r["created"], r["tensors"], r["bytes"],
                            tuple(tags.get(r["id"], []))) for r in rows]

    def stances(self) -> list[dict]:
        return self.catalog.stances()

    def tag(self, ref: str | Version, name: str, *, force: bool = False) -> TagChange:
        """Name a version: STANCE@NAME then refers to it. Returns the version, tagged. A tag
        that names another version already is refused (`TagExists`) unless `force` moves it."""
        self._writable()
        names.check_tag_name(name)
        version = self.resolve(ref)
        if not force:
            self._check_tag_free(version.stance, name, version.id, "--force")
        self.catalog.set_tag(version.stance, name, version.id)
        return TagChange(self.resolve(version.id), name)

    def _check_tag_free(self, stance: str, name: str, version_id: str | None, option: str) -> None:
        """Refuse a tag of `stance` that names a version other than `version_id` (None: a
        version still to be made) already; the message says which, and `option` to move it."""
        current = self.catalog.tag_target(stance, name)
        if current is not None and current != version_id:
            row = self.catalog.version(current)
            where = f"{row['stance']}@{row['number']} {short(current)}" if row else short(current)
            raise TagExists(stance, name, where, option)

    def untag(self, ref: str, name: str | None = None) -> TagChange:
        """Remove a tag, `untag("STANCE@TAG")` or `untag(REF, TAG)` where REF names the stance
        (or one of its versions). Returns the version the tag named; the version stays."""
        self._writable()
        if name is None:
            stance, at, name = ref.partition("@")
            if not at or not name or name.isdigit():
                raise UnsafeInput(f"{cut(ref)} names no tag; give STANCE@TAG, or REF and TAG")
        else:
            stance = ref if self.catalog.has_stance(ref) else self.resolve(ref).stance
        if not self.catalog.has_stance(stance):
            raise RefNotFound(stance, self._close_refs(stance))
        vid = self.catalog.delete_tag(stance, name)
        if vid is None:
            raise TagNotFound(stance, name, [t["name"] for t in self.catalog.tags() if t["stance"] == stance])
        return TagChange(self.resolve(vid), name, deleted=True)

    def rename_stance(self, old: str, new: str):
        """Give a stance another name. Its versions keep their ids, numbers and tags."""
        self._writable()
        return rename_stance(self, old, new)

    def merge_stance(self, old: str, into: str):
        """Move `old`'s versions (with their ids and tags) into `into`, numbered after its
        newest; `old` is gone afterwards (history.merge_stance)."""
        self._writable()
        return merge_stance(self, old, into)

    def delete_stance(self, name: str):
        """Remove a stance, its versions and tags from the catalog. Objects stay until `gc`,
        which removes those no other version shares."""
        self._writable()
        return delete_stance(self, name)

    def delete_version(self, ref: str | Version):
        """Remove one version that nothing needs (no tag, patched folder or version stored
        against it; not its stance's only one). Its number is never given again; objects stay
        until `gc`."""
        self._writable()
        return delete_version(self, ref)

    def diff(self, a: str | Version, b: str | Version, *, base_weights: ModelLike | None = None,
             progress: Progress | None = None):
        """Tensor by tensor, what differs between the models versions `a` and `b` describe."""
        return diff(self, a, b, base_weights=base_weights, progress=progress)

    # -- commit --------------------------------------------------------------------------------

    def commit(self, stance: str, model: ModelLike, *, base: ModelLike | str | Base,
               encoding: str = "lossless", encoding_for: list[tuple[str, str]] | None = None,
               encoding_options: Mapping[str, Any] | None = None, selector: Selector | None = None,
               include: str | None = None, exclude: str | None = None, top_k: int | None = None,
               min_rel_change: float | None = None, energy: float | None = None,
               message: str = "", metadata: Mapping[str, str] | None = None, tag: str | None = None,
               base_weights: ModelLike | None = None, progress: Progress | None = None,
               allow_nonfinite: bool = False, allow_empty: bool = False, force: bool = False,
               new_stance: bool = False, against: str | Version | None = None,
               move_tag: bool = False) -> CommitResult:
        """Store `model` as the next version of `stance`, as deltas against `base`: the changed
        tensors `selector` keeps (`include`, `exclude`, `top_k`, `min_rel_change`, `energy` are
        the same options one by one; given with a `selector`, they replace its fields). A changed
        tensor holding nan or inf is refused (`NonFiniteTensor`) unless `allow_nonfinite`;
        lossless encodings then store it exactly, lossy ones refuse it. A model that would
        store what the stance's newest version stores is refused (`IdenticalVersion`) unless
        `allow_empty`; one whose median relative change is above `NOT_A_FINE_TUNE` (another
        model of the same shape) is refused (`NotAFineTune`) unless `force`. A stance that does
        not exist yet, named within a few edits of one that does, is refused (`StanceNameClose`:
        a typo would start a new line of versions unnoticed) unless `new_stance`. A `tag` that
        names a version already is refused (`TagExists`) unless `move_tag`. `against`: a
        version of the same base whose result the deltas are taken against instead of the base's
        (a chain, chain.py: at most `MAX_DEPTH` links; every tensor it stores is stored again)."""
        from .engine.commit import NOT_A_FINE_TUNE, build_entries
        from .codecs.selection import Selector

        selector = Selector.of(selector, include=include, exclude=exclude, top_k=top_k,
                               min_rel_change=min_rel_change, energy=energy)
        metadata, against_version = self.check_commit(stance, tag=tag, metadata=metadata, message=message,
                                                      selector=selector, new_stance=new_stance, against=against,
                                                      move_tag=move_tag)
        base_rec, given, registered = self._resolve_base(base)
        token = uuid.uuid4().hex
        try:
            if against_version is not None:
                check_depth(self, against_version, base_rec.id)
            base_src = given or self.base_source(base_rec, base_weights, mapped=True)
            from .weights.models import open_model

            target = open_model(model, mapped=True)
            built = build_entries(self, base_rec, base_src, target, token=token, encoding=encoding,
                                  encoding_for=encoding_for, encoding_options=dict(encoding_options or {}),
                                  selector=selector, progress=progress, allow_nonfinite=allow_nonfinite,
                                  base_hashed=given is not None, against=against_version)
            if not built.entries and not built.unchanged:
                raise NothingToCommit("the model has no tensors")
            if against_version is not None:
                self._mark_chained()
            median = built.median_rel_change
            if not force and median is not None and median > NOT_A_FINE_TUNE:
                raise NotAFineTune(median, NOT_A_FINE_TUNE, base_rec.name or base_rec.id[:19])
            version = self._land(stance, base_rec, built, encoding, message, metadata, tag, token,
                                 allow_empty=allow_empty, against=against_version.id if against_version else None)
        except BaseException:
            # A commit that fails changes nothing: not the objects it wrote for the tensors it
            # stored before the failure (those nothing else uses), not the base it registered.
            # Best effort (on a full disk the clean-up may fail too): the first error is the one
            # to report, and what is left is harmless (fsck notes it, gc and --repair clear it).
            written = self._quietly(self.catalog.pending_of, token) or []
            self._quietly(self.catalog.drop_pending, token)
            self._remove_unreferenced(written)
            raise
        finally:
            if registered:
                self._unregistered.pop(base_rec.id, None)
            # Whether it landed or not, this commit no longer needs its objects shielded from gc.
            self._quietly(self.catalog.drop_pending, token)
        return CommitResult(version, len(built.entries), built.unchanged, version.bytes, built.bytes_new,
                            tuple(built.left_out), built.left_out_energy_fraction,
                            median_rel_change=built.median_rel_change)

    def check_commit(self, stance: str, *, tag: str | None = None, metadata: Mapping[str, str] | None = None,
                     message: str = "", selector: Selector | None = None, new_stance: bool = False,
                     against: str | Version | None = None,
                     move_tag: bool = False) -> tuple[dict[str, str], Version | None]:
        """The refusals of `commit` that read no tensor: a store that cannot be written, a bad
        name, tag, message or metadata, a tag that names a version already (unless `move_tag`), a stance name a typo away from another's, a selection
        that is not text, a version to be against that is not there. A measured commit makes
        them before it measures (auto.py). Returns the metadata as stored and that version."""
        self._writable()
        check_stance_name(stance)
        if not new_stance and not self.catalog.has_stance(stance):
            close = names.close_names(stance, [row["name"] for row in self.catalog.stances()], series=False)
            if close:
                raise StanceNameClose(stance, close[0])
        if tag is not None:
            names.check_tag_name(tag)
            if not move_tag:
                self._check_tag_free(stance, tag, None, "--move-tag")
        checked = names.check_metadata({str(k): str(v) for k, v in (metadata or {}).items()})
        names.check_message(message)
        for what, texts in (("--include", selector.include if selector else None),
                            ("--exclude", selector.exclude if selector else None)):
            for text in [texts] if isinstance(texts, str) else texts or ():
                if not is_text(text):
                    raise UnsafeInput(f"{what} holds bytes that are not UTF-8 text; write it as UTF-8")
        against_version = self.resolve(against) if against is not None else None
        if against_version is not None and selector:
            raise ChainError("--against stores every tensor that differs from the other version's result; "
                             "leave out the selection options (--include, --exclude, --top-k, ...)")
        return checked, against_version

    @property
    def holds_chains(self) -> bool:
        """Whether a version stored against another was ever committed here (the store's
        format says so): only then do delete and fsck read every manifest for chains."""
        return store_format(self.root) == CHAINED_STORE_FORMAT

    def _mark_chained(self) -> None:
        """Mark the store as one that holds chains (durably, before the first lands), so that
        builds that do not know them refuse it."""
        if not self.holds_chains:
            replace_file(self.root / STORE_FILE, (json.dumps({"format": CHAINED_STORE_FORMAT}) + "\n").encode(),
                         self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-STORE.tmp")

    def _land(self, stance: str, base: Base, built: Any, encoding: str, message: str,
              metadata: dict[str, str], tag: str | None, token: str, *, allow_empty: bool = False,
              against: str | None = None) -> Version:
        from .engine.commit import same_content

        with self.catalog.transaction():
            # Stamped under the write lock, so that a stance's versions are in time order too.
            created = now()
            records = []
            if base.id in self._unregistered and not self.catalog.has_base(base.id):
                row, tensors = self._unregistered[base.id]
                listing, record = self._base_objects(row, tensors)
                self.objects.put(listing, object_id=row["id"])
                self.objects.put(record, object_id=row["record"])
                records.append(self.catalog.register_base(row, tensors))
            elif not self.catalog.has_base(base.id):  # removed while this commit read the model
                raise BaseNotFound(base.name or base.id[:19], [b["name"] or b["id"][:19] for b in self.catalog.bases()])
            if against is not None and self.catalog.version(against) is None:
                raise ChainError(f"the version this commit is stored against ({against[:19]}) was deleted while it "
                                 "ran; nothing was stored")
            latest = self.catalog.latest(stance)
            if latest and not allow_empty:
                newest = self.resolve(latest["id"])
                if same_content(built.entries, newest, base_id=base.id, encoding=encoding,
                                selection=built.selection, against=against):
                    raise IdenticalVersion(newest.ref, newest.id)
            number = self.catalog.last_number(stance) + 1  # never a deleted version's number
            if number > names.MAX_NUMBER:
                raise UnsafeInput(f"stance {stance!r} has reached version number {names.MAX_NUMBER}, the last a ref "
                                  "can name; commit to another stance; nothing was stored")
            m = manifest(stance=stance, number=number, parent=latest["id"] if latest else None,
                         base_id=base.id, encoding=encoding, selection=built.selection, message=message,
                         metadata=metadata, created=created, tensors=built.entries, against=against)
            vid = self._insert_version(m, stance=stance, number=number, sizes=built.sizes)
            records.append({"op": "version", "id": vid, "stance": stance, "number": number})
            if tag:
                self.catalog.put_tag(stance, tag, vid, created)
                records.append({"op": "tag", "stance": stance, "name": tag, "version": vid, "created": created})
            self.catalog.forget_pending(token)
            self.catalog.record(*records)
        return self.resolve(vid)

    def _insert_version(self, m: dict, *, stance: str, number: int, sizes: Mapping[str, int]) -> str:
        """Inside a transaction: write the manifest object (durable before its ref record), then
        index the version."""
        vid = self.objects.put(canonical_json(m)).id
        row, objects, links, by_encoding = index.version_rows(m, vid, stance, number, sizes)
        self.catalog.insert_version(row, objects, links, by_encoding, m["metadata"])
        return vid

    # -- versions made elsewhere (a pull, see hub.py) --------------------------------------------

    def ingest(self, manifests: list[dict], payload: Callable[[str, int], bytes | memoryview], *,
               into: Mapping[str, str] | None = None,
               numbers: Mapping[str, int] | None = None,
               stances: Mapping[str, str] | None = None) -> list[tuple[Version, bool]]:
        """Store versions made in another store, each keeping its id and its number; all of them
        land in one transaction, or none does and the store is as it was.

        `payload(object_id, size)` hands over an object's bytes; each is hashed again before it
        is written. Refused before anything is written: a malformed manifest, a base this store
        lacks, entries whose base tensors are not that base's, and a stance that already has the
        number as another version. `into` maps a manifest's stance to the local stance its
        versions land in (their ids, numbers and manifests unchanged, as after a rename).
        `numbers` (version id -> number) and `stances` (version id -> stance) land a version under
        another number and stance than its manifest's: those the other store's ref gives it (a
        remote's number, FORMAT.md §10; a stance renamed or merged there).
        Returns (version, whether it is new here) per manifest."""
        self._writable()
        versions = [check_manifest(m) for m in manifests]
        if into:
            for local in into.values():
                check_stance_name(local)
            versions = [dataclasses.replace(v, stance=into[v.stance], committed_as=v.stance) if v.stance in into
                        else v for v in versions]
        if numbers or stances:
            numbers, stances = numbers or {}, stances or {}
            for vid, number in numbers.items():
                names.check_number(number, f"version {vid[:19]}")
            for local in set(stances.values()):
                check_stance_name(local)
            versions = [dataclasses.replace(v, stance=stances.get(v.id, v.stance), number=numbers.get(v.id, v.number))
                        for v in versions]
        todo: dict[str, tuple[Version, dict]] = {}
        slots: dict[tuple[str, int], str] = {}  # (stance, number) -> the version landing there
        for v, m in zip(versions, manifests):
            self._check_ingest(v)
            if self.is_new(v, slots):
                todo.setdefault(v.id, (v, m))
                slots.setdefault((v.stance, v.number), v.id)
        needed = {o.id: o.size for v, _ in todo.values() for e in v.tensors for o in e.objects.values()}
        token = uuid.uuid4().hex
        written: list[str] = []
        landed = False
        try:
            self.catalog.add_pending(token, sorted(needed))
            sizes = {}
            for oid, size in needed.items():
                data = payload(oid, size)
                if len(data) != size or bytes_id(data) != oid:
                    raise UnsafeInput(f"object {oid} does not match its id and size")
                put = self.objects.put(data, object_id=oid)
                sizes[oid] = put.size
                if put.new:
                    written.append(oid)
            inserted = set()
            with self.catalog.transaction():
                records = []
                for v, m in todo.values():
                    # Another process may have landed something since the checks above.
                    if self.is_new(v):
                        self._insert_version(m, stance=v.stance, number=v.number, sizes=sizes)
                        records.append({"op": "version", "id": v.id, "stance": v.stance, "number": v.number})
                        inserted.add(v.id)
                if records:
                    self.catalog.record(*records)
            landed = True
        finally:
            self._quietly(self.catalog.drop_pending, token)
            if not landed:
                self._remove_unreferenced(written)
        return [(self.resolve(v.id), v.id in inserted) for v in versions]

    def add_base_record(self, listing: bytes, record: bytes, *, name: str | None = None,
                        hub_id: str | None = None) -> Base:
        """Register a base from its tensor list and base record (made in another store, checked
        by the caller): no weights are read. Its weights are found later (`--base-path`)."""
        self._writable()
        bid, rid = bytes_id(listing), bytes_id(record)
        problem = index.base_record_problem(listing, record, bid)
        if problem is not None:
            raise UnsafeInput(f"base record {rid} is not the record of base {bid}: {problem}; nothing was stored")
        row, tensors = index.base_rows(bid, rid, json.loads(record), name=name, source=None, hub_id=hub_id,
                                       created=now())
        if self.catalog.has_base(bid):
            row["record"] = self.catalog.base_record_id(bid)  # the one here: it may come from the weights
        self._put_base(row, tensors, listing, record)
        return self.base(bid)

    def _check_ingest(self, v: Version) -> None:
        base = self.base(v.base_id)
        tensors = self.base_tensors(base)
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

    def is_new(self, v: Version, landing: Mapping[tuple[str, int], str] | None = None) -> bool:
        """Whether a version from another store (`ingest`, a pull) would be new here: False when
        this store has it already. Raises `VersionConflict` when its stance's number is another
        version's, here or among the others landing with it (`landing`: (stance, number) ->
        version id; a lookup, so that a pull of n versions checks in O(n))."""
        if self.catalog.version(v.id):
            return False
        row = self.catalog.version_at(v.stance, v.number)
        if row is not None:
            raise VersionConflict(v.stance, v.number, row["id"], v.id)
        if v.stance in self.catalog.numbers_given() and self._deleted_at(v.stance, v.number) not in (None, v.id):
            # The number was another version's, deleted here: it names that one for good. The
            # same version may come back under it; a gap a pull left may be filled.
            raise VersionConflict(v.stance, v.number, None, v.id)
        other = (landing or {}).get((v.stance, v.number))
        if other is not None and other != v.id:
            raise VersionConflict(v.stance, v.number, other, v.id, "in what is being stored")
        return True

    def _deleted_at(self, stance: str, number: int) -> str | None:
        """The id of the version deleted as `stance@number`, or None. Read from the ref log:
        only a version landing on a deleted number asks."""
        return self.refs.deleted_at(stance, number)

    def _remove_unreferenced(self, object_ids: list[str]) -> None:
        """Undo the objects a failed commit or ingest wrote, sparing any that something else now
        uses. Best effort: an object left behind is gc's."""
        for oid in object_ids:
            # Inside a write transaction, so no commit can start re-using it in between.
            def remove(oid: str = oid) -> None:
                with self.catalog.transaction():
                    if not self.catalog.is_referenced(oid):
                        self.objects.remove(oid)
            self._quietly(remove)

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any) -> Any:
        """A clean-up step after a failure: never a second error in place of the first."""
        try:
            return call(*args)
        except (DeltastoreError, OSError):
            return None

    # -- reading versions back -----------------------------------------------------------------

    def read_parts(self, entry: TensorEntry) -> dict[str, bytes | bytearray]:
        """The payloads of one entry's objects, each verified against its id."""
        return {part: self.objects.get(o.id, raw_size=o.size) for part, o in entry.objects.items()}

    def decode_entry(self, entry: TensorEntry, base_tensor: torch.Tensor | None,
                     parts: dict[str, bytes | bytearray] | None = None, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor apply produces for one entry, from verified objects (read here unless
        `parts` holds them already); `out`: see Encoding.decode."""
        import torch

        from .codecs import encodings
        from .core.hashing import DTYPES

        parts = self.read_parts(entry) if parts is None else parts
        enc = encodings.from_params(entry.encoding, entry.params)
        if entry.against_version is not None:
            # Stored against another version's result: that result, its chain resolved and verified.
            base_tensor = reference(self, entry, base_tensor)
        base = base_tensor if base_tensor is not None else torch.empty(0)
        return enc.decode(base, encodings.Encoded(parts, entry.params), dtype=DTYPES[entry.dtype],
                          shape=entry.shape, out=out)

    def materialize(self, ref: str | Version, *, base_weights: ModelLike | None = None
                    ) -> tuple[dict[str, TensorInfo], Callable[[str], torch.Tensor]]:
        """The fine-tuned model a version describes: every tensor's description, and a function
        that produces one tensor at a time, verified against the ids recorded at commit."""
        from .weights.models import TensorInfo

        version = self.resolve(ref)
        base = self.base(version.base_id)
        source = self.base_source(base, base_weights)
        expected = self.base_tensors(base)
        entries = {e.name: e for e in version.tensors}
        missing = sorted(n for n in expected if n not in source)
        if missing:
            raise BaseMismatch(base.id, None, missing, "the base weights lack these tensors")
        infos = {}
        for name in sorted(set(expected) | set(entries)):
            info = source.infos.get(name)
            entry = entries.get(name)
            if entry is not None:
                infos[name] = TensorInfo(name, entry.dtype, tuple(entry.shape), info.file if info else None)
            else:
                infos[name] = info

        def tensor(name: str) -> torch.Tensor:
            base_tensor = None
            if name in expected:
                base_tensor = source.get(name)
                if tensor_id(base_tensor) != expected[name]["tensor_id"]:
                    raise self.base_changed(base, source, [name])
            entry = entries.get(name)
            if entry is None:
                return base_tensor
            result = self.decode_entry(entry, base_tensor)
            entry.check_result(result, version.ref)
            return result
        return infos, tensor

    def tensors(self, ref: str | Version, *, base_weights: ModelLike | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the fine-tuned model a version describes, one at a time, verified."""
        infos, tensor = self.materialize(ref, base_weights=base_weights)
        for name in infos:
            yield name, tensor(name)

    def export(self, ref: str | Version, out: str | os.PathLike, *, base_weights: ModelLike | None = None,
               progress: Progress | None = None) -> Path:
        """Write the full fine-tuned model (base + delta) as a Hugging Face model folder."""
        from .patching.patch import write_model

        version = self.resolve(ref)
        base = self.base(version.base_id)
        source = self.base_source(base, base_weights)
        infos, tensor = self.materialize(version, base_weights=source)
        return write_model(Path(out), infos, tensor, files_from=source.folder, progress=progress)

    def apply_files(self, ref: str | Version, target: str | os.PathLike, *, break_links: bool = False,
                    progress: Progress | None = None):
        """Patch a model file or folder in place, journalled so that `revert_files` undoes it.
        A file with other hard links is refused, unless `break_links`: it is then replaced by a
        private copy first, and the other paths keep their bytes. `progress(done, total)`: in
        bytes checked and written."""
        from .patching.patch import apply_in_place

        self._writable()
        return apply_in_place(self, self.resolve(ref), Path(target), allow_links=break_links, progress=progress)

    def revert_files(self, target: str | os.PathLike, *, progress: Progress | None = None):
        from .patching.patch import journals_covering, revert_in_place
        self._writable()
        if not journals_covering(self.catalog.open_journals(), target):
            other = store_patching(target, besides=self.root)
            if other is not None:  # e.g. a store made here after the patch knows nothing of it
                raise JournalError(f"nothing was applied in place to {target} from the store {self.root}; the store "
                                   f"{other} patched it: run `deltastore --store {other} revert {target}`")
        return revert_in_place(self, Path(target), progress=progress)

    def forget_journal(self, name: str | os.PathLike):
        """Drop the journal of an in-place apply that revert cannot restore (its files gone or
        changed), by its target's path or its id; writes no model file."""
        from .patching.patch import forget_journal
        self._writable()
        return forget_journal(self, str(name))

    # -- maintenance (see maintenance.py) -------------------------------------------------------

    def fsck(self, *, read_data: bool = False, repair: bool = False):
        if repair:
            self._writable()
        return fsck(self, read_data=read_data, repair=repair)

    def gc_plan(self):
        return gc_plan(self)

    def gc(self, plan=None):
        self._writable()
        return gc(self, plan)

    def stats(self):
        return stats(self)

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStore(str(self.root))

    def check_writable(self) -> None:
        """Refuse, in one line, a write to a store opened read-only."""
        self._writable()

    # -- apply on a live module (see apply.py) --------------------------------------------------

    def apply(self, module: torch.nn.Module, ref: "str | Version | Mapping[str | Version, float]", *,
              strict: bool = True, scale: float | None = None):
        """Apply a version to `module` in place. `scale=a`: base + a*dW instead; `ref` a mapping
        {ref: a, ...}: base + a1*dW1 + a2*dW2 + ... (mix.py). Revert puts the base bytes back."""
        from .patching.apply import apply_module
        from .patching.mix import MixError, apply_mix

        if isinstance(ref, Mapping):
            if scale is not None:
                raise MixError("give the weights in the mapping, or one ref and scale=, not both")
            handle = apply_mix(self, module, ref)
        elif scale is not None:
            handle = apply_mix(self, module, {self.resolve(ref).id: scale})
        else:
            handle = apply_module(self, module, self.resolve(ref), strict=strict)
        self._applied[id(module)] = handle
        return handle

    def revert(self, module: torch.nn.Module) -> None:
        handle = self._applied.pop(id(module), None)
        if handle is not None:
            handle.revert()

    def prepare(self, ref: str | Version, *, device: torch.device | str | None = None, mode: str = "full",
                base_weights: ModelLike | None = None):
        """Read, verify and decode a version once, for `switch` to copy into a module (see
        prepared.py). `mode="full"` holds the decoded tensors (the bytes the stance touches),
        `mode="packed"` the stored codes (about the stored size), decoded at each switch.
        `device`: where they are held, the module's (default CPU). `base_weights`: the base
        model (path, state dict or module at its base), else where `base add` found it."""
        from .patching.prepared import prepare

        return prepare(self, self.resolve(ref), device=device, mode=mode, base_weights=base_weights)

    def switch(self, module: torch.nn.Module, ref: "str | Version | PreparedStance | None"):
        """Revert whatever this store applied to `module`, then apply `ref` (None: stay at base).
        Between prepared stances (`prepare`), a switch copies or decodes into the module and
        checks only what can have changed since the last one."""
        from .patching.apply import apply_module
        from .patching.prepared import PreparedStance

        if isinstance(ref, PreparedStance) or (ref is None and self._switching(module)):
            return self._switch_prepared(module, ref)
        version = self.resolve(ref) if ref is not None else None
        with self._replacing(module):
            if version is None:
                return None
            handle = apply_module(self, module, version)
        self._applied[id(module)] = handle
        return handle

    @contextmanager
    def _replacing(self, module: torch.nn.Module) -> Iterator[None]:
        """What this store applied to `module`, reverted for the body to apply another stance;
        when the body fails (the module is at its base again), the previous stance is applied
        again before the error goes on."""
        from .patching.apply import apply_module

        previous = self._applied.pop(id(module), None)
        if previous is not None:
            previous.revert()
        try:
            yield
        except BaseException:
            if previous is not None and previous.version is not None:
                self._applied[id(module)] = apply_module(self, module, previous.version)
            raise

    def _switching(self, module: torch.nn.Module) -> bool:
        from .patching.prepared import SwitchHandle

        return isinstance(self._applied.get(id(module)), SwitchHandle)

    def _switch_prepared(self, module: torch.nn.Module, stance: Any):
        from .patching.prepared import SwitchHandle

        handle = self._applied.get(id(module))
        if isinstance(handle, SwitchHandle) and handle.active:
            handle.switch(stance)
            return handle if stance is not None else None
        # A plain apply is reverted first; its stance is put back if the switch fails.
        with self._replacing(module):
            handle = SwitchHandle(module)
            handle.switch(stance)
        self._applied[id(module)] = handle
        return handle

    @contextmanager
    def applied(self, module: torch.nn.Module, ref: "str | Version | Mapping[str | Version, float]", *,
                scale: float | None = None) -> Iterator[Any]:
        handle = self.apply(module, ref, scale=scale)
        try:
            yield handle
        finally:
            handle.revert()
            self._applied.pop(id(module), None)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.endswith(".safetensors") or Path(text).exists()
