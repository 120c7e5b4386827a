"""In-place applies undone: a target's files reverted bit for bit from its journal, or a
journal that revert cannot complete dropped (`revert --forget`).

Revert checks every saved original (in the journal's `.originals`, or in the base's own files
where the journal points there, those files first checked to be the very files apply found)
against its base tensor id, and what every region of the
files whose identity is the journal's holds now: the base's bytes (left), what apply wrote
(its result's id: written back), or else nothing is written at all, unless a write was under
way (an unfinished apply, a revert marked as started) and left a region half written. Then it
checks each region again. Revert never computes base bytes from a delta. Journals from before
`.originals` files keep their originals as objects, and revert from those; journals from
before file identities find their target by path and header hashes, and the region check is
what keeps them from writing into another model put there. A journal that revert cannot
complete (its files copied and deleted, replaced, or written since) is dropped by
`forget_journal`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..core.errors import DeltastoreError, JournalError, SharedFile, shown_names
from ..core.pools import WORKERS, pipelined
from ..engine.reader import Reader
from ..repo import journalfiles
from ..repo.locate import store_patching
from ..repo.openjournals import applied_ref, journal_files, journals_covering, journals_on
from ..weights.models import open_files
from ..weights.target import FileId, Target, patch_lock, resolve
from .journalled import Journal, drop, open_for_writing, put_back, region_now, write_objects


def revert_files(reader: Reader, target: str | os.PathLike, *,
                 progress: Callable[[int, int], None] | None = None) -> list[Journal]:
    """Revert what this store applied in place to `target`; refused, naming the other store,
    where another store patched it."""
    repo = reader.repo
    repo.check_writable()
    if not journals_covering(repo.catalog.open_journals(), target):
        other = store_patching(target, besides=repo.root)
        if other is not None:  # e.g. a store made here after the patch knows nothing of it
            raise JournalError(f"nothing was applied in place to {target} from the store {repo.root}; the store "
                               f"{other} patched it: run `deltastore --store {other} revert {target}`")
    return revert_in_place(reader, Path(target), progress=progress)


def revert_in_place(reader: Reader, path: Path, *, progress: Callable[[int, int], None] | None = None) -> list[Journal]:
    """`progress(done, total)`: bytes written back and checked so far, of all to write and check."""
    given = Path(path)
    if not given.exists():
        rows = _journals_at(reader, given)
        if rows:
            which = applied_ref(reader.repo.catalog, rows[-1])
            raise JournalError(f"{given} does not exist: it moved or was deleted since {which} was applied to it; "
                               f"nothing was written; if it moved, run `deltastore revert NEWPATH`; a copy made after "
                               f"apply (`cp -a`) keeps {which} and is not reverted: once {given} is deleted, "
                               f"{_forget_hint(rows[-1])}")
        raise JournalError(f"{given} does not exist; nothing to revert")
    with patch_lock(reader.repo.root, resolve(given)):
        target = resolve(given)  # again, now that no other patch can change it
        rows = journals_on(reader.repo.catalog, target)
        if not rows:
            raise _no_journal(reader, target)
        total = 2 * sum(r["end"] - r["start"] for row in rows for r in json.loads(row["plan"])["regions"])
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)
        return [_revert_one(reader, target, row, tick) for row in reversed(rows)]


def _journals_at(reader: Reader, given: Path) -> list[dict]:
    """The open journals whose target is this path, however it is spelled (for a path that
    no longer exists, only its text can say)."""
    return journals_covering(reader.repo.catalog.open_journals(), given)


def _no_journal(reader: Reader, target: Target) -> JournalError:
    """Why a target that no open journal covers cannot be reverted: its path's journal
    recorded other files, or it is a copy of an applied target (`cp -a`: the journal's
    headers, and what apply wrote, in other files)."""
    for row in reader.repo.catalog.open_journals():
        if row["target"] == str(target.model):
            return JournalError(f"{target.given} is not what {applied_ref(reader.repo.catalog, row)} was applied to: "
                                f"{_replaced(target, journal_files(row) or [])}; nothing was written; "
                                f"if it no longer needs its base back, {_forget_hint(row)}")
    headers = {f.name: f.header for f in target.files}
    for row in reader.repo.catalog.open_journals():
        if json.loads(row["plan"])["files"] != headers or not _holds_results(target, row):
            continue
        which = applied_ref(reader.repo.catalog, row)
        if journalfiles.files_gone(row):
            then = f"the journal is of {row['target']}, which is gone: {_forget_hint(row)}"
        else:
            then = f"`deltastore revert {row['target']}` reverts the folder it was applied to"
        return JournalError(f"{target.given} is a copy of {row['target']} made after {which} was applied to it: "
                            f"it keeps {which} (a model like `apply --out` writes) and is not reverted; "
                            f"nothing was written; {then}")
    return JournalError(f"nothing was applied in place to {target.given} (no journal); nothing to revert")


def _holds_results(target: Target, row: dict) -> bool:
    """Whether every region of a journal holds, in the target's files, what apply wrote."""
    infos = open_files(target.model, files=[target.path(f) for f in target.files]).infos
    for name, regions in _by_file(json.loads(row["plan"])).items():
        with open(target.path(target.file(name)), "rb") as fh:
            if any(region_now(fh.fileno(), infos[r["name"]]) != r["result"] for r in regions):
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


