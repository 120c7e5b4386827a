"""Revert writes only into bytes that apply wrote, on every journal format; and a journal whose
target is gone (copied with `cp -a`, then deleted) can be dropped, which fsck advises instead of
a revert that cannot run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deltastore import JournalError, Store
from deltastore.repo import journalfiles

from helpers import file_bytes, make_model, run_cli, store_snapshot


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


# Every journal format an open journal may still have: the current one; the one before
# `.originals` files (each region's original bytes in an object); and the one before file
# identities too (found by the target's path and its files' header hashes), as a store of
# format 1 brought over by `upgrade` keeps it. "base files": the current format where the
# journal takes the original bytes from the base's own files (the others copy every one).
FORMATS = {"current": (True, False), "objects": (True, True), "no identity": (False, False),
           "no identity, objects": (False, True), "base files": (True, False)}


def as_format(store: Store, fmt: str) -> dict:
    """The one open journal, rewritten as a journal of an older format writes it."""
    identity, objects = FORMATS[fmt]
    [row] = store.catalog.open_journals()
    plan = json.loads(row["plan"])
    saved = journalfiles.originals(store.root, row["id"])
    oids = []
    if not identity:
        plan = {"files": plan["files"], "regions": plan["regions"],
                **({"originals": plan["originals"]} if "originals" in plan else {})}
    if objects:
        data = saved.read_bytes()
        for r in plan["regions"]:
            oid = store.objects.put(data[r["offset"]:r["offset"] + r["end"] - r["start"]]).id
            oids.append(oid)
            for key in ("offset", "dtype", "shape"):
                del r[key]
            r["original"] = oid
        del plan["originals"]
    old = {**row, "plan": json.dumps(plan, sort_keys=True)}
    journalfiles.write(store.root, old, oids)
    if objects:
        saved.unlink()
    with store.catalog.transaction():
        store.catalog.put_journal(old, oids)
    return old


def store_state(root: Path) -> tuple:
    """What the store holds, byte for byte: catalog rows, objects, tmp/, journals/, refs.log."""
    return store_snapshot(root), file_bytes(root / "journals"), (root / "refs.log").read_bytes()


def applied(tmp_path: Path, store: Store, fmt: str, *, encoding: str = "lossless", sharded: bool = True):
    pair = make_model(tmp_path, torch.bfloat16, sharded=sharded)
    store.commit("s", pair.ft, base=pair.base, encoding=encoding)
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    store.apply_files("s", target, copy_originals=fmt != "base files")
    return pair, target, as_format(store, fmt)


def region_of(row: dict, k: int = -1) -> dict:
    """A region of the journal (the last in file and name order by default)."""
    return sorted(json.loads(row["plan"])["regions"], key=lambda r: (r["file"], r["name"]))[k]


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write into a file in place: the same file (device, inode), size and header."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.safetensors"))}


# -- 2. revert writes only where the bytes are what apply wrote --------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_revert_writes_nothing_into_a_file_changed_since_apply(tmp_path, store, fmt) -> None:
    """Bytes of one tensor (in the last shard written) changed in place since apply: no file
    is written, not even the shards before it."""
    pair, target, row = applied(tmp_path, store, fmt)
    region = region_of(row)
    overwrite(target / region["file"], region["start"], b"\x7f\x01" * 4)
    before, kept = file_bytes(target), store_state(store.root)
    result = run_cli(store.root, "revert", str(target))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert (f"the bytes of {region['name']} in {target / region['file']} are neither s@1's nor the base's"
            in result.output and "nothing was written" in result.output), result.output
    assert f"deltastore revert --forget {row['id']}" in result.output
    assert file_bytes(target) == before and store_state(store.root) == kept


@pytest.mark.parametrize("fmt", ["no identity", "no identity, objects"])
def test_a_journal_without_identities_does_not_revert_a_folder_replaced_by_the_fine_tune(tmp_path, store,
                                                                                          fmt) -> None:
    """A journal from before file identities finds its target by path and header hashes: a
    copy of the fine-tune put there matches both; its bytes (int8: not the applied ones) do not."""
    pair, target, row = applied(tmp_path, store, fmt, encoding="int8", sharded=False)
    shutil.rmtree(target)
    shutil.copytree(pair.ft, target)
    before, kept = file_bytes(target), store_state(store.root)
    with pytest.raises(JournalError, match="are neither s@1's nor the base's.*nothing was written"):
        store.revert_files(target)
    assert file_bytes(target) == before and store_state(store.root) == kept
    assert [r["id"] for r in store.catalog.open_journals()] == [row["id"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_target_that_already_holds_the_base_is_not_written(tmp_path, store, fmt) -> None:
    """Every region already holds its original bytes (put back by hand, or a copy of the base
    put in place of a journal without identities): revert writes nothing, drops the journal."""
    pair, target, row = applied(tmp_path, store, fmt)
    for name, data in file_bytes(pair.base).items():
        overwrite(target / name, 0, data)  # the same files, their bytes the base's again
    if not FORMATS[fmt][0]:
        shutil.rmtree(target)
        shutil.copytree(pair.base, target)
    stamps = mtimes(target)
    result = run_cli(store.root, "revert", str(target))
    assert result.exit_code == 0, result.output
    assert "already holds the base" in result.output and "nothing was written" in result.output, result.output
    assert mtimes(target) == stamps and file_bytes(target) == file_bytes(pair.base)
    assert store.catalog.open_journals() == [] and not journalfiles.originals(store.root, row["id"]).exists()
    store.gc()
    assert store.fsck(read_data=True).problems == ()


def test_a_region_that_holds_the_base_is_left_and_the_others_reverted(tmp_path, store) -> None:
    pair, target, row = applied(tmp_path, store, "current")
    region = region_of(row)
    base = file_bytes(pair.base)[region["file"]]
    overwrite(target / region["file"], region["start"], base[region["start"]:region["end"]])
    [journal] = store.revert_files(target)
    regions = len(json.loads(row["plan"])["regions"])
    assert (journal.regions, journal.written) == (regions, regions - 1)
    assert file_bytes(target) == file_bytes(pair.base)


@pytest.mark.parametrize("interrupted", ["a revert", "an apply"])
def test_a_region_half_written_is_reverted_only_after_an_interrupted_write(tmp_path, store, interrupted) -> None:
    """A revert (or apply) killed in the middle of a region leaves it half the base's bytes,
    half the version's: the journal says a write was under way (a revert's mark, an apply's
    state), and revert finishes it; an applied journal, unmarked, never has one."""
    pair, target, row = applied(tmp_path, store, "current")
    region = region_of(row)
    base = file_bytes(pair.base)[region["file"]]
    half = (region["end"] - region["start"]) // 2
    overwrite(target / region["file"], region["start"], base[region["start"]:region["start"] + half])
    before, kept = file_bytes(target), store_state(store.root)
    with pytest.raises(JournalError, match=f"bytes of {region['name']} .* are neither"):
        store.revert_files(target)
    assert file_bytes(target) == before and store_state(store.root) == kept
    if interrupted == "a revert":
        journalfiles.mark_reverting(store.root, row["id"])  # as a revert does before its first write
    else:
        store.catalog.set_journal_state(row["id"], "applying")
    [note] = store.fsck().problems
    assert note.kind == "unfinished-journal" and note.message.startswith(f"{interrupted} "), note.message
    store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base) and store.catalog.open_journals() == []
    assert file_bytes(store.root / "journals") == {} and store.fsck().problems == ()


# -- 11. a journal whose target is gone -----------------------------------------------------------


def copied_away(tmp_path: Path, store: Store, fmt: str = "current"):
    """An in-place apply, then `cp -a` of the folder and removal of the original."""
    pair, target, row = applied(tmp_path, store, fmt)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(target), str(copy)], check=True)
    shutil.rmtree(target)
    return pair, target, copy, row


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_copied_then_deleted_target_is_forgotten_not_reverted(tmp_path, store, fmt) -> None:
    pair, target, copy, row = copied_away(tmp_path, store, fmt)
    held, kept = file_bytes(copy), store_state(store.root)
    forget = f"deltastore revert --forget {row['id']}"
    # Neither path can be reverted, and each says why and what drops the journal.
    gone = run_cli(store.root, "revert", str(target))
    assert gone.exit_code == 1 and len(gone.output.strip().splitlines()) == 1, gone.output
    assert "does not exist" in gone.output and forget in gone.output, gone.output
    other = run_cli(store.root, "revert", str(copy))
    assert other.exit_code == 1 and len(other.output.strip().splitlines()) == 1, other.output
    assert f"is a copy of {target}" in other.output and "keeps s@1" in other.output, other.output
    assert forget in other.output, other.output
    # fsck advises what can run, with --repair too.
    for args in (["fsck"], ["fsck", "--repair"]):
        report = run_cli(store.root, *args)
        assert report.exit_code == 0 and forget in report.output, report.output
        assert f"`deltastore revert {target}`" not in report.output, report.output
    assert file_bytes(copy) == held and store_state(store.root) == kept

    done = run_cli(store.root, "revert", "--forget", str(target))
    assert done.exit_code == 0 and "forgot" in done.output and row["id"] in done.output, done.output
    assert file_bytes(copy) == held
    assert store.catalog.open_journals() == [] and file_bytes(store.root / "journals") == {}
    assert store.fsck(read_data=True).problems == ()  # the originals' objects (older formats) went too


def test_a_copy_of_a_target_still_there_points_to_the_target(tmp_path, store) -> None:
    pair, target, row = applied(tmp_path, store, "current")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(target), str(copy)], check=True)
    held, kept = file_bytes(copy), store_state(store.root)
    result = run_cli(store.root, "revert", str(copy))
    assert result.exit_code == 1 and f"is a copy of {target}" in result.output, result.output
    assert f"`deltastore revert {target}` reverts the folder" in result.output, result.output
    assert file_bytes(copy) == held and store_state(store.root) == kept


def test_a_copy_of_the_base_is_not_taken_for_a_copy_of_the_applied_target(tmp_path, store) -> None:
    """The same headers as the applied target (an in-place apply keeps them), other bytes. The
    base's copy is made while the applied target's files still exist: revert knows a file by
    its device and inode, and a file made after they were deleted may be given one of theirs."""
    pair, target, row = applied(tmp_path, store, "current")
    fresh = tmp_path / "fresh"
    shutil.copytree(pair.base, fresh)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(target), str(copy)], check=True)
    shutil.rmtree(target)
    shutil.rmtree(copy)
    os.rename(fresh, copy)
    result = run_cli(store.root, "revert", str(copy))
    assert result.exit_code == 1 and "nothing was applied in place" in result.output, result.output


def test_a_journal_is_forgotten_by_the_id_fsck_shows(tmp_path, store) -> None:
    pair, target, copy, row = copied_away(tmp_path, store)
    [note] = store.fsck().problems
    assert note.kind == "open-journal" and row["id"] in note.message
    assert run_cli(store.root, "revert", "--forget", row["id"]).exit_code == 0
    assert store.catalog.open_journals() == [] and store.fsck().problems == ()


def test_forget_refuses_a_journal_that_revert_can_complete(tmp_path, store) -> None:
    pair, target, row = applied(tmp_path, store, "current")
    before, kept = file_bytes(target), store_state(store.root)
    for name in (str(target), row["id"]):
        result = run_cli(store.root, "revert", "--forget", name)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"`deltastore revert {target}`" in result.output and "nothing was dropped" in result.output
    for name in ("0123abcd", str(tmp_path / "nowhere")):
        result = run_cli(store.root, "revert", "--forget", name)
        assert result.exit_code == 1 and "no open journal" in result.output, result.output
    assert file_bytes(target) == before and store_state(store.root) == kept
    # One that revert refuses (its bytes changed since apply) can be dropped: nothing is written.
    region = region_of(row)
    overwrite(target / region["file"], region["start"], b"\x7f\x01" * 4)
    changed = file_bytes(target)
    assert run_cli(store.root, "revert", "--forget", str(target)).exit_code == 0
    assert file_bytes(target) == changed and store.catalog.open_journals() == []


# A child that reverts, sleeping after each fsync of a weight file: it is killed there.
REVERT_JOB = r"""
import time
from deltastore import Store

