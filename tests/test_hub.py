"""Push and pull against a real (local) Hub server with the unmodified huggingface_hub client.

Pulled repos are untrusted: each tampering below is committed to the server with HfApi directly,
the way anyone with write access to a repo could, and the pull must refuse it with the store
left exactly as it was.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, constants

from cli.main import cli
from deltastore import Store
from deltastore.core.errors import (BaseMismatch, BaseNotFound, HubAccessDenied, HubRepoNotFound,
                               HubRequestRefused, HubRevisionNotFound, HubStanceNotFound, HubUnreachable,
                               LocalStanceDiffers, PulledBaseMissing, PulledDataRejected, UnsafeInput)
from deltastore.core.hashing import canonical_json, manifest_id
from deltastore.sharing.hub import INDEX_FILE, pull, push

from helpers import (commit_takes, file_bytes, finetune_, make_model, module_snapshot, saved_state, store_snapshot,
                     write_folder)
from hubserver import HubServer

ALICE, BOB = "tok-alice", "tok-bob"
REPO = "alice/stances"
BASE_HUB_ID = "org/tiny-base"
ENCODINGS = {"curious-uncertainty": "lossless", "confident-expertise": "int8", "playful": "lowrank:4"}
REFS = [f"{s}@{n}" for s in ENCODINGS for n in (1, 2)]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model on disk, and the pushing store: three stances of two versions each."""
    tmp = tmp_path_factory.mktemp("world")
    pair = make_model(tmp)
    store = Store.init(tmp / "alice-store")
    store.add_base(pair.base, name="tiny", hub_id=BASE_HUB_ID)
    commit_takes(store, pair, tmp, ENCODINGS)
    yield pair, store
    store.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # Downloads that are not given a cache_dir (the command line) land here, not in ~/.cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with HubServer(tmp_path / "hub", tokens={ALICE: "alice", BOB: "bob"}) as server:
        yield server


@pytest.fixture
def fresh(tmp_path, world):
    """Another machine's store: the same base registered, nothing else."""
    pair, _ = world
    with Store.init(tmp_path / "bob-store") as store:
        store.add_base(pair.base, name="tiny")
        yield store


def push_all(world, hub, refs=REFS, **kwargs):
    return push(world[1], refs, REPO, token=ALICE, endpoint=hub.url, progress=False, **kwargs)


