"""In-place apply on model files, journalled, and revert to the exact bytes, even after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from deltastore import BaseMismatch, JournalError, Store
from deltastore.codecs import absmax, encodings
from deltastore.core.errors import ResultMismatch

from helpers import (ForkDriver, assert_same_state, file_bytes, load_folder, make_model, module_snapshot,
                     weight_bytes, write_folder)


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def copy_model(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


@pytest.mark.parametrize("layout", ["folder", "sharded", "file"])
def test_apply_in_place_then_revert_gives_back_the_exact_bytes(tmp_path, store, layout) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=layout == "sharded")
    store.commit("s", pair.ft, base=pair.base)
    src = pair.base / "model.safetensors" if layout == "file" else pair.base
    target = copy_model(src, tmp_path / ("target.safetensors" if layout == "file" else "target"))
    original = file_bytes(target)

    journal = store.apply_files("s", target)
    assert journal.state == "applied" and journal.regions == len(pair.changed)
    assert_same_state(load_folder(target), pair.ft_state)
    after = file_bytes(target)
    assert sorted(after) == sorted(original)
    assert {n: after[n] for n in after if not n.endswith(".safetensors")} == \
        {n: original[n] for n in original if not n.endswith(".safetensors")}
    report = store.fsck()
    assert report.ok and [p.kind for p in report.problems if p.kind == "open-journal"] == ["open-journal"]

    reverted = store.revert_files(target)
    assert [j.state for j in reverted] == ["reverted"]
    assert file_bytes(target) == original
    assert store.catalog.open_journals() == []
    assert store.fsck().ok
    # The saved originals are garbage now; gc takes them and the version stays intact.
    store.gc()
    assert store.fsck(read_data=True).problems == ()
    store.apply_files("s", target)
    assert_same_state(load_folder(target), pair.ft_state)


def test_revert_finds_the_target_however_its_path_is_spelled(tmp_path, store, monkeypatch) -> None:
    pair = make_model(tmp_path, torch.float16)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    store.apply_files("s", Path("../target"))
    with pytest.raises(JournalError, match="already has s@1 applied in place"):
        store.apply_files("s", target)
    store.revert_files(tmp_path / "elsewhere" / ".." / "target" / ".")
    assert file_bytes(target) == file_bytes(pair.base)
    assert store.catalog.open_journals() == []


def test_lossy_apply_in_place_reverts_exactly(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base, encoding="int4")
    target = copy_model(pair.base, tmp_path / "target")
    store.apply_files("s", target)
    assert weight_bytes(target) != weight_bytes(pair.base)
    store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base)


def test_apply_twice_is_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float16)
    store.commit("s", pair.ft, base=pair.base)
    store.commit("t", pair.ft, base=pair.base, include="blocks.0")
    target = copy_model(pair.base, tmp_path / "target")
    store.apply_files("s", target)
    applied = file_bytes(target)
    for ref in ("s", "t"):
        with pytest.raises(JournalError, match="already has s@1 applied in place.*revert"):
            store.apply_files(ref, target)
    assert file_bytes(target) == applied
    assert len(store.catalog.open_journals()) == 1
    store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base)


def test_revert_without_apply_is_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    target = copy_model(pair.base, tmp_path / "target")
    with pytest.raises(JournalError, match="nothing was applied"):
        store.revert_files(target)
    store.commit("s", pair.ft, base=pair.base)
    store.apply_files("s", target)
    store.revert_files(target)
    with pytest.raises(JournalError, match="nothing was applied"):
        store.revert_files(target)
    assert file_bytes(target) == file_bytes(pair.base)


def test_revert_with_a_corrupt_original_writes_nothing_and_keeps_the_journal(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    store.apply_files("s", target, copy_originals=True)  # every original in `.originals`
    applied = file_bytes(target)
    [journal] = store.catalog.open_journals()
    region = sorted(json.loads(journal["plan"])["regions"], key=lambda r: r["name"])[-1]
    saved = store.root / "journals" / f"{journal['id']}.originals"
    data = bytearray(saved.read_bytes())
    data[region["offset"] + (region["end"] - region["start"]) // 2] ^= 0x04
    saved.write_bytes(bytes(data))
    assert store.fsck().ok  # seen only when the saved bytes are read
    with pytest.raises(JournalError, match=f"original bytes of {region['name']} .* damaged; nothing was written"):
        store.revert_files(target)
    assert file_bytes(target) == applied
    assert len(store.catalog.open_journals()) == 1
    [problem] = [p for p in store.fsck(read_data=True).errors if p.kind == "damaged-originals"]
    assert problem.subject == str(target.absolute()) and region["name"] in problem.message


def test_a_journal_keeps_the_originals_in_one_file_beside_it(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    before = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}
    store.apply_files("s", target, copy_originals=True)  # every original in `.originals`
    [journal] = store.catalog.open_journals()
    plan = json.loads(journal["plan"])
    saved = (store.root / "journals" / f"{journal['id']}.originals").read_bytes()
    # Each region's original bytes, raw, at its offset: nothing compressed, no objects.
    assert len(saved) == sum(r["end"] - r["start"] for r in plan["regions"])
    for r in plan["regions"]:
        assert saved[r["offset"]:r["offset"] + r["end"] - r["start"]] == before[r["file"]][r["start"]:r["end"]]
    assert store.catalog.journal_object_rows() == []
    store.revert_files(target)
    assert sorted(p.name for p in (store.root / "journals").iterdir()) == []
    assert {p.name: p.read_bytes() for p in target.glob("*.safetensors")} == before


def test_a_lossy_tensor_that_decodes_to_other_bytes_is_refused_before_any_write(tmp_path, store,
                                                                               monkeypatch) -> None:
    # Another torch build's arithmetic, stood in for by a decode one ulp off in one element: the
    # result ids recorded at commit catch it, in the one wording every decoding path uses.
    pair = make_model(tmp_path, torch.float32)
    version = store.commit("s", pair.ft, base=pair.base, encoding="int4").version
    entry = next(e for e in version.tensors if e.encoding == "int4")
    # Files decode int4 in numpy (absmax.py), a live module in torch (the encoding's decode).
    decode_into, int4 = absmax.decode_into, type(encodings.from_params(entry.encoding, entry.params))
    decode = int4.decode

    def one_ulp_off_in_numpy(*args, **kwargs):
        out = decode_into(*args, **kwargs)
        out[0] ^= 1  # the lowest bit of the first element's mantissa (little-endian)
        return out

    def one_ulp_off(self, *args, **kwargs):
        result = decode(self, *args, **kwargs)
        flat = result.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
        return result

    monkeypatch.setattr(absmax, "decode_into", one_ulp_off_in_numpy)
    monkeypatch.setattr(int4, "decode", one_ulp_off)
    target = copy_model(pair.base, tmp_path / "target")
    before = file_bytes(target)
    with pytest.raises(ResultMismatch) as e:
        store.apply_files("s", target)
    assert "decodes to other bytes than at commit" in str(e.value) and "nothing was changed" in str(e.value)
    assert file_bytes(target) == before
    assert store.catalog.open_journals() == []
    model = pair.base_module
    snapshot = module_snapshot(model)
    with pytest.raises(ResultMismatch) as live:
        store.apply(model, "s")
    assert str(live.value) == str(e.value) and module_snapshot(model) == snapshot


def test_apply_to_a_model_that_is_not_the_base_changes_nothing(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.ft, tmp_path / "target")  # already fine-tuned
    before = file_bytes(target)
    with pytest.raises(BaseMismatch) as e:
        store.apply_files("s", target)
    assert sorted(e.value.names) == pair.changed
    assert file_bytes(target) == before
    assert store.catalog.open_journals() == []


def test_a_resized_tensor_cannot_be_patched_in_place(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    ft = dict(pair.ft_state)
    ft["embed.weight"] = torch.cat([ft["embed.weight"], torch.zeros(1, 16)])
    store.commit("grown", write_folder(tmp_path / "grown", ft), base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    with pytest.raises(JournalError, match="apply --out"):
        store.apply_files("grown", target)
    assert file_bytes(target) == file_bytes(pair.base)
    assert store.catalog.open_journals() == []
    out = store.export("grown", tmp_path / "out", base_weights=target)
    assert_same_state(load_folder(out), ft)


def test_a_symlinked_weight_file_is_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base)
    target = tmp_path / "target"
    target.mkdir()
    (target / "model.safetensors").symlink_to(pair.base / "model.safetensors")
    with pytest.raises(JournalError, match="symlink"):
        store.apply_files("s", target)
    assert file_bytes(pair.base / "model.safetensors") == file_bytes(target / "model.safetensors")


def test_revert_refuses_a_file_replaced_since_apply(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.float32)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    store.apply_files("s", target)
    state = load_folder(target)
    state["extra"] = torch.zeros(2)
    (target / "model.safetensors").unlink()
    write_folder(target, state, extra={})
    replaced = file_bytes(target)
    with pytest.raises(JournalError, match="(replaced|changed) since apply"):
        store.revert_files(target)
    assert file_bytes(target) == replaced
    assert len(store.catalog.open_journals()) == 1


# -- kill -9 in the middle of an in-place apply ---------------------------------------------------

# What a forked child does with a job: apply a version to model files. With "slow", it sleeps
# after each fsync of a weight file: the patching phase then lasts long enough to be killed in
# its middle.
JOBS = r"""
import time
from deltastore import Store

