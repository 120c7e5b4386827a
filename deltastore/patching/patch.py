"""A version applied to model files on disk, in place and journalled (revert.py undoes it),
or written as a whole model to a new folder (`apply --out`, `export`).

In-place order (the journal makes every step undoable), all under the target's lock:
  1. resolve the target to its files by identity (target.py); refuse a file another path
     shares, and a target that an open journal already covers;
  2. check each region's base tensor id, a tensor or two at a time, and keep its original
     bytes: where a registered base file holds exactly them (basefiles.py), the journal will
     point there; else they are copied into one file in tmp/ (writeback started at once),
     fsynced; open every file to be written, and check that each is still the file checked;
     nothing written yet;
  3. rename the originals in as `journals/<id>.originals`, then record the journal (the files'
     identities, regions, where each region's originals are) as its file and its catalog rows;
  4. two tensors at a time: read each region's objects (verified), decode its result (a lossy
     one checked against its id) and write it straight over the region, each file fsynced
     once its regions are written; mark the journal applied. A check or a write that fails
     puts back what was written and drops the journal ("nothing was changed").
A crash before 3 completes leaves the files untouched; after it, `revert` restores them.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable


from ..core.errors import BaseMismatch, JournalError, short, shown_names
from ..core.hashing import base_id, raw_tensor_id
from ..core.pools import WORKERS, pipelined
from ..engine.reader import ModelLike, Reader
from ..repo import journalfiles, trust
from ..repo.catalog import now
from ..repo.openjournals import applied_ref, journals_on
from ..repo.records import Version
from ..weights.models import TensorInfo, TensorSource, open_files
from ..weights.target import Target, break_links, patch_lock, resolve
from .basefiles import BaseFiles, open_base_files
from .decoding import decoder
from .journalled import Journal, copy_range, drop, open_for_writing, put_back, pwrite_all, start_writeback
from .modelfolder import decodes_from_files, write_decoded, write_model

# Tensors that patching's workers may decode and write past the one whose file this thread
# fsyncs next: enough that a worker does not idle behind a large one (qwen0.5b's embedding is
# a quarter of its bytes, and as long to decode as ~30 of its other tensors).
AHEAD = 32


def apply_files(reader: Reader, ref: str | Version, target: str | os.PathLike, *, break_links: bool = False,
                progress: Callable[[int, int], None] | None = None, verify: bool = False,
                copy_originals: bool = False) -> Journal:
    """Patch a model file or folder in place (the store's `apply_files` says how)."""
    reader.repo.check_writable()
    return apply_in_place(reader, reader.resolve(ref), Path(target), allow_links=break_links, progress=progress,
                          verify=verify, copy_originals=copy_originals)


def export(reader: Reader, ref: str | Version, out: str | os.PathLike, *, base_weights: ModelLike | None = None,
           progress: Callable[[int, int], None] | None = None, verify: bool = False) -> Path:
    """Write the full fine-tuned model (base + delta) as a Hugging Face model folder. `verify`:
    hash every base tensor, even in files this store trusts (trust.py)."""
    version = reader.resolve(ref)
    base = reader.base(version.base_id)
    if base_weights is None or isinstance(base_weights, (str, os.PathLike)):
        # Files: read through memory maps, and decoded in numpy two tensors at a time where it can.
        source = reader.base_source(base, base_weights, mapped=True)
        expected = reader.base_tensors(base)
        if decodes_from_files(version, source, expected):
            trusted = {} if verify else {n: tid for n, (tid, _) in trust.trusted(reader.repo, source).items()}
            return write_decoded(reader, version, source, expected, Path(out), progress=progress, trusted=trusted,
                                 base_changed=lambda names: reader.base_changed(base, source, names))
    source = reader.base_source(base, base_weights)
    infos, tensor = reader.materialize(version, base_weights=source)
    return write_model(Path(out), infos, tensor, files_from=source.folder, progress=progress)


def apply_in_place(reader: Reader, version: Version, path: Path, *, allow_links: bool = False,
                   progress: Callable[[int, int], None] | None = None, verify: bool = False,
                   copy_originals: bool = False) -> Journal:
    """`allow_links`: give each hard-linked file a private copy first (`apply --break-links`).
    `progress(done, total)`: bytes checked and written so far, of all to check and write.
    `verify`: hash every region's base bytes, even in files this store trusts (trust.py).
    `copy_originals`: every region's original bytes into the journal's `.originals`, none
    taken from the base's files (basefiles.py)."""
    with patch_lock(reader.repo.root, resolve(path)):
        target = resolve(path)  # again, now that no other patch can change it
        covering = journals_on(reader.repo.catalog, target)
        if covering:
            which = applied_ref(reader.repo.catalog, covering[-1])
            raise JournalError(f"{target.given} already has {which} applied in place; "
                               f"run `deltastore revert {target.given}` first")
        target.check_private(allow_links=allow_links)
        # Read through memory maps: the base bytes are hashed, saved and decoded straight from
        # the page cache, each tensor's pages let go once it is done with.
        source = open_files(target.model, files=[target.path(f) for f in target.files], mapped=True)
        regions = _base_regions(reader, version, target, source)
        # Files this store hashed whole, unchanged since (trust.py), are not hashed again.
        trusted = {} if verify else {n: tid for n, (tid, _) in trust.trusted(reader.repo, source).items()}
        total = sum(info.nbytes for _, info in regions)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], 2 * total)

        reader.repo.objects.tmp.mkdir(exist_ok=True)
        journal_id = uuid.uuid4().hex
        saved = reader.repo.objects.tmp / f"{os.getpid()}-journal-{journal_id}{journalfiles.ORIGINALS}"
        try:
            base_files = None if copy_originals else open_base_files(reader, version, target, verify=verify)
            with open(saved, "wb") as originals:
                in_base = _check_and_save(reader, version, target, source, regions, originals, tick, base_files,
                                          trusted)
                originals.flush()
                os.fsync(originals.fileno())
            recheck = False
            if allow_links:
                linked = target
                target = break_links(target)
                if target != linked:
                    # The results are decoded from the private copies, each checked again first.
                    source = open_files(target.model, files=[target.path(f) for f in target.files], mapped=True)
                    regions, recheck = [(entry, source.infos[entry.name]) for entry, _ in regions], True
            files = list(dict.fromkeys(info.file.name for _, info in regions))
            handles = open_for_writing(target, files, "apply")
            try:
                source.check_unchanged()  # nothing wrote to the files since their regions were checked
                journal = _record(reader, version, target, regions, journal_id, saved, in_base, base_files)
                _patch_or_roll_back(reader, version, target, journal, source, regions, handles, tick, recheck)
            finally:
                for fh in handles.values():
                    fh.close()
        finally:
            saved.unlink(missing_ok=True)  # renamed into journals/ once recorded
        reader.repo.catalog.set_journal_state(journal["id"], "applied")
        return Journal(journal["id"], journal["target"], version.id, "applied", len(regions))


