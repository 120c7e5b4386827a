"""Versions as history: refs, tags, renaming and deleting stances, log, diff, metadata."""

from __future__ import annotations


import blake3
import pytest
import sqlite_utils
import torch

from deltastore import AmbiguousRef, RefNotFound, Store
from deltastore.core.errors import MetadataError, StanceExists, TagNotFound, UnsafeInput, VersionConflict
from deltastore.core.hashing import canonical_json, manifest_id

from helpers import assert_same_state, load_folder, make_model, run_cli, run_json, write_folder


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


def variant(pair, tmp_path, seed: int, names: list[str], *, scale: float = 0.01):
    """A folder of the base with `names` moved by seeded noise: one fine-tune of many."""
    gen = torch.Generator().manual_seed(seed)
    state = {n: t.clone() for n, t in pair.base_state.items()}
    for n in names:
        state[n] = state[n] + scale * torch.randn(state[n].shape, generator=gen).to(state[n].dtype)
    return write_folder(tmp_path / f"variant-{seed}", state), state


# -- refs --------------------------------------------------------------------------------------


def test_refs_resolve_as_specified(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    v1 = store.commit("curious", variant(pair, tmp_path, 1, ["head.weight"])[0], base=pair.base).version
    v2 = store.commit("curious", variant(pair, tmp_path, 2, ["head.weight"])[0], base=pair.base, tag="best").version
    v3 = store.commit("curious", pair.ft, base=pair.base).version
    other = store.commit("confident", pair.ft, base=pair.base).version

    assert store.resolve("curious").id == v3.id
    assert [store.resolve(f"curious@{n}").id for n in (1, 2, 3)] == [v1.id, v2.id, v3.id]
    assert store.resolve("curious@best").id == v2.id
    assert store.resolve("confident").id == other.id
    digits = v1.id.removeprefix("b3:")
    for prefix in (digits[:8], digits[:12], digits, v1.id, "b3:" + digits[:8]):
        assert store.resolve(prefix).id == v1.id
    assert (v2.number, v2.parent, v3.parent, other.parent) == (2, v1.id, v2.id, None)

    with pytest.raises(RefNotFound):
        store.resolve(digits[:7])  # a prefix needs 8 hex digits
    with pytest.raises(RefNotFound):
        store.resolve("curious@4")
    with pytest.raises(RefNotFound):
        store.resolve("curious@worst")
    with pytest.raises(RefNotFound) as err:
        store.resolve("curiuos")
    assert "curious" in err.value.candidates and "did you mean" in str(err.value)


def test_a_pull_of_many_versions_still_finds_two_that_claim_one_number(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    first = store.commit("s", pair.ft, base=pair.base).version.manifest()
    chain, parent = [], manifest_id(first)
    for n in range(2, 302):  # versions 2..301 of s, made elsewhere, sharing version 1's objects
        m = {**first, "number": n, "parent": parent, "message": f"checkpoint {n}"}
        parent = manifest_id(m)
        chain.append(m)
    payload = lambda oid, size: store.objects.get(oid, raw_size=size)  # noqa: E731
    rival = {**chain[150], "message": "another history"}  # s@152 again, another version
    for landing in (chain + [rival], [rival] + chain):
        with pytest.raises(VersionConflict) as err:
            store.ingest(landing, payload)
        assert (err.value.stance, err.value.number) == ("s", 152) and "in what is being stored" in str(err.value)
        assert [v.number for v in store.log("s")] == [1]  # none of them landed
    store.ingest(chain, payload)
    assert store.resolve("s").number == 301
    with pytest.raises(VersionConflict) as err:
        store.ingest([rival], payload)
    assert err.value.existing == manifest_id(chain[150]) and err.value.incoming == manifest_id(rival)
    assert [(v, new) for v, new in store.ingest(chain[:2], payload)] == \
        [(store.resolve("s@2"), False), (store.resolve("s@3"), False)]  # already here: no conflict


def test_an_ambiguous_prefix_is_an_error_listing_the_candidates(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    model, _ = variant(pair, tmp_path, 1, ["blocks.0.attn.bias"])
    template = store.commit("seed", model, base=pair.base).version.manifest()
    twins = twin_manifests(template)
    # Versions made elsewhere, landed under their own ids; their objects are this store's.
    store.ingest(twins, lambda oid, size: store.objects.get(oid, raw_size=size))
    a, b = (manifest_id(m) for m in twins)
    shared = a[3:11]
    assert b[3:11] == shared and a != b

    with pytest.raises(AmbiguousRef) as err:
        store.resolve(shared)
    refs = {f"{m['stance']}@1" for m in twins}
    assert all(any(ref in c for c in err.value.candidates) for ref in refs)
    assert len(err.value.candidates) == 2
    # One digit more than they share tells them apart.
    longer = next(k for k in range(9, 65) if a[3:3 + k] != b[3:3 + k])
    assert store.resolve(a[3:3 + longer]).id == a

    result = run_cli(store, "show", shared)
    assert result.exit_code == 1
    assert all(ref in result.stderr for ref in refs) and "more digits" in result.stderr
    assert store.fsck().ok


def twin_manifests(template: dict) -> list[dict]:
    """Two valid manifests whose ids share their first 8 hex digits (a birthday search over
    the stance name: about 2**16 hashes)."""
    marker = "twin-XXXXXXXX"
    text = canonical_json({**template, "stance": marker, "number": 1, "parent": None, "message": ""})
    head, tail = text.split(marker.encode())
    seen: dict[bytes, str] = {}
    for i in range(1 << 22):
        name = f"twin-{i:08x}"
        digest = blake3.blake3(head + name.encode() + tail).digest()[:4]
        if digest in seen and seen[digest] != name:
            ms = [{**template, "stance": s, "number": 1, "parent": None, "message": ""} for s in (seen[digest], name)]
            assert manifest_id(ms[0])[3:11] == manifest_id(ms[1])[3:11]
            return ms
        seen[digest] = name
    raise AssertionError("no collision found")


# -- tags --------------------------------------------------------------------------------------


def test_tags_name_versions_move_and_are_deleted(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    v1 = store.commit("curious", variant(pair, tmp_path, 1, ["head.weight"])[0], base=pair.base).version
    v2 = store.commit("curious", pair.ft, base=pair.base).version

    tagged = store.tag("curious@1", "paper")
    assert (tagged.version.tags, tagged.tag, tagged.deleted) == (("paper",), "paper", False)
    assert store.resolve("curious@paper").id == v1.id
    out = run_json(store, "tag", "curious", "paper", "--force")  # a tag moves when asked (test_tags.py)
    assert out["id"] == v2.id
    assert store.resolve("curious@paper").id == v2.id and store.resolve("curious@1").tags == ()

    with pytest.raises(UnsafeInput):
        store.tag("curious@1", "12")  # would read as a number
    with pytest.raises(TagNotFound) as err:
        store.untag("curious@nope")
    assert "paper" in str(err.value)

    out = run_json(store, "tag", "--delete", "curious@paper")
    assert (out["id"], out["deleted"]) == (v2.id, True)
    with pytest.raises(RefNotFound):
        store.resolve("curious@paper")
    assert store.resolve("curious@2").id == v2.id  # the version stays

    store.tag(v1.id[3:15], "first")
    assert run_cli(store, "tag", "-d", "curious", "first").exit_code == 0
    store.tag(v1.id[3:15], "again")
    untagged = store.untag("curious", "again")
    assert (untagged.version.id, untagged.tag, untagged.deleted) == (v1.id, "again", True)
    assert untagged.to_json() == {"id": v1.id, "ref": "curious@1", "tag": "again", "deleted": True}
    assert store.catalog.tags() == []
    result = run_cli(store, "tag", "--delete", "curious@first")
    assert result.exit_code == 1 and "has no tag 'first'" in result.stderr


# -- stances renamed and deleted -------------------------------------------------------------


def test_renaming_a_stance_keeps_ids_numbers_tags_and_contents(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    m1, s1 = variant(pair, tmp_path, 1, ["head.weight", "embed.weight"])
    v1 = store.commit("curious", m1, base=pair.base, tag="first").version
    v2 = store.commit("curious", pair.ft, base=pair.base).version

    out = run_json(store, "stance", "rename", "curious", "curious-uncertainty")
    assert out == {"old": "curious", "new": "curious-uncertainty", "versions": 2}
    with pytest.raises(RefNotFound):
        store.resolve("curious")
    moved = store.resolve("curious-uncertainty@first")
    assert (moved.id, moved.number, moved.stance, moved.ref) == (v1.id, 1, "curious-uncertainty", "curious-uncertainty@1")
    assert store.resolve(v2.id[:12]).ref == "curious-uncertainty@2"
    # The manifest is what the id is the hash of: it still names the stance committed to.
    assert manifest_id(moved.manifest()) == moved.id and moved.committed_as == "curious"
    assert_same_state(load_folder(store.export("curious-uncertainty@1", tmp_path / "out")), s1)

    v3 = store.commit("curious-uncertainty", m1, base=pair.base).version
    assert (v3.number, v3.parent) == (3, v2.id)
    again = store.commit("curious", pair.ft, base=pair.base).version  # a new line of versions
    assert (again.number, again.parent) == (1, None)
    with pytest.raises(StanceExists):
        store.rename_stance("curious", "curious-uncertainty")
    with pytest.raises(RefNotFound):
        store.rename_stance("nope", "other")
    with pytest.raises(UnsafeInput):
        store.rename_stance("curious", "../evil")
    assert [v.ref for v in store.log("curious-uncertainty")] == [f"curious-uncertainty@{n}" for n in (3, 2, 1)]
    assert store.fsck().ok


def test_deleting_a_stance_removes_its_versions_and_tags_but_not_its_objects(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.commit("curious", pair.ft, base=pair.base, tag="keep")
    m2, s2 = variant(pair, tmp_path, 2, ["head.weight"])
    store.commit("curious", m2, base=pair.base)
    kept = store.commit("confident", pair.ft, base=pair.base).version  # shares every object of curious@1
    files_before = sorted(store.objects.ids())

    out = run_json(store, "stance", "delete", "curious")
    assert out["numbers"] == [1, 2] and out["orphaned"] == []
    with pytest.raises(RefNotFound):
        store.resolve("curious")
    with pytest.raises(RefNotFound):
        store.resolve(out["versions"][0][:12])
    assert store.catalog.tags() == []
    assert [s["name"] for s in store.stances()] == ["confident"]
    assert sorted(store.objects.ids()) == files_before  # until gc
    assert store.fsck().ok
    assert_same_state(load_folder(store.export(kept.id, tmp_path / "out")), pair.ft_state)
    assert run_cli(store, "stance", "delete", "curious").exit_code == 1


# -- log ---------------------------------------------------------------------------------------


def test_log_lists_versions_newest_first_with_their_facts(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.commit("curious", variant(pair, tmp_path, 1, ["head.weight"])[0], base=pair.base, message="one tensor")
    store.commit("curious", pair.ft, base=pair.base, encoding="int8", message="all of it", tag="v2")
    store.commit("confident", pair.ft, base=pair.base, message="other")

    rows = run_json(store, "log", "curious")
    assert [r["number"] for r in rows] == [2, 1]
    assert [r["message"] for r in rows] == ["all of it", "one tensor"]
    assert [r["encoding"] for r in rows] == ["int8", "lossless"]
    assert rows[1]["tensors"] == 1 and rows[0]["tensors"] == len(pair.changed)
    assert all(r["bytes"] > 0 and r["id"].startswith("b3:") and r["created"] for r in rows)
    assert rows[0]["tags"] == ["v2"] and rows[0]["parent"] == rows[1]["id"]
    assert [r["ref"] for r in run_json(store, "log")] == ["confident@1", "curious@2", "curious@1"]

    text = run_cli(store, "log", "curious").stdout.splitlines()
    assert text[0].split() == ["version", "id", "created", "base", "encoding", "tensors", "bytes", "KL", "top-1",
                               "tags", "message"]
    assert text[1].startswith("curious@2") and rows[0]["id"][3:15] in text[1] and "all of it" in text[1]
    # the base by name where it has one, else by short id; no fidelity recorded: "-" and null
    base_id = rows[0]["base"]
    assert f" {base_id[3:15]} " in text[1] and all(r["base_name"] is None for r in rows)
    assert all(r["kl"] is None and r["top1"] is None for r in rows)


def test_log_names_the_base_where_it_has_a_name(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.add_base(pair.base, name="tiny")
    store.commit("curious", pair.ft, base="tiny")
    row = run_json(store, "log")[0]
    assert row["base_name"] == "tiny" and row["base"].startswith("b3:")
    assert run_cli(store, "log").stdout.splitlines()[1].split()[4] == "tiny"
    assert run_cli(store, "log", "nope").exit_code == 1


# -- diff --------------------------------------------------------------------------------------


def test_diff_reports_added_removed_and_changed_tensors_with_their_relative_change(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    m1, s1 = variant(pair, tmp_path, 1, ["head.weight", "blocks.0.attn.weight"])
    m2, s2 = variant(pair, tmp_path, 2, ["head.weight", "blocks.1.mlp.weight"])
    store.commit("curious", m1, base=pair.base)
    store.commit("curious", m2, base=pair.base)

    d = store.diff("curious@1", "curious@2")
    by_name = {t.name: t for t in d.tensors}
    assert {n: t.status for n, t in by_name.items()} == {
        "head.weight": "changed", "blocks.1.mlp.weight": "added", "blocks.0.attn.weight": "removed"}
    assert d.unchanged == len(pair.base_state) - 3
    for name, t in by_name.items():
        # Tensors a version does not store are the base's.
        assert t.rel_change == pytest.approx(rel(s1[name], s2[name]), rel=1e-5)
    assert (by_name["blocks.1.mlp.weight"].encoding_a, by_name["blocks.1.mlp.weight"].encoding_b) == (None, "lossless")

    back = {t.name: t.status for t in store.diff("curious@2", "curious@1").tensors}
    assert back == {"head.weight": "changed", "blocks.1.mlp.weight": "removed", "blocks.0.attn.weight": "added"}
    assert store.diff("curious@2", "curious@2").tensors == ()


def test_diff_works_across_encodings(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    exact = store.commit("exact", pair.ft, base=pair.base).version
    small = store.commit("small", pair.ft, base=pair.base, encoding="int4").version
    result = dict(store.tensors(small))

    d = store.diff(small, exact)
    assert {t.status for t in d.tensors} == {"changed"}
    lossy = {e.name for e in small.tensors if not e.exact}
    assert {t.name for t in d.tensors} == lossy  # int4 stores 1-d tensors exactly
    for t in d.tensors:
        assert (t.encoding_a, t.encoding_b) == ("int4", "lossless")
        assert t.rel_change == pytest.approx(rel(result[t.name], pair.ft_state[t.name]), rel=1e-5)
        assert 0 < t.rel_change < 0.1

    out = run_json(store, "diff", "small", "exact")
    assert out["a"] == "small@1" and len(out["tensors"]) == len(lossy)
    text = run_cli(store, "diff", "small", "exact").stdout
    assert f"{len(lossy)} changed" in text and "int4" in text


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# -- metadata ----------------------------------------------------------------------------------


def test_metadata_from_options_and_a_json_file_is_stored_and_queryable(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    store.add_base(pair.base, name="tiny")
    facts = tmp_path / "train.json"
    facts.write_text('{"learning_rate": 1e-4, "epochs": 3, "examples": 120, "loss": 0.41, '
                     '"early_stop": true, "notes": "stance seeds v2"}')
    out = run_json(store, "commit", "curious", str(pair.ft), "--base", "tiny", "-m", "lr 1e-4",
                   "--meta-file", str(facts), "--meta", "epochs=4", "--meta", "run=a")
    m2, _ = variant(pair, tmp_path, 2, ["head.weight"])
    store.commit("curious", m2, base="tiny", metadata={"learning_rate": "3e-5", "run": "a"})
    store.commit("confident", pair.ft, base="tiny", metadata={"learning_rate": "1e-4"})

    v = store.resolve(out["id"])
    # Numbers are kept as written; --meta overrides the file.
    assert v.metadata == {"learning_rate": "1e-4", "epochs": "4", "examples": "120", "loss": "0.41",
                          "early_stop": "true", "notes": "stance seeds v2", "run": "a"}
    assert run_json(store, "show", "curious@1")["metadata"] == v.metadata

    assert [r["ref"] for r in run_json(store, "log", "--where", "learning_rate=1e-4")] == ["confident@1", "curious@1"]
    assert [r["ref"] for r in run_json(store, "log", "curious", "--where", "learning_rate=1e-4")] == ["curious@1"]
    assert [r["ref"] for r in run_json(store, "log", "--where", "run=a", "--where", "learning_rate=3e-5")] == ["curious@2"]
    assert run_json(store, "log", "--where", "run=b") == []
    assert [v.ref for v in store.log(where={"early_stop": "true"})] == ["curious@1"]

    # The catalog is plain SQLite: anyone can read the metadata with sqlite-utils.
    db = sqlite_utils.Database(store.root / "catalog.db")
    rows = list(db.query("SELECT v.stance, v.number, m.value FROM metadata m JOIN versions v ON v.id = m.version_id "
                         "WHERE m.key = 'loss'"))
    assert rows == [{"stance": "curious", "number": 1, "value": "0.41"}]


@pytest.mark.parametrize(("text", "message"), [
    ('{"learning_rate": 1e-4,', "is not valid JSON"),
    ('[1, 2]', "holds an array, not a JSON object"),
    ('{"optimizer": {"name": "adam"}}', "'optimizer' is an object"),
    ('{"loss": null}', "'loss' is null"),
    ('{"loss": NaN}', "NaN is not a JSON number"),
    ('{"": 1}', "is not allowed"),
])
def test_a_bad_metadata_file_is_refused_with_a_clear_message_and_nothing_stored(tmp_path, store, text, message) -> None:
    pair = make_model(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    result = run_cli(store, "commit", "curious", str(pair.ft), "--base", str(pair.base), "--meta-file", str(bad))
    assert result.exit_code == 1
    assert message in result.stderr and str(bad) in result.stderr and "Traceback" not in result.output
    assert store.catalog.versions() == []
    with pytest.raises(MetadataError):
        from deltastore.engine.history import read_metadata_file

        read_metadata_file(bad)


def test_bad_metadata_keys_are_refused(tmp_path, store) -> None:
    pair = make_model(tmp_path)
    for key in ("", "a=b", "x" * 129, "tab\there"):
        with pytest.raises(MetadataError):
            store.commit("curious", pair.ft, base=pair.base, metadata={key: "1"})
    assert run_cli(store, "commit", "curious", str(pair.ft), "--base", str(pair.base), "--meta", "=1").exit_code == 2
    assert store.catalog.versions() == []
