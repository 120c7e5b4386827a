"""Versions stored against another version's result (chains): what apply gives is the fine-tune
bit for bit (lossless) or the recorded result within the encoding's bound (lossy), through every
link; a corrupt link is refused before any write; the depth bound; gc, fsck, delete, push."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.engine.chain import MAX_DEPTH, ChainError
from deltastore.core.errors import CorruptObject, UnsafeInput
from deltastore.core.hashing import tensor_id
from deltastore.repo.records import CHAINED_FORMAT, check_manifest
from deltastore.sharing.remote import push

from helpers import (assert_same_state, finetune_, flip_byte, load_folder, make_model, module_snapshot,
                     saved_state, weight_bytes, write_folder)


@pytest.fixture
def stances(tmp_path):
    """A base, a shared fine-tune of it and five stances that each move it a little further:
    stance k is stance k-1 with more of its own moves (a chain's natural shape)."""
    pair = make_model(tmp_path)
    module = copy.deepcopy(pair.ft_module)
    folders = [pair.ft]
    states = [pair.ft_state]
    for k in range(1, 6):
        finetune_(module, seed=100 + k, lr=1e-4)
        folders.append(write_folder(tmp_path / f"stance-{k}", saved_state(module)))
        states.append(saved_state(module))
    store = Store.init(tmp_path / "store")
    yield store, pair, folders, states
    store.close()


def _chain(store: Store, pair, folders, depth: int, encoding: str = "lossless") -> list:
    store.commit("shared", folders[0], base=pair.base, encoding=encoding)
    against = "shared"
    versions = []
    for k in range(1, depth + 1):
        r = store.commit(f"s{k}", folders[k], base=pair.base, against=against, encoding=encoding, new_stance=True)
        versions.append(r.version)
        against = f"s{k}"
    return versions


def test_a_chain_of_depth_3_exports_and_applies_bit_exact(tmp_path, stances):
    store, pair, folders, states = stances
    versions = _chain(store, pair, folders, 3)
    top = store.resolve("s3")
    assert top.against == versions[1].id and top.manifest()["format"] == CHAINED_FORMAT
    assert top.manifest()["against"] == store.resolve("s2").id
    # Every tensor the version under it stores is listed again, each with what it is against.
    assert {e.name for e in top.tensors} >= {e.name for e in store.resolve("s2").tensors}
    assert all(e.against is not None for e in top.tensors)
    for k in (1, 2, 3):
        assert_same_state(load_folder(store.export(f"s{k}", tmp_path / f"out-{k}")), states[k])
    # On a live module, and back to the base exactly.
    model = copy.deepcopy(pair.base_module)
    before = module_snapshot(model)
    handle = store.apply(model, "s3")
    assert {n: t for n, t in saved_state(model).items()} .keys() == states[3].keys()
    assert_same_state(saved_state(model), states[3])
    handle.revert()
    assert module_snapshot(model) == before
    # In place on files, and reverted.
    target = write_folder(tmp_path / "target", pair.base_state)
    original = weight_bytes(target)
    store.apply_files("s3", target)
    assert_same_state(load_folder(target), states[3])
    store.revert_files(target)
    assert weight_bytes(target) == original
    # Stored against its neighbour, each version holds less than against the base.
    plain = store.commit("plain", folders[3], base=pair.base, new_stance=True)
    assert store.resolve("s3").bytes < plain.version.bytes


def test_a_lossy_chain_gives_the_recorded_results_within_the_encodings_bound(tmp_path, stances):
    store, pair, folders, states = stances
    _chain(store, pair, folders, 3, encoding="int8")
    out = load_folder(store.export("s3", tmp_path / "out"))
    reference = load_folder(store.export("s2", tmp_path / "under"))
    for entry in store.resolve("s3").tensors:
        got, want = out[entry.name], states[3][entry.name]
        assert tensor_id(got) == entry.result_tensor_id
        # int8 absmax per group: no element further from the fine-tune than half a step of the
        # largest delta (against s2's result) over 127, plus the rounding of the sum.
        step = float((want.double() - reference[entry.name].double()).abs().max()) / 127
        assert float((got.double() - want.double()).abs().max()) <= step / 2 + 1e-6


def test_a_corrupt_link_is_refused_before_any_write(tmp_path, stances):
    store, pair, folders, _ = stances
    _chain(store, pair, folders, 3)
    middle = store.resolve("s2")
    victim = next(iter(middle.tensors[0].objects.values())).id
    flip_byte(store.objects.path(victim))
    model = copy.deepcopy(pair.base_module)
    before = module_snapshot(model)
    with pytest.raises(CorruptObject):
        store.apply(model, "s3")
    assert module_snapshot(model) == before
    target = write_folder(tmp_path / "target", pair.base_state)
    original = weight_bytes(target)
    with pytest.raises(CorruptObject):
        store.apply_files("s3", target)
    assert weight_bytes(target) == original
    out = CliRunner().invoke(cli, ["--store", str(store.root), "apply", "s3", str(target)])
    assert out.exit_code == 1 and "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert weight_bytes(target) == original


def test_depth_is_bounded_at_commit(tmp_path, stances):
    store, pair, folders, _ = stances
    _chain(store, pair, folders, MAX_DEPTH)
    log = store.log()
    with pytest.raises(ChainError, match=f"at most {MAX_DEPTH}"):
        store.commit("s5", folders[5], base=pair.base, against=f"s{MAX_DEPTH}", new_stance=True)
    assert store.log() == log
    out = CliRunner().invoke(cli, ["--store", str(store.root), "commit", "s5", str(folders[5]), "--base",
                                   str(pair.base), "--against", "s4", "--new-stance"])
    assert out.exit_code == 1 and f"at most {MAX_DEPTH}" in out.output and "Traceback" not in out.output
    # The deepest allowed still exports exactly.
    assert_same_state(load_folder(store.export("s4", tmp_path / "s4")), load_folder(folders[4]))
    # Options a chain cannot honour are refused in one line.
    with pytest.raises(ChainError, match="selection"):
        store.commit("s5", folders[5], base=pair.base, against="s1", top_k=2, new_stance=True)
    other = make_model(tmp_path, name="other", seed=9)
    with pytest.raises(ChainError, match="base"):
        store.commit("x", other.ft, base=other.base, against="s1", new_stance=True)


def test_gc_delete_and_fsck_keep_every_link(tmp_path, stances):
    store, pair, folders, states = stances
    _chain(store, pair, folders, 3)
    # A stance others are stored against cannot be deleted: they would lose what they need.
    with pytest.raises(ChainError, match="s2@1 is stored against"):
        store.delete_stance("s1")
    out = CliRunner().invoke(cli, ["--store", str(store.root), "stance", "delete", "shared"])
    assert out.exit_code == 1 and "s1@1 is stored against" in out.output and "Traceback" not in out.output
    assert store.gc().removed == ()
    # The top of a chain goes freely; gc then frees its objects only.
    store.delete_stance("s3")
    store.gc()
    assert_same_state(load_folder(store.export("s2", tmp_path / "s2")), states[2])
    assert store.fsck(read_data=True).problems == ()
    # The catalog rebuilt from the objects and the log says the same.
    log = [v.to_json() for v in store.log()]
    store.close()
    report = Store.check(store.root, rebuild_catalog=True, read_data=True)
    assert report.problems == ()
    with Store.open(store.root) as again:
        assert [v.to_json() for v in again.log()] == log
        assert again.resolve("s2").against == again.resolve("s1").id
        assert_same_state(load_folder(again.export("s2", tmp_path / "again")), states[2])


def test_push_refuses_a_chained_version_and_packed_prepare_too(tmp_path, stances):
    store, pair, folders, _ = stances
    _chain(store, pair, folders, 1)
    remote = f"file://{tmp_path / 'shared' / 'team'}"
    with pytest.raises(ChainError, match="does not carry chains"):
        push(store, ["s1"], remote)
    out = CliRunner().invoke(cli, ["--store", str(store.root), "push", "s1", "--remote", remote])
    assert out.exit_code == 1 and "does not carry chains" in out.output and "Traceback" not in out.output
    from deltastore.sharing.hub import push as hub_push

    with pytest.raises(ChainError, match="does not carry chains"):
        hub_push(store, ["s1"], "user/repo")
    from deltastore.patching.prepared import prepare

    with pytest.raises(ChainError, match="mode='full'"):
        prepare(store.reader, store.resolve("s1"), mode="packed", base_weights=pair.base)
    full = prepare(store.reader, store.resolve("s1"), mode="full", base_weights=pair.base)
    assert len(full.tensors) == len(store.resolve("s1").tensors)
    # A pull takes manifests of format 1 only: one of a chained version, however it got there, is refused.
    with pytest.raises(UnsafeInput, match="deltastore/version/1"):
        check_manifest(store.resolve("s1").manifest())
    # The version it is against pushes as any other.
    assert [v.id for v in push(store, ["shared"], remote).pushed] == [store.resolve("shared").id]


def test_commit_against_on_the_command_line(tmp_path, stances):
    store, pair, folders, states = stances
    store.commit("shared", folders[0], base=pair.base)
    marker = store.root / "STORE"
    assert json.loads(marker.read_text())["format"] == "deltastore/store/2"
    runner = CliRunner()
    out = runner.invoke(cli, ["--store", str(store.root), "commit", "s1", str(folders[1]), "--base", str(pair.base),
                              "--against", "shared", "--new-stance", "--json"])
    assert out.exit_code == 0, out.output
    vid = json.loads(out.stdout)["id"]
    assert store.resolve(vid).against == store.resolve("shared").id
    shown = runner.invoke(cli, ["--store", str(store.root), "show", "s1", "--json"])
    assert json.loads(shown.stdout)["against"] == store.resolve("shared").id
    assert f"against  {store.resolve('shared').id}" in runner.invoke(cli, ["--store", str(store.root), "show",
                                                                           "s1"]).output
    # Marked before the first chained version lands: builds that know no chains refuse the store
    # (their delete and gc would not keep the links), this one reads both.
    assert json.loads(marker.read_text())["format"] == "deltastore/store/3"
    assert runner.invoke(cli, ["--store", str(store.root), "log", "--json"]).exit_code == 0
    same = runner.invoke(cli, ["--store", str(store.root), "commit", "s1", str(folders[1]), "--base",
                               str(pair.base), "--against", "shared"])
    assert same.exit_code == 1 and "Traceback" not in same.output  # the same content again
    (tmp_path / "p.txt").write_text("a prompt\n")
    measured = runner.invoke(cli, ["--store", str(store.root), "commit", "s1", str(folders[2]), "--base",
                                   str(pair.base), "--against", "shared", "--prompts", str(tmp_path / "p.txt")])
    assert measured.exit_code in (1, 2) and "--against" in measured.output, measured.output


def test_a_link_lost_elsewhere_is_reported_by_fsck_and_refused_by_apply(tmp_path, stances):
    store, pair, folders, _ = stances
    _chain(store, pair, folders, 2)
    # What a build that knew no chains would do: delete the stance without asking who needs it.
    store.catalog.delete_stance("s1")
    report = store.fsck()
    broken = [p for p in report.problems if p.kind == "broken-chain"]
    assert [p.versions for p in broken] == [("s2@1",)] and "not in this store" in broken[0].message
    model = copy.deepcopy(pair.base_module)
    before = module_snapshot(model)
    with pytest.raises(ChainError, match="not in this store"):
        store.apply(model, "s2")
    assert module_snapshot(model) == before