def _base_regions(reader: Reader, version: Version, target: Target,
                  source: TensorSource) -> list[tuple[Any, TensorInfo]]:
    """Every region the version overwrites, from the headers alone; refuses a target whose
    tensors are not the base's by name, dtype and shape, naming what it is instead."""
    expected = reader.base_tensors(version.base_id)
    regions, wrong, reshaped = [], [], []
    for entry in version.tensors:
        if entry.base_tensor_id is None:
            reshaped.append(entry.name)  # a tensor the base lacks
            continue
        info, row = source.infos.get(entry.name), expected.get(entry.name)
        if info is None or row is None or (info.dtype, list(info.shape)) != (row["dtype"], json.loads(row["shape"])):
            wrong.append(entry.name)
            continue
        if info.dtype != entry.dtype or info.shape != tuple(entry.shape):
            reshaped.append(entry.name)
        regions.append((entry, info))
    regions.sort(key=lambda region: (region[1].file.name, region[1].start))  # a file's regions one after another
    if wrong:
        raise _other_tensors(reader, version, target, source, sorted(wrong))
    if reshaped:
        # The target is the base: --out writes a new folder, which may differ in layout.
        raise JournalError(f"{shown_names(sorted(reshaped))} of {version.ref} change dtype or shape, or are new, "
                           "which cannot be patched in place; use `apply --out DIR`")
    return regions


