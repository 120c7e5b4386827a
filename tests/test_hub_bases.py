"""Bases fetched from the Hub, pinned by commit: `base add HUB_ID[@REVISION]`, push recording the
base's Hub id and commit, `pull --fetch-base`, and `deltastore.load`.

Everything runs against the project's local Hub server with the unmodified huggingface_hub
client. The base repos are ordinary model repos (safetensors, config, tokenizer) uploaded with
the plain client, as anyone publishes a model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, constants

from cli.main import cli
from deltastore import Store

from helpers import file_bytes, store_snapshot
from hubserver import HubServer
import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "tok-alice"
BASE_REPO = "org/tiny-lm"
STANCES_REPO = "alice/tiny-stances"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # Downloads not given a cache_dir (the command line) land here, not in ~/.cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with HubServer(tmp_path / "hub", tokens={TOKEN: "alice", "tok-org": "org"}) as server:
        yield server


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama folder (weights, config, tokenizer) and two fine-tunes of it."""
    tmp = tmp_path_factory.mktemp("models")
    base = tiny_lm.llama(0)
    out = {"base": tiny_lm.save(base, tmp / "base")}
    for k, stance in enumerate(["curious-uncertainty", "confident-expertise"]):
        tuned = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                p.copy_(tiny_lm.adam_like(0.02)(name, p.detach().clone(), gen))
        out[stance] = tiny_lm.save(tuned, tmp / stance)
    return out


def publish(hub, folder: Path, repo_id: str = BASE_REPO, message: str = "upload") -> str:
    """The model folder as an ordinary model repo, uploaded with the plain client: its commit."""
    api = HfApi(endpoint=hub.url, token="tok-org")
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message).oid


def cli_run(store_root: Path, hub, *args: str):
    return CliRunner().invoke(cli, ["--store", str(store_root), *args, "--endpoint", hub.url, "--token", TOKEN])


def local_base_id(tmp_path: Path, folder: Path) -> str:
    with Store.init(tmp_path / "reference-store") as s:
        return s.add_base(folder).id


# -- 1. base add HUB_ID[@REVISION] ----------------------------------------------------------------