real_fsync = os.fsync

def slow_fsync(fd):
    real_fsync(fd)
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
        time.sleep(SLOW_S)

def run(job):
    global SLOW_S
    if job.get("slow"):
        SLOW_S = job["slow"]
        os.fsync = slow_fsync
    with Store.open(job["store"]) as store:
        store.apply_files(job["ref"], job["target"])
"""


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """A store with one version of a 12-shard model, and a driver process ready to apply it."""
    tmp = tmp_path_factory.mktemp("kill")
    pair = make_model(tmp, torch.bfloat16, sharded=True, shards=12, layers=8, hidden=32)
    with Store.init(tmp / "store") as store:
        store.commit("s", pair.ft, base=pair.base)
    driver = ForkDriver(tmp, JOBS)
    yield tmp, pair, driver
    driver.close()


def journal_state(db: sqlite3.Connection, target: Path) -> str | None:
    row = db.execute("SELECT state FROM journals WHERE target = ?", [str(target.absolute())]).fetchone()
    return row[0] if row else None


def patched_shards(target: Path, base: Path) -> int:
    now, then = weight_bytes(target), weight_bytes(base)
    return sum(now[n] != then[n] for n in then)


def check_revert_after_kill(store_root: Path, target: Path, pair) -> None:
    with Store.open(store_root) as store:
        store.revert_files(target)
        assert file_bytes(target) == file_bytes(pair.base)
        assert store.catalog.open_journals() == []
        report = store.fsck(read_data=True)
        assert report.ok, report.errors
        # What the killed process left (its pending rows, saved originals) is harmless, and
        # repair plus gc clear it.
        store.fsck(repair=True)
        store.gc()
        assert store.fsck(read_data=True).problems == ()


def test_kill_9_in_the_middle_of_patching_then_revert(kill_setup) -> None:
    tmp, pair, driver = kill_setup
    shards = patched_shards(pair.ft, pair.base)
    assert shards >= 10
    db = sqlite3.connect(f"file:{tmp / 'store' / 'catalog.db'}?mode=ro", uri=True)
    midway = []
    for k, delay in enumerate((0.05, 0.3, 0.55)):
        target = copy_model(pair.base, tmp / f"slow-{k}")
        pid = driver.start(store=str(tmp / "store"), ref="s", target=str(target), slow=0.06)
        deadline = time.monotonic() + 60
        while journal_state(db, target) is None:
            assert time.monotonic() < deadline, "the apply never wrote its journal"
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = driver.status()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert journal_state(db, target) == "applying"
        midway.append(patched_shards(target, pair.base))
        check_revert_after_kill(tmp / "store", target, pair)
    db.close()
    # Killed while patching: some shards written, some not.
    assert any(0 < n < shards for n in midway), midway


def test_kill_9_at_any_moment_leaves_the_base_recoverable(kill_setup) -> None:
    tmp, pair, driver = kill_setup
    # How long one whole apply takes here, so that the kills below spread over all of it.
    target = copy_model(pair.base, tmp / "whole")
    started = time.monotonic()
    driver.start(store=str(tmp / "store"), ref="s", target=str(target))
    assert driver.status() == 0
    duration = time.monotonic() - started
    assert_same_state(load_folder(target), pair.ft_state)
    check_revert_after_kill(tmp / "store", target, pair)

    outcomes = []
    for k in range(6):
        target = copy_model(pair.base, tmp / f"any-{k}")
        pid = driver.start(store=str(tmp / "store"), ref="s", target=str(target))
        time.sleep(duration * (2 * k + 1) / 12)
        os.kill(pid, signal.SIGKILL)
        status = driver.status()
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
        with Store.open(tmp / "store") as store:
            if store.catalog.open_journals(str(target.absolute())):
                outcomes.append("journal")
                check_revert_after_kill(tmp / "store", target, pair)
            else:
                # Killed before the journal landed: not a byte of the target was written.
                outcomes.append("before")
                assert file_bytes(target) == file_bytes(pair.base)
                with pytest.raises(JournalError):
                    store.revert_files(target)
                assert store.fsck().ok
    assert outcomes[0] == "before"


def test_progress_counts_every_byte_checked_and_written(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    seen: list[tuple[int, int]] = []
    journal = store.apply_files("s", target, progress=lambda done, total: seen.append((done, total)))
    regions = json.loads(store.catalog.open_journals()[0]["plan"])["regions"]
    total = 2 * sum(r["end"] - r["start"] for r in regions)
    assert seen[-1] == (total, total) and len(seen) == 2 * journal.regions
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_journal_that_saved_its_originals_as_objects_still_reverts_exactly(tmp_path, store) -> None:
    """Journals written before `.originals` files name one object per region."""
    from deltastore.repo import journalfiles

    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    before = file_bytes(target)
    store.apply_files("s", target, copy_originals=True)  # every original in `.originals`
    [row] = store.catalog.open_journals()
    saved = store.root / "journals" / f"{row['id']}.originals"
    data = saved.read_bytes()
    plan = json.loads(row["plan"])
    objects = []
    for r in plan["regions"]:
        oid = store.objects.put(data[r["offset"]:r["offset"] + r["end"] - r["start"]]).id
        objects.append(oid)
        for key in ("offset", "dtype", "shape"):
            del r[key]
        r["original"] = oid
    del plan["originals"]
    old = {**row, "plan": json.dumps(plan, sort_keys=True)}
    journalfiles.write(store.root, old, objects)
    saved.unlink()
    with store.catalog.transaction():
        store.catalog.put_journal(old, objects)
    assert store.gc().removed == ()  # its objects are kept
    store.revert_files(target)
    assert file_bytes(target) == before
    assert not any(store.objects.exists(o) for o in objects)  # this journal's alone, removed with it
    assert store.fsck(read_data=True).problems == ()


def test_a_progress_bar_only_on_a_terminal_and_never_with_json(tmp_path, store) -> None:
    from helpers import run_on_terminal

    pair = make_model(tmp_path, torch.bfloat16, sharded=True)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")

    def run(*commands: list[str], terminal: bool) -> tuple[str, bytes]:
        return run_on_terminal(store.root, *commands, terminal=terminal)

    out, err = run(["apply", "s", str(target)], ["revert", str(target)], terminal=True)
    assert b"applying" in err and b"100%" in err and "applied s@1" in out
    out, err = run(["apply", "s", str(target), "--json"], ["revert", str(target)], terminal=True)
    assert b"applying" not in err and json.loads(out[:out.rindex("}") + 1])["state"] == "applied"
    out, err = run(["apply", "s", str(target)], ["revert", str(target)], terminal=False)
    assert err == b"" and "applied s@1" in out
    assert file_bytes(target) == file_bytes(pair.base)


def test_originals_left_without_their_journal_are_removed_once_stale(tmp_path, store) -> None:
    pair = make_model(tmp_path, torch.bfloat16)
    store.commit("s", pair.ft, base=pair.base)
    target = copy_model(pair.base, tmp_path / "target")
    journal = store.apply_files("s", target)
    # As a revert killed between removing the journal's file and its originals leaves it.
    saved = store.root / "journals" / f"{journal.id}.originals"
    kept = saved.read_bytes()
    store.revert_files(target)
    saved.write_bytes(kept)
    assert store.fsck().problems == ()  # young: it may be an apply's between two steps
    old = time.time() - 2 * 3600
    os.utime(saved, (old, old))
    assert [(p.kind, p.subject) for p in store.fsck().problems] == [("tmp-file", str(saved))]
    assert store.fsck(repair=True).repaired == (f"removed {saved}",)
    assert not saved.exists() and store.fsck().problems == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.uint8, torch.int32])
def test_lossless_in_place_decodes_every_element_width_exactly(tmp_path, store, dtype) -> None:
    # A lossless entry against the base is decoded from the file's bytes in numpy (its byte
    # planes put back together by element width, XORed with the base), not by the encoding's
    # torch code: each width, 1 to 8 bytes, gives the fine-tune's exact bytes and reverts exactly.
    g = torch.Generator().manual_seed(7)
    base = {"a": torch.randn(37, 5, generator=g).to(dtype) if dtype.is_floating_point
            else torch.randint(0, 100, (37, 5), generator=g).to(dtype), "b": torch.zeros(3, dtype=dtype)}
    ft = {"a": base["a"] + 1 if not dtype.is_floating_point else base["a"] * 1.01, "b": base["b"] + 2}
    write_folder(tmp_path / "base", base)
    write_folder(tmp_path / "ft", ft)
    store.commit("s", tmp_path / "ft", base=tmp_path / "base")
    target = copy_model(tmp_path / "base", tmp_path / "target")
    original = file_bytes(target)
    store.apply_files("s", target)
    assert_same_state(load_folder(target), ft)
    store.revert_files(target)
    assert file_bytes(target) == original