def _offsets(regions: list) -> list[int]:
    """Where each region's original bytes start in the journal's `.originals`: one after another."""
    offsets, at = [], 0
    for _, info in regions:
        offsets.append(at)
        at += info.nbytes
    return offsets


def _check_and_save(reader: Reader, version: Version, target: Target, source: TensorSource, regions: list,
                    originals: BinaryIO, tick: Callable[[int], None],
                    base_files: BaseFiles | None = None, trusted: dict[str, str] | None = None
                    ) -> dict[int, tuple[str, int]]:
    """Before the journal is recorded: each region's base tensor id checked, and where its
    original bytes are kept: in a registered base file that holds exactly them (basefiles.py;
    region index -> (file, start), returned), else copied to `originals` at the region's offset
    in the plan's order (their writeback started at once). Two tensors at a time: hashing and
    comparing release the GIL, the copies are the kernel's (page cache to page cache). `trusted`:
    the ids of tensors in files this store trusts, not hashed again."""
    offsets = _offsets(regions)
    by_name = {entry.name: k for k, (entry, _) in enumerate(regions)}
    in_base: dict[int, tuple[str, int]] = {}

    def check(name: str) -> bool:
        k = by_name[name]
        entry, info = regions[k]
        wanted = entry.base_tensor_id
        # Either is checked against this id before a revert uses it, and the files against
        # any write since they were mapped (check_unchanged, below).
        found = base_files.holds(name, info.nbytes, source) if base_files is not None else None
        # A region equal to a trusted base file's tensor holds that tensor: comparing bytes
        # costs a fraction of hashing them (the usual `cp -r base work && deltastore apply`).
        known = (trusted or {}).get(name) == wanted or (found is not None and base_files.trusted.get(name) == wanted)
        if not known and source.tensor_id(name) != wanted:
            return False
        if found is not None:
            in_base[k] = found
        else:
            copy_range(files[info.file], originals.fileno(), info.nbytes, info.start, offsets[k])
            start_writeback(originals.fileno(), offsets[k], info.nbytes)
        source.release(name)
        return True

    # One descriptor per file (a file holds many regions), each closed below.
    files = {path: os.open(path, os.O_RDONLY) for path in dict.fromkeys(info.file for _, info in regions)}
    try:
        for name, ok in pipelined(list(by_name), check, WORKERS, len(by_name)):
            if not ok:
                raise _not_the_base(reader, version, target, source)
            tick(regions[by_name[name]][1].nbytes)
    finally:
        for fd in files.values():
            os.close(fd)
    source.check_unchanged()
    if base_files is not None:
        base_files.check_unchanged()
    return in_base


class _WriteFailed(Exception):
    """A write or fsync of a target's file failed (`file`: its name, `error`: the OSError)."""

    def __init__(self, file: str, error: OSError):
        super().__init__(file, error)
        self.file, self.error = file, error


