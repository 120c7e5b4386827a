"""Commits that would mislead: identical weights again, and a model that is not a fine-tune of the base."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore import Store
from deltastore.engine.commit import NOT_A_FINE_TUNE, median_rel_change
from deltastore.core.errors import IdenticalVersion, NotAFineTune

from helpers import make_model, run_cli, store_snapshot, write_folder


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def other_model(pair, tmp_path):
    """A model of the base's shapes that is no fine-tune of it: a fresh random init."""
    gen = torch.Generator().manual_seed(7)
    state = {n: torch.randn(t.shape, generator=gen).to(t.dtype) * t.float().std().clamp_min(0.02).to(t.dtype)
             for n, t in pair.base_state.items()}
    return write_folder(tmp_path / "other", state)


def test_identical_recommit_is_refused_without_allow_empty(store, tmp_path):
    pair = make_model(tmp_path)
    first = store.commit("s", pair.ft, base=pair.base)
    before = store_snapshot(store.root)
    with pytest.raises(IdenticalVersion, match=r"identical to s@1.*--allow-empty"):
        store.commit("s", pair.ft, base=pair.base, message="again")
    assert store_snapshot(store.root) == before
    again = store.commit("s", pair.ft, base=pair.base, allow_empty=True)
    assert again.version.number == 2 and again.bytes_new == 0
    assert again.version.parent == first.version.id


def test_same_weights_in_another_encoding_is_a_new_version(store, tmp_path):
    pair = make_model(tmp_path)
    store.commit("s", pair.ft, base=pair.base)
    assert store.commit("s", pair.ft, base=pair.base, encoding="int8").version.number == 2


def test_cli_identical_recommit_one_line_exit_1(store, tmp_path):
    pair = make_model(tmp_path)
    assert run_cli(store, "commit", "s", pair.ft, "--base", pair.base).exit_code == 0
    result = run_cli(store, "commit", "s", pair.ft, "--base", pair.base)
    assert result.exit_code == 1
    assert "identical to s@1" in result.output and "Traceback" not in result.output
    assert run_cli(store, "commit", "s", pair.ft, "--base", pair.base, "--allow-empty").exit_code == 0
    assert [v.number for v in store.log("s")] == [2, 1]


def test_not_a_fine_tune_is_refused_naming_the_figure(store, tmp_path):
    pair = make_model(tmp_path)
    other = other_model(pair, tmp_path)
    store.add_base(pair.base)
    before = store_snapshot(store.root)
    with pytest.raises(NotAFineTune) as info:
        store.commit("s", other, base=pair.base)
    assert info.value.median > NOT_A_FINE_TUNE
    assert "--force" in str(info.value) and f"{info.value.median:.3g}" in str(info.value)
    assert store_snapshot(store.root) == before
    forced = store.commit("s", other, base=pair.base, force=True)
    assert forced.median_rel_change > NOT_A_FINE_TUNE


def test_cli_commit_json_always_shows_the_median(store, tmp_path):
    pair = make_model(tmp_path)
    result = run_cli(store, "commit", "s", pair.ft, "--base", pair.base, "--json")
    assert result.exit_code == 0, result.output
    median = json.loads(result.output)["median_rel_change"]
    assert 0 < median < 0.05
    other = other_model(pair, tmp_path)
    refused = run_cli(store, "commit", "t", other, "--base", pair.base)
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    forced = run_cli(store, "commit", "t", other, "--base", pair.base, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.output)["median_rel_change"] > NOT_A_FINE_TUNE


def test_median_counts_unchanged_tensors_and_skips_unknown():
    assert median_rel_change([0.0, 0.0, 2.0]) == 0.0
    assert median_rel_change([None, 1.0, 3.0]) == 2.0
    assert median_rel_change([None]) is None


def test_base_may_be_left_out_when_the_store_holds_one(store, tmp_path):
    pair = make_model(tmp_path)
    none = run_cli(store, "commit", "s", pair.ft)
    assert none.exit_code == 2 and "--base is needed" in none.output and "no base yet" in none.output
    store.add_base(pair.base, name="tiny")
    result = run_cli(store, "commit", "s", pair.ft, "--json")
    assert result.exit_code == 0, result.output
    assert store.resolve("s@1").base_id == store.bases()[0].id
    other = make_model(tmp_path, name="other", seed=5)
    store.add_base(other.base, name="other")
    two = run_cli(store, "commit", "t", other.ft)
    assert two.exit_code == 2 and "2 bases (" in two.output and "tiny" in two.output


def test_encoding_names_in_any_case_and_listed_in_help(store, tmp_path):
    pair = make_model(tmp_path)
    result = run_cli(store, "commit", "s", pair.ft, "--base", pair.base, "--encoding", "INT4", "--json")
    assert result.exit_code == 0, result.output
    assert store.resolve("s@1").encoding == "int4"
    shown = run_cli(store, "commit", "--help").output
    for name in ("lossless", "int8", "int4", "nf4", "fp4", "1bit", "lowrank:R", "auto"):
        assert name in shown


def test_a_typo_in_a_stance_name_asks_for_new_stance(store, tmp_path):
    from deltastore.core.errors import StanceNameClose

    pair = make_model(tmp_path)
    store.commit("curious-uncertainty", pair.ft, base=pair.base)
    other = variant_of(pair, tmp_path)
    # A series named on purpose commits as before.
    store.commit("curious-uncertainty-2", other, base=pair.base)
    before = store_snapshot(store.root)
    with pytest.raises(StanceNameClose, match="'curious-uncertainty'.*--new-stance"):
        store.commit("curious-uncertanity", other, base=pair.base)
    assert store_snapshot(store.root) == before
    result = run_cli(store, "commit", "curious-uncertanity", other, "--base", pair.base)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "delete" not in result.output
    assert run_cli(store, "commit", "curious-uncertanity", other, "--base", pair.base, "--new-stance").exit_code == 0
    store.commit("curious-uncertainty", other, base=pair.base)  # a stance that exists
    assert [r["name"] for r in store.stances()] == ["curious-uncertainty", "curious-uncertainty-2",
                                                    "curious-uncertanity"]


def variant_of(pair, tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {n: t + 1e-3 * torch.randn(t.shape, generator=gen).to(t.dtype) for n, t in pair.ft_state.items()}
    return write_folder(tmp_path / "variant", state)
