"""In-place apply and revert touch only the files they patched, once: the target is known by
file identity (not by a path string), shared files are refused, one patch runs at a time, a
failed patch says what it left, and headers are checked as safetensors checks them.

Every case runs on a folder of one file and on a sharded folder, through the command line:
its exit code, its one-line message, the sha256 of every file in and around the target (the
base, the fine-tune, the parent folder) before and after, and fsck."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.weights import target as target_module
from deltastore.weights.target import patch_lock, resolve

from helpers import assert_same_state, load_folder, make_model, weight_bytes

LAYOUTS = ["one-file", "sharded"]


@dataclass
class World:
    """A store with versions `s` and `t` of one base; a user's project folder `proj` holding the
    user's own fine-tune (the same tensors and headers as the base), and `proj/work`, a copy
    of the base to patch."""

    tmp: Path
    store: Path
    pair: object
    proj: Path
    work: Path

    def run(self, *args: object) -> tuple[int, str, str]:
        result = CliRunner().invoke(cli, ["--store", str(self.store), *map(str, args)],
                                    env={"DELTASTORE_DEBUG": "", "DELTASTORE_DIR": ""})
        assert "Traceback" not in result.stderr, result.stderr
        if result.exit_code not in (0, 1):
            raise AssertionError((result.exit_code, result.stdout, result.stderr, result.exception))
        return result.exit_code, result.stdout, result.stderr

    def ok(self, *args: object) -> str:
        code, out, err = self.run(*args)
        assert code == 0, err
        return out

    def refused(self, *args: object) -> str:
        """A command that must fail in one line on stderr, exit 1: the line."""
        code, out, err = self.run(*args)
        assert code == 1 and out == "", (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), err
        return lines[0]

    def files(self) -> dict[str, str]:
        """sha256 of every file under the test's folder but the store (a symlink: its text)."""
        out = {}
        for p in sorted(self.tmp.rglob("*")):
            if self.store in p.parents or p == self.store:
                continue
            rel = str(p.relative_to(self.tmp))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def journals(self) -> list[dict]:
        with Store.open(self.store) as s:
            return s.catalog.open_journals()

    def fsck_ok(self) -> list[str]:
        """fsck finds no error; the kinds of its notes."""
        with Store.open(self.store) as s:
            report = s.fsck(read_data=True)
        assert report.ok, report.errors
        return sorted(p.kind for p in report.problems)

    def shard(self, folder: Path, k: int = -1) -> Path:
        return sorted(folder.glob("*.safetensors"))[k]


@pytest.fixture(params=LAYOUTS)
def world(request, tmp_path) -> World:
    pair = make_model(tmp_path, torch.bfloat16, sharded=request.param == "sharded")
    store = tmp_path / "store"
    with Store.init(store) as s:
        s.commit("s", pair.ft, base=pair.base)
        s.commit("t", pair.ft, base=pair.base, include="blocks.0")
    proj = tmp_path / "proj"
    shutil.copytree(pair.ft, proj)  # the user's own fine-tune, same headers as the base
    work = proj / "work"
    shutil.copytree(pair.base, work)
    return World(tmp_path, store, pair, proj, work)


def base_bytes(w: World) -> dict[str, bytes]:
    return weight_bytes(w.pair.base)


# -- 1. identity, not paths --------------------------------------------------------------------


