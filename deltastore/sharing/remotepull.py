"""`pull` from a remote and `clone` of one (schema/FORMAT.md §10): versions downloaded into a
store, every ref, manifest, base and object checked first.

The remote is untrusted when read: every ref, manifest and object is checked (names, sizes,
hashes) before `Store.ingest` stores anything, and that stores all the pulled versions in one
transaction or none. This module never writes to the store any other way. The remote's tags of
the versions pulled are set here by git's rule: one here that names another version already is
left where it is (said in one line).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import CorruptObject, RemoteDataRejected, RemoteError, StoreExists, TagExists, UnsafeInput
from ..core.hashing import bytes_id, is_id
from ..core.limits import load_json
from ..core.names import check_base_name, check_stance_name
from ..repo.index import base_record_problem
from ..repo.objects import ObjectStore
from ..repo.records import Version
from ..store import DEFAULT_DIR, STORE_FILE, Store
from .listed import check_into
from .remoteerrors import backend_errors
from .remotefs import (MARKER, MAX_REF_BYTES, Progress, Remote, RemoteTag, RemoteVersion, name_allowed, parallel,
                       remote_manifest)
from .remotenames import add_remote, check_url, remote_url

MAX_BASE_RECORD_BYTES = 256 << 20  # a base record is ~150 bytes per tensor


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
    store.check_writable()
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
        check_into(sorted({rv.stance for rv in chosen}), into)
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
        got = parallel(missing, lambda oid: _download(remote, staging, oid, needed[oid]), progress)

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
              and (ref["name"] is None or (isinstance(ref["name"], str) and name_allowed(check_base_name, ref["name"])))
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
    if name is not None and store.catalog.base_named(name, other_than=ref["id"]):
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
