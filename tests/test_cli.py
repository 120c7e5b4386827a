"""The command line, through click's CliRunner: every core command with --json, errors, usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from cli.main import cli
from deltastore import Store

from helpers import assert_same_state, file_bytes, flip_byte, load_folder, make_model


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    env = {"DELTASTORE_DEBUG": "", "DELTASTORE_DIR": "", **(env or {})}
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def ok_json(*args: str, env: dict[str, str] | None = None):
    """Run a command with --json: exit 0, and stdout is exactly one JSON value."""
    result = invoke(*args, "--json", env=env)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return json.loads(result.stdout)


def failed(*args: str, code: int = 1, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail: the exit code, one line on stderr, no traceback. The line."""
    result = invoke(*args, env=env)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert isinstance(result.exception, SystemExit)
    if code == 1:
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ")
        return lines[0]
    return result.stderr


@pytest.fixture
def pair(tmp_path):
    return make_model(tmp_path, torch.bfloat16, sharded=True)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


def test_the_whole_round_with_json(tmp_path, pair, root) -> None:
    s = ("--store", root)
    assert ok_json(*s, "init") == {"store": str(root.absolute())}
    base = ok_json(*s, "base", "add", pair.base, "--name", "tiny")
    assert base["name"] == "tiny" and base["id"].startswith("b3:")
    assert base["tensor_count"] == len(pair.base_state)
    assert [b["id"] for b in ok_json(*s, "base", "list")] == [base["id"]]

    c = ok_json(*s, "commit", "curious", pair.ft, "--base", "tiny", "-m", "first", "--meta", "lr=2e-5",
                "--tag", "paper")
    assert (c["stance"], c["number"], c["tensors_stored"]) == ("curious", 1, len(pair.changed))
    assert c["tensors_unchanged"] == len(pair.unchanged) and c["bytes_new"] == c["bytes_stored"] > 0
    again = ok_json(*s, "commit", "curious", pair.ft, "--base", base["id"][:12], "--allow-empty")
    assert again["number"] == 2 and again["bytes_new"] == 0

    stances = ok_json(*s, "stances")
    assert [(r["name"], r["versions"], r["latest"]) for r in stances] == [("curious", 2, 2)]
    log = ok_json(*s, "log", "curious")
    assert [v["number"] for v in log] == [2, 1]
    assert log[1]["metadata"] == {"lr": "2e-5"} and log[1]["tags"] == ["paper"] and log[1]["message"] == "first"
    shown = ok_json(*s, "show", "curious@paper")
    assert shown["id"] == c["id"] and shown["base"] == base["id"]
    assert sorted(e["name"] for e in shown["tensor_entries"]) == pair.changed
    assert ok_json(*s, "tag", "curious@2", "latest") == {"id": again["id"], "ref": "curious@2", "tag": "latest"}
    assert ok_json(*s, "show", c["id"][3:15])["ref"] == "curious@1"

    out = ok_json(*s, "export", "curious@1", "--out", tmp_path / "export")
    assert out["ref"] == "curious@1"
    assert_same_state(load_folder(out["out"]), pair.ft_state)

    patched = ok_json(*s, "apply", "curious", pair.base, "--out", tmp_path / "patched")
    assert_same_state(load_folder(patched["out"]), pair.ft_state)

    target = tmp_path / "target"
    target.mkdir()
    for f in pair.base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    applied = ok_json(*s, "apply", "curious@paper", target)
    assert applied["version_id"] == c["id"] and applied["regions"] == len(pair.changed)
    assert_same_state(load_folder(target), pair.ft_state)
    fsck = ok_json(*s, "fsck", "--read-data")
    assert fsck["ok"] and [p["kind"] for p in fsck["problems"]] == ["open-journal"]
    reverted = ok_json(*s, "revert", target)
    assert [j["state"] for j in reverted] == ["reverted"]
    assert file_bytes(target) == file_bytes(pair.base)

    assert ok_json(*s, "gc", "--dry-run")["objects"] == []  # revert left no garbage
    with Store.open(root) as store:
        garbage = store.objects.put(b"nothing references this" * 10)
    plan = ok_json(*s, "gc", "--dry-run")
    assert plan["dry_run"] and plan["objects"] == [garbage.id] and plan["bytes"] == garbage.size
    assert ok_json(*s, "gc", "--dry-run") == plan  # a dry run removes nothing
    done = ok_json(*s, "gc")
    assert done["objects"] == [garbage.id] and done["bytes"] == garbage.size
    # Re-hashed: the tensors' objects, the two manifests, the base's tensor list and record.
    assert ok_json(*s, "fsck", "--read-data") == {"ok": True, "problems": [], "objects_checked": len(pair.changed) + 4,
                                                  "versions_checked": 2, "repaired": []}
    stats = ok_json(*s, "stats")
    assert stats["bytes_stored"] == c["bytes_stored"] and stats["bytes_saved_by_dedup"] == c["bytes_stored"]
    assert stats["by_stance"]["curious"]["versions"] == 2