real_fsync = os.fsync

def slow_fsync(fd):
    real_fsync(fd)
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
        time.sleep(60)

def run(job):
    os.fsync = slow_fsync
    with Store.open(job["store"]) as store:
        store.revert_files(job["target"])
"""


def test_a_revert_killed_midway_is_finished_by_the_next(tmp_path) -> None:
    """Killed after its first shard: the revert's mark says a write was under way, so a region
    it left half written (as a kill inside a copy leaves one) is written back by the next."""
    from helpers import ForkDriver

    with Store.init(tmp_path / "store") as store:
        pair, target, row = applied(tmp_path, store, "current")
    base = file_bytes(pair.base)

    def reverted() -> int:
        return sum(file_bytes(target)[n] == base[n] for n in base if n.endswith(".safetensors"))

    untouched = reverted()  # shards without a changed tensor
    assert len([n for n in base if n.endswith(".safetensors")]) - untouched >= 2
    driver = ForkDriver(tmp_path, REVERT_JOB)
    try:
        assert driver.kill_when(lambda: reverted() > untouched, 60, store=str(tmp_path / "store"),
                                target=str(target))
    finally:
        driver.close()
    assert journalfiles.is_reverting(tmp_path / "store", row["id"])
    region = next(r for r in sorted(json.loads(row["plan"])["regions"], key=lambda r: r["file"], reverse=True)
                  if file_bytes(target)[r["file"]] != base[r["file"]])
    half = (region["end"] - region["start"]) // 2
    overwrite(target / region["file"], region["start"], base[region["file"]][region["start"]:region["start"] + half])
    with Store.open(tmp_path / "store") as store:
        [note] = store.fsck().problems
        assert note.kind == "unfinished-journal" and note.message.startswith("a revert of"), note.message
        store.revert_files(target)
        assert file_bytes(target) == base and store.catalog.open_journals() == []
        assert file_bytes(store.root / "journals") == {} and store.fsck().problems == ()
