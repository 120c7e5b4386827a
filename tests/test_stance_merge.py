"""`stance merge OLD INTO`: the way out of a typo'd stance name. OLD's versions move into INTO,
numbered after INTO's newest, keeping ids, parents and tags; one ref record, so all or
nothing; the rebuilt catalog says what the live one says."""

from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from deltastore import RefNotFound, Store
from deltastore.core.errors import OptionConflict, StanceExists, TagsClash
from deltastore.core.hashing import manifest_id

from helpers import load_folder, make_model, run_cli, run_json, store_snapshot, views, write_folder


def variant(pair, tmp_path, seed: int):
    gen = torch.Generator().manual_seed(seed)
    state = {n: t.clone() for n, t in pair.base_state.items()}
    state["head.weight"] = state["head.weight"] + 0.01 * torch.randn(state["head.weight"].shape, generator=gen)
    return write_folder(tmp_path / f"variant-{seed}", state)


@pytest.fixture
def typo(tmp_path):
    """The issue's trap: 3 versions of curious-uncertainty, then 2 committed to a typo of it,
    the first of them tagged."""
    pair = make_model(tmp_path)
    root = tmp_path / "store"
    with Store.init(root) as store:
        for seed in (1, 2, 3):
            store.commit("curious-uncertainty", variant(pair, tmp_path, seed), base=pair.base,
                         tag="best" if seed == 2 else None)
        store.commit("curious-uncertanity", variant(pair, tmp_path, 4), base=pair.base, tag="mine", new_stance=True)
        store.commit("curious-uncertanity", variant(pair, tmp_path, 5), base=pair.base)
    return root, pair


def test_merge_moves_versions_after_the_existing_ones_keeping_ids_and_tags(typo, tmp_path):
    root, pair = typo
    with Store.open(root) as store:
        moved = [store.resolve(f"curious-uncertanity@{n}") for n in (1, 2)]
        exported = load_folder(store.export("curious-uncertanity@1", tmp_path / "before"))

    out = run_json(root, "stance", "merge", "curious-uncertanity", "curious-uncertainty")
    assert out == {"old": "curious-uncertanity", "into": "curious-uncertainty",
                   "versions": [v.id for v in moved], "numbers": [4, 5]}

    with Store.open(root) as store:
        assert [v.ref for v in store.log("curious-uncertainty")] == [f"curious-uncertainty@{n}" for n in (5, 4, 3, 2, 1)]
        for v, n in zip(moved, (4, 5)):
            now = store.resolve(f"curious-uncertainty@{n}")
            assert (now.id, now.parent, now.stance, now.number) == (v.id, v.parent, "curious-uncertainty", n)
            # The manifest, and so the id, keeps the name and number it was committed under.
            assert manifest_id(now.manifest()) == now.id and now.committed_as == "curious-uncertanity"
            assert store.resolve(v.id[:12]).ref == f"curious-uncertainty@{n}"
        assert store.resolve("curious-uncertainty@mine").id == moved[0].id
        assert store.resolve("curious-uncertainty@best").number == 2
        with pytest.raises(RefNotFound):
            store.resolve("curious-uncertanity")
        assert [s["name"] for s in store.stances()] == ["curious-uncertainty"]
        after = load_folder(store.export("curious-uncertainty@4", tmp_path / "after"))
        assert after.keys() == exported.keys() and all(torch.equal(after[k], exported[k]) for k in after)
        # The next commit numbers on from the merged ones, with the newest as its parent.
        v6 = store.commit("curious-uncertainty", variant(pair, tmp_path, 6), base=pair.base).version
        assert (v6.number, v6.parent) == (6, moved[1].id)
        assert store.fsck().ok
        assert store.gc_plan().objects == ()  # every moved version's objects are still reached


def test_the_rebuilt_catalog_equals_the_live_one_after_a_merge(typo):
    root, _ = typo
    run_json(root, "stance", "merge", "curious-uncertanity", "curious-uncertainty")
    commands = [("log",), ("stances",), ("stats",), *[("show", f"curious-uncertainty@{n}") for n in range(1, 6)]]
    live_rows, _ = store_snapshot(root)
    live = views(root, commands)

    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    rows, _ = store_snapshot(root)
    assert rows == live_rows
    assert views(root, commands) == live
    assert run_json(root, "fsck")["ok"]


def test_a_refused_merge_changes_nothing(typo):
    root, _ = typo
    with Store.open(root) as store:
        store.tag("curious-uncertainty@1", "mine")  # a tag of the same name in both
    before = store_snapshot(root), (root / "refs.log").read_bytes()

    clash = run_cli(root, "stance", "merge", "curious-uncertanity", "curious-uncertainty")
    assert clash.exit_code == 1 and "both have a tag named 'mine'" in clash.output
    assert len(clash.output.strip().splitlines()) == 1
    missing = run_cli(root, "stance", "merge", "curious-uncertanity", "curious")
    assert missing.exit_code == 1 and "no version matches 'curious'" in missing.output
    with Store.open(root) as store:
        with pytest.raises(OptionConflict):
            store.merge_stance("curious-uncertainty", "curious-uncertainty")
        with pytest.raises(TagsClash):
            store.merge_stance("curious-uncertanity", "curious-uncertainty")
    assert (store_snapshot(root), (root / "refs.log").read_bytes()) == before


def test_renaming_onto_an_existing_stance_offers_merge_never_delete(typo):
    root, _ = typo
    result = run_cli(root, "stance", "rename", "curious-uncertanity", "curious-uncertainty")
    assert result.exit_code == 1
    assert "`deltastore stance merge curious-uncertanity curious-uncertainty` moves the versions" in result.output
    assert "delete" not in result.output
    with Store.open(root) as store, pytest.raises(StanceExists):
        store.rename_stance("curious-uncertanity", "curious-uncertainty")


def test_merge_for_people(typo):
    root, _ = typo
    result = run_cli(root, "stance", "merge", "curious-uncertanity", "curious-uncertainty")
    assert result.exit_code == 0, result.output
    assert result.output == ("merged curious-uncertanity into curious-uncertainty: 2 versions, now "
                             "curious-uncertainty@4 to curious-uncertainty@5\n")


def test_a_merged_stance_goes_through_a_remote_as_it_is_here(typo, tmp_path):
    """Its versions keep manifests naming the stance and numbers they were committed under;
    the remote's refs say where they live now, and a clone lands them there."""
    root, _ = typo
    run_json(root, "stance", "merge", "curious-uncertanity", "curious-uncertainty")
    url = (tmp_path / "remote").as_uri()
    pushed = run_json(root, "push", "curious-uncertainty@1", "curious-uncertainty@2", "curious-uncertainty@3",
                      "curious-uncertainty@4", "curious-uncertainty@5", "--remote", url)
    assert [v["ref"] for v in pushed["pushed"]] == [f"curious-uncertainty@{n}" for n in range(1, 6)]
    cloned = CliRunner().invoke(cli, ["clone", url, str(tmp_path / "clone"), "--json"])
    assert cloned.exit_code == 0, cloned.output
    clone = tmp_path / "clone" / ".deltastore"
    def untagged(versions):  # a remote holds versions, not tags
        return [{**v, "tags": []} for v in versions]

    assert untagged(run_json(clone, "log")) == untagged(run_json(root, "log"))
    for n in (4, 5):
        here, there = (run_json(r, "show", f"curious-uncertainty@{n}") for r in (root, clone))
        assert {**there, "tags": []} == {**here, "tags": []}
    assert run_json(clone, "fsck")["ok"]
