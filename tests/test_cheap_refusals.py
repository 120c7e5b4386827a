"""Every cheap refusal comes before any expensive work (issue 34): a model of another shape is
refused by its header alone, before any tensor is hashed, by apply, base add and commit."""

from __future__ import annotations

import pytest

from deltastore import Store
import deltastore.core.hashing as hashing

from helpers import make_model, run_cli, store_snapshot, weight_bytes


@pytest.fixture
def world(tmp_path):
    pair = make_model(tmp_path, name="a")
    other = make_model(tmp_path, name="o", hidden=24, seed=5)
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add_base(pair.base, name="b")
        store.commit("s", pair.ft, base="b")
    return root, pair, other


@pytest.fixture
def hashed(monkeypatch):
    """How many tensors were hashed: every tensor id starts with the id's header."""
    count = []
    real = hashing.id_header

    def counted(dtype, shape):
        count.append(dtype)
        return real(dtype, shape)
    monkeypatch.setattr(hashing, "id_header", counted)
    return count


def _refused(result, *said: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    for words in said:
        assert words in lines[0], lines[0]


def test_apply_onto_a_model_of_other_shapes_hashes_nothing(world, hashed) -> None:
    root, _, other = world
    before, snapshot = weight_bytes(other.base), store_snapshot(root)
    _refused(run_cli(root, "apply", "s", other.base), "is not s@1's base b", "differ in name, dtype or shape",
             "nothing was changed")
    assert hashed == []
    assert weight_bytes(other.base) == before and store_snapshot(root) == snapshot


def test_base_add_under_a_name_another_base_holds_hashes_nothing(world, hashed) -> None:
    root, _, other = world
    snapshot = store_snapshot(root)
    _refused(run_cli(root, "base", "add", other.base, "--name", "b"), "base name 'b' already names base")
    assert hashed == []
    assert store_snapshot(root) == snapshot


def test_commit_onto_a_base_of_other_shapes_hashes_nothing(world, hashed) -> None:
    root, _, other = world
    snapshot = store_snapshot(root)
    _refused(run_cli(root, "commit", "u", other.ft, "--base", "b"), "was not made from base b")
    assert hashed == []
    assert store_snapshot(root) == snapshot
