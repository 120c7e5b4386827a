"""Apply a version to model files on disk, in place, journalled; revert it bit for bit; and
write a patched copy of a model to a new folder (`apply --out`, `export`).

In-place order (the journal makes every step undoable), all under the target's lock:
  1. resolve the target to its files by identity (target.py); refuse a file another path
     shares, and a target that an open journal already covers;
  2. check everything, a tensor or two at a time: base tensor ids, objects, decoded results;
     meanwhile copy each region's original bytes into one file in tmp/ (its writeback started
     at once) and put each result in an unnamed temporary file; fsync the originals; open
     every file to be written, and check that each is still the file checked; nothing
     written yet;
  3. rename the originals in as `journals/<id>.originals`, then record the journal (the files'
     identities, regions, offsets of the originals) as its file and its catalog rows;
  4. copy the results over the regions, fsync; mark the journal applied. A write that fails
     puts back what was written and drops the journal.
A crash before 3 completes leaves the files untouched; after it, `revert` checks every saved
original against its base tensor id, and what every region of the files whose identity is the
journal's holds now: the base's bytes (left), what apply wrote (its result's id: written back),
or else nothing is written at all, unless a write was under way (an unfinished apply, a revert
marked as started) and left a region half written. Then it checks each region again. Revert
never computes base bytes from a delta. Journals from before `.originals` files keep their
originals as objects, and revert from those; journals from before file identities find their
target by path and header hashes, and the region check is what keeps them from writing into
another model put there. A journal that revert cannot complete (its files copied and deleted,
replaced, or written since) is dropped by `forget_journal`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, TYPE_CHECKING

import numpy as np

from ..codecs import absmax
from ..repo import journalfiles
from ..codecs.bytegroups import ungroup
from ..repo.catalog import now
from ..core.durable import new_folder
from ..core.errors import (BaseMismatch, DeltastoreError, JournalError, ModelFormatError, SharedFile, short,
                     shown_names)
from ..core.hashing import DTYPE_SIZES, base_id, dtype_name, raw_tensor_id, tensor_bytes
from ..engine.maintenance import GcPlan, gc
from ..weights.models import (INDEX_FILE, TensorInfo, TensorSource, open_files, other_files,
                     write_safetensors)
from ..core.pools import WORKERS, pipelined
from ..repo.records import TensorEntry, Version
from ..weights.target import FileId, Target, break_links, fd_id, patch_lock, resolve

if TYPE_CHECKING:  # store.py imports this module, so Store is imported for types only
    import torch

    from ..store import Store


@dataclass(frozen=True)
class Journal:
    id: str
    target: str
    version_id: str
    state: str
    regions: int
    written: int | None = None  # of a revert: the regions written back (the others held the base already)


def apply_in_place(store: Store, version: Version, path: Path, *, allow_links: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Journal:
    """`allow_links`: give each hard-linked file a private copy first (`apply --break-links`).
    `progress(done, total)`: bytes checked and written so far, of all to check and write."""
    with patch_lock(store.root, resolve(path)):
        target = resolve(path)  # again, now that no other patch can change it
        covering = journals_on(store, target)
        if covering:
            raise JournalError(f"{target.given} already has {_applied(store, covering[-1])} applied in place; "
                               f"run `deltastore revert {target.given}` first")
        target.check_private(allow_links=allow_links)
        # Read through memory maps: the base bytes are hashed, decoded and saved straight from
        # the page cache, each tensor's pages let go once it is saved.
        source = open_files(target.model, files=[target.path(f) for f in target.files], mapped=True)
        regions = _base_regions(store, version, target, source)
        total = sum(info.nbytes for _, info in regions)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], 2 * total)

        store.objects.tmp.mkdir(exist_ok=True)
        journal_id = uuid.uuid4().hex
        saved = store.objects.tmp / f"{os.getpid()}-journal-{journal_id}{journalfiles.ORIGINALS}"
        try:
            # The results wait in an unnamed file (gone with the process), so that no more
            # than a tensor or two is held in memory, and nothing is written into the target
            # until every check has passed.
            with open(saved, "wb") as originals, tempfile.TemporaryFile(dir=store.objects.tmp) as results:
                _check_and_save(store, version, target, source, regions, originals, results, tick)
                originals.flush()
                os.fsync(originals.fileno())
                if allow_links:
                    target = break_links(target)
                by_file: dict[str, list[TensorInfo]] = {}
                for _, info in regions:
                    by_file.setdefault(info.file.name, []).append(info)
                handles = _open_for_writing(target, list(by_file), "apply")
                try:
                    journal = _record(store, version, target, regions, journal_id, saved)
                    _write_or_roll_back(store, target, journal, by_file, results.fileno(), handles, tick)
                finally:
                    for fh in handles.values():
                        fh.close()
        finally:
            saved.unlink(missing_ok=True)  # renamed into journals/ once recorded
        store.catalog.set_journal_state(journal["id"], "applied")
        return Journal(journal["id"], journal["target"], version.id, "applied", len(regions))


def _base_regions(store: Store, version: Version, target: Target,
                  source: TensorSource) -> list[tuple[Any, TensorInfo]]:
    """Every region the version overwrites, from the headers alone; refuses a target whose
    tensors are not the base's by name, dtype and shape, naming what it is instead."""
    expected = store.base_tensors(version.base_id)
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
    if wrong:
        raise _not_the_base(store, version, target, source)
    if reshaped:
        # The target is the base: --out writes a new folder, which may differ in layout.
        raise JournalError(f"{shown_names(sorted(reshaped))} of {version.ref} change dtype or shape, or are new, "
                           "which cannot be patched in place; use `apply --out DIR`")
    return regions


