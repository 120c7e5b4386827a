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
      refs/<stance>/<N>.json {"id", "stance", "number"}: taken with a conditional create
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from .chain import refuse_chained
from .errors import (CorruptObject, DeltastoreError, RemoteDataRejected, RemoteError, RemoteNotFound,
                     UnsafeInput, VersionConflict)
from .hashing import ALGORITHM, bytes_id, canonical_json, is_id
from .index import base_record_problem
from .limits import load_json
from .names import check_base_name, check_stance_name, number_problem
from .objects import HEADER, ObjectStore
from .records import MAX_MANIFEST_BYTES, Version, check_manifest, hub_origin, parse_manifest
from .store import DEFAULT_DIR, Store

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


@dataclass(frozen=True)
class RemoteVersion:
    """One version as the remote lists it: its ref."""

    stance: str
    number: int
    id: str

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    def to_json(self) -> dict:
        return {"ref": self.ref, "stance": self.stance, "number": self.number, "id": self.id}


@dataclass(frozen=True)
class PushResult:
    url: str
    pushed: tuple[RemoteVersion, ...]  # new on the remote, under the numbers they took there
    already_there: tuple[RemoteVersion, ...]
    objects_uploaded: int
    bytes_uploaded: int  # object files' sizes, as stored

    def to_json(self) -> dict:
        """`push --remote --json`."""
        return {"remote": self.url, "pushed": [rv.to_json() for rv in self.pushed],
                "already_there": [rv.to_json() for rv in self.already_there],
                "objects_uploaded": self.objects_uploaded, "bytes_uploaded": self.bytes_uploaded}


@dataclass(frozen=True)
class PullResult:
    url: str
    pulled: tuple[RemoteVersion, ...]
    already_here: tuple[RemoteVersion, ...]
    bases_added: tuple[str, ...]
    objects_downloaded: int
    bytes_downloaded: int

    def to_json(self) -> dict:
        """`pull --remote --json` and `clone --json`."""
        return {"remote": self.url, "pulled": [rv.to_json() for rv in self.pulled],
                "already_here": [rv.to_json() for rv in self.already_here],
                "bases_added": list(self.bases_added), "objects_downloaded": self.objects_downloaded,
                "bytes_downloaded": self.bytes_downloaded}


# -- remotes of a store: names and URLs, never credentials ----------------------------------------


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or (parts.scheme != "file" and not parts.netloc):
        raise UnsafeInput(f"remote URL {url[:120]!r} needs a scheme and a location, as in s3://bucket/prefix "
                          "or file:///shared/folder")
    if "@" in parts.netloc or parts.password:
        raise UnsafeInput("a remote URL must not hold a user or password: credentials come from each "
                          "backend's usual places (AWS variables or profiles, gcloud, Azure), never from the store")
    return url


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


def add_remote(store: Store | str | os.PathLike, name: str, url: str) -> None:
    if not REMOTE_NAME.match(name):
        raise UnsafeInput(f"remote name {name[:80]!r} is not allowed: use letters, digits, '.', '_' and '-'")
    check_url(url)
    config = remotes(store)
    if name in config:
        raise UnsafeInput(f"remote {name!r} exists already ({config[name]}); remove it first")
    config[name] = url
    _write_config(_root(store), config)


def remove_remote(store: Store | str | os.PathLike, name: str) -> str:
    config = remotes(store)
    if name not in config:
        raise RemoteNotFound(name, sorted(config))
    url = config.pop(name)
    _write_config(_root(store), config)
    return url


def remote_url(store: Store | str | os.PathLike, name_or_url: str) -> str:
    """A remote's URL from its name (a URL is taken as it is)."""
    if "://" in name_or_url:
        return check_url(name_or_url)
    config = remotes(store)
    if name_or_url not in config:
        raise RemoteNotFound(name_or_url, sorted(config))
    return config[name_or_url]


