"""A small Hugging Face Hub-compatible HTTP server for the test suite (stdlib only).

No machine running the tests reaches the internet, so push/pull code is exercised against this
server with the real, unmodified `huggingface_hub` client (`HfApi(endpoint=hub.url)` or
`HF_ENDPOINT=hub.url`). This module owns that server: the HTTP endpoints the client calls, the
on-disk storage of repos, commits, refs and blobs under one root folder, and token auth.

Usage in a test:

    from hubserver import HubServer  # pytest puts tests/ on sys.path (no tests/__init__.py)

    def test_push(tmp_path):
        with HubServer(tmp_path / "hub", tokens={"tok-write": "alice"}) as hub:
            api = HfApi(endpoint=hub.url, token="tok-write")
            api.create_repo("alice/stances")
            ...
            assert hub.commit_count("alice/stances") == 2

Pass `cache_dir=tmp_path / "cache"` (or set HF_HOME) to downloads so that nothing touches
~/.cache. `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_DISABLE_XET` are read by `huggingface_hub` when it
is imported: in-process tests pass `endpoint=` explicitly, and subprocesses get them in their env.

As a process (for examples): `python tests/hubserver.py --root DIR [--port N] [--token TOK=USER]`
prints the URL on its first stdout line and serves until SIGTERM or Ctrl-C.

Client side, large and binary files are uploaded through the LFS batch API (preupload answers
"lfs" like the Hub does), and the client then uses Xet whenever `hf_xet` is installed, unless
`HF_HUB_DISABLE_XET=1` is set before `huggingface_hub` is imported. This server has no Xet storage:
run the client with that variable set, or start the server with `lfs=False` so that every file is
sent inline ("regular" upload mode) and Xet never comes into play.

Auth: with `tokens=None` (the default) auth is off and anyone may read and write everything. With
`tokens={"token": "user"}` it behaves like the Hub: a user writes only under its own namespace; a
private repo answers 401 without a token and 404 for another user (both `RepoNotFound`, so the
client raises RepositoryNotFoundError); an unknown token is a 401 "Invalid credentials".

Limits: model repos only (no datasets/spaces), no pull requests, no Xet, no multipart LFS, no
README metadata parsing (model_info has no card_data), single-page listings.

Storage under `root`: `blobs/<sha256[:2]>/<sha256>` (content-addressed, shared by all repos) and
`repos/<namespace>/<name>/repo.json` (owner, private flag, commits as full trees path -> blob,
branches, tags, and the LFS objects uploaded to that repo). State is re-read from disk on each
request, so a server restarted on the same root sees the same repos.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub sends files of 10 MB and more through LFS whatever their type.
LFS_THRESHOLD = 10 * 1024 * 1024

# What the Hub puts in a new repo's first commit; its patterns also decide LFS vs regular uploads.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model"
        " *.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar"
        " *.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst"
        " *tfevents*"
    ).split()
)

DEFAULT_USER = "user"  # owner of repos created while auth is off
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(Exception):
    """An HTTP error answered the way the Hub does: status, X-Error-Code and a JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


def _repo_not_found(user: str | None) -> HubError:
    # Like the Hub: without a token this is a 401, and a private repo looks exactly like a missing one.
    return HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")


