"""Push, pull and clone through remotes: a shared folder (`file://`) and S3, the real s3fs client
against moto's S3 server on 127.0.0.1 (the server s3fs's own tests use), started and stopped here.

A remote is untrusted when pulled: each tampering below is written to it directly, the way
anyone with write access to the bucket could, and the pull must refuse it with one line and
the store left as it was.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.core.errors import RemoteDataRejected
from deltastore.core.hashing import bytes_id, canonical_json
from deltastore.sharing.remote import Remote, clone, pull, push
from deltastore.sharing.remotegc import gc, gc_plan

from helpers import commit_takes, file_bytes, finetune_, make_model, saved_state, store_snapshot, write_folder

ENCODINGS = {"curious-uncertainty": "lossless", "confident-expertise": "int8", "playful": "lowrank:4"}
REFS = [f"{s}@{n}" for s in ENCODINGS for n in (1, 2)]
ROOT = Path(__file__).resolve().parent.parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model on disk, and the pushing store A: three stances of two versions each."""
    tmp = tmp_path_factory.mktemp("world")
    pair = make_model(tmp)
    store = Store.init(tmp / "a-store")
    store.add_base(pair.base, name="tiny", hub_id="org/tiny-base")
    commit_takes(store, pair, tmp, ENCODINGS)
    yield pair, store
    store.close()


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["file", "s3"])
def remote_url(request, tmp_path, monkeypatch):
    """A fresh remote's URL: a folder, or a prefix of a new bucket on the S3 server. The
    variables the backend reads are set, as a user's environment would."""
    if request.param == "file":
        yield f"file://{tmp_path / 'shared' / 'team'}"
        return
    endpoint = request.getfixturevalue("s3_server")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    bucket = f"team-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}/deltas"


def snapshot(root: Path) -> tuple[dict, dict, bytes]:
    """What a store holds: catalog rows, object files, the ref log."""
    return (*store_snapshot(root), (root / "refs.log").read_bytes())


def exports_equal(a: Store, b: Store, refs, base: Path, tmp: Path) -> None:
    for ref in refs:
        run = uuid.uuid4().hex[:8]
        ours = a.export(ref, tmp / f"export-{run}-a")
        theirs = b.export(ref, tmp / f"export-{run}-b", base_weights=base)
        assert file_bytes(theirs) == file_bytes(ours)


# -- round trip ------------------------------------------------------------------------------------


def test_push_three_stances_clone_and_pull_give_the_same_versions_bit_exact(world, remote_url, tmp_path):
    pair, a = world
    pushed = push(a, REFS, remote_url)
    assert [rv.ref for rv in pushed.pushed] == sorted(REFS) and not pushed.already_there
    assert pushed.objects_uploaded > 0

    b, cloned = clone(remote_url, tmp_path / "b")
    assert sorted(rv.ref for rv in cloned.pulled) == sorted(REFS)
    assert [x.hub_id for x in b.bases()] == ["org/tiny-base"]
    with Store.init(tmp_path / "c-store") as c:
        pulled = pull(c, remote_url, stance="playful")
        assert sorted(rv.ref for rv in pulled.pulled) == ["playful@1", "playful@2"]
        pull(c, remote_url)
        ours = {(v.stance, v.number): (v.id, v.parent) for v in a.log()}
        for other in (b, c):
            assert {(v.stance, v.number): (v.id, v.parent) for v in other.log()} == ours
            assert other.fsck(read_data=True).ok
        exports_equal(a, c, REFS, pair.base, tmp_path)
        exports_equal(a, b, ["curious-uncertainty@2"], pair.base, tmp_path)

        # Again: no object moves either way, and nothing changes.
        again = push(a, REFS, remote_url)
        assert not again.pushed and again.objects_uploaded == 0 and again.bytes_uploaded == 0
        before = snapshot(c.root)
        back = pull(c, remote_url)
        assert not back.pulled and back.objects_downloaded == 0
        assert snapshot(c.root) == before
    b.close()


def test_only_missing_objects_move(world, remote_url, tmp_path):
    _, a = world
    first = push(a, ["curious-uncertainty@1"], remote_url)
    second = push(a, ["curious-uncertainty@1", "curious-uncertainty@2"], remote_url)
    # The base's two objects and whatever the versions share went up once.
    assert [rv.ref for rv in second.pushed] == ["curious-uncertainty@2"]
    assert [rv.ref for rv in second.already_there] == ["curious-uncertainty@1"]
    remote = Remote(remote_url)
    assert first.objects_uploaded + second.objects_uploaded == len(remote.object_ids())

    b, _ = clone(remote_url, tmp_path / "b")
    push(a, ["playful@1"], remote_url)
    more = pull(b, remote_url)
    playful = a.resolve("playful@1")
    shared = {o.id for e in a.resolve("curious-uncertainty@1").tensors for o in e.objects.values()} | \
             {o.id for e in a.resolve("curious-uncertainty@2").tensors for o in e.objects.values()}
    own = {o.id for e in playful.tensors for o in e.objects.values()} - shared
    assert [rv.ref for rv in more.pulled] == ["playful@1"] and more.objects_downloaded == len(own)
    b.close()