def _check_and_save(store: Store, version: Version, target: Target, source: TensorSource, regions: list,
                    originals: BinaryIO, results: BinaryIO, tick: Callable[[int], None]) -> None:
    """Every check before a byte of the target changes: each region's base tensor id, each
    object (read verified), each lossy result's id. On the way, the original bytes are
    copied to `originals` and the results written to `results`, both at the region's offset
    in the plan's order. Two tensors at a time (reading, hashing, decompressing and decoding
    release the GIL), each worker on its own until its tensor is saved: it holds one tensor's
    base, payload and result, and never waits behind another (an embedding) for its turn.
    Lossless, int8 and int4 entries against the base are decoded in numpy from the mapped
    bytes; torch is imported only for the others (importing it cost 1.3 CPU-seconds)."""
    offsets, at = [], 0
    for _, info in regions:
        offsets.append(at)
        at += info.nbytes
    by_name = {entry.name: k for k, (entry, _) in enumerate(regions)}
    if all(_numpy_decodes(entry, info) for entry, info in regions):
        decode_in_torch, in_order = None, pipelined
    else:
        decode_in_torch, in_order = _torch_decoder(store, version, source)
    buffers = threading.local()

    def into(nbytes: int, kind: str = "result") -> np.ndarray:
        """This worker's buffer of a kind (a payload, a result): memory already written is
        faster to decompress and decode into than fresh pages, tensor after tensor."""
        held = getattr(buffers, kind, None)
        if held is None or held.size < nbytes:
            held = np.empty(nbytes, dtype=np.uint8)
            setattr(buffers, kind, held)
        return held[:nbytes]

    def check(name: str) -> bool:
        k = by_name[name]
        entry, info = regions[k]
        base = source.view(name)
        if raw_tensor_id(info.dtype, info.shape, base) != entry.base_tensor_id:
            return False
        # The original bytes, copied in the kernel (page cache to page cache, no page of ours);
        # the copy is checked against this id before a revert uses it, and the file against
        # any write since it was mapped (check_unchanged, below).
        _copy_range(files[info.file], originals.fileno(), info.nbytes, info.start, offsets[k])
        _start_writeback(originals.fileno(), offsets[k], info.nbytes)
        if _numpy_decodes(entry, info):
            # Frame after frame on this worker (the other worker keeps the other core busy),
            # each part into a buffer this worker keeps.
            parts = {part: store.objects.get(o.id, raw_size=o.size, parallel=False, into=into(o.size, f"part {part}"))
                     for part, o in entry.objects.items()}
            if _xor_against_base(entry):
                result = ungroup(parts["xor"], DTYPE_SIZES[info.dtype], xor=np.frombuffer(base, dtype=np.uint8),
                                 out=into(info.nbytes)).data
            else:
                result = absmax.decode_into(parts, entry.params, bits=absmax.BITS[entry.encoding],
                                            base=np.frombuffer(base, dtype=np.uint8), base_dtype=info.dtype,
                                            out=into(info.nbytes), dtype=entry.dtype).data
                entry.check_result_bytes(result, version.ref, untouched="nothing was changed")
        else:
            result = decode_in_torch(entry, info, into(info.nbytes))
        _pwrite_all(results.fileno(), result, offsets[k])
        del base, result
        source.release(name)
        return True

    files = {info.file: os.open(info.file, os.O_RDONLY) for _, info in regions}
    try:
        # Every name handed out at once: a result is a flag, so those done early wait for
        # their turn at no cost, and a worker never idles behind a large tensor.
        for name, ok in in_order(list(by_name), check, WORKERS, len(by_name)):
            if not ok:
                raise _not_the_base(store, version, target, source)
            tick(regions[by_name[name]][1].nbytes)
    finally:
        for fd in files.values():
            os.close(fd)
    source.check_unchanged()


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Have the kernel start writing these bytes of a journal file to disk now, while the
    checks go on, rather than all of them at its fsync. (Pages already written are let go
    too; those still being written, most of them, stay cached for a revert.)"""
    if size and hasattr(os, "posix_fadvise"):  # (a size of 0 would mean "to the end")
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def _xor_against_base(entry: TensorEntry) -> bool:
    """A lossless entry whose result is the base's bytes XOR its one payload: decoded without
    torch. (An entry stored against another version's result needs that result first.)"""
    return (entry.encoding == "lossless" and entry.params.get("mode") == "xor" and set(entry.objects) == {"xor"}
            and entry.against_version is None)


def _numpy_decodes(entry: TensorEntry, info: TensorInfo) -> bool:
    """Whether an entry decodes without torch: a lossless XOR, or int8 or int4 (absmax.py)
    of a bf16, fp16 or fp32 region, against the base."""
    if _xor_against_base(entry):
        return True
    return (entry.encoding in absmax.BITS and entry.against_version is None and entry.dtype == info.dtype
            and info.dtype in absmax.DTYPES and tuple(entry.shape) == tuple(info.shape))


def _torch_decoder(store: Store, version: Version, source: TensorSource) -> tuple[Callable, Callable]:
    """(entry, region, buffer) -> the entry's result bytes, decoded by its encoding in torch,
    a lossy result checked against its id; and pools' `in_order`, which keeps torch's own
    threads from contending with its workers. torch and the modules that load it are imported
    here, when a version has such entries: an apply of a lossless version runs without them."""
    import torch

    from ..codecs import encodings
    from ..core.pools import in_order
    from ..core.hashing import DTYPES

    def decode(entry: TensorEntry, info: TensorInfo, buffer: np.ndarray) -> memoryview:
        base = source.get(entry.name)
        out = torch.from_numpy(buffer).view(DTYPES[info.dtype]).reshape(info.shape) if info.nbytes else None
        result = store.decode_entry(entry, base, out=out)
        # An exact encoding's result is a bitwise function of the verified object and base.
        if not encodings.from_params(entry.encoding, entry.params).exact:
            entry.check_result(result, version.ref, untouched="nothing was changed")
        return tensor_bytes(result)

    return decode, lambda names, work, workers, ahead: in_order(names, work, workers=workers, ahead=ahead)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + journalfiles.SLICE], offset + done)