def test_revert_of_a_deleted_target_writes_nothing_anywhere(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    shutil.rmtree(w.work)
    before = w.files()
    w.run("revert", w.work)
    assert w.files() == before  # proj's own fine-tune above all
    line = w.refused("revert", w.work)
    assert "does not exist" in line and "moved or was deleted" in line and "nothing was written" in line
    assert len(w.journals()) == 1
    assert w.fsck_ok() == ["open-journal"]


def test_a_moved_target_is_reverted_where_it_is_now(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    moved = w.tmp / "moved"
    w.work.rename(moved)
    before = w.files()
    assert "moved or was deleted" in w.refused("revert", w.work)
    assert w.files() == before
    w.ok("revert", moved)
    assert weight_bytes(moved) == base_bytes(w)
    after = w.files()
    assert {k: v for k, v in after.items() if not k.startswith("moved")} == \
        {k: v for k, v in before.items() if not k.startswith("moved")}
    assert w.journals() == [] and w.fsck_ok() == []


def test_revert_refuses_a_weight_file_replaced_by_a_symlink(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    victim = w.shard(w.work, 0)
    victim.unlink()
    victim.symlink_to(Path("..") / victim.name)  # proj/<same name>: the user's fine-tune
    before = w.files()
    line = w.refused("revert", w.work)
    assert "is now a symlink" in line and "nothing was written" in line
    assert w.files() == before
    assert len(w.journals()) == 1 and w.fsck_ok() == ["open-journal"]


def test_revert_refuses_a_weight_file_replaced_by_a_copy(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    victim = w.shard(w.work, 0)
    copy = victim.with_name("copy.tmp")
    shutil.copy2(victim, copy)
    os.replace(copy, victim)  # same bytes, another file: not the one the journal recorded
    before = w.files()
    line = w.refused("revert", w.work)
    assert "is another file now" in line and "nothing was written" in line
    assert w.files() == before
    assert len(w.journals()) == 1 and w.fsck_ok() == ["open-journal"]


def test_the_folder_named_any_way_is_one_target(world) -> None:
    w = world
    link = w.tmp / "link"
    link.symlink_to(w.work, target_is_directory=True)
    w.ok("apply", "s", w.work)
    applied = w.files()
    for path in (w.shard(w.work, 0), link, link / w.shard(w.work, -1).name, w.work / "." / ".." / "work"):
        line = w.refused("apply", "t", path)
        assert "already has s@1 applied in place" in line and "revert" in line
    assert w.files() == applied
    assert len(w.journals()) == 1
    w.ok("revert", link / w.shard(w.work, 0).name)
    assert weight_bytes(w.work) == base_bytes(w)
    assert w.journals() == [] and w.fsck_ok() == []
    assert "nothing was applied" in w.refused("revert", w.work)


# -- 2. shared files ---------------------------------------------------------------------------


def hard_link_copy(src: Path, dst: Path) -> None:
    """What `cp -al src dst` makes."""
    dst.mkdir()
    for p in src.iterdir():
        os.link(p, dst / p.name)


def test_hard_linked_files_are_refused_or_given_a_private_copy(world) -> None:
    w = world
    linked = w.tmp / "linked"
    hard_link_copy(w.pair.base, linked)
    before = w.files()
    line = w.refused("apply", "s", linked)
    assert "hard links" in line and "apply --out DIR" in line and "--break-links" in line
    assert w.files() == before and w.journals() == []
    w.ok("apply", "s", linked, "--break-links")
    assert_same_state(load_folder(linked), w.pair.ft_state)
    after = w.files()
    # The registered base, reached by the other name, kept every byte.
    assert {k: v for k, v in after.items() if not k.startswith("linked")} == \
        {k: v for k, v in before.items() if not k.startswith("linked")}
    w.ok("revert", linked)
    assert weight_bytes(linked) == base_bytes(w)
    assert w.journals() == [] and w.fsck_ok() == []


def test_revert_refuses_a_file_hard_linked_since_apply(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    os.link(w.shard(w.work, 0), w.tmp / "snapshot.safetensors")
    before = w.files()
    line = w.refused("revert", w.work)
    assert "hard links since apply" in line
    assert w.files() == before
    (w.tmp / "snapshot.safetensors").unlink()
    w.ok("revert", w.work)
    assert weight_bytes(w.work) == base_bytes(w)


def test_a_symlinked_weight_file_is_refused(world) -> None:
    w = world
    target = w.tmp / "target"
    target.mkdir()
    for p in w.pair.base.iterdir():
        (target / p.name).symlink_to(p)
    before = w.files()
    line = w.refused("apply", "s", target)
    assert "is a symlink" in line and "apply --out DIR" in line
    assert w.files() == before and w.journals() == []
    w.ok("apply", "s", target, "--out", w.tmp / "out")
    assert_same_state(load_folder(w.tmp / "out"), w.pair.ft_state)


# -- 3. one patch at a time --------------------------------------------------------------------


def test_an_apply_while_another_holds_the_lock_names_its_pid(world, monkeypatch) -> None:
    w = world
    monkeypatch.setattr(target_module, "LOCK_WAIT_S", 0.2)
    other = w.tmp / "other"
    shutil.copytree(w.pair.base, other)
    before = w.files()
    with patch_lock(w.store, resolve(w.work)):
        for path in (w.work, w.shard(w.work, 0)):
            line = w.refused("apply", "s", path)
            assert f"process {os.getpid()} is applying or reverting in place on {path}" in line
            assert "nothing was changed" in line
        assert w.files() == before and w.journals() == []
        w.ok("apply", "s", other)  # another target is not held up
        w.ok("revert", other)
    assert w.files() == before
    w.ok("apply", "s", w.work)
    with patch_lock(w.store, resolve(w.work)):
        assert f"process {os.getpid()}" in w.refused("revert", w.work)
    # A process working with another store holds the folder itself.
    with Store.init(w.tmp / "other-store") as elsewhere:
        with patch_lock(elsewhere.root, resolve(w.work)):
            line = w.refused("revert", w.work)
            assert "another process (working with another store?) is applying or reverting" in line
    shutil.rmtree(w.tmp / "other-store")
    w.ok("revert", w.work)
    assert w.files() == before and w.fsck_ok() == []


# Imports deltastore once, then for each round forks two children that wait on one pipe and
# apply their stance to the same folder at once; prints each child's stance and exit status.
RACE = r"""
import json, os, sys
from deltastore import Store

store, target, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for k in range(rounds):
    sys.stdin.readline()  # the test has put a fresh copy of the base in place
    go_r, go_w = os.pipe()
    pids = {}
    for stance in ("s", "t"):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)
            code = 0
            try:
                with Store.open(store) as s:
                    s.apply_files(stance, target)
            except Exception as e:
                print(type(e).__name__, e, file=sys.stderr)
                code = 3
            os._exit(code)
        pids[pid] = stance
    os.close(go_r)
    os.write(go_w, b"gogo")
    os.close(go_w)
    results = {}
    for pid, stance in pids.items():
        _, status = os.waitpid(pid, 0)
        results[stance] = os.waitstatus_to_exitcode(status)
    print(json.dumps(results), flush=True)
"""


def test_two_applies_at_once_one_wins_and_no_file_is_mixed(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16, sharded=True, shards=4)
    store = tmp_path / "store"
    with Store.init(store) as s:
        s.commit("s", pair.ft, base=pair.base)
        s.commit("t", pair.ft, base=pair.base, encoding="int4")  # other bytes in every shard
        patched = {}
        for stance in ("s", "t"):
            ref = tmp_path / f"ref-{stance}"
            shutil.copytree(pair.base, ref)
            s.apply_files(stance, ref)
            patched[stance] = weight_bytes(ref)
    base = weight_bytes(pair.base)
    assert all(patched["s"][n] != patched["t"][n] != base[n] for n in base)
    target = tmp_path / "target"
    script = tmp_path / "race.py"
    script.write_text(RACE)
    rounds = 20
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(target), str(rounds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for k in range(rounds):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(pair.base, target)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            results = json.loads(proc.stdout.readline())
            winners = [stance for stance, code in results.items() if code == 0]
            assert len(winners) == 1, (k, results)
            assert sorted(results.values()) == [0, 3], results
            assert weight_bytes(target) == patched[winners[0]], k
            with Store.open(store) as s:
                [journal] = [j for j in s.catalog.open_journals() if j["target"] == str(target)]
                s.revert_files(target)
            assert weight_bytes(target) == base
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with Store.open(store) as s:
        assert s.fsck(read_data=True).ok


# -- 4. a failure after the first write --------------------------------------------------------


def unwritable(path: Path) -> None:
    """Make a file unwritable even to root (an immutable file), or skip the test."""
    path.chmod(0o444)
    if os.access(path, os.W_OK):
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot make a file unwritable here")


def writable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


def test_an_unwritable_shard_stops_apply_before_its_first_write(world) -> None:
    w = world
    last = w.shard(w.work, -1)
    unwritable(last)
    try:
        before = w.files()
        line = w.refused("apply", "s", w.work)
        assert f"{last} is not writable" in line and "nothing was changed" in line
        assert w.files() == before and w.journals() == []
        assert w.fsck_ok() == []
    finally:
        writable(last)
    w.ok("apply", "s", w.work)
    w.ok("revert", w.work)
    assert weight_bytes(w.work) == base_bytes(w)


def failing_fsync(monkeypatch, *, fail_from: int, fail_until: int | None) -> None:
    """os.fsync of the weight files fails (EIO) from its `fail_from`-th call up to its
    `fail_until`-th (None: on and on): a disk failing while a shard is written."""
    real, calls = os.fsync, [0]

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            calls[0] += 1
            if calls[0] >= fail_from and (fail_until is None or calls[0] <= fail_until):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_write_that_fails_midway_is_rolled_back(world, monkeypatch) -> None:
    w = world
    before = w.files()
    files = len(list(w.work.glob("*.safetensors")))
    failing_fsync(monkeypatch, fail_from=files, fail_until=files)  # the last file written
    line = w.refused("apply", "s", w.work)
    assert "Input/output error" in line and "put back: nothing was changed" in line
    monkeypatch.undo()
    assert w.files() == before
    assert w.journals() == [] and w.fsck_ok() == []


def test_a_write_that_fails_and_cannot_be_undone_says_how_far_it_got(world, monkeypatch) -> None:
    w = world
    before = w.files()
    files = len(list(w.work.glob("*.safetensors")))
    failing_fsync(monkeypatch, fail_from=files, fail_until=None)
    line = w.refused("apply", "s", w.work)
    assert f"{files - 1} of {files} files patched, {w.shard(w.work, -1).name} in part" in line
    assert f"half patched: run `deltastore revert {w.work}`" in line
    monkeypatch.undo()
    assert {k: v for k, v in w.files().items() if not k.startswith("proj/work/")} == \
        {k: v for k, v in before.items() if not k.startswith("proj/work/")}
    assert w.fsck_ok() == ["unfinished-journal"]
    w.ok("revert", w.work)
    assert w.files() == before and w.journals() == [] and w.fsck_ok() == []


# -- 5. headers checked as safetensors checks them ---------------------------------------------


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with `edit(header) -> (header, data)`."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = edit(json.loads(raw[8:8 + n]), raw[8 + n:])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
    """Two tensors of equal size on one byte range: the data section one tensor shorter."""
    by_start = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = next((a, b) for a, b in zip(by_start, by_start[1:])
                if header[a]["data_offsets"][1] - header[a]["data_offsets"][0] ==
                header[b]["data_offsets"][1] - header[b]["data_offsets"][0])
    (s, e) = header[b]["data_offsets"]
    for k in by_start:
        if header[k]["data_offsets"][0] >= e:
            header[k]["data_offsets"] = [x - (e - s) for x in header[k]["data_offsets"]]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return header, data[:s] + data[e:]


def gap(header: dict, data: bytes) -> tuple[dict, bytes]:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    header[last]["data_offsets"] = [x + 8 for x in header[last]["data_offsets"]]
    return header, data + bytes(8)


def trailing(header: dict, data: bytes) -> tuple[dict, bytes]:
    return header, data + b"\0"


def reordered(header: dict, data: bytes) -> tuple[dict, bytes]:
    """The header's entries in another order than their data: allowed."""
    return dict(reversed(list(header.items()))), data


@pytest.mark.parametrize("edit, refused", [(overlap, "overlaps"), (gap, "belong to no tensor"),
                                           (trailing, "tensors end at byte"), (reordered, None)])
def test_headers_are_refused_exactly_when_safetensors_refuses_them(tmp_path, edit, refused) -> None:
    from safetensors import safe_open

    from deltastore.weights.models import read_header
    from deltastore.core.errors import ModelFormatError

    pair = make_model(tmp_path, torch.float32)
    path = tmp_path / "model.safetensors"
    shutil.copy(pair.base / "model.safetensors", path)
    rewrite_header(path, edit)
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
        theirs = None
    except Exception as e:
        theirs = e
    if refused is None:
        assert theirs is None
        read_header(path)
    else:
        assert theirs is not None
        with pytest.raises(ModelFormatError, match=refused):
            read_header(path)


def test_overlapping_tensors_are_refused_everywhere(world) -> None:
    w = world
    # Two tensors with the same bytes (so that one range can serve both) in every layout.
    state = dict(w.pair.base_state)
    names = sorted(n for n in state if n.endswith("attn.bias"))
    for n in names:
        state[n] = torch.zeros_like(state[n])
    from helpers import write_folder

    shards = len(list(w.pair.base.glob("*.safetensors")))
    twin = write_folder(w.tmp / "twin", state, shards=shards)
    victim = sorted(twin.glob("*.safetensors"))[0]
    rewrite_header(victim, overlap)
    before = w.files()
    for args in (("base", "add", twin), ("commit", "u", w.pair.ft, "--base", twin), ("apply", "s", twin)):
        line = w.refused(*args)
        assert "overlaps" in line and str(victim) in line, line
    assert w.files() == before and w.journals() == [] and w.fsck_ok() == []


# -- 6. the base cannot be registered from a patched folder ------------------------------------


def test_a_patched_folder_is_never_taken_for_a_base(world) -> None:
    w = world
    w.ok("apply", "s", w.pair.base)  # the registered base's own folder
    before = w.files()
    for args in (("base", "add", w.pair.base), ("commit", "u", w.pair.ft, "--base", w.pair.base)):
        line = w.refused(*args)
        assert f"{w.pair.base} has s@1 applied in place" in line
        assert f"run `deltastore revert {w.pair.base}` first" in line
    # A command that reads the registered base from where it was added names the journal too.
    line = w.refused("export", "t", "--out", w.tmp / "out")
    assert "differ from those of base" in line and f"{w.pair.base} has s@1 applied in place" in line
    assert w.files() == before
    with Store.open(w.store) as s:
        assert len(s.bases()) == 1
    w.ok("revert", w.pair.base)
    w.ok("export", "t", "--out", w.tmp / "out")
    assert w.fsck_ok() == []


# -- 7. wrong-model messages -------------------------------------------------------------------


def test_another_base_is_named_first_and_out_is_not_offered(world) -> None:
    w = world
    other = make_model(w.tmp / "other", torch.bfloat16, seed=7)
    with Store.open(w.store) as s:
        b = s.add_base(other.base, name="other")
    odd = make_model(w.tmp / "odd", torch.bfloat16, hidden=8)  # another model: other shapes
    before = w.files()
    line = w.refused("apply", "s", other.base)
    assert line.startswith(f"Error: {other.base} is base other {b.id[:15]}, not s@1's base ")
    assert "tensors differ" in line and "blocks.0.attn.bias" in line and "--out" not in line
    line = w.refused("apply", "s", w.proj)  # the user's fine-tune itself
    assert f"{w.proj} already holds s@1's own weights" in line and "--out" not in line
    line = w.refused("apply", "s", odd.base)
    assert line.startswith(f"Error: {odd.base} is not s@1's base ") and "differ in name, dtype or shape" in line
    assert "not s@1's base" in line and "--out" not in line
    assert w.files() == before and w.journals() == [] and w.fsck_ok() == []


def test_a_journal_from_before_file_identities_still_reverts(world) -> None:
    w = world
    w.ok("apply", "s", w.work)
    with Store.open(w.store) as s:
        [row] = s.catalog.open_journals()
        plan = json.loads(row["plan"])
        del plan["identity"], plan["root"]  # as journals were written before
        with s.catalog.transaction():
            s.catalog.conn.execute("UPDATE journals SET plan = ?, target = ? WHERE id = ?",
                                   [json.dumps(plan, sort_keys=True), os.path.abspath(w.work), row["id"]])
    assert "already has s@1 applied in place" in w.refused("apply", "t", w.work)
    w.ok("revert", w.work)
    assert weight_bytes(w.work) == base_bytes(w)
    assert w.journals() == [] and w.fsck_ok() == []