def _write_config(root: Path, config: dict[str, str]) -> None:
    tmp = root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-remotes.json"
    tmp.write_bytes(json.dumps({k: {"url": v} for k, v in config.items()}, indent=1, sort_keys=True).encode() + b"\n")
    os.replace(tmp, root / CONFIG_FILE)


# -- the remote's files ---------------------------------------------------------------------------


class Remote:
    """One remote, opened through fsspec."""

    def __init__(self, url: str):
        import fsspec

        self.url = check_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise RemoteError(f"cannot open {url}: {e} (install the backend, e.g. `pip install deltastore[s3]`)",
                              url=url) from None
        except (ValueError, OSError) as e:
            raise RemoteError(f"cannot open {url}: {e}", url=url) from None
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def object_path(self, object_id: str) -> str:
        digest = object_id.split(":", 1)[1]
        return self.path("objects", digest[:2], digest[2:])

    def ref_path(self, stance: str, number: int) -> str:
        return self.path("refs", stance, f"{number}.json")

    def base_path(self, base: str) -> str:
        return self.path("bases", f"{base.split(':', 1)[1]}.json")

    # reading

    def is_remote(self) -> bool:
        try:
            raw = self.read(MARKER, self.path(MARKER), MAX_REF_BYTES)
        except FileNotFoundError:
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

    def object_ids(self) -> set[str]:
        ids = set()
        for rel in self.find("objects"):
            fan, _, rest = rel.partition("/")
            oid = f"{ALGORITHM}:{fan}{rest}"
            if len(fan) == 2 and is_id(oid):
                ids.add(oid)
        return ids

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


def _is_base_name(name: str) -> bool:
    try:
        check_base_name(name)
    except UnsafeInput:
        return False
    return True


def backend_errors(url: str) -> Any:
    """OSErrors of a backend (unreachable, access denied) as one line naming the remote."""
    @contextmanager
    def wrap():
        try:
            yield
        except DeltastoreError:
            raise
        except PermissionError as e:
            raise RemoteError(f"access to {url} denied ({str(e)[:160]}): check the backend's credentials",
                              url=url) from None
        except (OSError, TimeoutError) as e:
            raise RemoteError(f"remote {url} failed: {str(e)[:200]}", url=url) from None
    return wrap()


# -- push -----------------------------------------------------------------------------------------


def push(store: Store, refs: Sequence[str], url: str, *, progress: Progress | None = None) -> PushResult:
    """Upload versions to a remote (`url`: a URL, or the name of one of the store's remotes):
    their objects (those it lacks), their bases, then one ref per version, taken with a
    conditional create (the next free number of its stance there)."""
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
        listed = remote.versions()
        on_remote = {rv.id: rv for rv in listed}
        new = [v for v in versions if v.id not in on_remote]
        needed: dict[str, None] = {}
        bases = {}
        for v in new:
            base = store.base(v.base_id)
            row = store.catalog.one("SELECT record FROM bases WHERE id = ?", [base.id])
            bases[base.id] = (base, row["record"])
            for oid in (base.id, row["record"], *(o.id for e in v.tensors for o in e.objects.values()), v.id):
                needed[oid] = None
        have = remote.object_ids() if needed else set()
        missing = [oid for oid in needed if oid not in have]
        sent = _parallel(missing, lambda oid: _upload(store, remote, oid), progress)
        for base, record in bases.values():
            ref = {"id": base.id, "record": record, "name": base.name,
                   "hub_id": hub_origin(base.hub_id, base.hub_revision)}
            remote.create(remote.base_path(base.id), canonical_json(ref) + b"\n")
        taken = {}
        for rv in listed:
            taken[rv.stance] = max(taken.get(rv.stance, 0), rv.number)
        pushed = []
        for v in new:
            pushed.append(_take_number(remote, v, taken))
        if new:
            # A gc of the remote that ran between the uploads and the refs (its grace period
            # passed, or the objects were there, unreferenced, before this push) may have removed
            # some: put them back.
            still = remote.object_ids()
            sent += _parallel([oid for oid in needed if oid not in still],
                              lambda oid: _upload(store, remote, oid), None)
    here = tuple(on_remote[v.id] for v in versions if v.id in on_remote)
    return PushResult(url, tuple(pushed), here, len(sent), sum(sent))


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
            return RemoteVersion(v.stance, number, v.id)
        raw = remote.read(f"refs/{v.stance}/{number}.json", remote.ref_path(v.stance, number), MAX_REF_BYTES)
        try:
            if json.loads(raw).get("id") == v.id:
                taken[v.stance] = number
                return RemoteVersion(v.stance, number, v.id)
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


