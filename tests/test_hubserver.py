"""The local Hub server (tests/hubserver.py) against the real, unmodified huggingface_hub client."""

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

# huggingface_hub reads these when it is imported. This server has no Xet storage, so LFS uploads
# must take the plain LFS path (see the hubserver module docstring).
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import HubServer  # noqa: E402

TOKEN = "tok-write"  # alice's
BIG = 12 * 1024 * 1024  # above the Hub's 10 MB LFS threshold


@pytest.fixture
def plain_lfs():
    """For tests that push LFS files through the client: it must not pick Xet, which the server lacks."""
    if not constants.HF_HUB_DISABLE_XET:
        pytest.fail("huggingface_hub was imported before HF_HUB_DISABLE_XET=1 was set, so it would upload"
                    " LFS files through Xet: set os.environ['HF_HUB_DISABLE_XET'] = '1' at the top of"
                    " tests/conftest.py, before anything imports huggingface_hub or transformers")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with HubServer(tmp_path / "hub", tokens={TOKEN: "alice", "tok-bob": "bob"}) as server:
        yield server


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


def download(hub, tmp_path, repo_id, filename, revision=None, token=TOKEN, cache="cache") -> bytes:
    path = hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.url, token=token,
                           cache_dir=tmp_path / cache)
    with open(path, "rb") as f:
        return f.read()


def puts(hub) -> int:
    """LFS content uploads the server received so far."""
    return sum(1 for method, path, status in hub.requests if method == "PUT" and status == 200)


def test_create_repo(hub, api):
    url = api.create_repo("alice/m")
    assert url.repo_id == "alice/m"
    assert api.create_repo("alice/m", exist_ok=True).repo_id == "alice/m"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/m")
    assert err.value.response.status_code == 409

    info = api.model_info("alice/m")
    assert info.private is False
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    assert info.sha == hub.refs("alice/m")["branches"]["main"]
    assert hub.commit_count("alice/m") == 1
    assert api.create_repo("m2", private=True).repo_id == "alice/m2"  # namespace from the token
    assert api.model_info("alice/m2").private is True


def test_commit_tag_download(plain_lfs, hub, api, tmp_path):
    api.create_repo("alice/m")
    big = os.urandom(BIG)
    first = api.create_commit("alice/m", [
        CommitOperationAdd("notes.txt", b"version 1"),
        CommitOperationAdd("weights/big.bin", big),
    ], commit_message="v1")
    api.create_tag("alice/m", tag="v1")

    # The big file went through preupload -> LFS batch -> PUT -> verify; the small one inline.
    assert puts(hub) == 1
    files = {f.path: f for f in api.list_repo_tree("alice/m", recursive=True) if hasattr(f, "lfs")}
    assert files["weights/big.bin"].lfs.size == BIG and files["notes.txt"].lfs is None
    assert sorted(api.list_repo_files("alice/m")) == [".gitattributes", "notes.txt", "weights/big.bin"]
    assert hub.read_file("alice/m", "weights/big.bin") == big

    assert download(hub, tmp_path, "alice/m", "weights/big.bin", revision="v1") == big
    assert download(hub, tmp_path, "alice/m", "notes.txt", revision="main") == b"version 1"
    assert download(hub, tmp_path, "alice/m", "notes.txt", revision=first.oid) == b"version 1"

    second = api.create_commit("alice/m", [CommitOperationAdd("notes.txt", b"version 2")],
                               commit_message="v2", parent_commit=first.oid)
    assert second.oid != first.oid
    assert download(hub, tmp_path, "alice/m", "notes.txt") == b"version 2"
    assert download(hub, tmp_path, "alice/m", "notes.txt", revision="v1") == b"version 1"

    snapshot = snapshot_download("alice/m", revision="v1", endpoint=hub.url, token=TOKEN,
                                 cache_dir=tmp_path / "cache")
    with open(os.path.join(snapshot, "notes.txt"), "rb") as f:
        assert f.read() == b"version 1"
    with open(os.path.join(snapshot, "weights", "big.bin"), "rb") as f:
        assert f.read() == big

    assert hub.commit_count("alice/m") == 3
    assert [c.title for c in api.list_repo_commits("alice/m")] == ["v2", "v1", "initial commit"]


def test_unchanged_files_make_no_commit_and_no_upload(plain_lfs, hub, api):
    api.create_repo("alice/m")
    ops = lambda: [CommitOperationAdd("a.txt", b"same"), CommitOperationAdd("w.safetensors", b"\0" * 100)]  # noqa: E731
    api.create_commit("alice/m", ops(), commit_message="one")
    count, uploads = hub.commit_count("alice/m"), puts(hub)
    assert uploads == 1  # *.safetensors is an LFS pattern, whatever the size

    api.create_commit("alice/m", ops(), commit_message="again")  # the client sees matching oids
    assert (hub.commit_count("alice/m"), puts(hub)) == (count, uploads)


