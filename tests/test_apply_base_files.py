"""An in-place apply whose journal takes the original bytes from the registered base's own
files (patching/basefiles.py) rather than a copy in the store: exact revert, a one-line refusal
when those files changed or are gone, a failed check rolled back from them, and a kill at any
moment still revertable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from deltastore import JournalError, Store
from deltastore.core.errors import DeltastoreError
from deltastore.repo import journalfiles

from helpers import ForkDriver, file_bytes, make_model


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def applied(tmp_path: Path, store: Store, encoding: str = "lossless"):
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base, encoding=encoding)
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    store.apply_files("s", target)
    [row] = store.catalog.open_journals()
    return pair, target, row, json.loads(row["plan"])


@pytest.mark.parametrize("encoding", ["lossless", "int4"])
def test_a_journal_pointing_to_the_base_files_reverts_bit_exact(tmp_path, store, encoding) -> None:
    pair, target, row, plan = applied(tmp_path, store, encoding)
    base = {p.name: p.read_bytes() for p in pair.base.glob("*.safetensors")}
    # Every region taken from the base's files: nothing copied into the store.
    assert plan["regions"] and all("base_file" in r and "offset" not in r for r in plan["regions"])
    assert {Path(d["path"]) for d in plan["base_files"]} == {p.resolve() for p in pair.base.glob("*.safetensors")}
    for r in plan["regions"]:
        n = r["end"] - r["start"]
        assert base[Path(r["base_file"]).name][r["base_start"]:r["base_start"] + n] == \
            (pair.base / r["file"]).read_bytes()[r["start"]:r["end"]]
    assert journalfiles.originals(store.root, row["id"]).stat().st_size == 0
    assert file_bytes(target) != file_bytes(pair.base)
    assert store.fsck(read_data=True).ok
    store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base)
    assert store.catalog.open_journals() == [] and list((store.root / "journals").iterdir()) == []


def test_a_base_file_changed_after_apply_makes_revert_refuse_and_write_nothing(tmp_path, store) -> None:
    pair, target, row, plan = applied(tmp_path, store)
    applied_bytes = file_bytes(target)
    r = plan["regions"][-1]
    path = Path(r["base_file"])
    kept = path.read_bytes()
    # Written in place: the same file, size and header, another byte in a region.
    with open(path, "r+b") as f:
        f.seek(r["base_start"] + 1)
        f.write(bytes([kept[r["base_start"] + 1] ^ 0x10]))
    with pytest.raises(JournalError) as e:
        store.revert_files(target)
    assert "\n" not in str(e.value) and r["name"] in str(e.value) and "nothing was written" in str(e.value)
    assert file_bytes(target) == applied_bytes and len(store.catalog.open_journals()) == 1
    assert [p.kind for p in store.fsck(read_data=True).errors] == ["damaged-originals"]
    # Replaced (another inode), then gone: one line naming the fix, nothing written.
    path.unlink()
    path.write_bytes(kept)
    for why in ("was replaced or changed since apply", "is gone"):
        with pytest.raises(JournalError) as e:
            store.revert_files(target)
        line = str(e.value)
        assert "\n" not in line and f"{path} {why}" in line and "nothing was written" in line
        assert "put the base's files back" in line and f"revert --forget {row['id']}" in line
        assert file_bytes(target) == applied_bytes
        path.unlink(missing_ok=True)
    record = json.loads((store.root / "journals" / f"{row['id']}.json").read_bytes())
    assert json.loads(record["plan"])["base_files"]  # the paths and identities an fsck reads
    store.forget_journal(row["id"])  # what revert cannot complete is forgotten
    assert store.catalog.open_journals() == [] and file_bytes(target) == applied_bytes


def test_plain_fsck_sees_a_base_file_the_journal_needs_replaced_or_gone(tmp_path, store) -> None:
    """fsck without --read-data checks the base files by identity, as revert does first: an
    error naming the file and the fix, where revert would refuse."""
    pair, target, row, plan = applied(tmp_path, store)
    assert store.fsck().ok
    path = Path(plan["regions"][0]["base_file"])
    kept = path.read_bytes()
    path.unlink()
    path.write_bytes(kept)  # the same bytes in another file (inode): revert refuses it too
    for why in ("was replaced or changed since apply", "is gone"):
        [problem] = store.fsck().errors
        assert problem.kind == "damaged-originals" and f"{path} {why}" in problem.message
        assert f"revert --forget {row['id']}" in problem.message
        path.unlink(missing_ok=True)


def test_revert_from_the_base_files_put_back_in_place(tmp_path, store) -> None:
    """Base files written in place and then restored (same file, same bytes): revert is exact."""
    pair, target, row, plan = applied(tmp_path, store)
    r = plan["regions"][0]
    path = Path(r["base_file"])
    kept = path.read_bytes()
    with open(path, "r+b") as f:
        f.seek(r["base_start"])
        f.write(bytes([kept[r["base_start"]] ^ 1]))
    with pytest.raises(JournalError, match="damaged; nothing was written"):
        store.revert_files(target)
    with open(path, "r+b") as f:
        f.write(kept)
    store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base)


def test_a_target_that_is_the_base_folder_itself_copies_its_originals(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    before = file_bytes(pair.base)
    store.apply_files("s", pair.base)
    [row] = store.catalog.open_journals()
    plan = json.loads(row["plan"])
    assert "base_files" not in plan and all("offset" in r for r in plan["regions"])
    store.revert_files(pair.base)
    assert file_bytes(pair.base) == before


def test_a_failed_check_midway_puts_back_what_was_written(tmp_path, store) -> None:
    """A damaged object is found once the results are being written: what was written is put
    back from the base's files, and the journal dropped."""
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    version = store.commit("s", pair.ft, base=pair.base).version
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    before = file_bytes(target)
    last = sorted(version.tensors, key=lambda e: e.name)[-1]
    oid = next(iter(last.objects.values())).id
    path = store.objects.path(oid)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeltastoreError):
        store.apply_files("s", target)
    assert file_bytes(target) == before
    assert store.catalog.open_journals() == [] and list((store.root / "journals").iterdir()) == []


