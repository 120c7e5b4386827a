"""Remotes: a store's objects and refs on another filesystem, reached through fsspec (a shared
folder, S3, GCS, Azure), with `push`, `pull` and `clone` (schema/FORMAT.md §10).

No server: objects are written once under their hash, and a version's number on the remote is
taken by creating its ref with a conditional write (O_EXCL on a folder, `If-None-Match: *` on
S3), so that many pushers can share one remote. The remote is untrusted when read: every ref,
manifest and object is checked (names, sizes, hashes) before `Store.ingest` stores anything,
and that stores all the pulled versions in one transaction or none. This module never writes to
the store any other way, and never stores credentials: a remote is a name and a URL.

A remote, as `push` writes it::

    PREFIX/
      REMOTE                 {"format": "deltastore/remote/1"}
      objects/9a/0c…e1       object files, byte for byte as in a store
      bases/<hex>.json       {"id", "record", "name", "hub_id"}
      locks/<kind>-<hex>.json a push's shared lock or a gc's exclusive one (remotelock.py)
      refs/<stance>/<N>.json {"id", "stance", "number"}: taken with a conditional create
      tags/<stance>/<T>.json {"id", "stance", "name"}: a tag, made (never moved) the same way

A push holds a shared lock from before it lists the remote to after its refs, so that no gc
deletes an object it checked and relies on; it checks what it finds there (manifests and
base objects by content, payloads by size) and uploads again what is missing or damaged.

Tags travel with their versions, by git's rule: a tag is created where it is missing, and one
that names another version already is left where it is (said in one line), on the remote at
a push and in the store at a pull. A tag is written after the refs, so it names a version a
ref holds: gc, which keeps what refs reach, never needs to read it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from ..engine.chain import refuse_chained
from ..core.errors import (CorruptObject, DeltastoreError, RemoteDataRejected, RemoteError, RemoteNotFound, StoreExists,
                     TagExists, UnsafeInput)
from ..core.hashing import ALGORITHM, bytes_id, canonical_json, is_id
from ..repo.index import base_record_problem
from ..core.limits import load_json
from ..core.names import check_base_name, check_stance_name, check_tag_name, number_problem
from ..repo.objects import HEADER, ObjectStore
from ..repo.records import MAX_MANIFEST_BYTES, Version, check_manifest, hub_origin, parse_manifest
from .remotelock import SHARED, Lock
from ..store import DEFAULT_DIR, STORE_FILE, Store

# fsspec (and through it s3fs, gcsfs, adlfs) is imported when a remote is opened: a store that
# only names its remotes needs none of it.

REMOTE_FORMAT = "deltastore/remote/1"
MARKER = "REMOTE"
CONFIG_FILE = "remotes.json"
MAX_REF_BYTES = 64 << 10
MAX_BASE_RECORD_BYTES = 256 << 20  # a base record is ~150 bytes per tensor
TRANSFERS = 8  # objects moved at once
REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REF_FILE = re.compile(r"^([1-9][0-9]{0,9})\.json$")
Progress = Callable[[int, int], None]


def _step(name: str) -> None:
    """Called between the steps of a push; does nothing. Tests replace it to run a gc at
    that very moment (tests/test_remote_race.py)."""


@dataclass(frozen=True)
class RemoteVersion:
    """One version as the remote lists it: its ref. In a push's or a pull's result, `local` is
    the ref the store gives it (the remote numbers a stance's versions as they arrive, so the
    two may differ: FORMAT.md §10)."""

    stance: str
    number: int
    id: str
    local: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    def to_json(self) -> dict:
        return {"ref": self.ref, "stance": self.stance, "number": self.number, "id": self.id, "local": self.local}


@dataclass(frozen=True)
class RemoteTag:
    """A tag as the remote lists it: STANCE@NAME there names version `id`."""

    stance: str
    name: str
    id: str

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.name}"


@dataclass(frozen=True)
class PushResult:
    url: str
    pushed: tuple[RemoteVersion, ...]  # new on the remote, under the numbers they took there
    already_there: tuple[RemoteVersion, ...]
    objects_uploaded: int
    bytes_uploaded: int  # object files' sizes, as stored
    # Of those uploaded, the objects (and base refs) that were missing or damaged although a ref
    # on the remote already needed them, or that were damaged: put back.
    objects_repaired: int = 0
    stale_locks_removed: tuple[str, ...] = ()  # one line each
    tags: tuple[str, ...] = ()  # STANCE@TAG created on the remote
    tags_not_moved: tuple[str, ...] = ()  # one line each: a tag there names another version

    def to_json(self) -> dict:
        """`push --remote --json`."""
        return {"remote": self.url, "pushed": [rv.to_json() for rv in self.pushed],
                "already_there": [rv.to_json() for rv in self.already_there],
                "objects_uploaded": self.objects_uploaded, "bytes_uploaded": self.bytes_uploaded,
                "objects_repaired": self.objects_repaired, "stale_locks_removed": list(self.stale_locks_removed),
                "tags": list(self.tags), "tags_not_moved": list(self.tags_not_moved)}


@dataclass(frozen=True)
class PullResult:
    url: str
    pulled: tuple[RemoteVersion, ...]
    already_here: tuple[RemoteVersion, ...]
    bases_added: tuple[str, ...]
    objects_downloaded: int
    bytes_downloaded: int
    tags: tuple[str, ...] = ()  # STANCE@TAG set here
    tags_not_moved: tuple[str, ...] = ()  # one line each: a tag here names another version

    def to_json(self) -> dict:
        """`pull --remote --json` and `clone --json`."""
        return {"remote": self.url, "pulled": [rv.to_json() for rv in self.pulled],
                "already_here": [rv.to_json() for rv in self.already_here],
                "bases_added": list(self.bases_added), "objects_downloaded": self.objects_downloaded,
                "bytes_downloaded": self.bytes_downloaded, "tags": list(self.tags),
                "tags_not_moved": list(self.tags_not_moved)}


# -- remotes of a store: names and URLs, never credentials ----------------------------------------


# Backends that keep nothing once the command exits, or that are wrappers and inline data with no
# storage of their own: a push there would say "pushed" and keep nothing.
NOT_PERSISTENT = frozenset({"memory", "data", "cached", "blockcache", "filecache", "simplecache", "dir", "generic",
                            "reference", "async_wrapper", "asyncwrapper"})
LOCAL_SCHEMES = ("file", "local")


def check_url(url: str) -> str:
    """The URL a remote is kept and opened under: a folder's (file://) made absolute, so that it
    names the same folder from any working folder; refused when it cannot hold a remote."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return _folder_url(url, parts)
    if not parts.scheme or not parts.netloc:
        raise UnsafeInput(f"remote URL {url[:120]!r} needs a scheme and a location, as in s3://bucket/prefix "
                          "or file:///shared/folder")
    if "@" in parts.netloc or parts.password:
        raise UnsafeInput("a remote URL must not hold a user or password: credentials come from each "
                          "backend's usual places (AWS variables or profiles, gcloud, Azure), never from the store")
    if parts.scheme in NOT_PERSISTENT:
        raise UnsafeInput(f"remote URL {url[:120]!r}: {parts.scheme}:// keeps nothing once the command exits, "
                          "so it cannot hold a remote: use a folder (file:///PATH) or object storage "
                          "(s3://, gs://, az://)")
    return url