def _copy_range(src: int, dst: int, size: int, src_offset: int, dst_offset: int) -> None:
    """`size` bytes from one open file to another, in the kernel where it can (no buffer of
    ours; the page cache to the page cache), else through one bounded buffer."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, min(size - done, 1 << 30), src_offset + done, dst_offset + done)
            if n <= 0:
                break
            done += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(journalfiles.SLICE, size - done)) if done < size else b""
    while done < size:
        n = os.preadv(src, [memoryview(buf)[:min(len(buf), size - done)]], src_offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"{size - done} bytes missing from a journal file")
        _pwrite_all(dst, memoryview(buf)[:n], dst_offset + done)
        done += n


def _not_the_base(store: Store, version: Version, target: Target, source: TensorSource) -> BaseMismatch:
    """What the target is, since it is not the version's base: another registered base, the
    version's own result, or an unknown model; and which of the version's tensors differ.
    (`--out` reads the same base, so it would fail too and is not offered.)"""
    mine = store.base(version.base_id)
    mine_shown = f"{mine.name + ' ' if mine.name else ''}{short(mine.id)}"
    ids = {name: raw_tensor_id(info.dtype, info.shape, source.view(name)) for name, info in source.infos.items()}
    actual = base_id(ids.items())
    known = next((b for b in store.bases() if b.id == actual), None)
    entries = {e.name: e for e in version.tensors}
    expected = store.base_tensors(version.base_id)
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


def _open_for_writing(target: Target, names: list[str], verb: str, journal: list[FileId] | None = None
                      ) -> dict[str, BinaryIO]:
    """Each file to be written, opened now, so that one that cannot be written stops the patch
    before its first byte; and checked to be the very file that was checked (or that the
    journal names): not replaced, not a symlink now, not shared."""
    handles: dict[str, BinaryIO] = {}
    try:
        for name in names:
            path = target.path(target.file(name))
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as e:
                raise JournalError(f"cannot {verb} {target.given}: {path} is not writable ({e.strerror}); "
                                   "nothing was changed") from None
            handles[name] = fh = os.fdopen(fd, "r+b")
            now = fd_id(name, fh)
            want = next(f for f in journal if f.name == name) if journal else target.file(name)
            if not now.unchanged(want):
                raise JournalError(f"{path} changed while {verb} checked it; nothing was changed; try again")
            if now.links > 1:
                raise SharedFile(str(path), "hardlink", f"{path} has {now.links} hard links: another path shares "
                                 f"its bytes and would change too; nothing was changed")
    except BaseException:
        for fh in handles.values():
            fh.close()
        raise
    return handles


def _record(store: Store, version: Version, target: Target, regions: list, journal_id: str,
            saved: Path) -> dict:
    """The originals (written and fsynced) renamed in, then the journal that points at them;
    one folder fsync makes both durable before the first byte of the target is written."""
    plan = {"root": str(target.root), "identity": [f.to_json() for f in target.files],
            "files": {f.name: f.header for f in target.files}, "originals": "file", "regions": []}
    offset = 0
    for entry, info in regions:
        plan["regions"].append({"file": info.file.name, "name": entry.name, "start": info.start, "end": info.end,
                                "offset": offset, "dtype": info.dtype, "shape": list(info.shape),
                                "base": entry.base_tensor_id, "result": entry.result_tensor_id})
        offset += info.nbytes
    journal = {"id": journal_id, "target": str(target.model), "version_id": version.id,
               "state": "applying", "plan": json.dumps(plan, sort_keys=True), "created": now()}
    journalfiles.folder(store.root).mkdir(exist_ok=True)
    os.replace(saved, journalfiles.originals(store.root, journal_id))
    try:
        store.catalog.add_journal(journal, [], uuid.uuid4().hex)
    except BaseException:
        journalfiles.remove(store.root, journal_id)
        raise
    return journal


def _write_or_roll_back(store: Store, target: Target, journal: dict, by_file: dict[str, list[TensorInfo]],
                        results: int, handles: dict[str, BinaryIO], tick: Callable[[int], None]) -> None:
    """Overwrite the regions from the results, file by file. A write that fails puts the
    original bytes back into every file written so far and drops the journal; if that fails
    too, says how far it got."""
    offsets = {r["name"]: r["offset"] for r in json.loads(journal["plan"])["regions"]}
    started: list[str] = []
    try:
        for name, infos in by_file.items():
            started.append(name)
            _write_regions(handles[name], results, [(info, offsets[info.name]) for info in infos], tick)
    except Exception as e:
        failed = f"{target.path(target.file(started[-1]))} ({getattr(e, 'strerror', None) or e})"
        try:
            with open(journalfiles.originals(store.root, journal["id"]), "rb") as saved:
                for name in started:
                    _write_regions(handles[name], saved.fileno(),
                                   [(info, offsets[info.name]) for info in by_file[name]])
        except Exception:
            raise JournalError(f"writing {failed} failed: {len(started) - 1} of {len(by_file)} files patched, "
                               f"{started[-1]} in part; {target.given} is half patched: "
                               f"run `deltastore revert {target.given}`") from None
        _drop(store, journal["id"], [])
        raise JournalError(f"writing {failed} failed; the files written were put back: nothing was changed") from None


def _write_regions(fh: BinaryIO, source: int, regions: list[tuple[Any, int]],
                   tick: Callable[[int], None] | None = None) -> None:
    """Each (region, offset in `source`): the region's bytes from there; then fsync."""
    for info, offset in regions:
        size = info.nbytes if isinstance(info, TensorInfo) else info["end"] - info["start"]
        _copy_range(source, fh.fileno(), size, offset, info.start if isinstance(info, TensorInfo) else info["start"])
        if tick:
            tick(size)
    fh.flush()
    os.fsync(fh.fileno())


