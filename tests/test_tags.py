"""Tags behave like git's: one that names a version already moves only with --force (or
`commit --move-tag`), the refusal naming where it points and coming before any work."""

from __future__ import annotations

import pytest

from deltastore import Store
from deltastore.core.errors import TagExists

from helpers import make_model, run_cli, run_json, store_snapshot


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


@pytest.fixture
def pair(tmp_path):
    return make_model(tmp_path)


def test_tag_on_another_version_is_refused_without_force(store, pair) -> None:
    v1 = store.commit("curious", pair.ft, base=pair.base, tag="paper").version
    v2 = store.commit("curious", pair.ft, base=pair.base, allow_empty=True).version
    before = store_snapshot(store.root)
    refs_before = (store.root / "refs.log").read_bytes()

    result = run_cli(store, "tag", "curious@2", "paper")
    assert result.exit_code != 0
    line = result.output.strip()
    assert line == f"Error: tag curious@paper already names curious@1 b3:{v1.short_id}; pass --force to move it"
    with pytest.raises(TagExists):
        store.tag("curious@2", "paper")
    assert store_snapshot(store.root) == before and (store.root / "refs.log").read_bytes() == refs_before

    assert run_json(store, "tag", "curious@1", "paper")["id"] == v1.id  # where it is already: fine
    assert run_json(store, "tag", "curious@2", "paper", "--force")["id"] == v2.id
    assert store.resolve("curious@paper").id == v2.id


def test_commit_with_a_taken_tag_is_refused_before_any_work(store, pair) -> None:
    v1 = store.commit("curious", pair.ft, base=pair.base, tag="paper").version
    before = store_snapshot(store.root)

    result = run_cli(store, "commit", "curious", pair.ft, "--allow-empty", "--tag", "paper")
    assert result.exit_code != 0
    assert f"tag curious@paper already names curious@1 b3:{v1.short_id}; pass --move-tag" in result.output
    assert store_snapshot(store.root) == before  # no object written, no version

    # a model path that does not exist: the tag refusal comes first, without opening it
    with pytest.raises(TagExists):
        store.commit("curious", pair.ft.parent / "missing", base=pair.base, tag="paper")

    moved = run_json(store, "commit", "curious", pair.ft, "--allow-empty", "--tag", "paper", "--move-tag")
    assert store.resolve("curious@paper").id == moved["id"] != v1.id