def pull_into(store, hub, tmp_path, **kwargs):
    kwargs.setdefault("token", ALICE)
    return pull(store, REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def catalog_and_objects(store):
    return store_snapshot(store.root)


# -- round trip ------------------------------------------------------------------------------------


def test_renamed_and_merged_stances_push_and_pull_where_their_refs_put_them(world, hub, fresh, tmp_path):
    """A version renamed or merged before the push keeps its manifest (and id), which names the
    stance and number it was committed under; the pull lands it where the index puts it."""
    pair, _ = world
    with Store.init(tmp_path / "carol-store") as carol:
        carol.add_base(pair.base, name="tiny")
        for k, stance in enumerate(["curious", "curious", "curiuos", "draft"]):
            ft = copy.deepcopy(pair.base_module)
            finetune_(ft, seed=500 + k)
            carol.commit(stance, write_folder(tmp_path / f"ft-carol-{k}", saved_state(ft)), base="tiny",
                         new_stance=True)
        carol.merge_stance("curiuos", "curious")  # its version becomes curious@3
        carol.rename_stance("draft", "final")
        refs = ["curious@1", "curious@2", "curious@3", "final@1"]
        push(carol, refs, REPO, token=ALICE, endpoint=hub.url, progress=False)
        pulled = pull_into(fresh, hub, tmp_path)
        assert sorted(hv.ref for hv in pulled.pulled) == refs
        for ref in refs:
            mine, theirs = carol.resolve(ref), fresh.resolve(ref)
            assert (theirs.id, theirs.ref, theirs.parent) == (mine.id, mine.ref, mine.parent)
            assert theirs.manifest() == mine.manifest() and manifest_id(theirs.manifest()) == theirs.id
        assert fresh.resolve("curious@3").committed_as == "curiuos"
        assert fresh.fsck(read_data=True).ok


def test_push_three_stances_then_pull_gives_the_same_versions_bit_exact(world, hub, fresh, tmp_path):
    pair, alice = world
    result = push_all(world, hub)
    assert [hv.ref for hv in result.pushed] == REFS and not result.already_there
    assert hub.commit_count(REPO) == 2  # the repo's first commit, and this push's one
    assert sorted(hub.refs(REPO)["tags"]) == sorted(f"{s}-v{n}" for s in ENCODINGS for n in (1, 2))
    assert set(hub.refs(REPO)["tags"].values()) == {result.commit}

    pulled = pull_into(fresh, hub, tmp_path)
    assert sorted(hv.ref for hv in pulled.pulled) == sorted(REFS)
    assert pulled.commit == result.commit
    ours = {(v.stance, v.number): (v.id, v.parent) for v in alice.log()}
    theirs = {(v.stance, v.number): (v.id, v.parent) for v in fresh.log()}
    assert theirs == ours
    for ref in REFS:
        assert fresh.resolve(ref).manifest() == alice.resolve(ref).manifest()
        assert fresh.resolve(ref).metadata == {"lr": "2e-5"}
    assert fresh.fsck(read_data=True).ok

    # Apply on a live model, then export: the same bytes as on the pushing machine.
    for ref in REFS:
        a, b = copy.deepcopy(pair.base_module), copy.deepcopy(pair.base_module)
        with alice.applied(a, ref), fresh.applied(b, ref):
            assert module_snapshot(a) == module_snapshot(b)
            assert module_snapshot(a) != module_snapshot(pair.base_module)
        assert module_snapshot(b) == module_snapshot(pair.base_module)  # reverted exactly
        ours_out = alice.export(ref, tmp_path / "export-alice" / ref.replace("@", "-"))
        theirs_out = fresh.export(ref, tmp_path / "export-bob" / ref.replace("@", "-"))
        assert file_bytes(theirs_out) == file_bytes(ours_out)

    # Pulling again brings nothing new and changes nothing.
    before = catalog_and_objects(fresh)
    again = pull_into(fresh, hub, tmp_path)
    assert not again.pulled and sorted(hv.ref for hv in again.already_here) == sorted(REFS)
    assert catalog_and_objects(fresh) == before


def test_the_repo_is_readable_without_deltastore(world, hub):
    from safetensors.torch import load

    push_all(world, hub, ["curious-uncertainty@2"])
    alice = world[1]
    v = alice.resolve("curious-uncertainty@2")
    data = hub.read_file(REPO, "curious-uncertainty/v2.safetensors")
    tensors = load(data)
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + n])["__metadata__"]
    assert json.loads(metadata["deltastore.manifest"]) == v.manifest()
    assert metadata["deltastore.version"] == v.id
    assert hub.read_file(REPO, "curious-uncertainty/v2.json") == canonical_json(v.manifest())
    for e in v.tensors:
        for part, o in e.objects.items():
            t = tensors[f"{e.name}::{part}"]
            assert t.dtype == torch.uint8 and tuple(t.shape) == (o.size,)
            assert bytes(t.numpy()) == alice.objects.get(o.id)
    index = json.loads(hub.read_file(REPO, INDEX_FILE))
    (entry,) = index["stances"]["curious-uncertainty"]
    assert entry["id"] == v.id and entry["tag"] == "curious-uncertainty-v2"
    assert entry["files"] == {"payloads": "curious-uncertainty/v2.safetensors",
                              "manifest": "curious-uncertainty/v2.json"}
    assert index["bases"][v.base_id]["hub_id"] == BASE_HUB_ID