def _write_objects(fh: BinaryIO, regions: list[tuple[int, Any]]) -> None:
    """A journal from before `.originals` files: each region's bytes from its object."""
    for start, data in regions:
        fh.seek(start)
        fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _drop(store: Store, journal_id: str, originals: list[str]) -> None:
    store.catalog.drop_journal(journal_id)  # its `.originals` file too
    # Originals saved as objects (journals from before `.originals` files) were this
    # journal's alone; remove them now unless shared.
    if originals:
        gc(store, GcPlan(tuple(sorted(set(originals))), 0))


def revert_in_place(store: Store, path: Path, *, progress: Callable[[int, int], None] | None = None) -> list[Journal]:
    """`progress(done, total)`: bytes written back and checked so far, of all to write and check."""
    given = Path(path)
    if not given.exists():
        rows = _journals_at(store, given)
        if rows:
            applied = _applied(store, rows[-1])
            raise JournalError(f"{given} does not exist: it moved or was deleted since {applied} was applied to it; "
                               f"nothing was written; if it moved, run `deltastore revert NEWPATH`; a copy made after "
                               f"apply (`cp -a`) keeps {applied} and is not reverted: once {given} is deleted, "
                               f"{_forget_hint(rows[-1])}")
        raise JournalError(f"{given} does not exist; nothing to revert")
    with patch_lock(store.root, resolve(given)):
        target = resolve(given)  # again, now that no other patch can change it
        rows = journals_on(store, target)
        if not rows:
            raise _no_journal(store, target)
        total = 2 * sum(r["end"] - r["start"] for row in rows for r in json.loads(row["plan"])["regions"])
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)
        return [_revert_one(store, target, row, tick) for row in reversed(rows)]