def pull(store: Store, url: str, *, stance: str | None = None, progress: Progress | None = None) -> PullResult:
    """Download versions from a remote (`url`: a URL, or the name of one of the store's remotes)
    into the store, verified: every ref, manifest, base and
    object is checked before anything is stored; then the bases the store lacks are registered
    and all the versions land at once under the remote's numbers, or none does. Only objects
    the store lacks are downloaded; they wait in the store's tmp/ until they land, so a pull
    run again after a kill does not download them again."""
    store._writable()
    url = remote_url(store, url)
    remote = Remote(url)
    staging = store.root / "tmp" / f"pull-{bytes_id(url.encode())[3:19]}"
    try:
        return _pull(store, remote, staging, stance, progress)
    except (UnsafeInput, VersionConflict):
        # Refused data will not be better next time: keep nothing of it. (After any other
        # failure, a kill or a network error, what was downloaded and checked stays for the
        # next pull.)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _pull(store: Store, remote: Remote, staging: Path, stance: str | None, progress: Progress | None) -> PullResult:
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
        todo: list[tuple[RemoteVersion, dict, Version]] = []
        for rv in chosen:
            if store.catalog.version(rv.id):
                continue
            todo.append((rv, *remote_manifest(remote, rv)))
        _check_numbers(store, todo)
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
    numbers = {v.id: rv.number for rv, _, v in todo}
    stances = {v.id: rv.stance for rv, _, v in todo}
    landed = {}
    if todo:
        try:
            landed = {v.id: new for v, new in store.ingest([m for _, m, _ in todo], payload, numbers=numbers,
                                                           stances=stances)}
        except CorruptObject as e:  # a staged file changed between its check and the ingest
            raise RemoteDataRejected(url, f"object {e.object_id}", e.reason) from None
    shutil.rmtree(staging, ignore_errors=True)
    pulled = tuple(rv for rv, _, v in todo if landed.get(v.id))
    here = tuple(rv for rv in chosen if rv not in pulled)
    # A staged object (a pull that was killed) counts 0: it was not downloaded again.
    return PullResult(url, pulled, here, added, sum(1 for n in got if n), sum(got))


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


def _check_numbers(store: Store, todo: list[tuple[RemoteVersion, dict, Version]]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for rv, _, v in todo:
        row = store.catalog.version_at(rv.stance, rv.number)
        if row is not None and row["id"] != rv.id:
            raise VersionConflict(rv.stance, rv.number, row["id"], rv.id)
        if seen.setdefault((rv.stance, rv.number), rv.id) != rv.id:
            raise VersionConflict(rv.stance, rv.number, seen[(rv.stance, rv.number)], rv.id, "on the remote")


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
    it keeps as its remote `origin`. Nothing is left behind when the pull fails."""
    folder = Path(directory)
    root = folder / DEFAULT_DIR
    check_url(url)
    created = not folder.exists()
    store = Store.init(root)
    try:
        result = pull(store, url, progress=progress)
        add_remote(root, "origin", url)
    except BaseException:
        store.close()
        shutil.rmtree(folder if created else root, ignore_errors=True)
        raise
    return store, result