def test_tags_remotes_and_written_folders_print_their_json(tmp_path, pair, root) -> None:
    s = ("--store", root)
    ok_json(*s, "init")
    ok_json(*s, "base", "add", pair.base, "--name", "tiny")
    c = ok_json(*s, "commit", "curious", pair.ft, "--base", "tiny")
    ok_json(*s, "commit", "curious", pair.ft, "--base", "tiny", "--encoding", "int8")
    ok_json(*s, "tag", "curious@1", "v1")
    assert ok_json(*s, "tag", "--delete", "curious@v1") == {"id": c["id"], "ref": "curious@1", "tag": "v1",
                                                            "deleted": True}
    assert ok_json(*s, "remote", "list") == []
    for name in ("team", "backup"):
        assert invoke(*s, "remote", "add", name, f"file://{tmp_path / name}").exit_code == 0
    assert ok_json(*s, "remote", "list") == [{"name": "backup", "url": f"file://{tmp_path / 'backup'}"},
                                             {"name": "team", "url": f"file://{tmp_path / 'team'}"}]
    assert ok_json(*s, "export", "--mix", "curious=0.5,curious@1=0.25", "--out", tmp_path / "mix") == \
        {"mix": {"curious": 0.5, "curious@1": 0.25}, "out": str(tmp_path / "mix")}
    assert ok_json(*s, "apply", "curious", pair.base, "--scale", "0.5", "--out", tmp_path / "half") == \
        {"ref": "curious@2", "scale": 0.5, "out": str(tmp_path / "half")}


def test_the_lifecycle_commands_also_print_for_people(tmp_path, pair, root) -> None:
    s = ("--store", root)
    target = tmp_path / "target"
    target.mkdir()
    for f in pair.base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    commands = [
        ("init",), ("base", "add", pair.base, "--name", "tiny"), ("base", "list"),
        ("commit", "curious", pair.ft, "--base", "tiny"), ("stances",), ("log",), ("show", "curious"),
        ("tag", "curious", "v1"), ("export", "curious", "--out", tmp_path / "out"),
        ("apply", "curious", target), ("revert", target), ("fsck",), ("gc", "--dry-run"), ("gc",), ("stats",),
    ]
    for args in commands:
        result = invoke(*s, *args)
        assert result.exit_code == 0, (args, result.output, result.stderr)
        assert result.stdout.strip(), args
        with pytest.raises(json.JSONDecodeError):
            json.loads(result.stdout)


