"""`base remove NAME`: refused while versions use the base, naming them; otherwise its ref
record goes, gc reclaims its two objects, and the rebuilt catalog agrees."""

from __future__ import annotations


import pytest

from deltastore import Store
from deltastore.core.errors import BaseInUse

from helpers import make_model, run_cli, run_json, store_snapshot, views


@pytest.fixture
def two_bases(tmp_path):
    """Base `a` with two versions of stance s, and base `b` that no version uses."""
    a, b = make_model(tmp_path, name="a"), make_model(tmp_path, name="b", seed=7)
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(a.base, name="a")
        base_b = store.add_base(b.base, name="b")
        store.commit("s", a.ft, base="a")
        store.commit("s", a.ft, base="a", encoding="int8")
    return root, base_b, b


def test_a_base_in_use_is_refused_naming_its_versions_and_nothing_changes(two_bases):
    root, _, _ = two_bases
    before = store_snapshot(root), (root / "refs.log").read_bytes()
    refused = run_cli(root, "base", "remove", "a")
    assert refused.exit_code == 1
    assert refused.output == "Error: base 'a' is the base of 2 versions (s@1, s@2); it can be removed once no " \
                             "version uses it\n"
    with Store.open(root) as store, pytest.raises(BaseInUse):
        store.remove_base("a")
    assert (store_snapshot(root), (root / "refs.log").read_bytes()) == before


def test_removing_an_unused_base_lets_gc_reclaim_it_and_the_rebuild_agrees(two_bases):
    root, base_b, pair_b = two_bases
    out = run_json(root, "base", "remove", "b")
    assert (out["id"], out["name"]) == (base_b.id, "b")
    assert [b["name"] for b in run_json(root, "base", "list")] == ["a"]
    commands = [("base", "list"), ("log",), ("stats",), ("show", "s@2")]
    live_rows, _ = store_snapshot(root)
    live = views(root, commands)

    # The rebuild, before and after gc removed the base's objects, gives back the same catalog.
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert store_snapshot(root)[0] == live_rows and views(root, commands) == live
    with Store.open(root) as store:
        base_record = store.catalog.query("SELECT 1 FROM bases")  # only a's row is left
        assert len(base_record) == 1
    freed = run_json(root, "gc")
    assert base_b.id in freed["objects"] and len(freed["objects"]) == 2  # its tensor list and its record
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert views(root, commands) == live
    assert run_json(root, "fsck")["ok"]

    # Registered again, it is a base like any other; the log now holds base, unbase, base.
    with Store.open(root) as store:
        assert store.add_base(pair_b.base, name="b").id == base_b.id
        store.commit("t", pair_b.ft, base="b")
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert [b["name"] for b in run_json(root, "base", "list")] == ["a", "b"]
    assert run_json(root, "fsck")["ok"]


def test_a_base_whose_versions_are_gone_can_be_removed(two_bases):
    root, _, _ = two_bases
    assert run_cli(root, "stance", "delete", "s").exit_code == 0
    result = run_cli(root, "base", "remove", "a")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed base a (b3:")
    assert [b["name"] for b in run_json(root, "base", "list")] == ["b"]
    assert run_cli(root, "fsck", "--rebuild-catalog").exit_code == 0
    assert [b["name"] for b in run_json(root, "base", "list")] == ["b"]
