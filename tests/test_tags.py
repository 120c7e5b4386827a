"""Tags behave like git's: one that names a version already moves only with --force (or
`commit --move-tag`), the refusal naming where it points and coming before any work."""

from __future__ import annotations

import pytest

from deltastore import Store
from deltastore.core.errors import TagExists
from deltastore.core.hashing import canonical_json

from deltastore.sharing.remote import Remote, clone, push

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


# -- tags on a remote (FORMAT.md §10: tags/<stance>/<tag>.json) ----------------------------------


def test_push_and_clone_carry_tags_and_a_pull_never_moves_one(store, pair, tmp_path) -> None:
    url = (tmp_path / "remote").as_uri()
    v1 = store.commit("curious", pair.ft, base=pair.base, tag="paper").version
    v2 = store.commit("curious", pair.ft, base=pair.base, allow_empty=True, tag="latest").version

    pushed = run_json(store, "push", "curious@1", "curious@2", "--remote", url)
    assert sorted(pushed["tags"]) == ["curious@latest", "curious@paper"] and pushed["tags_not_moved"] == []
    assert sorted(t.ref for t in Remote(url).tags()) == ["curious@latest", "curious@paper"]

    b, result = clone(url, tmp_path / "b")
    with b:
        assert sorted(result.tags) == ["curious@latest", "curious@paper"]
        assert b.resolve("curious@paper").id == v1.id and b.resolve("curious@latest").id == v2.id

        # Here the tag moves (asked for); the remote keeps its own, and a push says so in one line.
        store.tag("curious@1", "latest", force=True)
        again = push(store, ["curious@1"], url)
        assert again.tags == () and again.tags_not_moved == (
            f"tag curious@latest not pushed: the remote's names {v2.id[:15]}, not curious@1 {v1.id[:15]}",)
        assert {t.ref: t.id for t in Remote(url).tags()}["curious@latest"] == v2.id

        # A pull into b, whose tag names another version: not moved, one line, the pull stands.
        b.tag("curious@2", "paper", force=True)
        v3 = store.commit("curious", pair.ft, base=pair.base, allow_empty=True, tag="third").version
        push(store, ["curious@3"], url)
        out = run_cli(b.root, "pull", "--remote", url)
        assert out.exit_code == 0, out.output
        assert (f"tag curious@paper not moved: it names curious@2 b3:{v2.short_id} here, the remote's "
                f"curious@paper names curious@1") in out.output
        assert b.resolve("curious@paper").id == v2.id  # not moved
        assert b.resolve("curious@third").id == v3.id  # the pull went on, with the new tag


@pytest.mark.parametrize("path, record", [
    ("tags/curious/12.json", {"id": None, "stance": "curious", "name": "12"}),  # digits: not a tag name
    ("tags/curious/paper.json", {"id": None, "stance": "curious", "name": "other"}),  # not its path's
    ("tags/curious/paper.json", {"id": "b3:00", "stance": "curious", "name": "paper"}),  # not an id
])
def test_a_bad_tag_on_the_remote_is_refused_and_the_pull_stores_nothing(store, pair, tmp_path, path,
                                                                         record) -> None:
    url = (tmp_path / "remote").as_uri()
    v1 = store.commit("curious", pair.ft, base=pair.base).version
    push(store, ["curious@1"], url)
    record["id"] = record["id"] or v1.id
    (tmp_path / "remote" / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "remote" / path).write_bytes(canonical_json(record))
    with Store.init(tmp_path / "b-store") as b:
        before = (*store_snapshot(b.root), (b.root / "refs.log").read_bytes())
        out = run_cli(b.root, "pull", "--remote", url)
        assert out.exit_code == 1 and path.split("/")[0] in out.output and "tag" in out.output
        assert (*store_snapshot(b.root), (b.root / "refs.log").read_bytes()) == before


def test_import_lora_with_a_taken_tag_is_refused_unless_move_tag(store, pair, tmp_path) -> None:
    from deltastore.exports.lora import export_lora

    v1 = store.commit("curious", pair.ft, base=pair.base, tag="paper").version
    adapter = tmp_path / "adapter"
    export_lora(store, "curious", adapter, rank=2)
    before = store_snapshot(store.root)
    refused = run_cli(store, "import-lora", "curious", adapter, "--base-path", pair.base, "--tag", "paper")
    assert refused.exit_code == 1 and f"already names curious@1 b3:{v1.short_id}; pass --move-tag" in refused.output
    assert store_snapshot(store.root) == before
    moved = run_json(store, "import-lora", "curious", adapter, "--base-path", pair.base, "--tag", "paper",
                     "--move-tag")
    assert store.resolve("curious@paper").id == moved["id"] != v1.id
