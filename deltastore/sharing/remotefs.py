"""A remote's files, reached through fsspec (a shared folder, S3, GCS, Azure): where each lies,
each read bounded and checked (names, sizes, hashes) before anyone uses it, and the writes a
remote needs (a file created only where none is, an object put whole or not at all); the only
module that imports `fsspec`.

A remote, as `push` writes it (schema/FORMAT.md §10)::

    PREFIX/
      REMOTE                 {"format": "deltastore/remote/1"}
      objects/9a/0c…e1       object files, byte for byte as in a store
      bases/<hex>.json       {"id", "record", "name", "hub_id"}
      locks/<kind>-<hex>.json a push's shared lock or a gc's exclusive one (remotelock.py)
      refs/<stance>/<N>.json {"id", "stance", "number"}: taken with a conditional create
      tags/<stance>/<T>.json {"id", "stance", "name"}: a tag, made (never moved) the same way
"""

from __future__ import annotations

import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

from ..core.errors import CorruptObject, RemoteDataRejected, RemoteError, UnsafeInput
from ..core.hashing import ALGORITHM, bytes_id, is_id
from ..core.limits import load_json
from ..core.names import check_stance_name, check_tag_name, number_problem
from ..repo.objects import HEADER, ObjectStore
from ..repo.records import MAX_MANIFEST_BYTES, Version, check_manifest, parse_manifest
from .listed import ListedVersion
from .remoteerrors import backend_failure, no_bucket
from .remotenames import NOT_PERSISTENT, check_url

# fsspec (and through it s3fs, gcsfs, adlfs) is imported when a remote is opened: a store that
# only names its remotes needs none of it.

REMOTE_FORMAT = "deltastore/remote/1"
MARKER = "REMOTE"
MAX_REF_BYTES = 64 << 10
TRANSFERS = 8  # objects moved at once
_REF_FILE = re.compile(r"^([1-9][0-9]{0,9})\.json$")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RemoteVersion(ListedVersion):
    """One version as the remote lists it: its ref. In a push's or a pull's result, `local` is
    the ref the store gives it (the remote numbers a stance's versions as they arrive, so the
    two may differ: FORMAT.md §10)."""

    local: str | None = None

    def to_json(self) -> dict:
        return {**super().to_json(), "local": self.local}


@dataclass(frozen=True)
class RemoteTag:
    """A tag as the remote lists it: STANCE@NAME there names version `id`."""

    stance: str
    name: str
    id: str

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.name}"


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
            raise backend_failure(url, e) or RemoteError(f"cannot open {url}: {e}", url=url) from None
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
            if no_bucket(e):  # not an empty remote: nothing can be pushed there either
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
        base, found = self._found(parts, detail=False)
        return [rel for rel, _ in self._relative(base, found)]

    def listing(self, *parts: str) -> dict[str, dict]:
        """Every file under a folder of the remote, relative to it, with what the backend says
        of it (its size, when it was last written)."""
        base, found = self._found(parts, detail=True)
        return {rel: found[path] for rel, path in self._relative(base, found)}

    def _found(self, parts: tuple[str, ...], *, detail: bool) -> tuple[str, Any]:
        """The folder's path and what fsspec finds under it, read afresh: a backend's cached
        listing (s3fs keeps one) would hide a file another writer just made."""
        base = self.path(*parts)
        self.fs.invalidate_cache()
        try:
            return base, self.fs.find(base, detail=detail)
        except FileNotFoundError:
            return base, {} if detail else []
        finally:
            self.fs.invalidate_cache()

    def _relative(self, base: str, found: Iterable[str]) -> Iterator[tuple[str, str]]:
        """Each path found under `base`: (relative to it, as found). Compared without their
        protocol, which a backend may or may not give."""
        prefix = _without_protocol(self.fs, base).rstrip("/") + "/"
        for path in found:
            bare = _without_protocol(self.fs, path)
            if bare.startswith(prefix):
                yield bare[len(prefix):], path

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
            if not name_allowed(check_stance_name, stance, in_path=True) or match is None:
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
            if not (name_allowed(check_stance_name, stance, in_path=True) and file.endswith(".json")
                    and name_allowed(check_tag_name, tag, in_path=True)):
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


def _without_protocol(fs: Any, path: str) -> str:
    """`path` as `fs` names it without a protocol, by the backend's own rule (fsspec's
    `strip_protocol` reads the protocol `unstrip_protocol` gives the path, `fs`'s own)."""
    import fsspec.core

    return fsspec.core.strip_protocol(fs.unstrip_protocol(path))


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

def name_allowed(check: Callable[[str], Any], name: str, *, in_path: bool = False) -> bool:
    """Whether a name the remote gives passes `check`, one of the store's rules for names; one
    that is also a path on the remote (`in_path`) must hold no '..'."""
    try:
        check(name)
    except UnsafeInput:
        return False
    return not (in_path and ".." in name)


def parallel(items: list[str], call: Callable[[str], int], progress: Progress | None) -> list[int]:
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
