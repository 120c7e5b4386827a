"""gc frees exactly what nothing needs; fsck finds every kind of problem, all in one run."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest
import torch

from cli.output import size
from deltastore import Store

from helpers import (assert_same_state, file_bytes, flip_byte, load_folder, make_model, run_cli, store_snapshot,
                     write_folder)


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def variant(pair, tmp_path, seed: int, names: list[str]):
    gen = torch.Generator().manual_seed(seed)
    state = {n: t.clone() for n, t in pair.base_state.items()}
    for n in names:
        state[n] = state[n] + 0.01 * torch.randn(state[n].shape, generator=gen)
    return write_folder(tmp_path / f"variant-{seed}", state), state


REBUILD = "fsck --rebuild-catalog"


def objects_of(store: Store, ref: str) -> set[str]:
    return {o.id for e in store.resolve(ref).tensors for o in e.objects.values()}


def dead_writer(store: Store, object_ids: list[str]) -> int:
    """A process that records pending objects, as a commit does first, then dies."""
    pid = os.fork()
    if pid == 0:
        try:
            with Store.open(store.root) as s:
                s.catalog.add_pending("dead-commit", object_ids)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


# -- gc ----------------------------------------------------------------------------------------


def test_gc_after_deleting_a_stance_frees_exactly_the_bytes_no_other_version_shares(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    m2, _ = variant(pair, tmp_path, 2, ["head.weight", "blocks.0.mlp.weight"])
    m3, s3 = variant(pair, tmp_path, 3, ["head.weight", "blocks.2.out.weight"])
    store.commit("curious", pair.ft, base=pair.base)
    store.commit("curious", m2, base=pair.base, encoding="int8")
    store.commit("curious", m3, base=pair.base)
    store.commit("confident", pair.ft, base=pair.base)  # shares every object of curious@1
    store.commit("confident", m3, base=pair.base)  # and of curious@3
    doomed = set().union(*(objects_of(store, f"curious@{n}") for n in (1, 2, 3)))
    doomed -= objects_of(store, "confident@1") | objects_of(store, "confident@2")
    assert doomed  # curious@2's int8 objects are its own
    doomed |= {store.resolve(f"curious@{n}").id for n in (1, 2, 3)}  # and so are the manifests
    expected = sum(store.objects.size(o) for o in doomed)
    total_before = sum(store.objects.size(o) for o in store.objects.ids())

    deleted = store.delete_stance("curious")
    assert deleted.bytes_only_here == expected
    before = store_snapshot(store.root)
    dry = json.loads(run_cli(store, "gc", "--dry-run", "--json").stdout)
    assert store_snapshot(store.root) == before  # a dry run changes nothing
    assert set(dry["objects"]) == doomed and dry["bytes"] == expected
    assert dry["object_bytes"] == {o: store.objects.size(o) for o in doomed}
    # The summary alone, in one line; the list of objects only with --verbose.
    text = run_cli(store, "gc", "--dry-run").stdout
    assert text.strip().splitlines() == [f"would free {size(expected)} in {len(doomed)} objects"]
    listed = run_cli(store, "gc", "--dry-run", "--verbose").stdout
    assert all(o in listed for o in doomed) and f"in {len(doomed)} objects" in listed

    result = store.gc()
    assert set(result.removed) == doomed and result.bytes_freed == expected and result.skipped == ()
    assert sum(store.objects.size(o) for o in store.objects.ids()) == total_before - expected
    assert store.gc().bytes_freed == 0
    assert_same_state(load_folder(store.export("confident@1", tmp_path / "c1")), pair.ft_state)
    assert_same_state(load_folder(store.export("confident@2", tmp_path / "c2")), s3)
    assert store.fsck(read_data=True).problems == ()


def test_gc_spares_what_a_commit_in_progress_or_an_apply_journal_needs(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.commit("curious", pair.ft, base=pair.base)
    m2, _ = variant(pair, tmp_path, 2, ["head.weight"])
    store.commit("scratch", m2, base=pair.base)
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    journal = store.apply_files("curious", target)
    # The originals are kept beside the journal (journals/<id>.originals), not as objects;
    # journals from before that name objects, which gc keeps (test_upgrade's format-1 store).
    journal_objects = {r["object_id"] for r in store.catalog.journal_object_rows()}
    assert journal_objects == set()
    saved = store.root / "journals" / f"{journal.id}.originals"

    # A commit (this process: alive) has decided to reuse an object of the stance deleted below.
    reused = sorted(objects_of(store, "scratch"))[0]
    store.catalog.add_pending("live-commit", [reused])
    store.delete_stance("scratch")
    store.delete_stance("curious")  # the version applied in place goes; its journal stays
    doomed = objects_of_disk(store) - journal_objects - {reused} - base_objects(store)

    plan = store.gc_plan()
    assert set(plan.objects) == doomed
    assert set(store.gc(plan).removed) == doomed
    assert store.objects.exists(reused) and saved.exists()
    store.revert_files(target)  # its originals are all still there
    assert file_bytes(target) == file_bytes(pair.base)

    # The commit gave up; a dead writer's pending rows do not shield anything either.
    store.catalog.drop_pending("live-commit")
    pid = dead_writer(store, [reused])
    assert store.fsck().kinds() >= {"stale-pending"}
    plan = store.gc_plan()
    assert reused in plan.objects and plan.dead_commits == ("dead-commit",)
    assert reused in store.gc(plan).removed
    assert store.catalog.pending_commits() == [] and pid > 0
    assert store.fsck(read_data=True).problems == ()
    assert set(store.objects.ids()) == base_objects(store)  # the base is still registered


def objects_of_disk(store: Store) -> set[str]:
    return set(store.objects.ids())


def base_objects(store: Store) -> set[str]:
    """The tensor lists and records of the store's bases (objects, kept while it is registered)."""
    return {oid for b in store.catalog.bases() for oid in (b["id"], b["record"])}