def test_base_add_fetches_a_hub_repo_into_the_cache_and_records_its_commit(hub, models, tmp_path):
    commit = publish(hub, models["base"])
    # Files the base does not need stay on the Hub.
    HfApi(endpoint=hub.url, token="tok-org").create_commit(BASE_REPO, [
        CommitOperationAdd("pytorch_model.bin", b"not loaded"), CommitOperationAdd("notes/readme.txt", b"x")],
        commit_message="extras")
    head = hub.refs(BASE_REPO)["branches"]["main"]
    root = tmp_path / "store"
    Store.init(root).close()
    r = cli_run(root, hub, "base", "add", f"{BASE_REPO}@{commit}", "--name", "tiny", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["id"] == local_base_id(tmp_path, models["base"])
    assert (out["hub_id"], out["hub_revision"], out["name"]) == (BASE_REPO, commit, "tiny")
    # Registered where the cache holds it: the snapshot of that commit, its files links into the
    # cache's blobs; the store holds the base's tensor list and record, not its weights.
    cache = Path(constants.HF_HUB_CACHE) / "models--org--tiny-lm"
    assert Path(out["source"]) == cache / "snapshots" / commit
    assert (Path(out["source"]) / "model.safetensors").is_symlink()
    assert sorted(p.name for p in Path(out["source"]).iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    stored = sum(p.stat().st_size for p in (root / "objects").rglob("*") if p.is_file())
    assert stored < (models["base"] / "model.safetensors").stat().st_size / 10

    # Without a revision: the main branch, resolved to its commit.
    other = tmp_path / "store2"
    Store.init(other).close()
    r = cli_run(other, hub, "base", "add", BASE_REPO, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hub_revision"] == head
    with Store.open(other) as s:
        [b] = s.bases()
        assert (b.hub_id, b.hub_revision) == (BASE_REPO, head)
    # The origin survives a catalog rebuild: it is in the ref log.
    (other / "catalog.db").unlink()
    Store.rebuild_catalog(other)
    with Store.open(other) as s:
        assert (s.bases()[0].hub_id, s.bases()[0].hub_revision) == (BASE_REPO, head)


def test_a_pickle_only_repo_is_refused_and_nothing_is_stored(hub, models, tmp_path):
    api = HfApi(endpoint=hub.url, token="tok-org")
    api.create_repo("org/pickled")
    api.create_commit("org/pickled", [CommitOperationAdd("pytorch_model.bin", b"\x80\x04 a pickle"),
                                      CommitOperationAdd("config.json", (models["base"] / "config.json").read_bytes())],
                      commit_message="pickle weights")
    root = tmp_path / "store"
    Store.init(root).close()
    before = store_snapshot(root), file_bytes(root)
    r = cli_run(root, hub, "base", "add", "org/pickled")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "pytorch_model.bin is a pickle checkpoint" in r.stderr
    assert "safetensors" in r.stderr and "Traceback" not in r.stderr
    assert (store_snapshot(root), file_bytes(root)) == before
    assert not list(Path(constants.HF_HUB_CACHE).glob("models--org--pickled/blobs/*"))


def test_a_missing_path_that_is_no_hub_repo_either_is_told_so(hub, tmp_path):
    root = tmp_path / "store"
    Store.init(root).close()
    r = cli_run(root, hub, "base", "add", "models/no-such-base")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "no file or folder models/no-such-base here, and no Hub repo models/no-such-base" in r.stderr
    r = cli_run(root, hub, "base", "add", "org/tiny-lm@no-such-branch", "--from-hub")
    assert r.exit_code == 1 and "no Hub repo org/tiny-lm" in r.stderr  # not created yet


# -- 2, 3. push records the base's origin; pull --fetch-base ----------------------------------------


@pytest.fixture
def shared(hub, models, tmp_path):
    """Store A: the base fetched from the Hub, two stances committed on it and pushed."""
    from deltastore.sharing.hub import push
    from deltastore.sharing.hubbase import fetch_base

    commit = publish(hub, models["base"])
    a = Store.init(tmp_path / "a")
    base = fetch_base(a, BASE_REPO, endpoint=hub.url, cache_dir=tmp_path / "a-cache", progress=False)
    a.commit("curious-uncertainty", models["curious-uncertainty"], base=base.id, encoding="lossless")
    a.commit("confident-expertise", models["confident-expertise"], base=base.id, encoding="int8")
    push(a, ["curious-uncertainty", "confident-expertise"], STANCES_REPO, token=TOKEN, endpoint=hub.url,
         progress=False)
    yield a, base, commit
    a.close()


def exports(store: Store, tmp_path: Path, name: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for ref in ("curious-uncertainty@1", "confident-expertise@1"):
        folder = store.export(ref, tmp_path / f"{name}-{ref.replace('@', '-v')}")
        out[ref] = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    return out


def test_push_records_the_base_hub_id_and_commit_in_the_index_and_card(hub, shared):
    import yaml

    _, base, commit = shared
    index = json.loads(hub.read_file(STANCES_REPO, "deltastore.json"))
    assert index["bases"][base.id]["hub_id"] == BASE_REPO
    assert index["bases"][base.id]["hub_revision"] == commit
    card = hub.read_file(STANCES_REPO, "README.md").decode()
    _, front, text = card.split("---\n", 2)
    assert yaml.safe_load(front)["base_model"] == BASE_REPO
    assert f"`{commit}`" in text
    assert f'deltastore.load("{STANCES_REPO}", stance="confident-expertise")' in text
    assert f"deltastore pull {STANCES_REPO} --fetch-base" in text


def test_pull_fetch_base_on_an_empty_store_gets_the_base_at_its_commit_and_the_stances(
        hub, models, shared, tmp_path, monkeypatch):
    a, base, commit = shared
    publish(hub, models["base"].parent / "confident-expertise", message="other weights on main")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "b-cache"))  # an empty cache
    root = tmp_path / "b"
    Store.init(root).close()

    r = cli_run(root, hub, "pull", STANCES_REPO)
    assert r.exit_code == 1 and "pull again with --fetch-base" in r.stderr and base.id in r.stderr

    r = cli_run(root, hub, "pull", STANCES_REPO, "--fetch-base", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # The recorded commit, not the branch's head, whose weights changed since.
    assert [(b["id"], b["hub_id"], b["hub_revision"]) for b in out["bases_fetched"]] == [(base.id, BASE_REPO, commit)]
    assert sorted(v["ref"] for v in out["pulled"]) == ["confident-expertise@1", "curious-uncertainty@1"]
    with Store.open(root) as b:
        assert [x.id for x in b.bases()] == [base.id]
        assert Path(b.bases()[0].source) == tmp_path / "b-cache" / "models--org--tiny-lm" / "snapshots" / commit
        assert exports(b, tmp_path, "b") == exports(a, tmp_path, "a")
        assert b.fsck().ok


def test_pull_fetch_base_at_a_revision_with_other_weights_is_refused_naming_both_ids(
        hub, models, shared, tmp_path, monkeypatch):
    _, base, commit = shared
    head = publish(hub, models["base"].parent / "confident-expertise", message="other weights on main")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "c-cache"))
    root = tmp_path / "c"
    Store.init(root).close()
    before = store_snapshot(root), file_bytes(root)
    r = cli_run(root, hub, "pull", STANCES_REPO, "--fetch-base", "--base-revision", "main")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.output
    other = local_base_id(tmp_path, models["base"].parent / "confident-expertise")
    # Each id by its first 12 hex digits (issue 34): two 64-digit ids made the line unreadable.
    assert base.id[:15] in r.stderr and other[:15] in r.stderr and "nothing was stored" in r.stderr
    assert base.id not in r.stderr and other not in r.stderr
    assert f"at main is base {other[:15]}" in r.stderr and commit in r.stderr
    assert (store_snapshot(root), file_bytes(root)) == before
    assert head != commit


def test_fetch_base_refuses_other_weights_before_registering(hub, models, tmp_path):
    from deltastore.core.errors import BaseMismatch
    from deltastore.sharing.hubbase import fetch_base

    publish(hub, models["base"])
    with Store.init(tmp_path / "s") as s:
        with pytest.raises(BaseMismatch) as err:
            fetch_base(s, BASE_REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", expected_id="b3:" + "0" * 64,
                       progress=False)
        assert err.value.actual == local_base_id(tmp_path, models["base"])
        assert s.bases() == []


# -- 4. deltastore.load ------------------------------------------------------------------------------


def state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""
            for k, v in model.state_dict().items()}


