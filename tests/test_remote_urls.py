"""Which URLs can be a remote, what `clone` may remove, and what a remote command says when its
backend fails: one line that names what to set or check, exit 1, no traceback, and the store
(and the folder a clone was given) byte for byte as it was.

The S3 failures are real ones, from the real s3fs client against moto's S3 server on
127.0.0.1: no credentials anywhere (the AWS variables unset, the credential and config files
empty), a bucket that does not exist, an access key that IAM refuses (the server's
authorization switched on), and an endpoint whose port nothing listens on.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.output import escape
from deltastore import Store
from deltastore.core.errors import UnsafeInput
from deltastore.sharing.remote import clone, push, remotes

from helpers import file_bytes, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one base and one version, s@1."""
    tmp = tmp_path_factory.mktemp("world")
    pair = make_model(tmp)
    store = Store.init(tmp / "a" / ".deltastore")
    store.add_base(pair.base, name="tiny")
    store.commit("s", pair.ft, base="tiny", encoding="int8")
    store.close()
    return tmp / "a" / ".deltastore"


def cli_run(*args) -> tuple[int, list[str], BaseException | None]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines(), result.exception


def refused(*args) -> str:
    """The one line a command refuses with (exit 1, no traceback)."""
    code, lines, exception = cli_run(*args)
    assert code == 1 and isinstance(exception, SystemExit), (lines, exception)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def pushed_remote(world: Path, tmp_path: Path) -> str:
    url = f"file://{tmp_path / 'team'}"
    with Store.open(world) as a:
        push(a, ["s@1"], url)
    return url


# -- clone creates or refuses: it never removes what was there before it ----------------------------


def a_store_without_its_catalog(folder: Path, world: Path) -> Path:
    """A store folder whose STORE file and catalog are gone: its objects, ref log and a journal's
    originals are still there (`fsck --rebuild-catalog` brings the catalog back from them)."""
    root = folder / ".deltastore"
    (root / "objects" / "9a").mkdir(parents=True)
    (root / "objects" / "9a" / ("0c" * 31)).write_bytes(b"an object's bytes")
    (root / "refs.log").write_bytes((world / "refs.log").read_bytes())
    (root / "journals" / "apply-1").mkdir(parents=True)
    (root / "journals" / "apply-1" / "original-0.bin").write_bytes(b"the model file as it was")
    return root


def test_clone_into_a_store_folder_holding_files_refuses_and_removes_nothing(world, tmp_path):
    # Fails before this commit: clone initialised over the folder, and when the pull from the
    # mistyped URL failed it removed .deltastore whole, objects, refs.log and journal included.
    work = tmp_path / "work"
    a_store_without_its_catalog(work, world)
    before = file_bytes(work)
    mistyped = f"file://{tmp_path / 'no-such-remote'}"
    line = refused("clone", mistyped, work)
    assert "not empty" in line and ".deltastore" in line
    assert file_bytes(work) == before
    # A URL that works is refused the same: the folder is not clone's to fill.
    line = refused("clone", pushed_remote(world, tmp_path), work)
    assert "not empty" in line
    assert file_bytes(work) == before
    with pytest.raises(UnsafeInput, match="not empty"):
        clone(mistyped, work)
    assert file_bytes(work) == before