JOBS = r"""
from deltastore import Store

def run(job):
    with Store.open(job["store"]) as store:
        store.apply_files(job["ref"], job["target"])
"""


def test_an_apply_killed_at_any_moment_is_revertable_from_the_base_files(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True, shards=12, layers=8, hidden=32)
    with Store.init(tmp_path / "store") as s:
        s.commit("s", pair.ft, base=pair.base, encoding="int4")
    driver = ForkDriver(tmp_path, JOBS)
    try:
        whole = tmp_path / "whole"
        shutil.copytree(pair.base, whole)
        started = time.monotonic()
        driver.start(store=str(tmp_path / "store"), ref="s", target=str(whole))
        assert driver.status() == 0
        duration = time.monotonic() - started
        journals = 0
        for k in range(6):
            target = tmp_path / f"any-{k}"
            shutil.copytree(pair.base, target)
            pid = driver.start(store=str(tmp_path / "store"), ref="s", target=str(target))
            time.sleep(duration * (2 * k + 1) / 12)
            os.kill(pid, signal.SIGKILL)
            driver.status()
            with Store.open(tmp_path / "store") as store:
                rows = store.catalog.open_journals(str(target.absolute()))
                if rows:
                    journals += 1
                    assert "base_files" in json.loads(rows[0]["plan"])
                    store.revert_files(target)
                assert file_bytes(target) == file_bytes(pair.base)
                assert store.catalog.open_journals(str(target.absolute())) == []
    finally:
        driver.close()


def test_apply_revert_and_export_leave_no_file_open(tmp_path, store) -> None:
    """A file holds many regions: each is opened once per apply or export, and closed (one
    descriptor per region was opened and all but one per file left open: a long-lived process
    ran out of descriptors)."""
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base, encoding="int4")
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    before = len(os.listdir("/proc/self/fd"))
    store.apply_files("s", target)
    store.revert_files(target)
    store.export("s", tmp_path / "out")
    assert len(os.listdir("/proc/self/fd")) == before