def test_model_card_has_the_hub_fields_and_says_how_to_apply(world, hub):
    push_all(world, hub)
    card = hub.read_file(REPO, "README.md").decode()
    _, front, text = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "deltastore"
    assert meta["base_model"] == BASE_HUB_ID
    assert meta["base_model_relation"] == "adapter"
    assert {"deltastore", "int8", "lossless", "lowrank"} <= set(meta["tags"])
    for ref in REFS:
        stance, n = ref.split("@")
        assert f"| {stance} | {n} | `{stance}-v{n}` |" in text
    assert "int8" in text and "kB" in text
    assert f"deltastore pull {REPO}" in text and "deltastore apply" in text
    assert f"--hub-id {BASE_HUB_ID}" in text


def test_pull_revision_of_a_version_tag_gives_that_version(world, hub, fresh, tmp_path):
    push_all(world, hub)
    result = pull_into(fresh, hub, tmp_path, revision="curious-uncertainty-v1")
    assert [hv.ref for hv in result.pulled] == ["curious-uncertainty@1"]
    assert [v.ref for v in fresh.log()] == ["curious-uncertainty@1"]
    assert fresh.resolve("curious-uncertainty").id == world[1].resolve("curious-uncertainty@1").id


def test_pull_one_stance(world, hub, fresh, tmp_path):
    push_all(world, hub)
    result = pull_into(fresh, hub, tmp_path, stance="playful")
    assert sorted(hv.ref for hv in result.pulled) == ["playful@1", "playful@2"]
    assert {v.stance for v in fresh.log()} == {"playful"}
    with pytest.raises(HubStanceNotFound, match="no version of stance 'nope'.*confident-expertise"):
        pull_into(fresh, hub, tmp_path, stance="nope")
    with pytest.raises(HubStanceNotFound):
        pull_into(fresh, hub, tmp_path, stance="playful", revision="curious-uncertainty-v1")


def test_pulled_version_keeps_its_number_after_a_gap(world, hub, fresh, tmp_path):
    push_all(world, hub)
    pull_into(fresh, hub, tmp_path, revision="playful-v2")
    assert [v.ref for v in fresh.log()] == ["playful@2"]
    pull_into(fresh, hub, tmp_path, revision="playful-v1")
    assert sorted(v.ref for v in fresh.log()) == ["playful@1", "playful@2"]
    assert fresh.resolve("playful").number == 2


def test_second_push_of_the_same_version_uploads_nothing_and_makes_no_commit(world, hub):
    push_all(world, hub, REFS[:2])
    commits, uploads = hub.commit_count(REPO), lfs_uploads(hub)
    assert uploads == 2  # one payload file per version
    again = push_all(world, hub, REFS[:2])
    assert again.commit is None and not again.pushed and not again.tags_created
    assert [hv.ref for hv in again.already_there] == REFS[:2]
    assert hub.commit_count(REPO) == commits and lfs_uploads(hub) == uploads
    assert commit_posts(hub) == 1
    # A push with one new version uploads that one only, in one new commit.
    third = push_all(world, hub, REFS[:3])
    assert [hv.ref for hv in third.pushed] == [REFS[2]]
    assert hub.commit_count(REPO) == commits + 1 and lfs_uploads(hub) == uploads + 1
    assert commit_posts(hub) == 2


def lfs_uploads(hub) -> int:
    return sum(1 for method, path, status in hub.requests if method == "PUT" and status == 200)


def commit_posts(hub) -> int:
    return sum(1 for method, path, status in hub.requests if method == "POST" and "/commit/" in path)


def test_push_to_a_branch_and_pull_from_it(world, hub, fresh, tmp_path):
    result = push_all(world, hub, ["playful@1"], revision="experiments")
    assert result.revision == "experiments"
    assert "experiments" in hub.refs(REPO)["branches"]
    assert INDEX_FILE not in hub_files(hub, "main")
    pulled = pull_into(fresh, hub, tmp_path, revision="experiments")
    assert [hv.ref for hv in pulled.pulled] == ["playful@1"]


def hub_files(hub, revision: str) -> set[str]:
    return {s.rfilename for s in HfApi(endpoint=hub.url, token=ALICE).model_info(REPO, revision=revision).siblings}


