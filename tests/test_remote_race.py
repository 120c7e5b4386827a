"""gc of a remote racing a push, and a push repairing what it relies on (schema/FORMAT.md §10).

Each interleaving is forced: push and gc call a no-op `_step(name)` between their steps, and a
test replaces it to run the other operation at that moment, on a shared folder and on S3
through moto. Whatever the order, every ref on the remote must reach only objects that are
there and intact, and the versions must pull bit-exact.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import deltastore.sharing.remotepush as push_module
import deltastore.sharing.remotegc as gc_module
from cli.main import cli
from deltastore import Store
from deltastore.core.errors import RemoteDataRejected, RemoteError, RemoteLocked
from deltastore.sharing.remote import Remote, clone, pull, push
from deltastore.sharing.remotegc import GRACE_SECONDS, _reached, gc, gc_plan

from test_remote import exports_equal, remote_url, s3_server, world  # noqa: F401 (fixtures)

PUSH_STEPS = ["locked", "listed", "uploaded", "refs"]
GC_STEPS = ["plan:refs-read", "planned", "locked", "reread", "deleted"]
FIRST, RACER = "curious-uncertainty@1", "playful@1"
DAYS_AGO = time.time() - 2 * 24 * 3600


@pytest.fixture(autouse=True)
def fresh_s3_clients():
    """s3fs keeps one client per set of options, whatever the endpoint variable says: one made
    for the S3 server of a module that ran before (stopped since) would be used again."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


def needed(a: Store, ref: str) -> set[str]:
    """Every object a version on a remote needs: its manifest, its payloads, its base's two."""
    v = a.resolve(ref)
    record = a.catalog.one("SELECT record FROM bases WHERE id = ?", [v.base_id])["record"]
    return {v.id, v.base_id, record, *(o.id for e in v.tensors for o in e.objects.values())}


def dangling(url: str) -> set[str]:
    """What the remote's refs reach that is not there (or a manifest that is not)."""
    remote = Remote(url)
    try:
        reached = _reached(remote, remote.versions())
    except RemoteDataRejected as e:
        return {str(e)}
    return reached - remote.object_ids()


def leave_orphans(a: Store, url: str, ref: str) -> set[str]:
    """What a push killed after its uploads leaves: the version's objects, and no ref."""
    remote = Remote(url)
    orphans = needed(a, ref) - remote.object_ids()
    for oid in orphans:
        remote.put(remote.object_path(oid), a.objects.path(oid).read_bytes())
    return orphans


def run_gc(url: str, grace: float = 0) -> object:
    """A whole gc (plan, then execute), or the lock that made it refuse."""
    try:
        return gc(gc_plan(url, grace_seconds=grace))
    except RemoteError as e:
        return e


def run_push(a: Store, url: str, refs: list[str]) -> object:
    try:
        return push(a, refs, url)
    except RemoteError as e:
        return e


def at(monkeypatch, module, step: str, action) -> list:
    """Run `action` once when `module` reaches `step`; after it, check at every later step that
    no ref on the remote names a missing object. Returns what `action` returned (a list of one)."""
    ran: list = []
    checks: list = []

    def hook(name: str) -> None:
        if name == step and not ran:
            ran.append(action())
        elif ran:
            checks.append((name, action.url, dangling(action.url)))
    hook.checks = checks
    monkeypatch.setattr(module, "_step", hook)
    return ran


class Action:
    def __init__(self, url: str, call):
        self.url, self.call = url, call

    def __call__(self):
        return self.call()


def settle(a: Store, url: str, pair_base: Path, tmp_path: Path) -> None:
    """The end state any interleaving must reach: the racing version pushed (again if its push
    was refused), a later gc removing nothing a ref needs, and both versions pulling bit-exact."""
    again = push(a, [RACER], url)
    assert not again.pushed or [rv.ref.split("@")[0] for rv in again.pushed] == ["playful"]
    assert dangling(url) == set()
    later = gc(gc_plan(url, grace_seconds=0))
    assert not set(later.removed) & (needed(a, FIRST) | needed(a, RACER))
    assert dangling(url) == set()
    with Store.init(tmp_path / "reader") as reader:
        assert len(pull(reader, url).pulled) == 2
        assert reader.fsck(read_data=True).ok
        exports_equal(a, reader, [RACER], pair_base, tmp_path)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text
    return text


# -- gc at each step of a push ---------------------------------------------------------------------


@pytest.mark.parametrize("step", PUSH_STEPS)
def test_gc_at_each_step_of_a_push_loses_nothing(world, remote_url, tmp_path, monkeypatch, step):
    pair, a = world
    push(a, [FIRST], remote_url)
    leave_orphans(a, remote_url, RACER)  # found by the push, planned by the gc (grace 0)
    ran = at(monkeypatch, push_module, step, Action(remote_url, lambda: run_gc(remote_url)))
    push(a, [RACER], remote_url)
    assert ran and dangling(remote_url) == set()
    assert isinstance(ran[0], RemoteLocked) and "locked by a push" in one_line(ran[0])  # its lock kept gc out
    assert all(not missing for _, _, missing in push_module._step.checks), push_module._step.checks
    monkeypatch.setattr(push_module, "_step", lambda name: None)
    settle(a, remote_url, pair.base, tmp_path)


