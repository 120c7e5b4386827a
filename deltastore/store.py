"""The store: what a user calls. `Store` composes the repository on disk (repo/repo.py), a
reader of it (engine/reader.py), and the functions of engine/ and patching/, each method one
call to them; the order of writes and the resolution of refs are theirs. `Store.open` finds
the store's folder (repo/locate.py) and opens it.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .core import names
from .engine import bases, history, landing, maintenance, tags
from .engine.landing import is_new
from .engine.reader import Reader
from .patching.live import LiveModules
from .repo import index
from .repo.locate import (CHAINED_STORE_FORMAT, DEFAULT_DIR, OLD_FORMATS, READABLE_FORMATS, STORE_FILE,
                          STORE_FORMAT, create, current_store, find_store, store_at, store_format, store_patching)
from .repo.records import Base, CommitResult, TagChange, TensorEntry, Version, VersionInfo
from .repo.repo import Repo

# torch, and the modules that import it when loaded (apply, commit, encodings, mix, models,
# patch, prepared, selection), are imported inside the methods where a tensor is at hand: read
# commands (log, show, stances, tag, stats, fsck, gc) then start without loading torch
# (tests/test_startup.py).
if TYPE_CHECKING:
    import torch

    from .codecs.selection import Selector
    from .engine.maintenance import FsckReport
    from .patching.prepared import PreparedStance
    from .weights.models import TensorInfo, TensorSource

__all__ = ["CHAINED_STORE_FORMAT", "DEFAULT_DIR", "OLD_FORMATS", "READABLE_FORMATS", "STORE_FILE", "STORE_FORMAT",
           "Store", "TAG_NAME", "check_stance_name", "current_store", "find_store", "store_at", "store_format",
           "store_patching"]

TAG_NAME = names.NAME
Progress = Callable[[int, int], None]
ModelLike = Any  # a path, a state dict, an nn.Module or a TensorSource

check_stance_name = names.check_stance_name


class Store:
    def __init__(self, root: Path, *, readonly: bool | None = None):
        self.repo = Repo(root, readonly=readonly)
        self.reader = Reader(self.repo)
        self.root, self.readonly = self.repo.root, self.repo.readonly
        self.objects, self.refs, self.catalog = self.repo.objects, self.repo.refs, self.repo.catalog
        # Versions others are stored against, each chain checked once (reader.py).
        self.chain_links: dict[str, Version] = self.reader.chain_links
        # What a call did besides what it was asked, for the caller to show (one line each): a
        # base record its weights contradicted, replaced.
        self.notes: list[str] = []
        self._live = LiveModules(self.reader)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike = DEFAULT_DIR) -> "Store":
        return cls(create(path), readonly=False)

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
        self.repo.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """Refuse (`ReadOnlyStore`) a write to a store opened read-only."""
        self.repo.check_writable()

    _writable = check_writable  # its name before it was public, until every caller uses check_writable

    # -- bases (see bases.py) ------------------------------------------------------------------

    def add_base(self, model: ModelLike, *, name: str | None = None, hub_id: str | None = None,
                 hub_revision: str | None = None, expected_id: str | None = None,
                 progress: Progress | None = None, verify: bool = False) -> Base:
        """Register a base: hash every tensor, record names, dtypes, shapes and where it lives.
        `hub_id`, `hub_revision`: the Hub repo it is, and the commit its weights were fetched at.
        `expected_id`: refuse (BaseMismatch, nothing stored) weights whose base id is another.
        A weight file this store hashed whole before and whose stat data (device, inode, size,
        times) has not changed since is not hashed again; `verify` hashes every file."""
        return bases.add_base(self.reader, model, self.notes, name=name, hub_id=hub_id, hub_revision=hub_revision,
                              expected_id=expected_id, progress=progress, verify=verify)

    def add_base_record(self, listing: bytes, record: bytes, *, name: str | None = None,
                        hub_id: str | None = None) -> Base:
        """Register a base from its tensor list and base record (made in another store, checked
        by the caller): no weights are read. Its weights are found later (`--base-path`)."""
        return bases.add_base_record(self.reader, listing, record, name=name, hub_id=hub_id)

    def remove_base(self, ref: str | Base) -> Base:
        """Forget a base no version uses (refused, naming them, while any does): its ref record
        goes, and gc may then remove its two objects. Its weights, outside the store, are not
        touched. Returns the base removed."""
        return bases.remove_base(self.reader, ref)

    @contextmanager
    def base_for_commit(self, base: ModelLike | str | Base) -> Iterator[tuple[Base, dict[str, dict]]]:
        """The base a commit names (registered, or weights it would register) and its tensors'
        rows, for checks made before the commit: a base given as weights is not registered."""
        with bases.base_for_commit(self.reader, base, self.notes) as found:
            yield found

    def bases(self) -> list[Base]:
        return self.reader.bases()

    def base(self, ref: str | Base) -> Base:
        """A base by id, id prefix (8+ hex digits) or name."""
        return self.reader.base(ref)

    def base_tensors(self, base: str | Base) -> dict[str, dict]:
        return self.reader.base_tensors(base)

    def base_source(self, base: Base, weights: ModelLike | None = None, *, mapped: bool = False) -> TensorSource:
        """The base's weights: those given, else where `base add` found them (`mapped`: see
        models.open_files)."""
        return self.reader.base_source(base, weights, mapped=mapped)

    base_folder = staticmethod(Reader.base_folder)

    def base_changed(self, base: Base, source: TensorSource, names: list[str]):
        """The error for base weights that are no longer those registered, naming the open
        journal when a stance applied in place to them is why."""
        return self.reader.base_changed(base, source, names)

    # -- refs, stances and tags ----------------------------------------------------------------

    def resolve(self, ref: str | Version) -> Version:
        """`STANCE`, `STANCE@N`, `STANCE@TAG` or a version id prefix of 8+ hex digits (the
        reader's `resolve` gives the order)."""
        return self.reader.resolve(ref)

    def close_refs(self, ref: str) -> list[str]:
        """What a ref that matches nothing may have meant: stances and tags a few edits away."""
        return self.reader.close_refs(ref)

    def log(self, stance: str | None = None, *, where: Mapping[str, str] | None = None) -> list[VersionInfo]:
        """Versions, newest first: of one stance, or of all; `where` keeps those whose metadata
        has every key=value given. Summaries without tensor entries (`resolve` gives those)."""
        return self.reader.log(stance, where=where)

    def stances(self) -> list[dict]:
        return self.reader.stances()

    def tag(self, ref: str | Version, name: str, *, force: bool = False) -> TagChange:
        """Name a version: STANCE@NAME then refers to it. Returns the version, tagged. A tag
        that names another version already is refused (`TagExists`) unless `force` moves it."""
        return tags.tag(self.reader, ref, name, force=force)

    def untag(self, ref: str, name: str | None = None) -> TagChange:
        """Remove a tag, `untag("STANCE@TAG")` or `untag(REF, TAG)` where REF names the stance
        (or one of its versions). Returns the version the tag named; the version stays."""
        return tags.untag(self.reader, ref, name)

    def rename_stance(self, old: str, new: str):
        """Give a stance another name. Its versions keep their ids, numbers and tags."""
        self.check_writable()
        return history.rename_stance(self.reader, old, new)

    def merge_stance(self, old: str, into: str):
        """Move `old`'s versions (with their ids and tags) into `into`, numbered after its
        newest; `old` is gone afterwards (history.merge_stance)."""
        self.check_writable()
        return history.merge_stance(self.reader, old, into)

    def delete_stance(self, name: str):
        """Remove a stance, its versions and tags from the catalog. Objects stay until `gc`,
        which removes those no other version shares."""
        self.check_writable()
        return history.delete_stance(self.reader, name)

    def delete_version(self, ref: str | Version):
        """Remove one version that nothing needs (no tag, patched folder or version stored
        against it; not its stance's only one). Its number is never given again; objects stay
        until `gc`."""
        self.check_writable()
        return history.delete_version(self.reader, ref)

    def diff(self, a: str | Version, b: str | Version, *, base_weights: ModelLike | None = None,
             progress: Progress | None = None):
        """Tensor by tensor, what differs between the models versions `a` and `b` describe."""
        return history.diff(self.reader, a, b, base_weights=base_weights, progress=progress)

    # -- commit (see landing.py) ---------------------------------------------------------------

    def commit(self, stance: str, model: ModelLike, *, base: ModelLike | str | Base,
               encoding: str = "lossless", encoding_for: list[tuple[str, str]] | None = None,
               encoding_options: Mapping[str, Any] | None = None, selector: Selector | None = None,
               include: str | None = None, exclude: str | None = None, top_k: int | None = None,
               min_rel_change: float | None = None, energy: float | None = None,
               message: str = "", metadata: Mapping[str, str] | None = None, tag: str | None = None,
               base_weights: ModelLike | None = None, progress: Progress | None = None,
               allow_nonfinite: bool = False, allow_empty: bool = False, force: bool = False,
               new_stance: bool = False, against: str | Version | None = None,
               move_tag: bool = False, verify: bool = False) -> CommitResult:
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
        (a chain, chain.py: at most `MAX_DEPTH` links; every tensor it stores is stored again).
        The base's weight files that this store hashed whole and whose stat data has not
        changed since are trusted to hold the base; `verify` hashes them all."""
        from .codecs.selection import Selector

        selector = Selector.of(selector, include=include, exclude=exclude, top_k=top_k,
                               min_rel_change=min_rel_change, energy=energy)
        request = landing.Request(
            base, selector, encoding=encoding, encoding_for=encoding_for, encoding_options=encoding_options,
            message=message, metadata=metadata, tag=tag, base_weights=base_weights, progress=progress,
            allow_nonfinite=allow_nonfinite, allow_empty=allow_empty, force=force, new_stance=new_stance,
            against=against, move_tag=move_tag, verify=verify)
        return landing.commit(self.reader, self.notes, stance, model, request)

    def check_commit(self, stance: str, *, tag: str | None = None, metadata: Mapping[str, str] | None = None,
                     message: str = "", selector: Selector | None = None, new_stance: bool = False,
                     against: str | Version | None = None,
                     move_tag: bool = False) -> tuple[dict[str, str], Version | None]:
        """The refusals of `commit` that read no tensor: a store that cannot be written, a bad
        name, tag, message or metadata, a tag that names a version already (unless `move_tag`), a stance name a typo away from another's, a selection
        that is not text, a version to be against that is not there. A measured commit makes
        them before it measures (auto.py). Returns the metadata as stored and that version."""
        return landing.check_commit(self.reader, stance, tag=tag, metadata=metadata, message=message,
                                    selector=selector, new_stance=new_stance, against=against, move_tag=move_tag)

    @property
    def holds_chains(self) -> bool:
        """Whether a version stored against another was ever committed here (the store's
        format says so): only then do delete and fsck read every manifest for chains."""
        return self.repo.holds_chains

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
        return landing.ingest(self.reader, manifests, payload, into=into, numbers=numbers, stances=stances)

    def is_new(self, v: Version, landing: Mapping[tuple[str, int], str] | None = None) -> bool:
        """Whether a version from another store (`ingest`, a pull) would be new here: False when
        this store has it already. Raises `VersionConflict` when its stance's number is another
        version's, here or among the others landing with it (`landing`: (stance, number) ->
        version id; a lookup, so that a pull of n versions checks in O(n))."""
        return is_new(self.reader, v, landing)

    # -- reading versions back -----------------------------------------------------------------

    def read_parts(self, entry: TensorEntry) -> dict[str, bytes | bytearray]:
        """The payloads of one entry's objects, each verified against its id."""
        return self.reader.read_parts(entry)

    def decode_entry(self, entry: TensorEntry, base_tensor: torch.Tensor | None,
                     parts: dict[str, bytes | bytearray] | None = None, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor apply produces for one entry, from verified objects (read here unless
        `parts` holds them already); `out`: see Encoding.decode."""
        return self.reader.decode_entry(entry, base_tensor, parts, out=out)

    def materialize(self, ref: str | Version, *, base_weights: ModelLike | None = None
                    ) -> tuple[dict[str, TensorInfo], Callable[[str], torch.Tensor]]:
        """The fine-tuned model a version describes: every tensor's description, and a function
        that produces one tensor at a time, verified against the ids recorded at commit."""
        return self.reader.materialize(ref, base_weights=base_weights)

    def tensors(self, ref: str | Version, *, base_weights: ModelLike | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the fine-tuned model a version describes, one at a time, verified."""
        return self.reader.tensors(ref, base_weights=base_weights)

    # -- model files (see patch.py and revert.py) ----------------------------------------------

    def export(self, ref: str | Version, out: str | os.PathLike, *, base_weights: ModelLike | None = None,
               progress: Progress | None = None, verify: bool = False) -> Path:
        """Write the full fine-tuned model (base + delta) as a Hugging Face model folder. Base
        files this store hashed whole (at `base add`), whose stat data is unchanged since, are
        trusted to hold the base; `verify` hashes them all."""
        from .patching.patch import export

        return export(self.reader, ref, out, base_weights=base_weights, progress=progress, verify=verify)

    def apply_files(self, ref: str | Version, target: str | os.PathLike, *, break_links: bool = False,
                    progress: Progress | None = None, verify: bool = False, copy_originals: bool = False):
        """Patch a model file or folder in place, journalled so that `revert_files` undoes it.
        A file with other hard links is refused, unless `break_links`: it is then replaced by a
        private copy first, and the other paths keep their bytes. `progress(done, total)`: in
        bytes checked and written. The regions a version overwrites are checked to hold its
        base, except in files this store hashed whole and whose stat data has not changed
        since; `verify` checks them all. The journal takes the original bytes back from the
        base's own registered files where they hold them, unless `copy_originals`: every
        original byte is then copied into the store (a journal that outlives the base's files)."""
        from .patching.patch import apply_files

        return apply_files(self.reader, ref, target, break_links=break_links, progress=progress, verify=verify,
                           copy_originals=copy_originals)

    def revert_files(self, target: str | os.PathLike, *, progress: Progress | None = None):
        from .patching.revert import revert_files

        return revert_files(self.reader, target, progress=progress)

    def forget_journal(self, name: str | os.PathLike):
        """Drop the journal of an in-place apply that revert cannot restore (its files gone or
        changed), by its target's path or its id; writes no model file."""
        from .patching.revert import forget_journal

        self.check_writable()
        return forget_journal(self.reader, str(name))

    # -- maintenance (see maintenance.py) -------------------------------------------------------

    def fsck(self, *, read_data: bool = False, repair: bool = False):
        if repair:
            self.check_writable()
        return maintenance.fsck(self.reader, read_data=read_data, repair=repair)

    def gc_plan(self):
        return maintenance.gc_plan(self.reader)

    def gc(self, plan=None):
        self.check_writable()
        return maintenance.gc(self.reader, plan)

    def stats(self):
        return maintenance.stats(self.reader)

    # -- live modules (see live.py, apply.py, mix.py, prepared.py) -------------------------------

    def apply(self, module: torch.nn.Module, ref: "str | Version | Mapping[str | Version, float]", *,
              strict: bool = True, scale: float | None = None):
        """Apply a version to `module` in place. `scale=a`: base + a*dW instead; `ref` a mapping
        {ref: a, ...}: base + a1*dW1 + a2*dW2 + ... (mix.py). Revert puts the base bytes back."""
        return self._live.apply(module, ref, strict=strict, scale=scale)

    def revert(self, module: torch.nn.Module) -> None:
        self._live.revert(module)

    def prepare(self, ref: str | Version, *, device: torch.device | str | None = None, mode: str = "full",
                base_weights: ModelLike | None = None):
        """Read, verify and decode a version once, for `switch` to copy into a module (see
        prepared.py). `mode="full"` holds the decoded tensors (the bytes the stance touches),
        `mode="packed"` the stored codes (about the stored size), decoded at each switch.
        `device`: where they are held, the module's (default CPU). `base_weights`: the base
        model (path, state dict or module at its base), else where `base add` found it."""
        from .patching.prepared import prepare

        return prepare(self.reader, self.resolve(ref), device=device, mode=mode, base_weights=base_weights)

    def switch(self, module: torch.nn.Module, ref: "str | Version | PreparedStance | None"):
        """Revert whatever this store applied to `module`, then apply `ref` (None: stay at base).
        Between prepared stances (`prepare`), a switch copies or decodes into the module and
        checks only what can have changed since the last one."""
        return self._live.switch(module, ref)

    @contextmanager
    def applied(self, module: torch.nn.Module, ref: "str | Version | Mapping[str | Version, float]", *,
                scale: float | None = None) -> Iterator[Any]:
        with self._live.applied(module, ref, scale=scale) as handle:
            yield handle
