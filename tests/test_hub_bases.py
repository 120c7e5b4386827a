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