def _revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid`/ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores for an LFS object; the Hub reports its git id and size."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


def _check_path(path: str) -> str:
    """Refuse repo paths that could escape the repo or confuse git (`..`, absolute, `.git`)."""
    if not isinstance(path, str) or "\\" in path or "\0" in path or any(
            part in ("", ".", "..", ".git") for part in path.split("/")):  # "" also catches a leading "/"
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _check_ref(name: str) -> str:
    if not _REF.match(name or "") or ".." in name or "//" in name or name.endswith(("/", ".lock")):
        raise HubError(400, f"Invalid reference name: {name!r}")
    return name


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line.split()[1:]]


def _matches(path: str, pattern: str) -> bool:
    # Git matches a pattern without a slash against the file name, one with a slash against the path.
    return fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern)


class _Store:
    """Repos and blobs on disk. Callers hold `lock` around every read-modify-write of a repo."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        # repo.json parsed, by path, with the (inode, mtime, size) it was read at: a download
        # reads the repo, and parsing a repo of thousands of files per request would make the
        # server, not the client, what a pull of many versions measures.
        self._parsed: dict[Path, tuple[tuple[int, int, int], dict]] = {}
        for sub in ("blobs", "repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _repo_file(self, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) and ".." not in p for p in parts) or parts[1].endswith(".git"):
            return None
        return self.root / "repos" / parts[0] / parts[1] / "repo.json"

    def load(self, repo_id: str, *, shared: bool = False) -> dict | None:
        """The repo as saved; `shared`: one parse shared by every reader, never to be changed
        (writers get their own copy)."""
        path = self._repo_file(repo_id)
        if path is None or not path.exists():
            return None
        if not shared:
            return json.loads(path.read_text())
        with self.lock:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._parsed.get(path)
            if cached is None or cached[0] != key:
                cached = (key, json.loads(path.read_text()))
                self._parsed[path] = cached
            return cached[1]

    def save(self, repo_id: str, repo: dict) -> None:
        path = self._repo_file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo, indent=1, sort_keys=True))
        os.replace(tmp, path)  # readers never see a half-written file

    def delete(self, repo_id: str) -> None:
        path = self._repo_file(repo_id)
        path.unlink()
        path.parent.rmdir()

    def blob_path(self, sha256: str) -> Path:
        assert _SHA256.match(sha256), sha256
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = self.root / "tmp" / secrets.token_hex(8)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    def new_tmp(self):
        return tempfile.NamedTemporaryFile(dir=self.root / "tmp", delete=False)


# --- repo model: plain dicts, saved as JSON -----------------------------------------------------


def _resolve(repo: dict, rev: str) -> str | None:
    """A branch, a tag or a full commit id -> commit id."""
    if rev in repo["branches"]:
        return repo["branches"][rev]
    if rev in repo["tags"]:
        return repo["tags"][rev]
    return rev if _SHA1.match(rev) and rev in repo["commits"] else None


def _add_commit(repo: dict, parent: str | None, tree: dict, title: str, description: str, author: str) -> str:
    commit = {"parent": parent, "tree": tree, "title": title, "description": description,
              "author": author, "date": _now()}
    seed = json.dumps([commit, len(repo["commits"]), time.time_ns()], sort_keys=True)
    sha = hashlib.sha1(seed.encode()).hexdigest()  # 40 hex chars, like a git commit id
    repo["commits"][sha] = commit
    return sha


def _file_entry(data: bytes | None, sha256: str, size: int, lfs: bool) -> dict:
    """A file in a commit's tree; `data` is only needed for regular files (their git id)."""
    oid = git_blob_sha1(lfs_pointer(sha256, size) if lfs else data)
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


def _tree_json(path: str, entry: dict) -> dict:
    """A file as the tree / paths-info APIs describe it."""
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return out


def _folders(tree: dict) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in tree for i in range(1, p.count("/") + 1)}


def _folder_json(tree: dict, folder: str) -> dict:
    listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(tree.items()) if p.startswith(folder + "/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}


# --- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 60  # idle keep-alive connections give their thread back
    # Headers and body go out in separate writes: without TCP_NODELAY each response waits ~40 ms
    # on the client's delayed ACK.
    disable_nagle_algorithm = True

    server: "_HTTPServer"

    def log_message(self, format, *args):  # requests are recorded in hub.requests instead
        pass

    @property
    def hub(self) -> "HubServer":
        return self.server.hub

    @property
    def store(self) -> _Store:
        return self.hub.store

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    # --- plumbing

    def _handle(self, method: str) -> None:
        self.method, self.status, self.body_read = method, 0, False
        url = urlsplit(self.path)
        # Split before unquoting: a quoted revision like "refs%2Fpr%2F1" is a single segment.
        self.segs = [unquote(s) for s in url.path.split("/")[1:]]
        self.query = parse_qs(url.query)
        try:
            self._dispatch()
        except Exception as exc:
            if self.status:  # headers already sent (e.g. the client hung up mid-download)
                self.close_connection = True
            elif isinstance(exc, HubError):
                self._send_error(exc)
            else:  # a server bug shows up as a 500 in the client, never as a hang
                self._send_error(HubError(500, f"hubserver: {type(exc).__name__}: {exc}"))
        finally:
            with self.hub.lock:
                self.hub.requests.append((method, url.path, self.status))

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _iter_body(self):
        """The request body in pieces, from Content-Length or chunked transfer encoding."""
        self.body_read = True
        if self._chunked():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size:
                    piece = self.rfile.read(min(size, 1 << 20))
                    if not piece:
                        raise HubError(400, "Truncated request body")
                    size -= len(piece)
                    yield piece
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            piece = self.rfile.read(min(remaining, 1 << 20))
            if not piece:
                raise HubError(400, "Truncated request body")
            remaining -= len(piece)
            yield piece

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def _start(self, status: int, headers: dict) -> None:
        self.status = status
        self.send_response(status)
        if not self.body_read and (self._chunked() or int(self.headers.get("Content-Length") or 0)):
            # The unread body would be taken for the next request on this connection.
            self.close_connection = True
            headers = {**headers, "Connection": "close"}
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self._start(status, {"Content-Type": content_type, "Content-Length": len(body), **(headers or {})})
        if self.method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), content_type=content_type)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message, **err.body}).encode(), headers)

    def _base(self) -> str:
        # URLs handed to the client must use the host it called: RepoUrl rejects any other host.
        return f"http://{self.headers.get('Host') or self.hub.url.split('//', 1)[1]}"

    # --- auth

    def _user(self) -> str | None:
        """The caller's user name, None when anonymous. An unknown token is refused like on the Hub."""
        if self.hub.tokens is None:
            return DEFAULT_USER
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        user = self.hub.tokens.get(auth.split(" ", 1)[-1].strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> dict:
        user = self._user()
        repo = self.store.load(repo_id, shared=not write)
        if self.hub.tokens is None:
            if repo is None:
                raise _repo_not_found(user)
            return repo
        if repo is None or (repo["private"] and user != repo["owner"]):
            raise _repo_not_found(user)
        if write and user != repo["owner"]:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # --- routing

    def _dispatch(self) -> None:
        s, m = self.segs, self.method
        if s[:2] == ["api", "repos"] and len(s) == 3:
            return {("POST", "create"): self._create_repo, ("DELETE", "delete"): self._delete_repo}.get(
                (m, s[2]), self._not_found)()
        if s == ["api", "validate-yaml"] and m == "POST":
            self._body()
            return self._send_json({"errors": [], "warnings": []})  # no YAML parser in the stdlib
        if s == ["api", "whoami-v2"] and m == "GET":
            return self._whoami()
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            return self._repo_api(f"{s[2]}/{s[3]}", s[4:])
        if s[0] == "api":
            # Datasets, spaces and everything else: this server only has model repos.
            raise HubError(404, "Repository not found", "RepoNotFound")
        if len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and m == "POST":
            repo_id = f"{s[0]}/{s[1][:-4]}"
            if s[5] == "batch":
                return self._lfs_batch(repo_id)
            if s[5] == "verify":
                return self._lfs_verify(repo_id)
        if len(s) == 3 and s[:2] == ["_lfs", "upload"] and m == "PUT":
            return self._lfs_upload(s[2])
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        self._not_found()

    def _not_found(self) -> None:
        raise HubError(404, f"No route for {self.method} {urlsplit(self.path).path}")

    def _repo_api(self, repo_id: str, rest: list[str]) -> None:
        m = self.method
        action, args = (rest[0], rest[1:]) if rest else (None, [])
        if action is None and m == "GET":
            return self._repo_info(repo_id, "main")
        if action == "revision" and len(args) == 1 and m == "GET":
            return self._repo_info(repo_id, args[0])
        if action == "tree" and args and m == "GET":
            return self._tree(repo_id, args[0], "/".join(args[1:]))
        if action == "paths-info" and len(args) == 1 and m == "POST":
            return self._paths_info(repo_id, args[0])
        if action == "refs" and not args and m == "GET":
            return self._refs(repo_id)
        if action == "commits" and len(args) == 1 and m == "GET":
            return self._commits(repo_id, args[0])
        if action == "preupload" and len(args) == 1 and m == "POST":
            return self._preupload(repo_id, args[0])
        if action == "commit" and len(args) == 1 and m == "POST":
            return self._commit(repo_id, args[0])
        if action == "branch" and len(args) == 1 and m in ("POST", "DELETE"):
            return self._branch(repo_id, args[0])
        if action == "tag" and len(args) == 1 and m in ("POST", "DELETE"):
            return self._tag(repo_id, args[0])
        if action in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "This Hub server has no Xet storage: set HF_HUB_DISABLE_XET=1 in the client")
        self._not_found()

    # --- repos

    def _create_repo(self) -> None:
        payload = self._json_body()
        user = self._user()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server only hosts model repos")
        namespace = payload.get("organization") or user
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if self.hub.tokens is not None and namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        repo_id = f"{namespace}/{payload.get('name')}"
        if self.store._repo_file(repo_id) is None:
            raise HubError(400, f"Invalid repo name: {repo_id!r}")
        url = f"{self._base()}/{repo_id}"
        with self.store.lock:
            if self.store.load(repo_id) is not None:
                # The client reads `url` from the 409 too (create_repo with exist_ok).
                raise HubError(409, "You already created this model repo", body={"url": url})
            private = payload.get("visibility") == "private" or payload.get("private") is True
            repo = {"owner": namespace, "private": private, "createdAt": _now(),
                    "commits": {}, "branches": {}, "tags": {}, "lfs": []}
            data = DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": _file_entry(data, self.store.put_blob(data), len(data), False)}
            repo["branches"]["main"] = _add_commit(repo, None, tree, "initial commit", "", namespace)
            self.store.save(repo_id, repo)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self._user()}/{payload.get('name')}"
        with self.store.lock:
            self._repo(repo_id, write=True)
            self.store.delete(repo_id)
        self._send_json({})

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _commit_at(self, repo_id: str, rev: str, write: bool = False) -> tuple[dict, str]:
        repo = self._repo(repo_id, write)
        sha = _resolve(repo, rev)
        if sha is None:
            raise _revision_not_found(rev)
        return repo, sha

    def _repo_info(self, repo_id: str, rev: str) -> None:
        with self.store.lock:
            repo, sha = self._commit_at(repo_id, rev)
        commit = repo["commits"][sha]
        with_blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": pointer_size}
            siblings.append(sibling)
        self._send_json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo["owner"], "sha": sha,
            "lastModified": commit["date"], "createdAt": repo["createdAt"], "private": repo["private"],
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def _tree(self, repo_id: str, rev: str, base: str) -> None:
        with self.store.lock:
            repo, sha = self._commit_at(repo_id, rev)
        tree = repo["commits"][sha]["tree"]
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        folders = _folders(tree)
        if base and base not in folders:
            raise HubError(404, f"{base} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        prefix = base + "/" if base else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [_folder_json(tree, f) for f in sorted(folders) if listed(f)]
        entries += [_tree_json(p, e) for p, e in sorted(tree.items()) if listed(p)]
        self._send_json(entries)

    def _paths_info(self, repo_id: str, rev: str) -> None:
        form = parse_qs(self._body().decode())
        with self.store.lock:
            repo, sha = self._commit_at(repo_id, rev)
        tree = repo["commits"][sha]["tree"]
        folders = _folders(tree)
        out = []
        for path in form.get("paths", []):
            if path in tree:
                out.append(_tree_json(path, tree[path]))
            elif path in folders:
                out.append(_folder_json(tree, path))
        self._send_json(out)

    def _refs(self, repo_id: str) -> None:
        with self.store.lock:
            repo = self._repo(repo_id)

        def refs(kind: str, names: dict) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(names.items())]

        self._send_json({"branches": refs("heads", repo["branches"]), "converts": [],
                         "tags": refs("tags", repo["tags"]), "pullRequests": []})

    def _commits(self, repo_id: str, rev: str) -> None:
        with self.store.lock:
            repo, sha = self._commit_at(repo_id, rev)
        out = []
        while sha is not None:
            c = repo["commits"][sha]
            message = c["title"] + (f"\n\n{c['description']}" if c["description"] else "")
            out.append({"id": sha, "title": c["title"], "message": message,
                        "authors": [{"user": c["author"]}], "date": c["date"]})
            sha = c["parent"]
        self._send_json(out)

    # --- writes

    def _branch_head(self, repo: dict, rev: str) -> str:
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this server")
        if rev not in repo["branches"]:
            raise _revision_not_found(rev)
        return repo["branches"][rev]

    def _preupload(self, repo_id: str, rev: str) -> None:
        payload = self._json_body()
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
            head = self._branch_head(repo, rev)
        tree = repo["commits"][head]["tree"]
        attributes = tree.get(".gitattributes")
        patterns = _lfs_patterns(self.store.blob_path(attributes["sha256"]).read_text()) if attributes else []
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            # Like the Hub: big files, binary files (a NUL byte in the first 512 bytes) and
            # files matching the repo's LFS patterns go through LFS.
            lfs = self.hub.lfs and (f["size"] >= LFS_THRESHOLD or b"\0" in sample
                                    or any(_matches(f["path"], p) for p in patterns))
            out = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = tree.get(f["path"])
            if existing:
                # The client skips a file whose oid it can match: sha256 for LFS, git sha1 otherwise.
                out["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
            files.append(out)
        self._send_json({"files": files, "commitOid": head})

    def _commit(self, repo_id: str, rev: str) -> None:
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
            head = self._branch_head(repo, rev)
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo["commits"][head]["tree"])
            for line in lines[1:]:
                self._apply(repo, tree, line.get("key"), line.get("value") or {})
            author = self._user() or repo["owner"]
            sha = _add_commit(repo, head, tree, header.get("summary") or "", header.get("description") or "", author)
            repo["branches"][rev] = sha
            self.store.save(repo_id, repo)
        self._send_json({"success": True, "commitOid": sha, "commitUrl": f"{self._base()}/{repo_id}/commit/{sha}",
                         "pullRequestUrl": None})

    def _apply(self, repo: dict, tree: dict, key: str, value: dict) -> None:
        """One commit operation applied to `tree` (path -> file entry)."""
        path = _check_path(value.get("path", ""))
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            data = base64.b64decode(value.get("content", ""))
            tree[path] = _file_entry(data, self.store.put_blob(data), len(data), False)
        elif key == "lfsFile":
            oid = value.get("oid", "")
            # Only objects uploaded to this repo may be referenced (as on the Hub).
            if oid not in repo["lfs"] or not self.store.blob_path(oid).exists():
                raise HubError(400, f"LFS object {oid} for {path} was not uploaded to this repo")
            size = self.store.blob_path(oid).stat().st_size
            if value.get("size") not in (None, size):
                raise HubError(400, f"LFS object {oid} has size {size}, not {value['size']}")
            tree[path] = _file_entry(None, oid, size, True)
        elif key == "deletedFile":
            if path not in tree:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            inside = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del tree[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")

    def _branch(self, repo_id: str, name: str) -> None:
        payload = self._json_body()
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
            if self.method == "DELETE":
                if name not in repo["branches"]:
                    raise _revision_not_found(name)
                if name == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo["branches"][name]
            else:
                _check_ref(name)
                if name in repo["branches"]:
                    raise HubError(409, f"Reference already exists: refs/heads/{name}")
                start = payload.get("startingPoint") or "main"
                sha = _resolve(repo, start)
                if sha is None:
                    raise _revision_not_found(start)
                repo["branches"][name] = sha
            self.store.save(repo_id, repo)
        self._send_json({})

    def _tag(self, repo_id: str, rev: str) -> None:
        payload = self._json_body()
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
            if self.method == "DELETE":  # the URL names the tag
                if rev not in repo["tags"]:
                    raise _revision_not_found(rev)
                del repo["tags"][rev]
            else:  # the URL names the revision to tag
                tag = _check_ref(payload.get("tag", ""))
                sha = _resolve(repo, rev)
                if sha is None:
                    raise _revision_not_found(rev)
                if tag in repo["tags"]:
                    raise HubError(409, f"Tag {tag} already exists")
                repo["tags"][tag] = sha
            self.store.save(repo_id, repo)
        self._send_json({})

    # --- LFS (https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md, "basic" transfer)

    def _lfs_batch(self, repo_id: str) -> None:
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported; download through /resolve/")
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not _SHA256.match(oid) or not isinstance(size, int) or size < 0:
                raise HubError(400, f"Invalid LFS object: {obj}")
            if oid in repo["lfs"] and self.store.blob_path(oid).exists():
                objects.append({"oid": oid, "size": size})  # no actions: already uploaded
                continue
            # The client PUTs without auth headers (as to S3), so the URL itself grants the upload.
            ticket = secrets.token_urlsafe(24)
            with self.hub.lock:
                self.hub.tickets[ticket] = (repo_id, oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self._base()}/_lfs/upload/{ticket}"},
                "verify": {"href": f"{self._base()}/{repo_id}.git/info/lfs/objects/verify"},
            }})
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, ticket: str) -> None:
        with self.hub.lock:
            target = self.hub.tickets.get(ticket)
        if target is None:
            raise HubError(403, "Unknown or used upload URL")
        repo_id, oid, size = target
        digest, received = hashlib.sha256(), 0
        with self.store.new_tmp() as tmp:
            try:
                for piece in self._iter_body():
                    digest.update(piece)
                    received += len(piece)
                    tmp.write(piece)
            except BaseException:
                os.unlink(tmp.name)
                raise
        if digest.hexdigest() != oid or received != size:
            os.unlink(tmp.name)
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        path = self.store.blob_path(oid)
        path.parent.mkdir(exist_ok=True)
        os.replace(tmp.name, path)
        with self.store.lock:
            repo = self.store.load(repo_id)
            if repo is not None and oid not in repo["lfs"]:
                repo["lfs"].append(oid)
                self.store.save(repo_id, repo)
        with self.hub.lock:
            self.hub.tickets.pop(ticket, None)
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_id: str) -> None:
        payload = self._json_body()
        with self.store.lock:
            repo = self._repo(repo_id, write=True)
        oid = payload.get("oid", "")
        path = self.store.blob_path(oid) if _SHA256.match(oid) else None
        if oid not in repo["lfs"] or path is None or not path.exists() or path.stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} not found")
        self._send_json({}, content_type="application/vnd.git-lfs+json")

    # --- downloads

    def _resolve_file(self, repo_id: str, rev: str, path: str) -> None:
        with self.store.lock:
            repo, sha = self._commit_at(repo_id, rev)
        entry = repo["commits"][sha]["tree"].get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the absence of the file for this commit.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        size, blob = entry["size"], self.store.blob_path(entry["sha256"])
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": size})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and match.group(0) != "bytes=-":
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # suffix range: the last N bytes
                start = max(size - int(last), 0)
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = max(end - start + 1, 0)
        self._start(status, headers)
        if self.method == "GET":
            with open(blob, "rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    piece = f.read(min(remaining, 1 << 20))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    remaining -= len(piece)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not block shutdown
    hub: "HubServer"


class HubServer:
    """A Hub-compatible server on 127.0.0.1, storing everything under `root`.

    `tokens` maps token -> user name (None: auth off). `lfs=False` makes preupload answer "regular"
    for every file, so a client with Xet enabled can still push. Use as a context manager, or call
    start() and close().
    """

    def __init__(self, root, tokens: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, lfs: bool = True):
        self.root = Path(root)
        self.tokens = dict(tokens) if tokens is not None else None
        self.lfs = lfs
        self.store = _Store(self.root)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in arrival order
        self.tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload URL -> (repo_id, oid, size)
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        # A short poll interval keeps close() (and so each test's teardown) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- introspection for tests

    def _load(self, repo_id: str) -> dict:
        with self.store.lock:
            repo = self.store.load(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id}")
        return repo

    def commit_count(self, repo_id: str) -> int:
        """Commits in the repo, including the "initial commit" that create_repo makes."""
        return len(self._load(repo_id)["commits"])

    def refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        """{"branches": {name: commit}, "tags": {name: commit}}."""
        repo = self._load(repo_id)
        return {"branches": dict(repo["branches"]), "tags": dict(repo["tags"])}

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        repo = self._load(repo_id)
        sha = _resolve(repo, revision)
        if sha is None:
            raise KeyError(f"no revision {revision} in {repo_id}")
        return self.store.blob_path(repo["commits"][sha]["tree"][path]["sha256"]).read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub-compatible API.")
    parser.add_argument("--root", required=True, help="folder holding the repos and blobs")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--token", action="append", default=None, metavar="TOKEN=USER",
                        help="accept TOKEN as USER (repeatable); without any, auth is off")
    parser.add_argument("--no-lfs", action="store_true", help="upload every file inline (no LFS, no Xet)")
    args = parser.parse_args(argv)
    tokens = dict(t.split("=", 1) for t in args.token) if args.token else None
    hub = HubServer(args.root, tokens, port=args.port, lfs=not args.no_lfs).start()
    print(hub.url, flush=True)  # first stdout line: callers read the URL from it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):  # a timed wait lets the signal handler run promptly
            pass
    except KeyboardInterrupt:
        pass
    finally:
        hub.close()


if __name__ == "__main__":
    main()