def _revert_one(reader: Reader, target: Target, row: dict, tick: Callable[[int], None] | None = None) -> Journal:
    plan = json.loads(row["plan"])
    recorded = _files_to_revert(reader, target, row)
    by_file = _by_file(plan)
    # Read and verify every original, and what every region holds now, before writing any.
    gone = journalfiles.base_files_problem(row)
    if gone:
        raise JournalError(f"{target.given} takes its base bytes back from the base's own files, and {gone}; nothing "
                           f"was written; put the base's files back as `base add` found them, then run `deltastore "
                           f"revert {target.given}` again; if it no longer needs its base back, {_forget_hint(row)}")
    damaged = journalfiles.damaged_originals(reader.repo.root, row)
    if damaged:
        where = {str(journalfiles.original_at(reader.repo.root, row["id"], r)[0]) for r in plan["regions"]
                 if r["name"] in damaged}
        raise JournalError(f"the saved original bytes of {shown_names(damaged)} in {', '.join(sorted(where))} are "
                           f"missing or damaged; nothing was written; {target.given} cannot be reverted exactly from "
                           "this journal (run `deltastore fsck --read-data`)")
    todo = _regions_to_write(reader, target, row, recorded, by_file)
    objects = {r["original"]: reader.repo.objects.get(r["original"]) for r in plan["regions"] if "original" in r}
    if todo:
        _write_originals(reader, target, row, recorded, todo, objects, tick)
    drop(reader, row["id"], list(objects))
    return Journal(row["id"], row["target"], row["version_id"], "reverted", len(plan["regions"]),
                   sum(len(regions) for regions in todo.values()))