def _folder_url(url: str, parts: Any) -> str:
    """file:///PATH, file://localhost/PATH and file:PATH (relative to the working folder) as
    file:///ABSOLUTE/PATH. Another host is refused: fsspec would read it as a relative folder
    named after the host."""
    if parts.netloc.lower() not in ("", "localhost"):
        raise UnsafeInput(f"remote URL {url[:120]!r} names the host {parts.netloc[:60]!r}: a folder remote is "
                          "file:///ABSOLUTE/PATH (or file://localhost/PATH) on this machine; mount a network share "
                          "and give the folder it is mounted at")
    if parts.query or parts.fragment or not parts.path:
        raise UnsafeInput(f"remote URL {url[:120]!r} is not a folder: write file:///ABSOLUTE/PATH")
    return "file://" + os.path.abspath(parts.path)


def _root(store: Store | str | os.PathLike) -> Path:
    """A store's folder, from the store or the folder itself (as callers before the API's one
    rule passed it)."""
    return Path(store) if isinstance(store, (str, os.PathLike)) else store.root


class Remotes(dict[str, str]):
    """A store's remotes, name -> URL, in name order."""

    def to_json(self) -> list[dict[str, str]]:
        """`remote list --json`."""
        return [{"name": name, "url": url} for name, url in self.items()]


def remotes(store: Store | str | os.PathLike) -> Remotes:
    """The store's remotes: name -> URL. `store`: a Store, or its folder."""
    path = _root(store) / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Remotes()
    config = load_json(raw, str(path), max_bytes=1 << 20)
    if not isinstance(config, dict) or not all(isinstance(v, dict) and isinstance(v.get("url"), str)
                                               for v in config.values()):
        raise DeltastoreError(f"{path} is not a list of remotes; fix or remove it")
    return Remotes((name, v["url"]) for name, v in sorted(config.items()))


def add_remote(store: Store | str | os.PathLike, name: str, url: str) -> str:
    """Remember `url` as remote `name`; returns the URL as kept (a folder's made absolute)."""
    if not REMOTE_NAME.match(name):
        raise UnsafeInput(f"remote name {name[:80]!r} is not allowed: use letters, digits, '.', '_' and '-'")
    url = check_url(url)
    config = remotes(store)
    if name in config:
        raise UnsafeInput(f"remote {name!r} exists already ({config[name]}); remove it first")
    config[name] = url
    _write_config(_root(store), config)
    return url


def remove_remote(store: Store | str | os.PathLike, name: str) -> str:
    config = remotes(store)
    if name not in config:
        raise RemoteNotFound(name, sorted(config))
    url = config.pop(name)
    _write_config(_root(store), config)
    return url


def remote_url(store: Store | str | os.PathLike, name_or_url: str) -> str:
    """A remote's URL from its name, or the URL given, checked (check_url)."""
    if ":" in name_or_url:  # a URL: a remote's name holds no ':'
        return check_url(name_or_url)
    config = remotes(store)
    if name_or_url not in config:
        raise RemoteNotFound(name_or_url, sorted(config))
    # One added before URLs were checked as they are now is checked (and made absolute) here.
    return check_url(config[name_or_url])


def _write_config(root: Path, config: dict[str, str]) -> None:
    tmp = root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-remotes.json"
    tmp.write_bytes(json.dumps({k: {"url": v} for k, v in config.items()}, indent=1, sort_keys=True).encode() + b"\n")
    os.replace(tmp, root / CONFIG_FILE)


# -- the remote's files ---------------------------------------------------------------------------