def test_gc_rechecks_each_object_before_removing_it(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    scratch = store.commit("scratch", pair.ft, base=pair.base).version.id
    store.delete_stance("scratch")
    plan = store.gc_plan()
    assert plan.objects
    # Between plan and execution, a commit lands that reuses the same objects (not the
    # manifest: the new version's names another stance).
    v = store.commit("curious", pair.ft, base=pair.base).version
    result = store.gc(plan)
    assert result.removed == (scratch,) and set(result.skipped) == set(plan.objects) - {scratch}
    assert_same_state(load_folder(store.export(v, tmp_path / "out")), pair.ft_state)
    assert store.fsck(read_data=True).ok


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_reports_problems_of_many_kinds_in_one_run(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    m2, _ = variant(pair, tmp_path, 2, ["head.weight", "embed.weight"])
    m3, _ = variant(pair, tmp_path, 3, ["blocks.0.attn.weight", "blocks.1.attn.weight", "blocks.2.attn.weight"])
    store.commit("curious", pair.ft, base=pair.base)
    store.commit("confident", pair.ft, base=pair.base)
    store.commit("plain", m2, base=pair.base)
    store.commit("third", m3, base=pair.base)
    target = tmp_path / "target"
    shutil.copytree(pair.base, target)
    journal = store.apply_files("plain", target)
    assert store.fsck(read_data=True).ok

    shared = sorted(objects_of(store, "curious@1"))
    plain = sorted(objects_of(store, "plain@1"))
    third = sorted(objects_of(store, "third@1"))
    # A missing object breaks both stances that share it.
    store.objects.path(shared[0]).unlink()
    # A flipped bit in a payload: seen only when re-hashing. A truncated file: seen always.
    flip_byte(store.objects.path(shared[1]))
    path = store.objects.path(shared[2])
    path.write_bytes(path.read_bytes()[:-3])
    # Rows pointing nowhere, as another tool could leave them.
    db = sqlite3.connect(store.root / "catalog.db")
    db.execute("DELETE FROM objects WHERE digest = ?", [bytes.fromhex(plain[0][3:])])
    db.execute("INSERT INTO tags VALUES ('plain', 'ghost', 'b3:' || hex(zeroblob(32)), '2026-01-01')")
    # An index that has lost one of a version's objects (gc would remove it), and one that
    # says other than the manifest.
    db.execute("DELETE FROM entry_objects WHERE object = (SELECT key FROM objects WHERE digest = ?) AND version = "
               "(SELECT key FROM versions WHERE stance = 'third')", [bytes.fromhex(third[0][3:])])
    db.execute("UPDATE versions SET message = 'x' WHERE stance = 'plain'")
    db.commit()
    db.close()
    # A manifest that is not one (its object is sound: the store holds what it was given).
    bogus = store.objects.put(b"not a manifest").id
    with open(store.refs.path, "ab") as log:
        log.write(json.dumps({"op": "version", "id": bogus, "stance": "bogus", "number": 1}).encode() + b"\n")
    # An apply that never finished; stray files; a commit that died before landing.
    store.catalog.set_journal_state(journal.id, "applying")
    (store.objects.tmp / "999999999-0123abcd.tmp").write_bytes(b"half an object")
    mine = store.objects.tmp / f"{os.getpid()}-4567ef.tmp"
    mine.write_bytes(b"being written")
    (store.objects.objects / "zz").mkdir()
    (store.objects.objects / "zz" / "junk").write_bytes(b"?")
    dead_writer(store, ["b3:" + "ab" * 32])

    store.close()
    store = Store.open(store.root)  # catches up with the log: the bogus version is left out
    report = store.fsck()
    kinds = {p.kind: p for p in report.problems}
    assert not report.ok
    assert set(kinds) == {"missing-object", "corrupt-object", "dangling-row", "index-mismatch", "bad-manifest",
                          "unfinished-journal", "tmp-file", "stray-file", "stale-pending"}
    missing = [p for p in report.problems if p.kind == "missing-object"]
    assert [(p.subject, p.versions) for p in missing] == [(shared[0], ("confident@1", "curious@1"))]
    corrupt = [p for p in report.problems if p.kind == "corrupt-object"]
    assert [(p.subject, p.versions) for p in corrupt] == [(shared[2], ("confident@1", "curious@1"))]
    dangling = {p.subject for p in report.problems if p.kind == "dangling-row"}
    assert any(s.startswith("tags:") for s in dangling) and any(s.startswith("entry_objects:") for s in dangling)
    mismatch = [p for p in report.problems if p.kind == "index-mismatch"]
    assert {v for p in mismatch for v in p.versions} == {"third@1", "plain@1"}
    assert any(plain[0] in p.message for p in mismatch) and all(REBUILD in p.message for p in mismatch)
    assert [p.versions for p in report.problems if p.kind == "bad-manifest"] == [("bogus@1",)]
    assert kinds["unfinished-journal"].subject == str(target.absolute())
    assert {p.subject for p in report.problems if p.kind == "tmp-file"} == {
        str(store.objects.tmp / "999999999-0123abcd.tmp"), str(mine)}
    assert all(not kinds[k].error for k in ("tmp-file", "stray-file", "stale-pending", "unfinished-journal"))

    # Re-hashing finds the flipped bit too.
    deep = store.fsck(read_data=True)
    assert {p.subject for p in deep.problems if p.kind == "corrupt-object"} == {shared[1], shared[2]}
    assert deep.objects_checked >= len(shared) - 1

    # The command line: every problem, exit status 1, and the same as JSON.
    result = run_cli(store, "fsck", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False and {p["kind"] for p in out["problems"]} == set(kinds)
    text = run_cli(store, "fsck").stdout
    assert "confident@1, curious@1" in text and "missing-object" in text

    # --repair does only what is safe: the dead writer's leftovers, not a live one's file,
    # and nothing about the errors.
    repaired = store.fsck(repair=True)
    assert len(repaired.repaired) == 2
    assert mine.exists() and not (store.objects.tmp / "999999999-0123abcd.tmp").exists()
    assert "stale-pending" not in repaired.kinds() and store.catalog.pending_commits() == []
    assert {p.kind for p in repaired.errors} == {p.kind for p in report.errors}


def test_a_clean_store_has_no_problems_and_exits_0(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.commit("curious", pair.ft, base=pair.base, encoding="int4", tag="t")
    result = run_cli(store, "fsck", "--read-data")
    assert result.exit_code == 0 and result.stdout.strip().endswith("ok")
    assert store.fsck(read_data=True).problems == ()