def test_the_store_is_found_from_env_or_from_a_folder_below(tmp_path, pair, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ok_json("init")["store"] == str(tmp_path / ".deltastore")
    below = tmp_path / "deep" / "er"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    ok_json("base", "add", pair.base)
    assert len(ok_json("base", "list")) == 1
    other = tmp_path / "other"
    ok_json("init", other)
    assert ok_json("base", "list", env={"DELTASTORE_DIR": str(other)}) == []


# -- errors -------------------------------------------------------------------------------------


def test_errors_are_one_line_on_stderr_with_exit_1(tmp_path, pair, root, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = failed("stances")
    assert "no deltastore store" in line and "deltastore init" in line
    s = ("--store", root)
    ok_json(*s, "init")
    assert "already exists" in failed(*s, "init")
    ok_json(*s, "base", "add", pair.base, "--name", "tiny")
    ok_json(*s, "commit", "curious-uncertainty", pair.ft, "--base", "tiny")

    assert "did you mean curious-uncertainty" in failed(*s, "show", "curious-uncertanty")
    assert "did you mean curious-uncertainty" in failed(*s, "show", "curious-uncertanty", "--json")
    assert "no base matches" in failed(*s, "commit", "x", pair.ft, "--base", "tiyn")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    assert "safetensors" in failed(*s, "commit", "x", tmp_path / "pickled", "--base", "tiny")
    assert "safetensors" in failed(*s, "base", "add", tmp_path / "pickled" / "pytorch_model.bin")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((pair.ft / sorted(p.name for p in pair.ft.glob("*.safetensors"))[0]).read_bytes()[:-9])
    assert "truncated" in failed(*s, "base", "add", broken)
    assert "unknown encoding" in failed(*s, "commit", "x", pair.ft, "--base", "tiny", "--encoding", "int3")
    assert "nothing was applied" in failed(*s, "revert", pair.base)
    assert "not empty" in failed(*s, "export", "curious-uncertainty", "--out", pair.base)
    assert "no version matches" in failed(*s, "tag", "nope", "x")
    target = tmp_path / "target"
    target.mkdir()
    for f in pair.base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    ok_json(*s, "apply", "curious-uncertainty", target)
    assert "revert" in failed(*s, "apply", "curious-uncertainty", target)
    assert "not the expected base" in failed(*s, "apply", "curious-uncertainty", pair.ft, "--out", tmp_path / "o")
    ok_json(*s, "revert", target)


def test_a_corrupt_object_fails_fsck_and_apply(tmp_path, pair, root) -> None:
    s = ("--store", root)
    ok_json(*s, "init")
    c = ok_json(*s, "commit", "curious", pair.ft, "--base", pair.base)
    with Store.open(root) as store:
        version = store.resolve("curious")
        oid = version.tensors[0].objects["xor"].id
        path = store.objects.path(oid)
    flip_byte(path, path.stat().st_size // 2)

    result = invoke(*s, "fsck", "--read-data", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"]
    [problem] = report["problems"]
    assert problem["subject"] == oid and problem["versions"] == ["curious@1"]
    text = invoke(*s, "fsck", "--read-data")
    assert text.exit_code == 1 and oid in text.stdout and "curious@1" in text.stdout
    line = failed(*s, "apply", "curious", pair.base, "--out", tmp_path / "out")
    assert oid in line and "fsck" in line
    assert not (tmp_path / "out").exists()
    assert c["id"] == version.id


def test_usage_errors_exit_2(tmp_path, pair, root) -> None:
    s = ("--store", root)
    ok_json(*s, "init")
    for args in [("frobnicate",), ("commit", "s"), ("commit", "s", pair.ft),
                 ("commit", "s", pair.ft, "--base", "x", "--top-k", "many"),
                 ("commit", "s", pair.ft, "--base", "x", "--meta", "novalue"),
                 ("show",), ("export", "s"), ("tag", "s"), ("log", "--wat")]:
        err = failed(*s, *args, code=2)
        assert "Usage:" in err or "Error:" in err, args


def test_debug_shows_the_traceback(tmp_path, root) -> None:
    Store.init(root).close()
    result = invoke("--store", root, "show", "nope", env={"DELTASTORE_DEBUG": "1"})
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "RefNotFound"
    # In a real process, the traceback reaches stderr only with DELTASTORE_DEBUG=1.
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cli", "--store", str(root), "show", "nope"]
    env = {**os.environ, "PYTHONPATH": str(repo), "DELTASTORE_DEBUG": "1"}
    debug = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "RefNotFound" in debug.stderr
    # Without it: the one line.
    plain = invoke("--store", root, "show", "nope")
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == ["Error: no version matches 'nope'; `deltastore stances` lists what there is"]


def test_ctrl_c_exits_130_after_cleaning_up(tmp_path, root) -> None:
    import errno
    import signal
    import time

    Store.init(root).close()
    pair = make_model(tmp_path)
    fifo = tmp_path / "meta.json"
    os.mkfifo(fifo)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cli", "--store", str(root), "commit", "s", str(pair.ft), "--base", str(pair.base),
           "--meta-file", str(fifo)]
    # PYTHONFAULTHANDLER: a command still running long after Ctrl-C is sent SIGABRT below, and
    # prints where each of its threads was.
    # The command starts with Ctrl-C's default handling, as from a terminal: a suite run in the
    # background of a script inherits SIGINT ignored, and so would the command.
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(repo), "PYTHONFAULTHANDLER": "1"}, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # The FIFO opens for writing once the command has opened it to read: then it is inside the
    # command, waiting for the file's bytes, when Ctrl-C comes. Polled, so that a command that
    # ends before it reads fails here with its output instead of leaving the test waiting.
    deadline = time.monotonic() + 300
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert proc.poll() is None, f"the command ended before it read --meta-file: {proc.communicate()}"
        assert time.monotonic() < deadline, "the command never opened --meta-file"
        time.sleep(0.01)
    with os.fdopen(fd, "w"):
        time.sleep(0.2)  # not a timing assertion: only so that the read has begun
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            raise AssertionError(f"still running 120 s after Ctrl-C: {proc.communicate()[1][-4000:]}") from None
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "Aborted" not in err
    with Store.open(root) as store:
        assert store.stances() == []