def _journals_at(store: Store, given: Path) -> list[dict]:
    """The open journals whose target is this path, however it is spelled (for a path that
    no longer exists, only its text can say)."""
    return journals_covering(store.catalog.open_journals(), given)


def _no_journal(store: Store, target: Target) -> JournalError:
    """Why a target that no open journal covers cannot be reverted: its path's journal
    recorded other files, or it is a copy of an applied target (`cp -a`: the journal's
    headers, and what apply wrote, in other files)."""
    for row in store.catalog.open_journals():
        if row["target"] == str(target.model):
            return JournalError(f"{target.given} is not what {_applied(store, row)} was applied to: "
                                f"{_replaced(target, _journal_files(row) or [])}; nothing was written; "
                                f"if it no longer needs its base back, {_forget_hint(row)}")
    headers = {f.name: f.header for f in target.files}
    for row in store.catalog.open_journals():
        if json.loads(row["plan"])["files"] != headers or not _holds_results(target, row):
            continue
        applied = _applied(store, row)
        if journalfiles.files_gone(row):
            then = f"the journal is of {row['target']}, which is gone: {_forget_hint(row)}"
        else:
            then = f"`deltastore revert {row['target']}` reverts the folder it was applied to"
        return JournalError(f"{target.given} is a copy of {row['target']} made after {applied} was applied to it: "
                            f"it keeps {applied} (a model like `apply --out` writes) and is not reverted; "
                            f"nothing was written; {then}")
    return JournalError(f"nothing was applied in place to {target.given} (no journal); nothing to revert")