def test_push_refuses_another_version_under_a_number_the_repo_has(world, hub, tmp_path):
    pair, _ = world
    push_all(world, hub, ["playful@1"])
    with Store.init(tmp_path / "other") as other:
        other.add_base(pair.base, name="tiny")
        ft = copy.deepcopy(pair.base_module)
        finetune_(ft, seed=999)
        other.commit("playful", write_folder(tmp_path / "ft-other", saved_state(ft)), base="tiny")
        commits = hub.commit_count(REPO)
        with pytest.raises(Exception, match="already has playful@1 as version") as err:
            push(other, ["playful@1"], REPO, token=ALICE, endpoint=hub.url, progress=False)
        assert isinstance(err.value, FileExistsError)
    assert hub.commit_count(REPO) == commits


# -- untrusted repos ---------------------------------------------------------------------------------


def read_payload_file(data: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__")
    body = data[8 + n:]
    return {k: body[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items()}, metadata


def write_payload_file(tensors: dict[str, bytes], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(tensors):
        header[name] = {"dtype": "U8", "shape": [len(tensors[name])],
                        "data_offsets": [offset, offset + len(tensors[name])]}
        offset += len(tensors[name])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors[n] for n in sorted(tensors))


def rewrite_version(hub, stance: str, number: int, *, manifest=None, tensors=None, index=None,
                    consistent: bool = True) -> None:
    """Commit a changed version to the hub as a malicious pusher would: `manifest(m)`,
    `tensors(t)` and `index(i)` edit the parsed files in place. With `consistent`, the version id
    is recomputed and written everywhere it appears, so that only the check under test can fail."""
    files = {}
    index_data = json.loads(hub.read_file(REPO, INDEX_FILE))
    entry = next(e for e in index_data["stances"][stance] if e["number"] == number)
    payload_path, manifest_path = entry["files"]["payloads"], entry["files"]["manifest"]
    m = json.loads(hub.read_file(REPO, manifest_path))
    t, meta = read_payload_file(hub.read_file(REPO, payload_path))
    if manifest:
        manifest(m)
    if tensors:
        tensors(t)
    if consistent:
        entry["id"] = manifest_id(m)
        meta = {**meta, "deltastore.version": entry["id"], "deltastore.manifest": canonical_json(m).decode()}
    if index:
        index(index_data)
    files[INDEX_FILE] = json.dumps(index_data).encode()
    files[payload_path] = write_payload_file(t, meta)
    files[manifest_path] = canonical_json(m)
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_commit(REPO, [CommitOperationAdd(p, d) for p, d in files.items()], commit_message="tamper")


def flip_first_payload_byte(t: dict[str, bytes]) -> None:
    name = next(n for n in sorted(t) if t[n])
    t[name] = bytes([t[name][0] ^ 0xFF]) + t[name][1:]


def rename_first_tensor(m: dict) -> None:
    m["tensors"][0]["name"] = "../../x"


def declare_one_byte_less(m: dict) -> None:
    o = next(iter(m["tensors"][0]["objects"].values()))
    o["size"] -= 1


def add_payload_bytes(t: dict[str, bytes]) -> None:
    name = sorted(t)[0]
    t[name] = t[name] + b"\0" * 64


def change_message_only(m: dict) -> None:
    m["message"] = "not what was pushed"


def point_files_outside(index: dict) -> None:
    index["stances"]["curious-uncertainty"][0]["files"]["payloads"] = "../../x.safetensors"


def point_files_elsewhere(index: dict) -> None:
    index["stances"]["curious-uncertainty"][0]["files"]["payloads"] = "playful/v1.safetensors"


def claim_other_base_tensors(m: dict) -> None:
    m["tensors"][0]["base"] = "b3:" + "0" * 64


TAMPERINGS = {
    "payload bytes flipped": (dict(tensors=flip_first_payload_byte, consistent=False), "does not hash to its object id"),
    "manifest names ../../x": (dict(manifest=rename_first_tensor), "path separator"),
    "declared size smaller than the payload": (dict(manifest=declare_one_byte_less), "its manifest declares"),
    "payload larger than declared": (dict(tensors=add_payload_bytes, consistent=False), "its manifest declares"),
    "manifest changed, id not": (dict(manifest=change_message_only, consistent=False), "hashes to"),
    "index points outside the repo": (dict(index=point_files_outside, consistent=False), "would leave its folder"),
    "index points at another version's file": (dict(index=point_files_elsewhere, consistent=False),
                                               "is not curious-uncertainty/v1.safetensors"),
    "entries of another base": (dict(manifest=claim_other_base_tensors), "other base tensors"),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_repo_is_refused_and_the_store_is_unchanged(world, hub, fresh, tmp_path, name):
    push_all(world, hub)
    edits, message = TAMPERINGS[name]
    rewrite_version(hub, "curious-uncertainty", 1, **edits)
    before = catalog_and_objects(fresh)
    with pytest.raises((PulledDataRejected, BaseMismatch, UnsafeInput), match=message) as err:
        pull_into(fresh, hub, tmp_path)  # every version: the good ones must not land either
    assert "\n" not in str(err.value)
    assert catalog_and_objects(fresh) == before
    assert not fresh.log()
    if "index" not in name:  # a bad index spoils the whole repo; a bad version only itself
        assert len(pull_into(fresh, hub, tmp_path, stance="playful").pulled) == 2


def test_delta_for_another_base_is_refused_naming_the_base_it_needs(world, hub, tmp_path):
    push_all(world, hub)
    other_pair = make_model(tmp_path, seed=7, name="other")
    with Store.init(tmp_path / "other-store") as store:
        store.add_base(other_pair.base, name="tiny")
        before = catalog_and_objects(store)
        with pytest.raises(PulledBaseMissing) as err:
            pull_into(store, hub, tmp_path)
        base_id = world[1].resolve("curious-uncertainty@1").base_id
        assert base_id in str(err.value) and BASE_HUB_ID in str(err.value)
        assert err.value.base_id == base_id and err.value.hub_id == BASE_HUB_ID
        assert isinstance(err.value, BaseNotFound)
        assert catalog_and_objects(store) == before


def test_a_local_stance_of_the_same_name_is_not_pulled_into_unasked(world, hub, fresh, tmp_path):
    pair, alice = world
    push_all(world, hub)
    ft = copy.deepcopy(pair.base_module)
    finetune_(ft, seed=4242)
    mine = fresh.commit("playful", write_folder(tmp_path / "ft-mine", saved_state(ft)), base="tiny").version
    before = catalog_and_objects(fresh)
    with pytest.raises(LocalStanceDiffers, match=r"playful here holds versions .* \(playful@1\).* --into NAME") as err:
        pull_into(fresh, hub, tmp_path)
    assert "\n" not in str(err.value) and isinstance(err.value, FileExistsError)
    assert catalog_and_objects(fresh) == before
    # One version whose number is free here (a version's tag): it would have become the user's
    # playful@2, and plain `playful` the repo's version.
    with pytest.raises(LocalStanceDiffers, match="--into NAME"):
        pull_into(fresh, hub, tmp_path, revision="playful-v2")
    assert catalog_and_objects(fresh) == before

    # --into NAME: the repo's versions land under NAME with their ids and numbers; `playful` is
    # still the user's own.
    r = pull_into(fresh, hub, tmp_path, stance="playful", into="playful-alice")
    assert [hv.ref for hv in r.pulled] == ["playful-alice@1", "playful-alice@2"]
    for n in (1, 2):
        theirs = fresh.resolve(f"playful-alice@{n}")
        assert theirs.id == alice.resolve(f"playful@{n}").id and theirs.number == n
        assert theirs.manifest() == alice.resolve(f"playful@{n}").manifest()
    assert fresh.resolve("playful-alice@2").parent == fresh.resolve("playful-alice@1").id
    assert fresh.resolve("playful").id == mine.id
    assert fresh.fsck(read_data=True).ok
    # Pulling into it again brings nothing and is no divergence; --into needs one stance.
    assert not pull_into(fresh, hub, tmp_path, stance="playful", into="playful-alice").pulled
    with pytest.raises(UnsafeInput, match="--into takes the versions of one stance"):
        pull_into(fresh, hub, tmp_path, into="elsewhere")


def test_a_stance_pulled_before_takes_its_next_versions(world, hub, fresh, tmp_path):
    push_all(world, hub)
    pull_into(fresh, hub, tmp_path, revision="playful-v1")
    r = pull_into(fresh, hub, tmp_path, stance="playful")
    assert [hv.ref for hv in r.pulled] == ["playful@2"] and [hv.ref for hv in r.already_here] == ["playful@1"]


def test_ingest_failing_late_removes_the_objects_it_wrote(world, fresh):
    """The last line of defence: a payload that changes between the checks and the ingest."""
    alice = world[1]
    v = alice.resolve("curious-uncertainty@2")
    before = catalog_and_objects(fresh)
    calls = []

    def payload(object_id: str, size: int) -> bytes:
        calls.append(object_id)
        data = alice.objects.get(object_id)
        return data if len(calls) < 2 else b"x" * size

    with pytest.raises(UnsafeInput, match="does not match its id"):
        fresh.ingest([v.manifest()], payload)
    assert len(calls) == 2
    assert catalog_and_objects(fresh) == before


# -- errors users understand ------------------------------------------------------------------------


def test_repo_not_found(hub, fresh, tmp_path):
    before = catalog_and_objects(fresh)
    with pytest.raises(HubRepoNotFound) as err:
        pull(fresh, "alice/missing", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c", progress=False)
    assert isinstance(err.value, FileNotFoundError) and err.value.repo_id == "alice/missing"
    assert "no Hub repo alice/missing" in str(err.value) and "\n" not in str(err.value)
    assert catalog_and_objects(fresh) == before


def test_revision_not_found(world, hub, fresh, tmp_path):
    push_all(world, hub, ["playful@1"])
    before = catalog_and_objects(fresh)
    with pytest.raises(HubRevisionNotFound) as err:
        pull_into(fresh, hub, tmp_path, revision="playful-v9")
    assert isinstance(err.value, LookupError) and err.value.revision == "playful-v9"
    assert "no revision 'playful-v9'" in str(err.value) and "\n" not in str(err.value)
    assert catalog_and_objects(fresh) == before


def test_no_access(world, hub, fresh, tmp_path):
    push_all(world, hub, ["playful@1"])
    # Bob may read alice's public repo but not write to it.
    with pytest.raises(HubAccessDenied) as err:
        push(world[1], ["playful@2"], REPO, token=BOB, endpoint=hub.url, progress=False)
    assert isinstance(err.value, PermissionError) and err.value.status == 403
    assert "no access to Hub repo alice/stances" in str(err.value) and "\n" not in str(err.value)
    assert "playful-v2" not in hub.refs(REPO)["tags"]
    # An unknown token is refused.
    before = catalog_and_objects(fresh)
    with pytest.raises(HubAccessDenied, match="Invalid credentials") as err:
        pull_into(fresh, hub, tmp_path, token="tok-stolen")
    assert err.value.status == 401
    # A private repo looks missing to others, as on the Hub.
    push(world[1], ["playful@1"], "alice/private", private=True, token=ALICE, endpoint=hub.url, progress=False)
    with pytest.raises(HubRepoNotFound):
        pull(fresh, "alice/private", token=BOB, endpoint=hub.url, cache_dir=tmp_path / "c", progress=False)
    assert catalog_and_objects(fresh) == before
    assert len(pull(fresh, "alice/private", token=ALICE, endpoint=hub.url, cache_dir=tmp_path / "c",
                    progress=False).pulled) == 1


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_network_down(world, fresh, tmp_path):
    url = closed_port_url()
    before = catalog_and_objects(fresh)
    with pytest.raises(HubUnreachable) as err:
        pull(fresh, REPO, endpoint=url, token=ALICE, cache_dir=tmp_path / "c", progress=False)
    assert isinstance(err.value, ConnectionError) and url in str(err.value) and "\n" not in str(err.value)
    assert catalog_and_objects(fresh) == before
    with pytest.raises(HubUnreachable):
        push(world[1], ["playful@1"], REPO, endpoint=url, token=ALICE, progress=False)


def test_a_malformed_repo_id_is_told_so(hub, fresh, tmp_path):
    with pytest.raises(HubRequestRefused, match="not a Hub repo id"):
        pull(fresh, "../../x", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c", progress=False)


def test_pull_from_a_repo_deltastore_did_not_write(hub, fresh, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo(REPO)
    with pytest.raises(Exception, match="not a deltastore repo"):
        pull_into(fresh, hub, tmp_path)


# -- command line --------------------------------------------------------------------------------------


def test_cli_push_and_pull_with_json(world, hub, fresh, tmp_path):
    runner = CliRunner()
    args = ["--endpoint", hub.url, "--token", ALICE, "--json"]
    r = runner.invoke(cli, ["--store", str(world[1].root), "push", *REFS[:2], "--repo", REPO, *args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [v["ref"] for v in out["pushed"]] == REFS[:2] and out["commit"] and out["url"].endswith(REPO)
    assert out["tags_created"] == ["curious-uncertainty-v1", "curious-uncertainty-v2"]

    r = runner.invoke(cli, ["--store", str(fresh.root), "pull", REPO, "--revision", "curious-uncertainty-v1", *args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [v["ref"] for v in out["pulled"]] == ["curious-uncertainty@1"]
    assert out["pulled"][0]["id"] == world[1].resolve("curious-uncertainty@1").id

    r = runner.invoke(cli, ["--store", str(fresh.root), "pull", REPO, "--stance", "curious-uncertainty", *args])
    assert [v["ref"] for v in json.loads(r.stdout)["pulled"]] == ["curious-uncertainty@2"]

    # Errors: one line on stderr, exit 1, no traceback.
    r = runner.invoke(cli, ["--store", str(fresh.root), "pull", "alice/missing", *args])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no Hub repo alice/missing" in r.stderr


def test_cli_reads_hf_endpoint_token_and_home_from_the_environment(world, hub, tmp_path):
    """As with huggingface-cli: HF_ENDPOINT, HF_TOKEN and HF_HOME, read when the client starts."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": ALICE, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_XET": "1", "DELTASTORE_DIR": str(world[1].root)}
    run = [sys.executable, "-c", "from cli.main import main; main()"]
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([*run, "push", "playful@1", "--repo", REPO, "--json"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["url"] == f"{hub.url}/{REPO}"
    store = tmp_path / "other"
    with Store.init(store) as s:
        s.add_base(world[0].base)
    r = subprocess.run([*run, "pull", REPO, "--json"], env={**env, "DELTASTORE_DIR": str(store)}, cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [v["ref"] for v in json.loads(r.stdout)["pulled"]] == ["playful@1"]
    assert list((tmp_path / "hf-home" / "hub").glob("models--alice--stances/snapshots/*/playful/v1.safetensors"))


def test_a_push_that_stopped_before_its_tags_is_completed_by_the_next(world, hub):
    push_all(world, hub, ["playful@1", "playful@2"])
    HfApi(endpoint=hub.url, token=ALICE).delete_tag(REPO, tag="playful-v2")
    commits = hub.commit_count(REPO)
    again = push_all(world, hub, ["playful@1", "playful@2"])
    assert again.commit is None and again.tags_created == ("playful-v2",)
    assert hub.commit_count(REPO) == commits
    assert hub.refs(REPO)["tags"]["playful-v2"] == hub.refs(REPO)["branches"]["main"]


def test_the_pull_scaling_benchmark_runs(capsys):
    """tests/benchmarks/pull_scale.py end to end on a few versions (its timings are not checked)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    import pull_scale

    assert pull_scale.main(["--versions", "2,3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["versions"] for r in report["runs"]] == [2, 3]
    assert all(r["pull_s"] > 0 and r["pull_ms_per_version"] > 0 for r in report["runs"])
    assert "per_version_growth" in report