def _patch_or_roll_back(reader: Reader, version: Version, target: Target, journal: dict, source: TensorSource,
                        regions: list, handles: dict[str, BinaryIO], tick: Callable[[int], None],
                        recheck: bool = False) -> None:
    """Once the journal is recorded: each region's objects read (verified), its result decoded
    (a lossy one checked against its id) and written straight into the target, two tensors at
    a time; then each file fsynced. A check or a write that fails puts the original bytes back
    into every region written so far (from the journal's fsynced `.originals`) and drops the
    journal; if that fails too, says how far it got. `recheck`: each region's base id is
    checked again first (files that were copied since the check)."""
    by_name = {entry.name: k for k, (entry, _) in enumerate(regions)}
    decode, in_order = decoder(reader, version, source, regions)
    touched: set[int] = set()
    lock = threading.Lock()
    synced: list[str] = []

    def write(name: str) -> None:
        k = by_name[name]
        entry, info = regions[k]
        if recheck and source.tensor_id(name) != entry.base_tensor_id:
            raise BaseMismatch(version.base_id, None, [name], f"{name} of {target.given} changed while it was "
                               "given a private copy; nothing was changed; try again")
        with lock:
            touched.add(k)  # before the first byte: a write that fails may leave part of it
        fd = handles[info.file.name].fileno()

        def put(at: int, block: memoryview) -> None:
            try:
                pwrite_all(fd, block, info.start + at)
            except OSError as e:
                raise _WriteFailed(info.file.name, e) from None

        decode(entry, info, put)
        start_writeback(fd, info.start, info.nbytes)
        source.release(name)

    last = {info.file.name: k for k, (_, info) in enumerate(regions)}  # (the regions are in file order)
    try:
        # Each file fsynced here once its last region is written, while the workers go on with
        # the next file's: at most AHEAD tensors past the one this thread waits for.
        for name, _ in in_order(list(by_name), write, WORKERS, AHEAD):
            k = by_name[name]
            tick(regions[k][1].nbytes)
            file = regions[k][1].file.name
            if last[file] == k:
                try:
                    os.fsync(handles[file].fileno())
                except OSError as e:
                    raise _WriteFailed(file, e) from None
                synced.append(file)
    except Exception as e:
        _roll_back(reader, target, journal, [regions[k][1] for k in sorted(touched)], handles, synced, e)
        raise


def _roll_back(reader: Reader, target: Target, journal: dict, written: list[TensorInfo],
               handles: dict[str, BinaryIO], synced: list[str], error: Exception) -> None:
    """The original bytes put back into every region written (all of `synced`'s, whose fsync
    passed), each file fsynced, the journal dropped; raises what to say where `error` was a
    write that failed (a check's error is the caller's to raise)."""
    recorded = {r["name"]: r for r in json.loads(journal["plan"])["regions"]}
    failing = error.file if isinstance(error, _WriteFailed) else None
    by_file: dict[str, list[dict]] = {}
    for info in written:
        by_file.setdefault(info.file.name, []).append(recorded[info.name])
    try:
        for name, regions in by_file.items():
            put_back(reader.repo.root, journal["id"], handles[name], regions)
    except Exception as e:
        why = f"writing {target.path(target.file(failing))} ({getattr(error.error, 'strerror', None) or error.error}) " \
            if failing else f"{error}; putting back what was written ({getattr(e, 'strerror', None) or e}) "
        in_part = failing or next(iter(by_file))
        raise JournalError(f"{why}failed: {len(synced)} of {len(handles)} files patched, {in_part} in part; "
                           f"{target.given} is half patched: run `deltastore revert {target.given}`") from None
    drop(reader, journal["id"], [])
    if failing:
        raise JournalError(f"writing {target.path(target.file(failing))} failed "
                           f"({getattr(error.error, 'strerror', None) or error.error}); the files written were "
                           "put back: nothing was changed") from None


def _other_tensors(reader: Reader, version: Version, target: Target, source: TensorSource,
                   wrong: list[str]) -> BaseMismatch:
    """The target's tensors are not the base's by name, dtype or shape: told from the headers
    alone, before any tensor is hashed, with the registered base whose tensors they are, if
    one's are."""
    mine = reader.base(version.base_id)
    mine_shown = f"{mine.name + ' ' if mine.name else ''}{short(mine.id)}"
    fits = reader.fitting_base({n: list(i.shape) for n, i in source.infos.items()}, other_than=mine.id)
    if fits:
        what = f"has the tensors of base {fits.name + ' ' if fits.name else ''}{short(fits.id)}, not"
        hint = f"apply a version of that base to it, or apply {version.ref} to a copy of {mine_shown}"
    else:
        what, hint = "is not", f"apply {version.ref} to a copy of {mine_shown}"
    return BaseMismatch(version.base_id, None, wrong, message=(
        f"{target.given} {what} {version.ref}'s base {mine_shown}: {len(wrong)} tensors differ in name, dtype "
        f"or shape ({shown_names(wrong)}); nothing was changed; {hint}"))