def _holds_results(target: Target, row: dict) -> bool:
    """Whether every region of a journal holds, in the target's files, what apply wrote."""
    infos = open_files(target.model, files=[target.path(f) for f in target.files]).infos
    for name, regions in _by_file(json.loads(row["plan"])).items():
        with open(target.path(target.file(name)), "rb") as fh:
            if any(_region_now(fh.fileno(), infos[r["name"]]) != r["result"] for r in regions):
                return False
    return True


def _by_file(plan: dict) -> dict[str, list[dict]]:
    """A journal's regions, by the file they are in."""
    by_file: dict[str, list[dict]] = {}
    for region in plan["regions"]:
        by_file.setdefault(region["file"], []).append(region)
    return by_file


def _forget_hint(row: dict) -> str:
    return f"`deltastore revert --forget {row['id']}` drops its journal and frees its saved originals"


def _revert_one(store: Store, target: Target, row: dict, tick: Callable[[int], None] | None = None) -> Journal:
    plan = json.loads(row["plan"])
    recorded = _files_to_revert(store, target, row)
    by_file = _by_file(plan)
    # Read and verify every original, and what every region holds now, before writing any.
    saved_file = journalfiles.originals(store.root, row["id"])
    damaged = journalfiles.damaged_originals(store.root, row)
    if damaged:
        raise JournalError(f"the saved original bytes of {shown_names(damaged)} in {saved_file} are missing or "
                           f"damaged; nothing was written; {target.given} cannot be reverted exactly from this "
                           "journal (run `deltastore fsck --read-data`)")
    todo = _regions_to_write(store, target, row, recorded, by_file)
    objects = {r["original"]: store.objects.get(r["original"]) for r in plan["regions"] if "original" in r}
    if todo:
        _write_originals(store, target, row, recorded, todo, objects, tick)
    _drop(store, row["id"], list(objects))
    return Journal(row["id"], row["target"], row["version_id"], "reverted", len(plan["regions"]),
                   sum(len(regions) for regions in todo.values()))


def _files_to_revert(store: Store, target: Target, row: dict) -> list[FileId]:
    """The target's files that the journal recorded, checked to be those very files, unchanged
    in size and header, and not shared."""
    plan = json.loads(row["plan"])
    recorded = _journal_files(row)
    if recorded is None:
        # A journal from before file identities: the header hashes of the files it names.
        recorded = [f for f in target.files if plan["files"].get(f.name) == f.header]
        if len(recorded) != len(plan["files"]):
            raise JournalError(f"the safetensors headers of {target.given} changed since apply; "
                               "the file was replaced, so its regions cannot be restored safely; nothing was "
                               f"written; if it no longer needs its base back, {_forget_hint(row)}")
    for f in recorded:
        now = target.file(f.name)
        if now is None or not now.same_file(f):
            raise JournalError(f"{target.given} is not what {_applied(store, row)} was applied to: "
                               f"{_replaced(target, recorded)}; nothing was written; if it no longer needs its "
                               f"base back, {_forget_hint(row)}")
        if not now.unchanged(f):
            raise JournalError(f"the safetensors header of {target.path(now)} changed since apply; "
                               "its regions cannot be restored safely; nothing was written; if it no longer "
                               f"needs its base back, {_forget_hint(row)}")
        if now.links > 1:
            raise SharedFile(str(target.path(now)), "hardlink",
                             f"{target.path(now)} has {now.links} hard links since apply: reverting it would "
                             "change the other paths too; remove them (or replace them by copies), then revert")
    return recorded