def test_a_failed_clone_removes_only_the_folders_it_created(tmp_path):
    bad = f"file://{tmp_path / 'no-such-remote'}"
    # An empty .deltastore that was there stays, empty. (Before this commit: removed.)
    (tmp_path / "empty" / ".deltastore").mkdir(parents=True)
    assert "is not a deltastore remote" in refused("clone", bad, tmp_path / "empty")
    assert (tmp_path / "empty" / ".deltastore").is_dir()
    assert not list((tmp_path / "empty" / ".deltastore").iterdir())
    # A folder with other files keeps them; the .deltastore clone made goes.
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    refused("clone", bad, tmp_path / "project")
    assert file_bytes(tmp_path / "project") == {"notes.txt": b"mine"}
    assert [p.name for p in (tmp_path / "project").iterdir()] == ["notes.txt"]
    # Folders clone made on the way (new/deeper/) go with it. (Before this commit: new/ stayed.)
    refused("clone", bad, tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()


# -- which URLs can be a remote ----------------------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("file://nas/share/team", "host 'nas'"),
    ("file://127.0.0.1/srv/team", "host '127.0.0.1'"),
    ("memory://team", "memory"),
])
def test_a_url_that_cannot_hold_a_remote_is_refused_by_every_command(world, tmp_path, monkeypatch, url, says):
    # Fails before this commit: file://nas/share was taken as the relative folder ./nas/share, and
    # memory://team as a remote that push reported "pushed" to and that was gone at exit.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = file_bytes(world)
    store = ["--store", world]
    for args in (["remote", "add", "team", url], ["push", "s", "--remote", url], ["pull", "--remote", url],
                 ["gc", "--remote", url, "--dry-run"], ["gc", "--remote", url, "--grace", "0"]):
        assert says in refused(*store, *args), args
    assert says in refused("clone", url, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert file_bytes(world) == before and not list(cwd.iterdir())
    assert url not in remotes(world).values()


def test_file_localhost_is_the_same_absolute_folder_from_any_working_folder(world, tmp_path, monkeypatch):
    # Fails before this commit: push wrote under ./localhost/<path> of each working folder.
    target = tmp_path / "shared" / "team"
    url = f"file://localhost{target}"
    for cwd in ("one", "two"):
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        code, lines, _ = cli_run("--store", world, "push", "s", "--remote", url)
        assert code == 0, lines
        assert not list((tmp_path / cwd).iterdir())
    assert (target / "REMOTE").is_file() and len(list((target / "refs" / "s").iterdir())) == 1
    code, lines, _ = cli_run("clone", url, tmp_path / "b")
    assert code == 0, lines
    assert remotes(tmp_path / "b" / ".deltastore") == {"origin": f"file://{target}"}


def test_a_relative_file_url_is_kept_as_its_absolute_folder(world, tmp_path, monkeypatch):
    # Fails before this commit: `remote add` stored file:shared/team as typed, so each command
    # found the remote relative to the folder it ran in.
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    absolute = f"file://{tmp_path / 'here' / 'shared' / 'team'}"
    code, lines, _ = cli_run("--store", world, "remote", "add", "rel", "file:shared/team")
    assert code == 0 and lines == [f"remote rel: {absolute}"], lines
    assert remotes(world)["rel"] == absolute
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, lines, _ = cli_run("--store", world, "push", "s", "--remote", "rel")
    assert code == 0, lines
    assert (tmp_path / "here" / "shared" / "team" / "REMOTE").is_file()
    assert not list((tmp_path / "elsewhere").iterdir())
    monkeypatch.chdir(tmp_path / "here")
    code, lines, _ = cli_run("clone", "file:shared/team", tmp_path / "b")
    assert code == 0, lines
    assert remotes(tmp_path / "b" / ".deltastore") == {"origin": absolute}
    assert cli_run("--store", world, "remote", "remove", "rel")[0] == 0


# -- URLs are shown escaped to people, exact in JSON ---------------------------------------------------


def test_remote_urls_print_escaped_and_their_json_is_exact(tmp_path):
    # Fails before this commit: `remote add` and `remote list` wrote the escape sequences raw.
    Store.init(tmp_path / "s").close()
    store = ["--store", tmp_path / "s"]
    url = "s3://bucket/x\x1b]0;owned\x07\u202egpj.exe\x9b2J"
    code, lines, _ = cli_run(*store, "remote", "add", "evil", url)
    assert code == 0 and lines == [f"remote evil: {escape(url)}"], lines
    code, lines, _ = cli_run(*store, "remote", "list")
    assert code == 0 and lines == [f"evil\t{escape(url)}"], lines
    code, lines, _ = cli_run(*store, "remote", "list", "--json")
    assert code == 0 and json.loads("\n".join(lines)) == [{"name": "evil", "url": url}]
    code, lines, _ = cli_run(*store, "remote", "remove", "evil")
    assert code == 0 and lines == [f"removed remote evil ({escape(url)})"], lines
    for line in lines:
        assert not any(c in line for c in "\x1b\x07\u202e\x9b")


# -- a backend's failure is one line ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _moto_authorization(endpoint: str, after: str) -> None:
    """Switch moto's IAM checks on ("0": from the next request) or off ("inf")."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=after.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens on it


FAILURES = {
    "no credentials": "AWS_ACCESS_KEY_ID",
    "no such bucket": "does not exist",
    "access denied": "denied",
    "unreachable": "cannot reach",
}


@pytest.fixture(params=list(FAILURES))
def failing_s3(request, s3_server, tmp_path, monkeypatch):
    """An s3:// URL and an environment under which the backend fails as the param says; the
    words the one line must hold."""
    import boto3
    import s3fs

    for key in [k for k in __import__("os").environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    (tmp_path / "aws-empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance to ask for credentials either
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client keeps the credentials it found
    bucket = f"team-{uuid.uuid4().hex[:12]}"
    kind = request.param
    if kind != "no credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    if kind in ("access denied", "unreachable"):
        boto3.client("s3").create_bucket(Bucket=bucket)
    if kind == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take ~9 s a request
    if kind == "access denied":
        user = f"nobody-{uuid.uuid4().hex[:8]}"
        iam = boto3.client("iam")
        iam.create_user(UserName=user)  # no policy: IAM allows it nothing
        key = iam.create_access_key(UserName=user)["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        _moto_authorization(s3_server, "0")
    yield f"s3://{bucket}/deltas", FAILURES[kind]
    if kind == "access denied":
        _moto_authorization(s3_server, "inf")
    s3fs.S3FileSystem.clear_instance_cache()


def test_push_pull_clone_and_gc_on_a_failing_backend_say_one_line(world, failing_s3, tmp_path):
    # Fails before this commit: no credentials gave botocore's NoCredentialsError traceback (92
    # to 95 lines) on each command, a closed port its EndpointConnectionError traceback, and a
    # missing bucket read as "not a deltastore remote: push to it first" on pull, clone and gc.
    url, says = failing_s3
    before = file_bytes(world)
    store = ["--store", world]
    for args in (["push", "s", "--remote", url], ["pull", "--remote", url], ["gc", "--remote", url, "--dry-run"]):
        line = refused(*store, *args)
        assert says in line and url in line, (args, line)
    line = refused("clone", url, tmp_path / "b")
    assert says in line, line
    assert not (tmp_path / "b").exists()
    assert file_bytes(world) == before