# -- many writers ----------------------------------------------------------------------------------


PUSHER = """
import sys
from deltastore import Store
from deltastore.sharing.remote import push
with Store.open(sys.argv[1]) as store:
    push(store, [f"shared@{n}" for n in range(1, 6)], sys.argv[2])
"""


def test_four_processes_pushing_five_versions_each_get_numbers_1_to_20(world, remote_url, tmp_path):
    pair, _ = world
    stores = []
    for k in range(4):
        with Store.init(tmp_path / f"pusher-{k}") as s:
            s.add_base(pair.base, name="tiny")
            for n in range(5):
                ft = copy.deepcopy(pair.base_module)
                finetune_(ft, seed=1000 * k + n)
                s.commit("shared", write_folder(tmp_path / f"ft-{k}-{n}", saved_state(ft)), base="tiny",
                         encoding="int8", message=f"pusher {k}, take {n}")
        stores.append(tmp_path / f"pusher-{k}")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(s), remote_url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for s in stores]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]

    listed = Remote(remote_url).versions()
    assert [rv.number for rv in listed] == list(range(1, 21))
    ids = {}
    for s in stores:
        with Store.open(s) as store:
            ids.update({v.id: (s, v.ref) for v in store.log()})
    assert set(rv.id for rv in listed) == set(ids)

    with Store.init(tmp_path / "reader") as reader:
        reader.add_base(pair.base, name="tiny")
        assert len(pull(reader, remote_url).pulled) == 20
        for rv in listed[::4]:  # every pusher's versions are among these
            with Store.open(ids[rv.id][0]) as origin:
                ours = origin.export(ids[rv.id][1], tmp_path / "x" / rv.ref)
            theirs = reader.export(rv.id[3:15], tmp_path / "y" / rv.ref)
            assert file_bytes(theirs) == file_bytes(ours)
            assert reader.resolve(rv.ref).id == rv.id


# -- a hostile remote ------------------------------------------------------------------------------


def _tamper_object(remote: Remote, a: Store) -> None:
    entry = a.resolve("curious-uncertainty@1").tensors[0]
    oid = next(iter(entry.objects.values())).id
    blob = bytearray(remote.fs.cat_file(remote.object_path(oid)))
    blob[-1] ^= 1
    _write(remote, remote.object_path(oid), bytes(blob))


def _manifest_naming_parent_folder(remote: Remote, a: Store) -> None:
    m = copy.deepcopy(a.resolve("curious-uncertainty@1").manifest())
    m["tensors"][0]["name"] = "../../etc/passwd"
    data = canonical_json(m)
    oid = bytes_id(data)
    _write(remote, remote.object_path(oid), _object_file(data))
    ref = canonical_json({"id": oid, "stance": "curious-uncertainty", "number": 9}) + b"\n"
    _write(remote, remote.ref_path("curious-uncertainty", 9), ref)


def _ref_to_a_missing_manifest(remote: Remote, a: Store) -> None:
    ref = canonical_json({"id": "b3:" + "ab" * 32, "stance": "playful", "number": 7}) + b"\n"
    _write(remote, remote.ref_path("playful", 7), ref)


def _write(remote: Remote, path: str, data: bytes) -> None:
    remote.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    remote.fs.pipe_file(path, data)


def _object_file(payload: bytes) -> bytes:
    from deltastore.repo.objects import FORMAT_VERSION, HEADER, MAGIC, RAW

    return HEADER.pack(MAGIC, FORMAT_VERSION, RAW, 0, len(payload)) + payload


@pytest.mark.parametrize("tamper", [_tamper_object, _manifest_naming_parent_folder, _ref_to_a_missing_manifest],
                         ids=["tampered-object", "manifest-naming-dotdot", "ref-to-missing-manifest"])
def test_pull_from_a_hostile_remote_refuses_with_one_line_and_changes_nothing(world, remote_url, tmp_path,
                                                                               tamper):
    pair, a = world
    push(a, REFS, remote_url)
    tamper(Remote(remote_url), a)
    with Store.init(tmp_path / "victim") as victim:
        victim.add_base(pair.base, name="tiny")
        before = snapshot(victim.root)
        with pytest.raises(RemoteDataRejected):
            pull(victim, remote_url)
        assert snapshot(victim.root) == before
        assert not list((victim.root / "tmp").iterdir())
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "victim"), "pull", "--remote", remote_url])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "nothing was stored" in result.output
    assert snapshot(tmp_path / "victim") == before