def _not_the_base(reader: Reader, version: Version, target: Target, source: TensorSource) -> BaseMismatch:
    """What the target is, since it is not the version's base: another registered base, the
    version's own result, or an unknown model; and which of the version's tensors differ.
    (`--out` reads the same base, so it would fail too and is not offered.)"""
    mine = reader.base(version.base_id)
    mine_shown = f"{mine.name + ' ' if mine.name else ''}{short(mine.id)}"
    ids = {name: raw_tensor_id(info.dtype, info.shape, source.view(name)) for name, info in source.infos.items()}
    actual = base_id(ids.items())
    known = next((b for b in reader.bases() if b.id == actual), None)
    entries = {e.name: e for e in version.tensors}
    expected = reader.base_tensors(version.base_id)
    wrong = sorted(e.name for e in version.tensors if e.base_tensor_id is not None and (
        e.name not in expected or ids.get(e.name) != e.base_tensor_id))
    if known:
        what = f"is base {known.name + ' ' if known.name else ''}{short(actual)}"
        hint = f"apply a version of that base to it, or apply {version.ref} to a copy of {mine_shown}"
    elif all(ids.get(n) == entries[n].result_tensor_id for n in wrong):
        what = f"already holds {version.ref}'s own weights (its fine-tune, or {version.ref} applied)"
        hint = f"apply to a copy of {mine_shown}"
    else:
        what = f"is not a registered base (its base id would be {short(actual)})"
        hint = f"apply {version.ref} to a copy of {mine_shown}"
    return BaseMismatch(version.base_id, actual, wrong, message=(
        f"{target.given} {what}, not {version.ref}'s base {mine_shown}: {len(wrong)} tensors differ "
        f"({shown_names(wrong)}); nothing was changed; {hint}"))


def _record(reader: Reader, version: Version, target: Target, regions: list, journal_id: str,
            saved: Path, in_base: dict[int, tuple[str, int]], base_files: BaseFiles | None) -> dict:
    """The originals (written and fsynced) renamed in, then the journal that points at them
    (and at the base files that hold the others); one folder fsync makes both durable before
    the first byte of the target is written."""
    plan = {"root": str(target.root), "identity": [f.to_json() for f in target.files],
            "files": {f.name: f.header for f in target.files}, "originals": "file", "regions": []}
    if in_base:
        plan["base_files"] = base_files.plan()
    for k, ((entry, info), offset) in enumerate(zip(regions, _offsets(regions))):
        kept = {"base_file": in_base[k][0], "base_start": in_base[k][1]} if k in in_base else {"offset": offset}
        plan["regions"].append({"file": info.file.name, "name": entry.name, "start": info.start, "end": info.end,
                                **kept, "dtype": info.dtype, "shape": list(info.shape),
                                "base": entry.base_tensor_id, "result": entry.result_tensor_id})
    journal = {"id": journal_id, "target": str(target.model), "version_id": version.id,
               "state": "applying", "plan": json.dumps(plan, sort_keys=True), "created": now()}
    journalfiles.folder(reader.repo.root).mkdir(exist_ok=True)
    os.replace(saved, journalfiles.originals(reader.repo.root, journal_id))
    try:
        reader.repo.catalog.add_journal(journal, [], uuid.uuid4().hex)
    except BaseException:
        journalfiles.remove(reader.repo.root, journal_id)
        raise
    return journal
