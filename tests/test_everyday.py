"""Everyday use (issue 34): a measured commit refuses before it measures, the typo guard reaches
a letter left out, doubled or swapped anywhere in a name, base mismatches in short ids worded
for the command, a clone's base without weights, and what `base add` prints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import Store  # noqa: E402
from deltastore.core.errors import (BaseMismatch, BaseNotFound, IdenticalVersion, StanceNameClose,  # noqa: E402
                               UnsafeInput)
from deltastore.analysis.committing import commit  # noqa: E402
from helpers import make_model, store_snapshot, write_folder  # noqa: E402
from tiny_lm import adam_like, pair, prompts_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    base, ft = pair(tmp, adam_like(0.02))
    return base, ft, prompts_file(tmp)


# -- item 2: every cheap refusal of a measured commit comes before the measuring ---------------

def test_a_measured_commit_refuses_before_it_measures(tmp_path, lm):
    base, ft, prompts = lm
    here = tmp_path / "prompts.txt"
    shutil.copy(prompts, here)
    with Store.init(tmp_path / "store") as store:
        store.add_base(base, name="lm")
        first = commit(store, "curious-uncertainty", ft, base="lm", encoding="auto", max_kl=5.0, prompts=here)
        store.tag("curious-uncertainty", "paper")
        before = store_snapshot(store.root)
        # Measuring starts by reading the prompts: with the file gone, any measuring fails on it.
        # So each refusal below is made before anything is measured.
        here.unlink()
        auto = dict(encoding="auto", max_kl=5.0, prompts=here)
        with pytest.raises(IdenticalVersion, match="identical to curious-uncertainty@1"):
            commit(store, "curious-uncertainty", ft, base="lm", **auto)
        with pytest.raises(IdenticalVersion):  # a fixed encoding, the one @1 was stored in
            commit(store, "curious-uncertainty", ft, base="lm", encoding=first.choice.encoding, prompts=here)
        with pytest.raises(StanceNameClose, match="curious-uncertainty"):
            commit(store, "curious-uncertainy", ft, base="lm", **auto)
        with pytest.raises(BaseNotFound):
            commit(store, "curious-uncertainty", ft, base="nope", **auto)
        other_shape, _ = pair(tmp_path / "wide", adam_like(0.02), hidden=48)
        with pytest.raises(BaseMismatch, match="other shapes"):
            commit(store, "curious-uncertainty", other_shape, base="lm", **auto)
        with pytest.raises(UnsafeInput, match="tag"):
            commit(store, "curious-uncertainty", ft, base="lm", tag="12", **auto)
        assert store_snapshot(store.root) == before
        # Another bound may choose another encoding: that one is measured (and here, the
        # prompts being gone, fails on them).
        with pytest.raises(Exception, match="prompts.txt"):
            commit(store, "curious-uncertainty", ft, base="lm", encoding="auto", max_kl=0.0, prompts=here)
        assert store_snapshot(store.root) == before


def test_the_cli_says_identical_at_once(tmp_path, lm):
    base, ft, prompts = lm
    root = tmp_path / "store"
    runner = CliRunner()
    runner.invoke(cli, ["init", str(root)])
    args = ["--store", str(root), "commit", "s", str(ft), "--base", str(base), "--encoding", "auto",
            "--max-kl", "5", "--prompts", str(prompts)]
    assert runner.invoke(cli, args).exit_code == 0
    before = store_snapshot(root)
    (base / "tokenizer.json").rename(base / "tokenizer.json.away")  # measuring would refuse: no tokenizer
    try:
        again = runner.invoke(cli, args)
    finally:
        (base / "tokenizer.json.away").rename(base / "tokenizer.json")
    assert again.exit_code == 1 and "identical to s@1" in again.output, again.output
    assert len(again.output.strip().splitlines()) == 1
    assert store_snapshot(root) == before


# -- item 5: the typo guard ------------------------------------------------------------------

def variant(pair_, tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {n: t + 1e-3 * torch.randn(t.shape, generator=gen).to(t.dtype) for n, t in pair_.ft_state.items()}
    return write_folder(tmp_path / f"variant{seed}", state)


def test_a_letter_left_out_doubled_or_swapped_anywhere_is_a_typo(tmp_path):
    p = make_model(tmp_path)
    with Store.init(tmp_path / "store") as store:
        store.commit("curious-uncertainty", p.ft, base=p.base)
        store.commit("run-a", variant(p, tmp_path, 1), base=p.base, new_stance=True)
        store.commit("model-v1", variant(p, tmp_path, 2), base=p.base)
        other = variant(p, tmp_path, 3)
        before = store_snapshot(store.root)
        for typo in ("curious-uncertainy", "curious-uncertaintyy", "curious-uncertainyt", "curous-uncertainty",
                     "curious--uncertainty", "run-aa", "mdoel-v1"):
            with pytest.raises(StanceNameClose):
                store.commit(typo, other, base=p.base)
        assert store_snapshot(store.root) == before
        # A series made on purpose: its own suffix after a separator or a digit.
        for series in ("curious-uncertainty-2", "run-b", "model-v2", "model-v12"):
            store.commit(series, other, base=p.base)
        assert len(store.stances()) == 7
        # A lookup still suggests what was meant, series or not.
        assert store.close_refs("run-c")[:2] == ["run-a", "run-b"]


# -- item 9: what base add prints -----------------------------------------------------------

def test_base_add_prints_the_short_id_tensors_and_size(tmp_path):
    p = make_model(tmp_path)
    root = tmp_path / "store"
    runner = CliRunner()
    runner.invoke(cli, ["init", str(root)])
    added = runner.invoke(cli, ["--store", str(root), "base", "add", str(p.base), "--name", "tiny"])
    assert added.exit_code == 0, added.output
    with Store.open(root) as store:
        b = store.base("tiny")
    nbytes = sum(t.numel() * t.element_size() for t in p.base_state.values())
    assert b.bytes == nbytes
    assert added.output.splitlines() == [f"base tiny {b.id[:15]}: {len(p.base_state)} tensors, {nbytes / 1e3:.1f} kB",
                                         f"id {b.id}"]
    # --json: every field it had, and the short id.
    shown = json.loads(runner.invoke(cli, ["--store", str(root), "base", "add", str(p.base), "--json"]).stdout)
    assert shown["id"] == b.id and shown["short_id"] == b.id[3:15]
    assert shown["tensor_count"] == len(p.base_state) and shown["bytes"] == nbytes and shown["name"] == "tiny"


# -- item 7: a clone's base has no weights ---------------------------------------------------

def test_export_in_a_clone_says_the_store_has_no_weights_and_offers_base_add(tmp_path):
    from deltastore.sharing.remote import clone, push

    p = make_model(tmp_path)
    with Store.init(tmp_path / "a") as a:
        a.add_base(p.base, name="tiny")
        a.commit("s", p.ft, base="tiny")
        push(a, ["s@1"], f"file://{tmp_path / 'team'}")
    b, _ = clone(f"file://{tmp_path / 'team'}", tmp_path / "b")
    b.close()
    root = tmp_path / "b" / ".deltastore"
    runner = CliRunner()
    before = store_snapshot(root)
    failed = runner.invoke(cli, ["--store", str(root), "export", "s", "--out", str(tmp_path / "out")])
    assert failed.exit_code == 1
    line = failed.output.strip()
    assert len(line.splitlines()) == 1 and "(unknown)" not in line and "Traceback" not in line
    assert "the store holds no weights for base tiny b3:" in line
    assert line.index("base add PATH") < line.index("--base-path")
    assert store_snapshot(root) == before and not (tmp_path / "out").exists()
    # base add, as offered, fixes it for good.
    assert runner.invoke(cli, ["--store", str(root), "base", "add", str(p.base)]).exit_code == 0
    done = runner.invoke(cli, ["--store", str(root), "export", "s", "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output


# -- item 6: base mismatches in short ids, worded for the command ----------------------------

def test_a_commit_on_the_wrong_base_names_the_base_it_fits_in_short_ids(tmp_path):
    import re

    p = make_model(tmp_path)
    wide = make_model(tmp_path, hidden=24, name="wide")
    with Store.init(tmp_path / "store") as store:
        tiny = store.add_base(p.base, name="tiny")
        before = store_snapshot(store.root)
        with pytest.raises(BaseMismatch) as e:
            store.commit("s", wide.ft, base="tiny")
        line = str(e.value)
        assert line.startswith(f"this fine-tune was not made from base tiny {tiny.id[:15]}: most tensors have "
                               "other shapes")
        assert "no registered base fits it" in line and not re.search("[0-9a-f]{64}", line)
        # The whole expected id stays on the error; the model's is not computed: its shapes alone
        # refused it, before any tensor was hashed (test_cheap_refusals.py).
        assert e.value.expected == tiny.id and e.value.actual is None
        assert store_snapshot(store.root) == before
        other = store.add_base(wide.base, name="wide")
        before = store_snapshot(store.root)
        result = CliRunner().invoke(cli, ["--store", str(store.root), "commit", "s", str(wide.ft), "--base", "tiny"])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
        assert f"it fits base wide {other.id[:15]}: commit it with --base wide" in result.output
        assert not re.search("[0-9a-f]{64}", result.output)
        assert store_snapshot(store.root) == before
        # Weights that must be one base and are another: short ids too, nothing registered.
        with pytest.raises(BaseMismatch) as e:
            Store.init(tmp_path / "other").add_base(p.base, expected_id=other.id)
        assert f"hold base {tiny.id[:15]}, not the expected base {other.id[:15]}" in str(e.value)
        assert not re.search("[0-9a-f]{64}", str(e.value))