# -- a push at each step of a gc -------------------------------------------------------------------


@pytest.mark.parametrize("step", GC_STEPS)
def test_a_push_at_each_step_of_a_gc_loses_nothing(world, remote_url, tmp_path, monkeypatch, step):
    """The issue's interleaving is "reread": gc has read the refs again, the push finds every
    object there (a killed push's, past the grace period), uploads nothing and makes its ref,
    then gc deletes what it planned."""
    pair, a = world
    push(a, [FIRST], remote_url)
    leave_orphans(a, remote_url, RACER)
    ran = at(monkeypatch, gc_module, step, Action(remote_url, lambda: run_push(a, remote_url, [RACER])))
    gc(gc_plan(remote_url, grace_seconds=0))
    assert ran and dangling(remote_url) == set()
    # The plan takes no lock; while gc executes, its lock keeps the push out.
    assert isinstance(ran[0], RemoteLocked) == (step in ("locked", "reread", "deleted"))
    if isinstance(ran[0], RemoteLocked):
        assert "locked by a gc" in one_line(ran[0])
    assert all(not missing for _, _, missing in gc_module._step.checks), gc_module._step.checks
    monkeypatch.setattr(gc_module, "_step", lambda name: None)
    settle(a, remote_url, pair.base, tmp_path)


def test_a_killed_push_older_than_the_grace_period_then_a_push_during_gc(world, tmp_path, monkeypatch):
    """With the default grace period: the objects a push killed two days ago left are what gc
    plans; a new push finds them and relies on them."""
    pair, a = world
    url = f"file://{tmp_path / 'team'}"
    push(a, [FIRST], url)
    remote = Remote(url)
    for oid in leave_orphans(a, url, RACER):
        os.utime(remote.object_path(oid), (DAYS_AGO, DAYS_AGO))
    ran = at(monkeypatch, gc_module, "reread", Action(url, lambda: run_push(a, url, [RACER])))
    result = gc(gc_plan(url, grace_seconds=GRACE_SECONDS))
    assert ran and result.plan.objects
    assert dangling(url) == set()
    monkeypatch.setattr(gc_module, "_step", lambda name: None)
    settle(a, url, pair.base, tmp_path)


# -- a push repairs what it relies on --------------------------------------------------------------