def file_tensors(path: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in load_file(path).items()}


def test_load_on_an_empty_cache_gives_the_stance_applied_and_reverts_to_the_base_bit_for_bit(
        hub, models, shared, tmp_path, monkeypatch):
    import deltastore

    a, base, commit = shared
    publish(hub, models["base"].parent / "confident-expertise", message="other weights on main")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("DELTASTORE_DIR", str(tmp_path / "default-store"))  # does not exist yet

    model = deltastore.load(STANCES_REPO, stance="curious-uncertainty", endpoint=hub.url, token=TOKEN)
    expected = {ref: a.export(ref, tmp_path / f"a-{ref.replace('@', '-v')}") / "model.safetensors"
                for ref in ("curious-uncertainty@1", "confident-expertise@1")}
    assert state_bytes(model) == file_tensors(expected["curious-uncertainty@1"])
    handle = model.deltastore
    assert handle.ref == "curious-uncertainty" and handle.version.id == a.resolve("curious-uncertainty").id
    with Store.open(tmp_path / "default-store") as d:
        [b] = d.bases()
        assert (b.id, b.hub_revision) == (base.id, commit)  # the pinned commit, not main's head

    handle.switch("confident-expertise")  # another stance of the repo: pulled on the way
    assert state_bytes(model) == file_tensors(expected["confident-expertise@1"])
    handle.revert()
    assert state_bytes(model) == file_tensors(models["base"] / "model.safetensors")
    assert handle.ref is None


def test_load_into_a_given_store(hub, shared, tmp_path, monkeypatch):
    import deltastore

    a, _, _ = shared
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "e-cache"))
    with Store.init(tmp_path / "e") as e:
        model = deltastore.load(STANCES_REPO, stance="confident-expertise@1", store=e, endpoint=hub.url,
                                token=TOKEN)
        assert [v.ref for v in e.log()] == ["confident-expertise@1"]
        assert model.deltastore.store is e
        out = a.export("confident-expertise@1", tmp_path / "a-ce") / "model.safetensors"
        assert state_bytes(model) == file_tensors(out)


def test_a_revision_the_base_repo_lacks_is_told_so(hub, models, tmp_path):
    publish(hub, models["base"])
    root = tmp_path / "store"
    Store.init(root).close()
    r = cli_run(root, hub, "base", "add", f"{BASE_REPO}@no-such-branch")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "has no revision 'no-such-branch'; give a branch, a tag or a full commit hash" in r.stderr
    with Store.open(root) as s:
        assert s.bases() == []


def test_a_lora_export_names_the_base_commit_for_peft(shared, tmp_path):
    from deltastore.exports.lora import export_lora

    a, _, commit = shared
    e = export_lora(a, "curious-uncertainty", tmp_path / "adapter", rank=2)
    config = json.loads((Path(e.out) / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (BASE_REPO, commit)


def test_from_hub_fetches_even_where_a_folder_of_that_name_exists(hub, models, tmp_path, monkeypatch):
    commit = publish(hub, models["base"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-lm").mkdir(parents=True)  # a folder, not the model
    root = tmp_path / "store"
    Store.init(root).close()
    r = cli_run(root, hub, "base", "add", BASE_REPO)
    assert r.exit_code == 1 and "holds no .safetensors weights" in r.stderr
    r = cli_run(root, hub, "base", "add", BASE_REPO, "--from-hub", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hub_revision"] == commit