# -- the command line --------------------------------------------------------------------------------


def test_remote_commands_push_pull_and_clone(world, tmp_path):
    pair, a = world
    url = f"file://{tmp_path / 'team'}"
    run = CliRunner()
    store = ["--store", str(a.root)]
    assert run.invoke(cli, [*store, "remote", "add", "team", url]).exit_code == 0
    listed = run.invoke(cli, [*store, "remote", "list"])
    assert listed.exit_code == 0 and f"team\t{url}" in listed.output
    refused = run.invoke(cli, [*store, "remote", "add", "leaky", "s3://AKIA:secret@bucket/x"])
    assert refused.exit_code == 1 and "credentials" in refused.output
    pushed = run.invoke(cli, [*store, "push", "playful", "--remote", "team"])
    assert pushed.exit_code == 0, pushed.output
    # The remote numbers a stance's versions as they arrive: A's playful@2 is its first there.
    assert f"pushed playful@1 {a.resolve('playful@2').id[:15]}" in pushed.output
    cloned = run.invoke(cli, ["clone", url, str(tmp_path / "b")])
    assert cloned.exit_code == 0, cloned.output
    with Store.open(tmp_path / "b" / ".deltastore") as b:
        assert b.resolve("playful").id == a.resolve("playful@2").id
    # In the clone, the remote is "origin": `pull NAME` pulls from it.
    run.invoke(cli, [*store, "push", "curious-uncertainty", "--remote", "team"])
    again = run.invoke(cli, ["--store", str(tmp_path / "b" / ".deltastore"), "pull", "origin"])
    assert again.exit_code == 0 and "pulled curious-uncertainty@1" in again.output
    collected = run.invoke(cli, [*store, "gc", "--remote", "team", "--grace", "0"])
    assert collected.exit_code == 0 and "freed 0 B in 0 objects" in collected.output
    assert run.invoke(cli, [*store, "remote", "remove", "team"]).exit_code == 0
    gone = run.invoke(cli, [*store, "push", "playful", "--remote", "team"])
    assert gone.exit_code == 1 and "no remote named 'team'" in gone.output
    (a.root / "remotes.json").unlink()


# -- a push killed part-way -------------------------------------------------------------------------


KILLED_PUSHER = """
import os, signal, sys, threading
from deltastore import Store
from deltastore.sharing import remote as r

store_dir, url, log, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lock, count = threading.Lock(), [0]

def counted(write):
    def run(self, path, data):
        with lock:
            count[0] += 1
            mine = count[0]
        if mine == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # before this write
        done = write(self, path, data)
        if "/objects/" in path:
            with open(log, "a") as f:
                f.write(path.rsplit("/objects/", 1)[1] + "\\n")
        return done
    return run

r.Remote.put = counted(r.Remote.put)
r.Remote.create = counted(r.Remote.create)
with Store.open(store_dir) as store:
    r.push(store, sys.argv[5:], url)
"""