class Remote:
    """One remote, opened through fsspec."""

    def __init__(self, url: str):
        import fsspec

        self.url = url = check_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise RemoteError(f"cannot open {url}: {e} (install the backend, e.g. `pip install deltastore[s3]`)",
                              url=url) from None
        except Exception as e:
            raise _backend_failure(url, e) or RemoteError(f"cannot open {url}: {e}", url=url) from None
        if NOT_PERSISTENT & set(_protocols(self.fs)):  # a protocol registered under another name
            raise UnsafeInput(f"remote URL {url[:120]!r} opens {type(self.fs).__name__}, which keeps nothing once "
                              "the command exits: it cannot hold a remote")
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def object_path(self, object_id: str) -> str:
        digest = object_id.split(":", 1)[1]
        return self.path("objects", digest[:2], digest[2:])

    def ref_path(self, stance: str, number: int) -> str:
        return self.path("refs", stance, f"{number}.json")

    def tag_path(self, stance: str, name: str) -> str:
        return self.path("tags", stance, f"{name}.json")

    def base_path(self, base: str) -> str:
        return self.path("bases", f"{base.split(':', 1)[1]}.json")

    # reading

    def is_remote(self) -> bool:
        try:
            raw = self.read(MARKER, self.path(MARKER), MAX_REF_BYTES)
        except FileNotFoundError as e:
            if _no_bucket(e):  # not an empty remote: nothing can be pushed there either
                raise
            return False
        marker = load_json(raw, MARKER, max_bytes=MAX_REF_BYTES, error=self.bad(MARKER))
        if not isinstance(marker, dict) or marker.get("format") != REMOTE_FORMAT:
            raise RemoteError(f"{self.url} is not a deltastore remote of format {REMOTE_FORMAT!r}", url=self.url)
        return True

    def bad(self, file: str) -> Callable[[str], RemoteDataRejected]:
        return lambda reason: RemoteDataRejected(self.url, file, reason)

    def read(self, name: str, path: str, limit: int) -> bytes:
        """A file's bytes, refused when over `limit` (before it is read, and as it arrives)."""
        # A backend's cached listing (s3fs keeps one) would hide a file another writer just made.
        self.fs.invalidate_cache()
        size = self.fs.size(path)
        if size is not None and size > limit:
            raise RemoteDataRejected(self.url, name, f"{size} bytes, more than the {limit} allowed")
        # One ranged request, never more than one byte past the bound (a file replaced since).
        data = self.fs.cat_file(path, start=0, end=limit + 1) if size != 0 else b""
        if len(data) > limit:
            raise RemoteDataRejected(self.url, name, f"more than the {limit} bytes allowed")
        return data

    def find(self, *parts: str) -> list[str]:
        """Paths of every file under a folder of the remote, relative to it."""
        base = self.path(*parts)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache()
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        return [p[len(prefix):] for p in (self.fs._strip_protocol(p) for p in found) if p.startswith(prefix)]

    def listing(self, *parts: str) -> dict[str, dict]:
        """Every file under a folder of the remote, relative to it, with what the backend says
        of it (its size, when it was last written)."""
        base = self.path(*parts)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        finally:
            self.fs.invalidate_cache()
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        out = {}
        for path, info in found.items():
            path = self.fs._strip_protocol(path)
            if path.startswith(prefix):
                out[path[len(prefix):]] = info
        return out

    @staticmethod
    def modified(info: dict) -> float | None:
        """When a listed file was last written, in seconds since the epoch; None when unknown."""
        for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
            value = info.get(key)
            if value is None:
                continue
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return value.timestamp()
            try:
                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
        return None

    def object_infos(self) -> dict[str, tuple[int, float | None]]:
        """Object id -> (its file's size, when it was last written, or None when unknown)."""
        out = {}
        for rel, info in self.listing("objects").items():
            fan, _, rest = rel.partition("/")
            oid = f"{ALGORITHM}:{fan}{rest}"
            if len(fan) == 2 and is_id(oid):
                out[oid] = (int(info.get("size") or 0), self.modified(info))
        return out

    def object_ids(self) -> set[str]:
        return set(self.object_infos())

    def versions(self) -> list[RemoteVersion]:
        """Every ref on the remote, each checked: its path, its fields, its id."""
        out = []
        for rel in self.find("refs"):
            name = f"refs/{rel}"
            stance, _, file = rel.partition("/")
            match = _REF_FILE.match(file)
            if not _is_stance(stance) or match is None:
                raise RemoteDataRejected(self.url, name[:120], "not a ref name of a deltastore remote "
                                         "(refs/<stance>/<N>.json)")
            raw = self.read(name, self.path(name), MAX_REF_BYTES)
            ref = load_json(raw, name, max_bytes=MAX_REF_BYTES, error=self.bad(name))
            number = int(match.group(1))
            problem = number_problem(number)
            if problem:  # a version no ref could name, and that numbers the next commit past the bound
                raise RemoteDataRejected(self.url, name, problem)
            if not (isinstance(ref, dict) and set(ref) == {"id", "stance", "number"} and ref["stance"] == stance
                    and ref["number"] == number and isinstance(ref["id"], str) and is_id(ref["id"])):
                raise RemoteDataRejected(self.url, name, "not a ref record of this path")
            out.append(RemoteVersion(stance, number, ref["id"]))
        return sorted(out, key=lambda v: (v.stance, v.number))

    def tags(self) -> list[RemoteTag]:
        """Every tag on the remote, each checked as refs are: its path, its size, its fields."""
        out = []
        for rel in self.find("tags"):
            name = f"tags/{rel}"
            stance, _, file = rel.partition("/")
            tag = file.removesuffix(".json")
            if not (_is_stance(stance) and file.endswith(".json") and _is_tag(tag)):
                raise RemoteDataRejected(self.url, name[:120], "not a tag name of a deltastore remote "
                                         "(tags/<stance>/<tag>.json)")
            raw = self.read(name, self.path(name), MAX_REF_BYTES)
            record = load_json(raw, name, max_bytes=MAX_REF_BYTES, error=self.bad(name))
            if not (isinstance(record, dict) and set(record) == {"id", "stance", "name"}
                    and record["stance"] == stance and record["name"] == tag
                    and isinstance(record["id"], str) and is_id(record["id"])):
                raise RemoteDataRejected(self.url, name, "not a tag record of this path")
            out.append(RemoteTag(stance, tag, record["id"]))
        return sorted(out, key=lambda t: (t.stance, t.name))

    def get_object(self, object_id: str, size: int | None, *, limit: int | None = None) -> tuple[bytes, bytes]:
        """An object's file and its payload, checked against its id and declared size."""
        name = f"object {object_id}"
        if limit is None:
            # A raw payload is the largest an object file holds; zstd never adds more than this.
            limit = HEADER.size + (size or 0) + (size or 0) // 100 + 4096
        try:
            blob = self.read(name, self.object_path(object_id), limit)
        except FileNotFoundError:
            raise RemoteDataRejected(self.url, name, "missing (a ref names it)") from None
        try:
            payload = ObjectStore.decode_file(object_id, blob, raw_size=size)
        except CorruptObject as e:
            raise RemoteDataRejected(self.url, name, e.reason) from None
        if bytes_id(payload) != object_id:
            raise RemoteDataRejected(self.url, name, "its content does not hash to its id (tampered or corrupt)")
        return blob, payload

    # writing

    def create(self, path: str, data: bytes) -> bool:
        """Create a file that must not exist: False when it does. The one write that decides a
        version's number, so it must be atomic and exclusive on every backend."""
        if self.local:
            # O_EXCL on the final name would show an empty ref to a reader while the bytes are
            # being written; a hard link of a finished file is created whole or not at all.
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(self.root, "tmp", f"{os.getpid()}-{uuid.uuid4().hex}.tmp")
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            _write_synced(tmp, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as e:
            raise RemoteError(f"{self.url} offers no conditional create ({str(e)[:120]}), so concurrent pushes "
                              "could give two versions one number: push refuses it", url=self.url) from None

    def put(self, path: str, data: bytes) -> None:
        """Write a file whose content its name fixes (an object): whole or not at all."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(self.root, "tmp", f"{os.getpid()}-{uuid.uuid4().hex}.tmp")
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            _write_synced(tmp, data)
            os.replace(tmp, path)
        else:
            # An object store makes an upload visible only once it is complete.
            self.fs.pipe_file(path, data)


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_stance(name: str) -> bool:
    try:
        check_stance_name(name)
    except UnsafeInput:
        return False
    return ".." not in name


def _is_tag(name: str) -> bool:
    try:
        check_tag_name(name)
    except UnsafeInput:
        return False
    return ".." not in name


def _is_base_name(name: str) -> bool:
    try:
        check_base_name(name)
    except UnsafeInput:
        return False
    return True


def backend_errors(url: str) -> Any:
    """A backend's failures (no credentials, access denied, no such bucket, unreachable) as one
    line naming the remote and what to set or check. Anything else is no backend's failure but a
    fault here, and keeps its traceback."""
    @contextmanager
    def wrap():
        try:
            yield
        except DeltastoreError:
            raise
        except Exception as e:
            failure = _backend_failure(url, e)
            if failure is None:
                raise
            raise failure from None
    return wrap()


# The backends' own exception classes, by name: naming them needs none of botocore, aiohttp,
# google-auth or azure-core imported (a remote's backend is imported only when it is opened).
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "CredentialUnavailableError", "ClientAuthenticationError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyConnectionError",
                "ClientConnectorError", "ServerTimeoutError", "ServiceRequestError", "TransportError"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AuthFailure"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}
_CREDENTIALS = {  # where each backend looks for them
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws/credentials)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
    "az": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
_ENDPOINTS = {"s3": "AWS_ENDPOINT_URL"}


def _backend_failure(url: str, e: BaseException) -> RemoteError | None:
    """`e` as one line that says what to set or check, or None when it is no backend's failure."""
    names = {c.__name__ for c in type(e).__mro__}
    code = _service_code(e)
    scheme = urlsplit(url).scheme
    scheme = _ALIASES.get(scheme, scheme)
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    credentials = _CREDENTIALS.get(scheme, "the backend's credentials, in its usual places")
    if names & _NO_CREDENTIALS:
        return RemoteError(f"no credentials for {url} ({detail}): set {credentials}", url=url)
    if code in _CREDENTIAL_CODES:
        return RemoteError(f"the credentials for {url} were refused ({detail}): check {credentials}", url=url)
    if isinstance(e, PermissionError) and scheme in LOCAL_SCHEMES:
        return RemoteError(f"access to {url} denied ({detail}): check the folder's permissions", url=url)
    if isinstance(e, PermissionError) or code in _DENIED_CODES:
        return RemoteError(f"access to {url} denied ({detail}): check the bucket's permissions, and which "
                           f"credentials are in use: {credentials}", url=url)
    if _no_bucket(e):
        return RemoteError(f"the bucket of {url} does not exist: check the URL, or create the bucket", url=url)
    if names & _UNREACHABLE or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
        endpoint = _ENDPOINTS.get(scheme)
        where = f", and {endpoint} if it is set" if endpoint else ""
        return RemoteError(f"cannot reach {url} ({detail}): check the network and the endpoint's address{where}",
                           url=url)
    if isinstance(e, OSError):
        return RemoteError(f"remote {url} failed: {detail}", url=url)
    return None


def _no_bucket(e: BaseException) -> bool:
    """The bucket itself is missing (not a file in it): S3's NoSuchBucket, which s3fs raises as
    a FileNotFoundError like a missing file's."""
    return _service_code(e) == "NoSuchBucket" or (isinstance(e, FileNotFoundError)
                                                  and "bucket does not exist" in str(e).lower())


def _service_code(e: BaseException) -> str | None:
    """The storage service's error code (S3's "NoSuchBucket", "AccessDenied"), from the error or
    the one it was translated from (s3fs raises an OSError whose cause holds it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = response["Error"].get("Code")
            return str(code) if code is not None else None
        e = e.__cause__ or e.__context__
    return None


# -- push -----------------------------------------------------------------------------------------


def push(store: Store, refs: Sequence[str], url: str, *, progress: Progress | None = None) -> PushResult:
    """Upload versions to a remote (`url`: a URL, or the name of one of the store's remotes),
    holding a shared lock there (schema/FORMAT.md §10): the objects each version needs that the
    remote lacks or holds damaged, its base's ref, then one ref per version, taken with a
    conditional create (the next free number of its stance there). A version already there is
    not pushed again, but what its ref needs is checked and put back the same way. Then the
    versions' tags, each created unless the remote has it already (`_push_tags`)."""
    url = remote_url(store, url)
    versions = list({v.id: v for v in (store.resolve(r) for r in refs)}.values())
    refuse_chained(versions, "push to a remote")
    if not versions:
        raise UnsafeInput("nothing to push: name at least one version (STANCE, STANCE@N or an id)")
    # Parents before children, as they were committed.
    versions.sort(key=lambda v: (v.stance, v.number))
    remote = Remote(url)
    with backend_errors(url):
        if not remote.is_remote():
            remote.create(remote.path(MARKER), canonical_json({"format": REMOTE_FORMAT}) + b"\n")
        lock = Lock(remote, SHARED).acquire()
        try:
            _step("locked")
            result = _push_locked(store, remote, versions, lock, progress)
        except BaseException:
            lock.release()
            raise
        if not lock.release():
            raise RemoteError(f"the push lost its lock on {url} after making its refs (removed as stale): a gc may "
                              "have removed objects they need since; push again to check them and put back what is "
                              "missing", url=url)
    return result


def _push_locked(store: Store, remote: Remote, versions: list[Version], lock: Lock,
                 progress: Progress | None) -> PushResult:
    """The steps of a push, under its lock: no gc deletes anything from here to the refs, so
    what is checked here stays there until the refs name it."""
    listed = remote.versions()
    on_remote = {rv.id: rv for rv in listed}
    needs, by_content, bases = _needs(store, versions, on_remote, set(remote.find("bases")))
    found = remote.object_infos()
    _step("listed")
    todo, repaired = _to_upload(store, remote, needs, by_content, found)
    sent = _parallel(todo, lambda oid: _upload(store, remote, oid), progress)
    _step("uploaded")
    for base, record in bases.values():
        lock.check()
        repaired += _put_base_ref(remote, base, record)
    taken: dict[str, int] = {}
    for rv in listed:
        taken[rv.stance] = max(taken.get(rv.stance, 0), rv.number)
    pushed = []
    for v in versions:
        if v.id not in on_remote:
            lock.check()
            pushed.append(_take_number(remote, v, taken))
    _step("refs")
    tags, not_moved = _push_tags(store, remote, versions, lock)
    here = tuple(replace(on_remote[v.id], local=v.ref) for v in versions if v.id in on_remote)
    return PushResult(remote.url, tuple(pushed), here, len(sent), sum(sent), repaired, tuple(lock.stale_removed),
                      tags, not_moved)


def _push_tags(store: Store, remote: Remote, versions: list[Version], lock: Lock
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The pushed versions' tags, each created on the remote (after the refs: a tag there
    always names a version a ref holds). One there already that names another version is not
    moved. Returns the tags created and a line for each one not moved."""
    there = {(t.stance, t.name): t.id for t in remote.tags()}
    made, not_moved = [], []
    for v in versions:
        for name in v.tags:
            current = there.get((v.stance, name))
            if current is None:
                lock.check()
                record = {"id": v.id, "stance": v.stance, "name": name}
                if remote.create(remote.tag_path(v.stance, name), canonical_json(record) + b"\n"):
                    made.append(f"{v.stance}@{name}")
                    continue
                current = next((t.id for t in remote.tags() if (t.stance, t.name) == (v.stance, name)), None)
            if current is not None and current != v.id:
                not_moved.append(f"tag {v.stance}@{name} not pushed: the remote's names {current[:15]}, "
                                 f"not {v.ref} {v.id[:15]}")
    return tuple(made), tuple(not_moved)


def _needs(store: Store, versions: list[Version], on_remote: dict[str, RemoteVersion], base_refs: set[str]
           ) -> tuple[dict[str, bool], set[str], dict[str, tuple[Any, str]]]:
    """Every object the versions need on the remote -> whether a ref there already reaches it
    (so that its absence is a loss to repair); the objects to check by content (manifests and
    the bases' lists and records: small, and a damaged one breaks every version that names
    it); and the bases, with their records' ids."""
    needs: dict[str, bool] = {}
    by_content: set[str] = set()
    bases: dict[str, tuple[Any, str]] = {}
    for v in versions:
        there = v.id in on_remote
        base = store.base(v.base_id)
        record = store.catalog.one("SELECT record FROM bases WHERE id = ?", [base.id])["record"]
        bases[base.id] = (base, record)
        based = there or f"{base.id.split(':', 1)[1]}.json" in base_refs
        for oid in (base.id, record):
            needs[oid] = needs.get(oid, False) or based
        for oid in (*(o.id for e in v.tensors for o in e.objects.values()), v.id):
            needs[oid] = needs.get(oid, False) or there
        by_content.update((base.id, record, v.id))
    return needs, by_content, bases


def _to_upload(store: Store, remote: Remote, needs: dict[str, bool], by_content: set[str],
               found: dict[str, tuple[int, float | None]]) -> tuple[list[str], int]:
    """The objects to upload: those missing, and those there but damaged (checked by content,
    or a payload whose size differs from ours, which another store's compression may explain:
    then by content too); and how many of them repair what a ref already needed."""
    missing = [oid for oid in needs if oid not in found]
    suspects = [oid for oid in needs if oid in found
                and (oid in by_content or found[oid][0] != store.objects.path(oid).stat().st_size)]
    intact = _parallel(suspects, lambda oid: int(_intact(store, remote, oid)), None)
    damaged = [oid for oid, ok in zip(suspects, intact) if not ok]
    return missing + damaged, sum(needs[oid] for oid in missing) + len(damaged)


def _intact(store: Store, remote: Remote, object_id: str) -> bool:
    """Whether the remote's copy of an object decodes to its id's content, at its size."""
    path = store.objects.path(object_id)
    with open(path, "rb") as f:
        raw_size = HEADER.unpack(f.read(HEADER.size))[4]
    limit = max(path.stat().st_size, HEADER.size + raw_size + raw_size // 100 + 4096)
    try:
        remote.get_object(object_id, raw_size, limit=limit)
    except RemoteDataRejected:
        return False
    return True


def _put_base_ref(remote: Remote, base: Any, record: str) -> int:
    """The base's ref on the remote, created; one there that is not this base's is put back
    (1: repaired). One another store wrote, naming the base otherwise, is left as it is."""
    ref = {"id": base.id, "record": record, "name": base.name, "hub_id": hub_origin(base.hub_id, base.hub_revision)}
    path = remote.base_path(base.id)
    if remote.create(path, canonical_json(ref) + b"\n"):
        return 0
    name = f"bases/{base.id.split(':', 1)[1]}.json"
    try:
        there = json.loads(remote.read(name, path, MAX_REF_BYTES))
    except (ValueError, RemoteDataRejected, FileNotFoundError):
        there = None
    if (isinstance(there, dict) and set(there) == set(ref) and there["id"] == base.id
            and there["record"] == record):
        return 0
    remote.put(path, canonical_json(ref) + b"\n")
    return 1


def _upload(store: Store, remote: Remote, object_id: str) -> int:
    data = store.objects.path(object_id).read_bytes()
    remote.put(remote.object_path(object_id), data)
    return len(data)


def _take_number(remote: Remote, v: Version, taken: dict[str, int]) -> RemoteVersion:
    """The version's ref at its stance's next free number on the remote; a number another
    pusher took first is skipped (that pusher's ref is read: it may be this very version)."""
    number = taken.get(v.stance, 0) + 1
    while True:
        ref = {"id": v.id, "stance": v.stance, "number": number}
        if remote.create(remote.ref_path(v.stance, number), canonical_json(ref) + b"\n"):
            taken[v.stance] = number
            return RemoteVersion(v.stance, number, v.id, v.ref)
        raw = remote.read(f"refs/{v.stance}/{number}.json", remote.ref_path(v.stance, number), MAX_REF_BYTES)
        try:
            if json.loads(raw).get("id") == v.id:
                taken[v.stance] = number
                return RemoteVersion(v.stance, number, v.id, v.ref)
        except (ValueError, AttributeError):
            pass
        number += 1


def _parallel(items: list[str], call: Callable[[str], int], progress: Progress | None) -> list[int]:
    """`call` on each item, at most TRANSFERS at once; the first error stops the rest."""
    done: list[int] = []
    if not items:
        return done
    with ThreadPoolExecutor(max_workers=min(TRANSFERS, len(items))) as pool:
        futures = [pool.submit(call, item) for item in items]
        try:
            for f in futures:
                done.append(f.result())
                if progress:
                    progress(len(done), len(items))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return done


# -- pull -----------------------------------------------------------------------------------------


def pull(store: Store, url: str, *, stance: str | None = None, into: str | None = None,
         progress: Progress | None = None) -> PullResult:
    """Download versions from a remote (`url`: a URL, or the name of one of the store's remotes)
    into the store, verified: every ref, manifest, base and
    object is checked before anything is stored; then the bases the store lacks are registered
    and all the versions land at once, or none does. Only objects
    the store lacks are downloaded; they wait in the store's tmp/ until they land, so a pull
    run again after a kill does not download them again.

    A version lands under the remote's number when that is above every number its stance has
    here, and otherwise under the stance's next number here (`_landing`); a version the store
    holds already, under any ref, is left where it is. `into`: the local stance the versions of
    the one stance pulled land in (`stance` names it when the remote has several). The remote's
    tags of those versions are set here where that moves no tag here (`_pull_tags`)."""
    store._writable()
    if into is not None:
        check_stance_name(into)
    url = remote_url(store, url)
    remote = Remote(url)
    staging = store.root / "tmp" / f"pull-{bytes_id(url.encode())[3:19]}"
    try:
        return _pull(store, remote, staging, stance, into, progress)
    except UnsafeInput:
        # Refused data will not be better next time: keep nothing of it. (After any other
        # failure, a kill, a network error or a commit here that took a number this pull was
        # landing a version under, what was downloaded and checked stays for the next pull.)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _pull(store: Store, remote: Remote, staging: Path, stance: str | None, into: str | None,
          progress: Progress | None) -> PullResult:
    url = remote.url
    with backend_errors(url):
        if not remote.is_remote():
            raise RemoteError(f"{url} is not a deltastore remote (it has no {MARKER} file): push to it first",
                              url=url)
        listed = remote.versions()
        if stance is not None:
            chosen = [rv for rv in listed if rv.stance == stance]
            if not chosen:
                known = sorted({rv.stance for rv in listed})
                raise RemoteError(f"remote {url} has no stance {stance!r} (it has: {', '.join(known) or 'none'})",
                                  url=url)
        else:
            chosen = listed
        _check_into(chosen, into)
        wanted = {rv.id for rv in chosen}
        remote_tags = [t for t in remote.tags() if t.id in wanted]  # checked before anything moves
        todo: list[tuple[RemoteVersion, dict, Version]] = []
        for rv in _first_refs(chosen):
            if store.catalog.version(rv.id):
                continue
            todo.append((rv, *remote_manifest(remote, rv)))
        bases = _bases(store, remote, {v.base_id for _, _, v in todo})
        needed = {o.id: o.size for _, _, v in todo for e in v.tensors for o in e.objects.values()}
        missing = [oid for oid in needed if not store.objects.exists(oid)]
        if missing:
            staging.mkdir(parents=True, exist_ok=True)
        got = _parallel(missing, lambda oid: _download(remote, staging, oid, needed[oid]), progress)

    def payload(object_id: str, size: int) -> bytes | bytearray:
        staged = staging / object_id.split(":", 1)[1]
        if staged.exists():  # checked when downloaded; decode_file bounds it, ingest hashes it
            return ObjectStore.decode_file(object_id, staged.read_bytes(), raw_size=size)
        return store.objects.get(object_id, raw_size=size)

    added = tuple(_register_base(store, remote, *b) for b in bases)
    places = _landing(store, [rv for rv, _, _ in todo], into)
    landed = {}
    if todo:
        try:
            landed = {v.id: new for v, new in store.ingest(
                [m for _, m, _ in todo], payload, numbers={vid: n for vid, (_, n) in places.items()},
                stances={vid: s for vid, (s, _) in places.items()})}
        except CorruptObject as e:  # a staged file changed between its check and the ingest
            raise RemoteDataRejected(url, f"object {e.object_id}", e.reason) from None
    shutil.rmtree(staging, ignore_errors=True)
    pulled = tuple(replace(rv, local="{}@{}".format(*places[rv.id])) for rv, _, _ in todo if landed.get(rv.id))
    new = {rv.id for rv in pulled}
    here = tuple(replace(rv, local=_ref_here(store, rv.id)) for rv in chosen if rv.id not in new)
    tags, not_moved = _pull_tags(store, remote_tags)
    # A staged object (a pull that was killed) counts 0: it was not downloaded again.
    return PullResult(url, pulled, here, added, sum(1 for n in got if n), sum(got), tags, not_moved)


def _pull_tags(store: Store, tags: list[RemoteTag]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The remote's tags of the versions pulled (or here already), set on the stance each
    version is in here. A tag here that names another version is not moved (git's rule, as
    for `tag` without --force): a line says so, and the pull stands. Returns the tags set and
    those lines."""
    made, not_moved = [], []
    for t in tags:
        row = store.catalog.version(t.id)
        if row is None:  # a version --stance left out, or one the remote lists under no ref
            continue
        ref = f"{row['stance']}@{t.name}"
        try:
            if store.catalog.tag_target(row["stance"], t.name) != t.id:
                store.tag(t.id, t.name)
                made.append(ref)
        except TagExists as e:
            not_moved.append(f"tag {ref} not moved: it names {e.current} here, the remote's {t.ref} "
                             f"names {row['stance']}@{row['number']}")
    return tuple(made), tuple(not_moved)


def _check_into(chosen: list[RemoteVersion], into: str | None) -> None:
    stances = sorted({rv.stance for rv in chosen})
    if into is not None and len(stances) > 1:
        raise UnsafeInput(f"--into takes the versions of one stance, and this pull has {len(stances)} "
                          f"({', '.join(stances[:5])}{', ...' if len(stances) > 5 else ''}); add --stance S")


def _first_refs(listed: list[RemoteVersion]) -> list[RemoteVersion]:
    """Each version once, under the first ref that names it (stance, then number): a remote
    anyone can write to may list one version under several refs."""
    return list({rv.id: rv for rv in reversed(listed)}.values())[::-1]


def _landing(store: Store, pulled: list[RemoteVersion], into: str | None) -> dict[str, tuple[str, int]]:
    """Where each pulled version lands here: version id -> (stance, number). Under the remote's
    number when that is above every number its stance has here (so a stance that is only pulled
    is numbered as on the remote), otherwise under the stance's next number here: the remote
    numbers versions as they arrive, and a teammate's version may hold there a number this
    store gives to its own. In the remote's order, so a stance's versions keep theirs."""
    top: dict[str, int] = {}
    out = {}
    for rv in pulled:
        stance = into or rv.stance
        if stance not in top:
            top[stance] = store.catalog.last_number(stance)  # a deleted version's number included
        top[stance] = rv.number if rv.number > top[stance] else top[stance] + 1
        out[rv.id] = (stance, top[stance])
    return out


def _ref_here(store: Store, version_id: str) -> str:
    row = store.catalog.version(version_id)
    return f"{row['stance']}@{row['number']}"


def remote_manifest(remote: Remote, rv: RemoteVersion) -> tuple[dict, Version]:
    name = f"the manifest of {rv.ref} (object {rv.id})"
    _, text = remote.get_object(rv.id, None, limit=HEADER.size + MAX_MANIFEST_BYTES + (MAX_MANIFEST_BYTES >> 6))
    try:
        m = parse_manifest(bytes(text))
        v = check_manifest(m)
    except (UnicodeDecodeError, ValueError) as e:
        raise RemoteDataRejected(remote.url, name, str(e).removeprefix("manifest: ")) from None
    if v.id != rv.id:  # the object's hash matched; its canonical form did not
        raise RemoteDataRejected(remote.url, name, "it is not in canonical form")
    # The ref says where the version lives: a version renamed or merged where it was pushed from
    # keeps the manifest that names the stance and number it was committed under.
    return m, v


def _bases(store: Store, remote: Remote, wanted: Iterable[str]) -> list[tuple[dict, bytes, bytes]]:
    """The bases the store lacks, from the remote, checked: (ref, tensor list, record)."""
    here = {b.id for b in store.bases()}
    out = []
    for bid in sorted(set(wanted) - here):
        name = f"bases/{bid.split(':', 1)[1]}.json"
        try:
            raw = remote.read(name, remote.base_path(bid), MAX_REF_BYTES)
        except FileNotFoundError:
            raise RemoteDataRejected(remote.url, name, f"missing: a version is a delta against base {bid}") from None
        ref = load_json(raw, name, max_bytes=MAX_REF_BYTES, error=remote.bad(name))
        ok = (isinstance(ref, dict) and set(ref) == {"id", "record", "name", "hub_id"} and ref["id"] == bid
              and isinstance(ref["record"], str) and is_id(ref["record"])
              and (ref["name"] is None or (isinstance(ref["name"], str) and _is_base_name(ref["name"])))
              and (ref["hub_id"] is None or (isinstance(ref["hub_id"], str) and len(ref["hub_id"]) <= 256)))
        if not ok:
            raise RemoteDataRejected(remote.url, name, "not a base ref of this base")
        _, listing = remote.get_object(bid, None, limit=MAX_BASE_RECORD_BYTES)
        _, record = remote.get_object(ref["record"], None, limit=MAX_BASE_RECORD_BYTES)
        load_json(bytes(record), f"base record {ref['record']}", max_bytes=MAX_BASE_RECORD_BYTES,
                  error=remote.bad(f"base record {ref['record']}"))  # bounded before it is parsed again
        problem = base_record_problem(bytes(listing), bytes(record), bid)
        if problem is not None:
            raise RemoteDataRejected(remote.url, f"base record {ref['record']}",
                                     f"not the record of base {bid}: {problem}")
        out.append((ref, bytes(listing), bytes(record)))
    return out


def _register_base(store: Store, remote: Remote, ref: dict, listing: bytes, record: bytes) -> str:
    name = ref["name"]
    if name is not None and store.catalog.one("SELECT 1 FROM bases WHERE name = ? AND id != ?", [name, ref["id"]]):
        name = None  # a name this store gives another base: the base comes in unnamed
    store.add_base_record(listing, record, name=name, hub_id=ref["hub_id"])
    return ref["id"]


def _download(remote: Remote, staging: Path, object_id: str, size: int) -> int:
    """One object into the staging folder, checked. One staged by a pull that was killed is
    checked again, not downloaded again."""
    staged = staging / object_id.split(":", 1)[1]
    if staged.exists():
        try:
            payload = ObjectStore.decode_file(object_id, staged.read_bytes(), raw_size=size)
            if bytes_id(payload) == object_id:
                return 0
        except CorruptObject:
            pass
    blob, _ = remote.get_object(object_id, size)
    tmp = staged.with_name(f"{staged.name}.{uuid.uuid4().hex}.part")
    tmp.write_bytes(blob)
    os.replace(tmp, staged)
    return len(blob)


# -- clone ----------------------------------------------------------------------------------------


def clone(url: str, directory: str | os.PathLike, *, progress: Progress | None = None) -> tuple[Any, PullResult]:
    """A new store at `directory` (its `.deltastore/`) holding every version of the remote, which
    it keeps as its remote `origin`. A `.deltastore/` there already must be an empty folder. When
    the pull fails, what clone created is removed, and nothing that was there before."""
    url = check_url(url)
    root = Path(directory) / DEFAULT_DIR
    made = _folders_to_make(root)
    store = None
    try:
        store = Store.init(root)
        result = pull(store, url, progress=progress)
        add_remote(root, "origin", url)
    except BaseException:
        if store is not None:
            store.close()
        _remove_made(root, made)
        raise
    return store, result


def _folders_to_make(root: Path) -> Path | None:
    """The topmost folder on `root`'s path that does not exist (clone creates it and those
    below it), or None when `root` exists: then it must be an empty folder, or clone would fill
    (and on failure remove) what someone left there, such as a store whose catalog is gone."""
    if not (root.exists() or root.is_symlink()):
        top = root
        while not (top.parent.exists() or top.parent.is_symlink()) and top.parent != top:
            top = top.parent
        return top
    if (root / STORE_FILE).exists():
        raise StoreExists(str(root))
    if not root.is_dir() or root.is_symlink():
        raise UnsafeInput(f"{root} exists and is not a folder: clone into a new folder")
    if any(root.iterdir()):
        raise UnsafeInput(f"{root} is not empty (it may be a store whose catalog is gone: its objects, refs.log "
                          "and journals are still there): clone into a new folder, or empty it first")
    return None


def _remove_made(root: Path, made: Path | None) -> None:
    """Undo a clone: the folders it made, or what it wrote into the empty `root` it was given."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for child in root.iterdir() if root.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
