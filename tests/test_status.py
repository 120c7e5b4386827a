"""Revert and status from any folder (a per-user list of stores, repo/knownstores.py), the
store a command names when it finds none, `--store` given the folder that holds `.deltastore/`,
and `deltastore status`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.sharing.remote import add_remote, push
from helpers import file_bytes, make_model, store_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def patched(tmp_path, monkeypatch):
    """work/.deltastore holding s@1, applied in place to work/target (a copy of the base);
    the current folder is elsewhere/, which holds no store."""
    monkeypatch.delenv("DELTASTORE_DIR", raising=False)
    work = tmp_path / "work"
    pair = make_model(work)
    target = work / "target"
    shutil.copytree(pair.base, target)
    with Store.init(work / ".deltastore") as store:
        store.commit("s", pair.ft, base=pair.base)
        store.apply_files("s@1", target)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return work, target, pair


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_revert_works_from_another_folder(patched) -> None:
    # Fails before this commit: "no deltastore store at .../elsewhere or above it; run
    # `deltastore init` to create one".
    work, target, pair = patched
    result = run("revert", target)
    assert result.exit_code == 0, result.output
    assert file_bytes(target) == file_bytes(pair.base)


def test_a_store_made_after_the_patch_is_passed_over_or_names_the_one_that_patched(patched) -> None:
    # Fails before this commit: following the hint (`init` here) made `revert` answer "nothing
    # was applied ... nothing to revert" about a patched folder.
    work, target, pair = patched
    assert run("init").exit_code == 0
    here = Path(".deltastore").resolve()
    patched_bytes, before = file_bytes(target), store_snapshot(here)
    result = run("--store", here, "revert", target)
    assert result.exit_code == 1
    assert f"the store {work / '.deltastore'} patched it" in result.output
    assert f"deltastore --store {work / '.deltastore'} revert" in result.output
    assert file_bytes(target) == patched_bytes and store_snapshot(here) == before
    result = run("revert", target)  # no --store: the store that patched it, not the one here
    assert result.exit_code == 0, result.output
    assert file_bytes(target) == file_bytes(pair.base)


def test_a_command_that_finds_no_store_names_the_nearest_known(patched) -> None:
    # Fails before this commit: it suggested `deltastore init` though a store exists.
    work, _, _ = patched
    result = run("log")
    assert result.exit_code == 1
    assert f"the nearest store this user has is {work / '.deltastore'}" in result.output
    assert "init" not in result.output


def test_no_store_known_still_suggests_init(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DELTASTORE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run("log")
    assert result.exit_code == 1 and "run `deltastore init` to create one" in result.output


def test_store_option_takes_the_folder_holding_the_store(patched) -> None:
    # Fails before this commit: "no deltastore store at .../work; run `deltastore init`".
    work, target, pair = patched
    result = run("--store", work, "log", "--json")
    assert result.exit_code == 0, result.output
    assert "s@1" in result.output


def test_status_lists_the_patched_folders_from_any_folder(patched) -> None:
    # Fails before this commit: there is no `status` command.
    work, target, _ = patched
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["store"] is None and shown["unpushed"] is None
    [p] = shown["patched"]
    assert (p["target"], p["ref"], p["state"], p["store"]) == (str(target), "s@1", "applied", str(work / ".deltastore"))
    assert p["since"][:4].isdigit()
    text = run("status").output
    assert f"patched {target}: s@1 since" in text and "no store in this folder" in text
    assert run("revert", target).exit_code == 0
    assert json.loads(run("status", "--json").stdout)["patched"] == []
    assert "no folder is patched in place" in run("status").output


def test_status_names_a_patched_folder_that_is_gone(patched) -> None:
    work, target, _ = patched
    shutil.rmtree(target)
    [p] = json.loads(run("status", "--json").stdout)["patched"]
    assert p["state"] == "gone"


def test_status_remotes_lists_what_each_remote_lacks(patched, tmp_path) -> None:
    work, _, pair = patched
    other = make_model(tmp_path, name="other", frozen=())
    with Store.open(work / ".deltastore") as store:
        store.commit("t", other.ft, base=pair.base)
        add_remote(store, "origin", (tmp_path / "remote").as_uri())
        push(store, ["s@1"], "origin")
    result = run("--store", work, "status", "--remotes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unpushed"] == {"origin": ["t@1"]}
    assert "remote origin lacks t@1" in run("--store", work, "status", "--remotes").output
    assert "remotes not checked: pass --remotes" in run("--store", work, "status").output


def test_status_refuses_a_store_option_that_names_no_store(patched, tmp_path) -> None:
    result = run("--store", tmp_path / "elsewhere", "status")
    assert result.exit_code == 1 and "no deltastore store at" in result.output


def test_revert_forget_by_journal_id_works_from_another_folder(patched) -> None:
    work, target, _ = patched
    [p] = json.loads(run("status", "--json").stdout)["patched"]
    shutil.rmtree(target)
    result = run("revert", "--forget", p["journal"])
    assert result.exit_code == 0, result.output
    assert json.loads(run("status", "--json").stdout)["patched"] == []