def test_delete_parent_commit_branches_and_tags(hub, api, tmp_path):
    api.create_repo("alice/m")
    first = api.create_commit("alice/m", [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("b.txt", b"b")],
                              commit_message="add")
    api.create_commit("alice/m", [CommitOperationDelete("b.txt")], commit_message="delete")
    assert "b.txt" not in api.list_repo_files("alice/m")
    with pytest.raises(HfHubHTTPError) as err:  # main moved on since `first`
        api.create_commit("alice/m", [CommitOperationAdd("c.txt", b"c")], commit_message="stale",
                          parent_commit=first.oid)
    assert err.value.response.status_code == 412

    api.create_tag("alice/m", tag="old", revision=first.oid)
    api.create_branch("alice/m", branch="dev", revision="old")
    api.create_commit("alice/m", [CommitOperationAdd("d.txt", b"d")], commit_message="on dev", revision="dev")
    refs = api.list_repo_refs("alice/m")
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("old", first.oid)]
    assert sorted(api.list_repo_files("alice/m", revision="dev")) == [".gitattributes", "a.txt", "b.txt", "d.txt"]

    api.delete_tag("alice/m", tag="old")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "alice/m", "a.txt", revision="old")


def test_not_found_errors(hub, api, tmp_path):
    api.create_repo("alice/m")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "alice/missing", "a.txt")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/m", revision="no-such-tag")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "alice/m", ".gitattributes", revision="no-such-tag")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("alice/m", revision="no-such-tag", endpoint=hub.url, token=TOKEN,
                          cache_dir=tmp_path / "cache")
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, "alice/m", "missing.txt")


def test_private_repo_needs_the_owners_token(hub, api, tmp_path):
    api.create_repo("alice/secret", private=True)
    api.create_commit("alice/secret", [CommitOperationAdd("a.txt", b"hidden")], commit_message="add")
    assert download(hub, tmp_path, "alice/secret", "a.txt") == b"hidden"

    # As on the Hub: 401 without a token, 404 for another user; both read as "not found".
    for token, status in ((False, 401), ("tok-bob", 404)):
        with pytest.raises(RepositoryNotFoundError) as err:
            HfApi(endpoint=hub.url, token=token).model_info("alice/secret")
        assert err.value.response.status_code == status
        with pytest.raises(RepositoryNotFoundError):  # a fresh cache: the client falls back on a cached copy
            download(hub, tmp_path, "alice/secret", "a.txt", token=token, cache=f"cache-{token}")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret", endpoint=hub.url, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="not-a-token").model_info("alice/secret")
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)


def test_writes_need_the_owner(hub, api):
    api.create_repo("alice/public")
    bob = HfApi(endpoint=hub.url, token="tok-bob")
    assert bob.model_info("alice/public").sha  # public: readable by anyone
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_commit("alice/public", [CommitOperationAdd("a.txt", b"x")], commit_message="m")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/other")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token=False).create_tag("alice/public", tag="t")
    assert err.value.response.status_code == 401
    assert hub.commit_count("alice/public") == 1


def _raw(hub, method, path, body=b"", headers=None):
    """A plain HTTP request, for what the client would never send (bad paths, tampered uploads)."""
    request = urllib.request.Request(hub.url + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_refuses_dotdot_paths(hub, api):
    api.create_repo("alice/m")
    for path in ("../x", "a/../../x", "/etc/passwd", ".git/config"):
        lines = [{"key": "header", "value": {"summary": "evil"}},
                 {"key": "file", "value": {"path": path, "content": "eA==", "encoding": "base64"}}]
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        status, _, payload = _raw(hub, "POST", "/api/models/alice/m/commit/main", body,
                                  {"Content-Type": "application/x-ndjson"})
        assert status == 400 and b"Invalid path" in payload
    assert hub.commit_count("alice/m") == 1


def test_lfs_upload_must_match_its_oid(hub, api):
    api.create_repo("alice/m")
    data = b"payload" * 1000
    oid = hashlib.sha256(data).hexdigest()

    def batch():
        body = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode()
        status, _, payload = _raw(hub, "POST", "/alice/m.git/info/lfs/objects/batch", body)
        assert status == 200
        return json.loads(payload)["objects"][0]

    href = batch()["actions"]["upload"]["href"]
    path = href[len(hub.url):]
    assert _raw(hub, "PUT", path, b"tampered" * 875)[0] == 400
    # Chunked transfer encoding, which http clients use for streams of unknown length.
    status, _, _ = _raw(hub, "PUT", path, iter([data[:100], data[100:]]), {"Transfer-Encoding": "chunked"})
    assert status == 200
    assert "actions" not in batch()  # already uploaded: nothing to do


def test_range_requests(hub, api):
    api.create_repo("alice/m")
    api.create_commit("alice/m", [CommitOperationAdd("a.txt", b"0123456789")], commit_message="add")
    status, headers, body = _raw(hub, "GET", "/alice/m/resolve/main/a.txt", headers={"Range": "bytes=3-"})
    assert (status, body, headers["Content-Range"]) == (206, b"3456789", "bytes 3-9/10")
    assert headers["X-Repo-Commit"] == hub.refs("alice/m")["branches"]["main"]
    assert _raw(hub, "GET", "/alice/m/resolve/main/a.txt", headers={"Range": "bytes=20-"})[0] == 416


def test_state_survives_a_restart(tmp_path):
    with HubServer(tmp_path / "hub") as hub:  # auth off: any token, or none, is "user"
        HfApi(endpoint=hub.url, token=False).create_repo("user/m")
    with HubServer(tmp_path / "hub") as hub:
        assert HfApi(endpoint=hub.url, token=False).model_info("user/m").sha
        assert hub.commit_count("user/m") == 1


def test_runs_as_a_process(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "hubserver.py")
    proc = subprocess.Popen([sys.executable, script, "--root", str(tmp_path / "hub"), "--token", "t=carol"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert HfApi(endpoint=url, token="t").create_repo("carol/m").repo_id == "carol/m"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