def test_a_push_killed_at_ten_moments_then_pushed_again_leaves_the_remote_consistent(world, tmp_path):
    pair, a = world
    scratch = f"file://{tmp_path / 'scratch'}"
    first = push(a, REFS, scratch)
    writes = first.objects_uploaded + 2 + len(REFS)  # objects, the marker, the base ref, the refs
    moments = sorted({1 + (writes - 1) * k // 9 for k in range(10)})
    assert len(moments) == 10
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in moments:
        url = f"file://{tmp_path / f'killed-{k}'}"
        log = tmp_path / f"uploads-{k}.txt"
        log.touch()
        killed = subprocess.run([sys.executable, "-c", KILLED_PUSHER, str(a.root), url, str(log), str(k), *REFS],
                                env=env, capture_output=True, timeout=300)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        # What a reader sees now: complete versions only.
        with Store.init(tmp_path / f"reader-{k}") as reader:
            if Remote(url).is_remote():
                got = pull(reader, url)
                assert reader.fsck(read_data=True).ok
                assert {rv.id for rv in got.pulled} <= {a.resolve(ref).id for ref in REFS}
        before = set(log.read_text().split())
        again = subprocess.run([sys.executable, "-c", KILLED_PUSHER, str(a.root), url, str(log), "0", *REFS],
                               env=env, capture_output=True, timeout=300)
        assert again.returncode == 0, again.stderr.decode()[-2000:]
        uploads = log.read_text().split()
        assert len(uploads) == len(set(uploads)), f"killed at write {k}: an object was uploaded twice"
        assert set(uploads) >= before
        listed = Remote(url).versions()
        assert sorted(rv.id for rv in listed) == sorted(a.resolve(ref).id for ref in REFS)
        assert [rv.number for rv in listed if rv.stance == "playful"] == [1, 2]
        with Store.init(tmp_path / f"after-{k}") as after:
            assert len(pull(after, url).pulled) == len(REFS)
            exports_equal(a, after, ["confident-expertise@2"], pair.base, tmp_path)


KILLED_PULLER = """
import os, signal, sys, threading
from deltastore import Store
from deltastore.sharing import remotefs, remotepull as r

store_dir, url, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
lock, count = threading.Lock(), [0]
download = r._download

def counted(remote, staging, object_id, size):
    got = download(remote, staging, object_id, size)
    with lock:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return got

r._download = counted
remotefs.TRANSFERS = 1
with Store.open(store_dir) as store:
    print(r.pull(store, url).objects_downloaded)
"""


def test_a_pull_killed_part_way_resumes_without_downloading_again(world, tmp_path):
    pair, a = world
    url = f"file://{tmp_path / 'team'}"
    push(a, REFS, url)
    with Store.init(tmp_path / "whole") as whole:
        total = pull(whole, url).objects_downloaded
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    Store.init(tmp_path / "b").close()
    store_dir = str(tmp_path / "b")
    killed = subprocess.run([sys.executable, "-c", KILLED_PULLER, store_dir, url, "5"], env=env,
                            capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    with Store.open(store_dir) as b:
        assert b.log() == []  # nothing landed
    again = subprocess.run([sys.executable, "-c", KILLED_PULLER, store_dir, url, "0"], env=env,
                           capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert int(again.stdout.split()[-1]) == total - 5 > 0
    with Store.open(store_dir) as b:
        assert len(b.log()) == len(REFS) and b.fsck(read_data=True).ok
        assert not list((b.root / "tmp").iterdir())


# -- gc of a remote ---------------------------------------------------------------------------------


def test_gc_of_a_remote_removes_what_a_killed_push_left_and_nothing_else(world, remote_url, tmp_path):
    pair, a = world
    push(a, ["curious-uncertainty@1"], remote_url)
    remote = Remote(remote_url)
    # A push that died after its uploads: objects no ref reaches.
    orphans = {o.id for e in a.resolve("playful@1").tensors for o in e.objects.values()} - remote.object_ids()
    for oid in orphans:
        remote.put(remote.object_path(oid), a.objects.path(oid).read_bytes())
    assert not gc_plan(remote_url).objects  # younger than the grace period
    plan = gc_plan(remote_url, grace_seconds=0)
    assert set(plan.objects) == orphans
    assert set(gc(plan).removed) == orphans
    with Store.init(tmp_path / "b") as b:
        assert [rv.ref for rv in pull(b, remote_url).pulled] == ["curious-uncertainty@1"]
        exports_equal(a, b, ["curious-uncertainty@1"], pair.base, tmp_path)


def test_a_clone_that_is_refused_leaves_no_folder(world, tmp_path):
    _, a = world
    url = f"file://{tmp_path / 'team'}"
    push(a, ["playful@1"], url)
    _ref_to_a_missing_manifest(Remote(url), a)
    result = CliRunner().invoke(cli, ["clone", url, str(tmp_path / "b")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "missing (a ref names it)" in result.output
    assert not (tmp_path / "b").exists()
    not_a_remote = CliRunner().invoke(cli, ["clone", f"file://{tmp_path / 'nothing'}", str(tmp_path / "c")])
    assert not_a_remote.exit_code == 1 and "is not a deltastore remote" in not_a_remote.output
    assert not (tmp_path / "c").exists()


def test_tags_travel_and_one_taken_there_stays_where_it_is(world, remote_url, tmp_path):
    """Tags on both backends (FORMAT.md §10): created with the refs' conditional create, never
    moved by a push or a pull (tests/test_tags.py has the rest)."""
    pair, _ = world
    with Store.init(tmp_path / "x") as x, Store.init(tmp_path / "y") as y:
        vx = x.commit("s", pair.ft, base=pair.base, tag="best", message="x").version
        vy = y.commit("s", pair.ft, base=pair.base, tag="best", message="y").version
        assert push(x, ["s"], remote_url).tags == ("s@best",)
        pushed = push(y, ["s"], remote_url)
        assert [rv.ref for rv in pushed.pushed] == ["s@2"] and pushed.tags == ()
        assert pushed.tags_not_moved == (f"tag s@best not pushed: the remote's names {vx.id[:15]}, "
                                         f"not s@1 {vy.id[:15]}",)
        b, cloned = clone(remote_url, tmp_path / "b")
        with b:
            assert cloned.tags == ("s@best",) and b.resolve("s@best").id == vx.id
        pulled = pull(y, remote_url)
        assert [rv.id for rv in pulled.pulled] == [vx.id] and pulled.tags == ()
        assert len(pulled.tags_not_moved) == 1 and y.resolve("s@best").id == vy.id