def _regions_to_write(store: Store, target: Target, row: dict, recorded: list[FileId],
                      by_file: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The regions that do not hold their base bytes already, by file. Each region must hold
    what apply wrote (its result's tensor id) or the base's bytes; a region that holds neither
    (written since apply: the files are no longer what apply left) stops the revert before
    any write, unless a write was under way (an apply not finished, a revert marked as started),
    which may have left one half written."""
    writing = row["state"] != "applied" or journalfiles.is_reverting(store.root, row["id"])
    infos = open_files(target.model, files=[target.path(f) for f in recorded]).infos
    todo: dict[str, list[dict]] = {}
    for name, regions in by_file.items():
        path = target.path(target.file(name))
        with open(path, "rb") as fh:
            for r in regions:
                now = _region_now(fh.fileno(), infos[r["name"]])
                if now == r["base"]:
                    continue
                if now != r["result"] and not writing:
                    raise JournalError(f"{target.given} does not hold what {_applied(store, row)} wrote: the bytes "
                                       f"of {r['name']} in {path} are neither {_applied(store, row)}'s nor the "
                                       f"base's (written since apply); nothing was written; if it no longer needs "
                                       f"its base back, {_forget_hint(row)}")
                todo.setdefault(name, []).append(r)
    return todo


def _write_originals(store: Store, target: Target, row: dict, recorded: list[FileId],
                     todo: dict[str, list[dict]], objects: dict[str, bytes],
                     tick: Callable[[int], None] | None = None) -> None:
    """The original bytes written back into each region of `todo`, then checked against the
    base ids. The journal is marked as reverting first: a revert interrupted from here on may
    leave a region half written, which the next revert finishes."""
    plan = json.loads(row["plan"])
    handles = _open_for_writing(target, list(todo), "revert", recorded)
    try:
        journalfiles.mark_reverting(store.root, row["id"])
        saved_file = journalfiles.originals(store.root, row["id"])
        with open(saved_file, "rb") if "originals" in plan else nullcontext() as saved:
            for name, regions in todo.items():
                try:
                    if "originals" in plan:
                        _write_regions(handles[name], saved.fileno(), [(r, r["offset"]) for r in regions], tick)
                    else:
                        _write_objects(handles[name], [(r["start"], objects[r["original"]]) for r in regions])
                except OSError as e:
                    raise JournalError(f"writing {target.path(target.file(name))} failed ({e.strerror or e}); the "
                                       f"journal is kept: run `deltastore revert {target.given}` again") from None
    finally:
        for fh in handles.values():
            fh.close()
    check = open_files(target.model, files=[target.path(f) for f in recorded])
    bad = []
    for name, regions in todo.items():
        with open(target.path(target.file(name)), "rb") as fh:
            for r in regions:
                if _region_now(fh.fileno(), check.infos[r["name"]]) != r["base"]:
                    bad.append(r["name"])
                if tick:
                    tick(r["end"] - r["start"])
    if bad:
        raise JournalError(f"after revert, {', '.join(bad[:5])} still differ from the base; "
                           "the journal is kept: run `deltastore fsck`")


def forget_journal(store: Store, name: str) -> list[Journal]:
    """Drop the open journals of a target that revert cannot restore (its files gone, as after
    `cp -a` and removal of the original, replaced, or written since apply), and their saved
    originals, writing nothing to any model file. `name`: the target's path, or a journal's id
    (or the start of one). A journal that revert can complete is refused."""
    rows = _journals_named(store, name)
    if not rows:
        raise JournalError(f"no open journal has {name} as its target or id; nothing was dropped "
                           "(`deltastore fsck` lists the open journals)")
    for row in rows:
        if _revertable(store, row):
            raise JournalError(f"{row['target']} still holds what {_applied(store, row)} wrote, and `deltastore "
                               f"revert {row['target']}` restores its base; nothing was dropped")
    out = []
    for row in rows:
        plan = json.loads(row["plan"])
        _drop(store, row["id"], [r["original"] for r in plan["regions"] if "original" in r])
        out.append(Journal(row["id"], row["target"], row["version_id"], "forgotten", len(plan["regions"]), 0))
    return out


def _journals_named(store: Store, name: str) -> list[dict]:
    rows = store.catalog.open_journals()
    if len(name) >= 8 and all(c in "0123456789abcdef" for c in name):
        by_id = [r for r in rows if r["id"].startswith(name)]
        if len(by_id) == 1 or any(r["id"] == name for r in by_id):
            return [r for r in by_id if r["id"] == name] or by_id
    given = Path(name)
    found = _journals_at(store, given)
    if given.exists():
        try:
            found += [r for r in journals_on(store, resolve(given)) if r not in found]
        except (DeltastoreError, OSError):
            pass
    return found


def _revertable(store: Store, row: dict) -> bool:
    """Whether revert would restore this journal's target now: its files are there and every
    check before the first write passes. A file hard-linked since apply counts as revertable:
    removing the other link lets revert run."""
    if journalfiles.files_gone(row):
        return False
    target = resolve(row["target"])
    with patch_lock(store.root, target):
        try:
            recorded = _files_to_revert(store, target, row)
            if journalfiles.damaged_originals(store.root, row):
                return False
            _regions_to_write(store, target, row, recorded, _by_file(json.loads(row["plan"])))
        except SharedFile:
            return True
        except JournalError:
            return False
    return True


def _region_now(fd: int, info: TensorInfo) -> str:
    return journalfiles.region_id(fd, info.start, info.nbytes, info.dtype, list(info.shape))


def _journal_files(row: dict) -> list[FileId] | None:
    ids = json.loads(row["plan"]).get("identity")
    return None if ids is None else [FileId.from_json(d) for d in ids]


def journals_on(store: Store, target: Target) -> list[dict]:
    """The open journals of a target: those that recorded one of its files (by device and
    inode, whatever path reached it). A journal from before identities matches by its path."""
    return _covering(store.catalog.open_journals(), target)


def _covering(rows: list[dict], target: Target) -> list[dict]:
    out = []
    for row in rows:
        ids = _journal_files(row)
        if target.shares_a_file(ids) if ids is not None else row["target"] in (
                str(target.model), os.path.abspath(target.given)):
            out.append(row)
    return out


def journals_covering(rows: list[dict], path: str | os.PathLike) -> list[dict]:
    """Of these journals (a store's files, or its rows), those that revert would take up for
    `path`; for a path that no longer exists, those whose target is its text."""
    given = Path(path)
    if not given.exists():
        here = {os.path.abspath(given), os.path.join(os.path.realpath(given.parent), given.name)}
        return [r for r in rows if r["target"] in here]
    try:
        return _covering(rows, resolve(given))
    except (DeltastoreError, OSError):
        return []


def open_journal_on(store: Store, path: str | os.PathLike) -> str | None:
    """If a stance is applied in place to the model at `path`: a line saying so and how to undo
    it, for errors about that model's weights."""
    try:
        target = resolve(path)
    except (DeltastoreError, OSError):
        return None
    rows = journals_on(store, target)
    if not rows:
        return None
    return (f"{path} has {_applied(store, rows[-1])} applied in place (an open journal): "
            f"run `deltastore revert {path}` first")


def _applied(store: Store, row: dict) -> str:
    v = store.catalog.version(row["version_id"])
    return f"{v['stance']}@{v['number']}" if v else f"version {short(row['version_id'])}"


def _replaced(target: Target, recorded: list[FileId]) -> str:
    """How the target's files differ from those the journal recorded."""
    for f in recorded:
        now = target.file(f.name)
        if now is None:
            return f"{f.name} is missing"
        if now.symlink:
            return f"{target.path(now)} is now a symlink (to {os.readlink(target.path(now))})"
        if not now.same_file(f):
            return f"{target.path(now)} is another file now (replaced since apply)"
    return "its files are others"


def write_model(out: Path, source_infos: dict[str, TensorInfo], tensor: Callable[[str], torch.Tensor], *,
                files_from: Path | None, progress: Callable[[int, int], None] | None = None) -> Path:
    """A complete Hugging Face model folder at `out`: the tensors `source_infos` describes (their
    `file` gives the sharding), plus the config and tokenizer files of `files_from`. Written next to `out` and renamed
    into place, so `out` is either absent or whole."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelFormatError(f"{out} exists and is not empty; choose a new folder")
    with new_folder(out) as tmp:
        groups: dict[str, list[TensorInfo]] = {}
        for info in source_infos.values():
            file = info.file.name if info.file is not None else "model.safetensors"
            groups.setdefault(file, []).append(info)
        done, total = 0, len(source_infos)
        written: dict[str, TensorInfo] = {}

        def counted(name: str) -> torch.Tensor:
            nonlocal done
            t = tensor(name)
            written[name] = TensorInfo(name, dtype_name(t.dtype), tuple(t.shape))
            done += 1
            if progress:
                progress(done, total)
            return t

        for file, infos in groups.items():
            write_safetensors(tmp / file, infos, counted, metadata={"format": "pt"})
        if len(groups) > 1:
            weight_map = {n: (i.file.name if i.file else "model.safetensors") for n, i in source_infos.items()}
            size = sum(i.nbytes for i in written.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        if files_from is not None:
            for f in other_files(files_from):
                shutil.copy2(f, tmp / f.name)
    return out
