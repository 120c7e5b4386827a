"""`push` to a remote (schema/FORMAT.md §10): the objects, base refs, refs and tags a store's
versions need there, uploaded under the remote's shared lock.

No server: objects are written once under their hash, and a version's number on the remote is
taken by creating its ref with a conditional write (O_EXCL on a folder, `If-None-Match: *` on
S3), so that many pushers can share one remote. A push holds a shared lock from before it lists
the remote to after its refs, so that no gc deletes an object it checked and relies on; it
checks what it finds there (manifests and base objects by content, payloads by size) and
uploads again what is missing or damaged.

Tags travel with their versions, by git's rule: a tag is created where it is missing, and one
that names another version already is left where it is (said in one line). A tag is written
after the refs, so it names a version a ref holds: gc, which keeps what refs reach, never needs
to read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

from ..core.errors import RemoteDataRejected, RemoteError, UnsafeInput
from ..core.hashing import canonical_json
from ..engine.chain import refuse_chained
from ..repo.objects import HEADER
from ..repo.records import Version, hub_origin
from .remoteerrors import backend_errors
from .remotefs import MARKER, MAX_REF_BYTES, REMOTE_FORMAT, Progress, Remote, RemoteVersion, parallel
from .remotelock import SHARED, Lock
from .remotenames import remote_url

if TYPE_CHECKING:
    from ..store import Store


def _step(name: str) -> None:
    """Called between the steps of a push; does nothing. Tests replace it to run a gc at
    that very moment (tests/test_remote_race.py)."""


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
    sent = parallel(todo, lambda oid: _upload(store, remote, oid), progress)
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
        record = store.catalog.base_record_id(base.id)
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
    intact = parallel(suspects, lambda oid: int(_intact(store, remote, oid)), None)
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