def _files_to_revert(reader: Reader, target: Target, row: dict) -> list[FileId]:
    """The target's files that the journal recorded, checked to be those very files, unchanged
    in size and header, and not shared."""
    plan = json.loads(row["plan"])
    recorded = journal_files(row)
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
            raise JournalError(f"{target.given} is not what {applied_ref(reader.repo.catalog, row)} was applied to: "
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


def _regions_to_write(reader: Reader, target: Target, row: dict, recorded: list[FileId],
                      by_file: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The regions that do not hold their base bytes already, by file. Each region must hold
    what apply wrote (its result's tensor id) or the base's bytes; a region that holds neither
    (written since apply: the files are no longer what apply left) stops the revert before
    any write, unless a write was under way (an apply not finished, a revert marked as started),
    which may have left one half written."""
    writing = row["state"] != "applied" or journalfiles.is_reverting(reader.repo.root, row["id"])
    ids = _ids_now(target, recorded, by_file)
    todo: dict[str, list[dict]] = {}
    for name, regions in by_file.items():
        for r in regions:
            now = ids[r["name"]]
            if now == r["base"]:
                continue
            if now != r["result"] and not writing:
                which = applied_ref(reader.repo.catalog, row)
                raise JournalError(f"{target.given} does not hold what {which} wrote: the bytes "
                                   f"of {r['name']} in {target.path(target.file(name))} are neither {which}'s nor "
                                   f"the base's (written since apply); nothing was written; if it no longer needs "
                                   f"its base back, {_forget_hint(row)}")
            todo.setdefault(name, []).append(r)
    return todo


def _ids_now(target: Target, recorded: list[FileId], by_file: dict[str, list[dict]]) -> dict[str, str]:
    """The tensor id of what each region holds now, by name: two regions hashed at a time."""
    infos = open_files(target.model, files=[target.path(f) for f in recorded]).infos
    fds = {name: os.open(target.path(target.file(name)), os.O_RDONLY) for name in by_file}
    file_of = {r["name"]: name for name, regions in by_file.items() for r in regions}
    try:
        return dict(pipelined(list(file_of), lambda n: region_now(fds[file_of[n]], infos[n]), WORKERS, 2 * WORKERS))
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_originals(reader: Reader, target: Target, row: dict, recorded: list[FileId],
                     todo: dict[str, list[dict]], objects: dict[str, bytes],
                     tick: Callable[[int], None] | None = None) -> None:
    """The original bytes written back into each region of `todo`, then checked against the
    base ids. The journal is marked as reverting first: a revert interrupted from here on may
    leave a region half written, which the next revert finishes."""
    plan = json.loads(row["plan"])
    handles = open_for_writing(target, list(todo), "revert", recorded)
    try:
        journalfiles.mark_reverting(reader.repo.root, row["id"])
        for name, regions in todo.items():
            try:
                if "originals" in plan:
                    put_back(reader.repo.root, row["id"], handles[name], regions, tick)
                else:
                    write_objects(handles[name], [(r["start"], objects[r["original"]]) for r in regions])
            except OSError as e:
                raise JournalError(f"writing {target.path(target.file(name))} failed ({e.strerror or e}); the "
                                   f"journal is kept: run `deltastore revert {target.given}` again") from None
    finally:
        for fh in handles.values():
            fh.close()
    ids = _ids_now(target, recorded, todo)
    bad = []
    for regions in todo.values():
        for r in regions:
            if ids[r["name"]] != r["base"]:
                bad.append(r["name"])
            if tick:
                tick(r["end"] - r["start"])
    if bad:
        raise JournalError(f"after revert, {', '.join(bad[:5])} still differ from the base; "
                           "the journal is kept: run `deltastore fsck`")


def forget_journal(reader: Reader, name: str) -> list[Journal]:
    """Drop the open journals of a target that revert cannot restore (its files gone, as after
    `cp -a` and removal of the original, replaced, or written since apply), and their saved
    originals, writing nothing to any model file. `name`: the target's path, or a journal's id
    (or the start of one). A journal that revert can complete is refused."""
    rows = _journals_named(reader, name)
    if not rows:
        raise JournalError(f"no open journal has {name} as its target or id; nothing was dropped "
                           "(`deltastore fsck` lists the open journals)")
    for row in rows:
        if _revertable(reader, row):
            which = applied_ref(reader.repo.catalog, row)
            raise JournalError(f"{row['target']} still holds what {which} wrote, and `deltastore "
                               f"revert {row['target']}` restores its base; nothing was dropped")
    out = []
    for row in rows:
        plan = json.loads(row["plan"])
        drop(reader, row["id"], [r["original"] for r in plan["regions"] if "original" in r])
        out.append(Journal(row["id"], row["target"], row["version_id"], "forgotten", len(plan["regions"]), 0))
    return out


def _journals_named(reader: Reader, name: str) -> list[dict]:
    rows = reader.repo.catalog.open_journals()
    if len(name) >= 8 and all(c in "0123456789abcdef" for c in name):
        by_id = [r for r in rows if r["id"].startswith(name)]
        if len(by_id) == 1 or any(r["id"] == name for r in by_id):
            return [r for r in by_id if r["id"] == name] or by_id
    given = Path(name)
    found = _journals_at(reader, given)
    if given.exists():
        try:
            found += [r for r in journals_on(reader.repo.catalog, resolve(given)) if r not in found]
        except (DeltastoreError, OSError):
            pass
    return found


def _revertable(reader: Reader, row: dict) -> bool:
    """Whether revert would restore this journal's target now: its files are there and every
    check before the first write passes. A file hard-linked since apply counts as revertable:
    removing the other link lets revert run."""
    if journalfiles.files_gone(row):
        return False
    target = resolve(row["target"])
    with patch_lock(reader.repo.root, target):
        try:
            recorded = _files_to_revert(reader, target, row)
            if journalfiles.damaged_originals(reader.repo.root, row):
                return False
            _regions_to_write(reader, target, row, recorded, _by_file(json.loads(row["plan"])))
        except SharedFile:
            return True
        except JournalError:
            return False
    return True


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