def _flip(remote: Remote, oid: str) -> None:
    path = remote.object_path(oid)
    blob = bytearray(remote.fs.cat_file(path))
    blob[len(blob) // 2] ^= 0x10
    remote.fs.pipe_file(path, bytes(blob))


def _truncate(remote: Remote, oid: str) -> None:
    path = remote.object_path(oid)
    remote.fs.pipe_file(path, remote.fs.cat_file(path)[:-7])


def test_a_flipped_bit_in_a_base_list_on_the_remote_is_repaired_by_the_next_push(world, remote_url, tmp_path):
    pair, a = world
    push(a, [FIRST], remote_url)
    remote = Remote(remote_url)
    base = a.resolve(FIRST).base_id
    _flip(remote, base)
    later = push(a, ["curious-uncertainty@2"], remote_url)  # a later version of the same base
    b, cloned = clone(remote_url, tmp_path / "b")
    assert len(cloned.pulled) == 2 and b.fsck(read_data=True).ok
    exports_equal(a, b, ["curious-uncertainty@2"], pair.base, tmp_path)
    b.close()
    assert later.objects_repaired == 1 and later.objects_uploaded >= 1


@pytest.mark.parametrize("damage", [_truncate, _flip, "remove"], ids=["truncated-payload", "flipped-manifest",
                                                                      "removed-payload"])
def test_a_push_again_repairs_a_damaged_or_missing_object(world, remote_url, tmp_path, damage):
    """The version is already there: the push says so, and puts back what its ref needs."""
    pair, a = world
    push(a, [FIRST], remote_url)
    remote = Remote(remote_url)
    v = a.resolve(FIRST)
    payload = max((o for e in v.tensors for o in e.objects.values()), key=lambda o: o.size).id

    def harm() -> None:
        if damage == "remove":
            remote.fs.rm_file(remote.object_path(payload))
        elif damage is _flip:
            _flip(remote, v.id)  # the manifest
        else:
            damage(remote, payload)
    harm()
    with Store.init(tmp_path / "before") as broken:
        with pytest.raises(RemoteDataRejected):
            pull(broken, remote_url)
    again = push(a, [FIRST], remote_url)
    assert [rv.ref for rv in again.already_there] == [FIRST]
    with Store.init(tmp_path / "after") as fixed:
        assert len(pull(fixed, remote_url).pulled) == 1 and fixed.fsck(read_data=True).ok
        exports_equal(a, fixed, [FIRST], pair.base, tmp_path)
    assert again.objects_repaired == again.objects_uploaded == 1
    assert push(a, [FIRST], remote_url).objects_uploaded == 0  # and nothing more after
    harm()
    shown = CliRunner().invoke(cli, ["--store", str(a.root), "push", FIRST, "--remote", remote_url])
    assert shown.exit_code == 0 and "1 repaired" in shown.output.splitlines()[-1], shown.output


# -- locks -----------------------------------------------------------------------------------------


def test_gc_during_a_push_refuses_with_one_line_naming_the_lock_and_its_age(world, tmp_path, monkeypatch):
    _, a = world
    url = f"file://{tmp_path / 'team'}"
    push(a, [FIRST], url)
    root = Path(url.removeprefix("file://"))
    seen = []

    def cli_gc():
        before = sorted(p.relative_to(root).as_posix() for p in (root / "objects").rglob("*"))
        result = CliRunner().invoke(cli, ["--store", str(a.root), "gc", "--remote", url, "--grace", "0"])
        after = sorted(p.relative_to(root).as_posix() for p in (root / "objects").rglob("*"))
        seen.append((result, before == after))
    at(monkeypatch, push_module, "uploaded", Action(url, cli_gc))
    push(a, [RACER], url)
    result, unchanged = seen[0]
    assert result.exit_code == 1 and unchanged
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "locked by a push" in lines[0] and "locks/" in lines[0] and " ago" in lines[0]
    assert not list((root / "locks").iterdir())  # both locks went with their holders


def test_a_stale_lock_is_removed_with_a_line_saying_so(world, remote_url, tmp_path, monkeypatch):
    _, a = world
    push(a, [FIRST], remote_url)
    remote = Remote(remote_url)
    dead = remote.path("locks", "dead-push.json")
    remote.put(dead, b'{"host":"gone","kind":"push","pid":1}\n')
    if remote.local:
        os.utime(dead, (DAYS_AGO, DAYS_AGO))
    else:  # S3 keeps its own times: make "stale" short and wait it out
        monkeypatch.setattr("deltastore.sharing.remotelock.STALE_SECONDS", 2.0)
        time.sleep(3.1)
    result = CliRunner().invoke(cli, ["--store", str(a.root), "gc", "--remote", remote_url, "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert "removed stale lock locks/dead-push.json" in result.output and "Traceback" not in result.output
    assert not remote.fs.exists(dead)


def test_two_gcs_never_run_at_once(world, tmp_path, monkeypatch):
    _, a = world
    url = f"file://{tmp_path / 'team'}"
    push(a, [FIRST], url)
    leave_orphans(a, url, RACER)
    ran = at(monkeypatch, gc_module, "reread", Action(url, lambda: run_gc(url)))
    first = gc(gc_plan(url, grace_seconds=0))
    assert isinstance(ran[0], RemoteLocked) and "locked by a gc" in one_line(ran[0])
    assert first.removed and not Remote(url).find("locks")


def test_a_held_lock_is_refreshed_and_stays_live(world, tmp_path, monkeypatch):
    """A push slower than the stale time keeps its lock live by refreshing it."""
    _, a = world
    monkeypatch.setattr("deltastore.sharing.remotelock.REFRESH_SECONDS", 0.2)
    monkeypatch.setattr("deltastore.sharing.remotelock.STALE_SECONDS", 2.0)
    url = f"file://{tmp_path / 'team'}"
    push(a, [FIRST], url)

    def slow_then_gc():
        time.sleep(3.0)
        return run_gc(url)
    ran = at(monkeypatch, push_module, "uploaded", Action(url, slow_then_gc))
    result = push(a, [RACER], url)
    assert isinstance(ran[0], RemoteError) and "locked by a push" in str(ran[0])
    assert [rv.ref for rv in result.pushed] == ["playful@1"]


def test_a_push_whose_lock_was_removed_makes_no_ref(world, tmp_path, monkeypatch):
    """A push that paused past the stale time may have had its lock removed, and a gc run: it
    stops before making refs rather than name objects it can no longer vouch for."""
    _, a = world
    monkeypatch.setattr("deltastore.sharing.remotelock.REFRESH_SECONDS", 0.1)
    url = f"file://{tmp_path / 'team'}"
    push(a, [FIRST], url)
    remote = Remote(url)

    def break_lock():
        for rel in remote.find("locks"):
            remote.fs.rm_file(remote.path("locks", rel))
        time.sleep(0.5)
    at(monkeypatch, push_module, "uploaded", Action(url, break_lock))
    with pytest.raises(RemoteError, match="lock"):
        push(a, [RACER], url)
    assert [rv.stance for rv in remote.versions()] == ["curious-uncertainty"]
