"""Sharing versions through the Hugging Face Hub: `push` and `pull`.

It reaches the `huggingface_hub` client through hubclient.py, only when called, so that the
rest of the library works without it. The repo's layout is hubindex.py's, its model card
hubcard.py's, and the checks on what a pull brings in hubchecks.py's. A pulled repo is
untrusted: every name, size and hash in it is checked, file by file, before `Store.ingest`
stores anything, and that stores all the pulled versions in one transaction or none. This
module never writes to the store any other way (but for the folder in the store's tmp/ where a
push writes the files it uploads, and the bases `pull --fetch-base` registers through
hubbase.py, checked against the ids the versions need before any version is stored). A pulled
version joins a local stance only when that stance holds nothing but versions the repo's stance
lists; else it is pulled `into` another name, or not at all.

One Hub commit per push (none when every version is already there), then a tag
`<stance>-v<N>` per version, so that `pull --revision curious-uncertainty-v1` fetches one version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.errors import (BaseMismatch, DeltastoreError, HubConflict, HubRepoNotFound, HubRevisionNotFound,
                           NotADeltaRepo, PulledBaseChanged, PulledDataRejected, UnsafeInput)
from ..core.hashing import canonical_json, manifest_id
from ..core.names import check_stance_name
from ..engine.chain import refuse_chained
from ..repo.records import Base, Version
from ..store import Store
from ..weights.models import TensorInfo, write_safetensors
from .hubbase import fetch_base
from .hubcard import model_card
from .hubchecks import check_against_store, check_manifest_file, check_payloads, read_at, read_pulled
from .hubclient import client as _hf, hub_errors as _hub_errors, progress_bars as _progress_bars
from .hubindex import (CARD_FILE, INDEX_FILE, INDEX_FORMAT, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES,
                       MAX_PAYLOAD_HEADER_BYTES, META_FORMAT, META_MANIFEST, META_VERSION, PART_SEPARATOR, HubVersion,
                       check_index, choose, empty_index, hub_version, index_entry, version_tag)
from .listed import check_into

Planned = list[tuple[HubVersion, dict, Version]]  # versions of the repo: as listed, their manifest, as it reads


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to
    url: str
    commit: str | None  # the commit this push made; None when everything was already there
    pushed: tuple[HubVersion, ...]  # uploaded by this push
    already_there: tuple[HubVersion, ...]  # asked for, found in the repo: nothing uploaded
    tags_created: tuple[str, ...]
    bytes_uploaded: int  # of the files this push committed

    def to_json(self) -> dict:
        """`push --repo --json`."""
        return {"repo": self.repo_id, "revision": self.revision, "url": self.url, "commit": self.commit,
                "pushed": [hv.to_json() for hv in self.pushed],
                "already_there": [hv.to_json() for hv in self.already_there],
                "tags_created": list(self.tags_created), "bytes_uploaded": self.bytes_uploaded}


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str | None  # as asked for (None: the default branch)
    commit: str  # the commit everything was read from
    pulled: tuple[HubVersion, ...]  # new in the store
    already_here: tuple[HubVersion, ...]  # were in the store already
    bytes_downloaded: int  # sizes of the payload files read (whether or not the HF cache had them)
    bases_fetched: tuple[Base, ...] = ()  # registered by this pull (fetch_base), from the Hub

    def to_json(self) -> dict:
        """`pull ID --json`."""
        return {"repo": self.repo_id, "revision": self.revision, "commit": self.commit,
                "pulled": [hv.to_json() for hv in self.pulled],
                "already_here": [hv.to_json() for hv in self.already_here],
                "bases_fetched": [asdict(b) for b in self.bases_fetched],
                "bytes_downloaded": self.bytes_downloaded}


# -- push ----------------------------------------------------------------------------------------


def push(store: Store, refs: Sequence[str], repo_id: str, *, revision: str | None = None,
         private: bool = False, token: str | None = None, endpoint: str | None = None,
         progress: bool = True) -> PushResult:
    """Upload versions to a Hub repo (created if missing, `private` then), as one commit on the
    branch `revision` (default main), then tag each version `<stance>-v<N>`. Versions already in
    the repo are not uploaded again; when none is new, no commit is made."""
    hf = _hf()
    versions = list({v.id: v for v in (store.resolve(r) for r in refs)}.values())
    refuse_chained(versions, "push to the Hub")
    if not versions:
        raise UnsafeInput("nothing to push: name at least one version (STANCE, STANCE@N or an id)")
    api = hf.HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    with _hub_errors(repo_id, branch, api.endpoint), _progress_bars(progress), _work_folder(store, "push") as tmp:
        head, tags = _branch_head(hf, api, repo_id, branch, private)
        index = _remote_index(hf, api, repo_id, head, Path(tmp) / "remote") or empty_index()
        listed = {e["id"]: e for entries in index["stances"].values() for e in entries}
        new = [v for v in versions if v.id not in listed]
        for v in new:
            _check_pushable(hf, api, repo_id, index, tags, v, Path(tmp) / "tags")
        ops, uploaded, commit = [], 0, None
        if new:
            for v in new:
                entry = index_entry(v)
                index["stances"].setdefault(v.stance, []).append(entry)
                index["stances"][v.stance].sort(key=lambda e: e["number"])
                for path, data in _version_files(store, v, Path(tmp)).items():
                    ops.append(hf.CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(data)))
                    uploaded += data.stat().st_size
                base = store.base(v.base_id)
                index["bases"][base.id] = {"name": base.name, "hub_id": base.hub_id,
                                           "hub_revision": base.hub_revision,
                                           "tensors": base.tensor_count, "bytes": base.bytes}
            index_bytes = json.dumps(index, indent=1, sort_keys=True).encode() + b"\n"
            card = model_card(repo_id, index).encode()
            ops.append(hf.CommitOperationAdd(path_in_repo=INDEX_FILE, path_or_fileobj=index_bytes))
            ops.append(hf.CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
            uploaded += len(index_bytes) + len(card)
            what = "; ".join(f"{v.ref} {v.short_id}" for v in new)
            info = api.create_commit(repo_id, ops, commit_message=f"deltastore push: {what}",
                                     revision=branch, parent_commit=head)
            commit = info.oid
        created = []
        for v in versions:
            tag = version_tag(v.stance, v.number)
            if tag not in tags:
                # A version already there but untagged: an earlier push stopped before its tags.
                api.create_tag(repo_id, tag=tag, revision=commit or head,
                               tag_message=f"{v.ref} {v.id}")
                created.append(tag)
    hub_versions = {v.id: hub_version(index_entry(v), v.stance) for v in versions}
    return PushResult(repo_id, branch, f"{api.endpoint.rstrip('/')}/{repo_id}", commit,
                      tuple(hub_versions[v.id] for v in new),
                      tuple(hub_versions[v.id] for v in versions if v.id in listed),
                      tuple(created), uploaded)


def versions_held(repo_id: str, version_ids: set[str], *, revision: str | None = None, token: str | None = None,
                  endpoint: str | None = None) -> list[HubVersion]:
    """Which of `version_ids` the repo's branch `revision` (default main) holds: what an
    interrupted push left there. A push is one commit, so a version is there once the commit
    that lists it in the index is; its tag may come after. None of them when the repo or the
    branch does not exist."""
    hf = _hf()
    api = hf.HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    try:
        with _hub_errors(repo_id, branch, api.endpoint), tempfile.TemporaryDirectory() as tmp:
            index = _remote_index(hf, api, repo_id, branch, Path(tmp)) or empty_index()
    except (HubRepoNotFound, HubRevisionNotFound):
        return []
    return [hub_version(e, stance) for stance, entries in index["stances"].items() for e in entries
            if e["id"] in version_ids]


@contextmanager
def _work_folder(store: Store, what: str) -> Iterator[str]:
    """A folder for the files a push writes before uploading them (up to the size of what it
    pushes), removed on every way out. It lies in the store's tmp/, named `<pid>-<what>-<hex>`,
    so that a push killed on the way leaves it where `fsck --repair` and gc find it, never
    in the system's temporary folder; a read-only store's push uses the latter."""
    if store.readonly:
        with tempfile.TemporaryDirectory(prefix=f"deltastore-{what}-") as tmp:
            yield tmp
        return
    folder = Path(store.root) / "tmp" / f"{os.getpid()}-{what}-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    try:
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _branch_head(hf: Any, api: Any, repo_id: str, branch: str, private: bool) -> tuple[str, dict[str, str]]:
    """The commit at the head of `branch`, creating the repo and the branch when missing, and the
    repo's tags (name -> commit)."""
    try:
        api.model_info(repo_id)
    except hf.errors.RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)
    refs = api.list_repo_refs(repo_id)
    branches = {b.name: b.target_commit for b in refs.branches}
    tags = {t.name: t.target_commit for t in refs.tags}
    if branch not in branches:
        if branch in tags:
            raise HubConflict(f"{branch!r} is a tag of {repo_id}; push to a branch (--revision BRANCH)",
                              repo_id=repo_id, revision=branch)
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        branches = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    return branches[branch], tags


def _remote_index(hf: Any, api: Any, repo_id: str, revision: str, folder: Path) -> dict | None:
    """The repo's index at `revision`, None when it has none."""
    try:
        path = api.hf_hub_download(repo_id, INDEX_FILE, revision=revision, local_dir=folder)
    except hf.errors.EntryNotFoundError as e:
        if isinstance(e, hf.errors.LocalEntryNotFoundError):
            raise
        return None
    if Path(path).stat().st_size > MAX_INDEX_BYTES:
        raise NotADeltaRepo(repo_id, revision, f"{INDEX_FILE} is larger than {MAX_INDEX_BYTES} bytes")
    return check_index(Path(path).read_bytes(), repo_id, revision)


def _check_pushable(hf: Any, api: Any, repo_id: str, index: dict, tags: dict[str, str], v: Version,
                    folder: Path) -> None:
    """Refuse, before uploading anything, a version whose number or tag the repo gives to another."""
    for e in index["stances"].get(v.stance, []):
        if e["number"] == v.number and e["id"] != v.id:
            raise HubConflict(
                f"{repo_id} already has {v.ref} as version {e['id'][:19]}, not {v.id[:19]}: the stance's "
                "histories differ; push to another repo or branch", repo_id=repo_id)
    tag = version_tag(v.stance, v.number)
    if tag in tags:
        # Pushed to another branch before? Then the tag must name this very version.
        there = _remote_index(hf, api, repo_id, tags[tag], folder / tag) or empty_index()
        if not any(e["id"] == v.id for e in there["stances"].get(v.stance, [])):
            raise HubConflict(f"tag {tag} of {repo_id} already names another version than {v.ref} {v.id[:19]}; "
                              "push to another repo", repo_id=repo_id, revision=tag)


def _version_files(store: Store, v: Version, tmp: Path) -> dict[str, Path]:
    """Write a version's payload file and manifest under `tmp`: path in the repo -> local file."""
    entry = index_entry(v)
    m = v.manifest()
    text = canonical_json(m)
    if manifest_id(m) != v.id:
        raise DeltastoreError(f"{v.ref}'s manifest does not hash to its id; run `deltastore fsck`")
    infos, objects = [], {}
    for e in v.tensors:
        for part, o in e.objects.items():
            name = f"{e.name}{PART_SEPARATOR}{part}"
            if name in objects:
                raise DeltastoreError(f"{v.ref}: two payloads would both be named {name!r}")
            infos.append(TensorInfo(name, "U8", (o.size,)))
            objects[name] = o

    def tensor(name: str) -> torch.Tensor:
        o = objects[name]
        if o.size == 0:
            return torch.empty(0, dtype=torch.uint8)
        data = store.objects.get(o.id, raw_size=o.size)  # verified against its id
        return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)

    out = {}
    payloads = tmp / entry["files"]["payloads"]
    payloads.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(payloads, infos, tensor, {META_FORMAT: INDEX_FORMAT, META_VERSION: v.id,
                                                META_MANIFEST: text.decode()})
    out[entry["files"]["payloads"]] = payloads
    manifest_file = tmp / entry["files"]["manifest"]
    manifest_file.write_bytes(text)
    out[entry["files"]["manifest"]] = manifest_file
    return out


# -- pull ----------------------------------------------------------------------------------------


def pull(store: Store, repo_id: str, *, revision: str | None = None, stance: str | None = None,
         into: str | None = None, token: str | None = None, endpoint: str | None = None,
         cache_dir: str | os.PathLike | None = None, force_download: bool = False,
         fetch_base: bool = False, base_revision: str | None = None, progress: bool = True) -> PullResult:
    """Download versions from a Hub repo into the store, verified. `revision` is a branch, a
    commit or a version's tag (`<stance>-v<N>`: then only that version); `stance` limits the pull
    to one stance. Every file is checked (names, sizes, hashes, the manifest against the version
    id, the base against the store's bases) before anything is stored; then all the versions land
    at once, or none does.

    A pulled stance never joins a local stance of that name that holds versions the repo's
    stance does not list (the user's own work): that pull is refused unless `into` names another
    local stance for the pulled one's versions (which keep their ids and numbers). `force_download`
    fetches every file afresh instead of reading the local Hugging Face cache.

    `fetch_base`: a base the store lacks is fetched from the Hub repo and commit the index records
    for it (`base_revision`: at that revision instead), into the Hugging Face cache, once every
    pulled file has passed its checks; its base id must be the one the versions need
    (PulledBaseChanged otherwise, and nothing is stored), and only then do the versions land."""
    hf = _hf()
    store.check_writable()
    if into is not None:
        check_stance_name(into)
    api = hf.HfApi(endpoint=endpoint, token=token)
    cached: dict[str, Path] = {}  # repo path -> the cached file a check read, when it was cached before this pull
    with _hub_errors(repo_id, revision, api.endpoint), _progress_bars(progress), _cache_hint(cached):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha
        sizes = _repo_files(info, repo_id, revision)
        download = _downloader(hf, repo_id, commit, cached, cache_dir=cache_dir, token=token, endpoint=endpoint,
                               force_download=force_download)
        index = check_index(read_pulled(download(INDEX_FILE), MAX_INDEX_BYTES, repo_id, revision, INDEX_FILE),
                            repo_id, revision)
        chosen = choose(index, repo_id, revision, stance)
        local = _local_stances(chosen, into)
        planned = _manifests(download, chosen, sizes, repo_id, revision)
        todo, missing = check_against_store(store, planned, index, repo_id, revision, local, fetch_base)
        located, downloaded = _payloads(download, todo, sizes, repo_id, revision)
    fetched = tuple(_fetch_base(store, index, base_id, ref, repo_id, revision, base_revision, token=token,
                                endpoint=endpoint, cache_dir=cache_dir, progress=progress)
                    for base_id, ref in missing.items())
    landed = _land(store, todo, located, local, repo_id, revision)
    pulled = tuple(_landed_as(hv, local) for hv, _, v in todo if landed.get(v.id))
    new_ids = {hv.id for hv in pulled}
    here = tuple(_landed_as(hv, local) for hv in chosen if hv.id not in new_ids)
    return PullResult(repo_id, revision, commit, pulled, here, downloaded, fetched)


def _repo_files(info: Any, repo_id: str, revision: str | None) -> dict[str, int | None]:
    """The repo's files at the commit read -> their sizes; refused when it has no index, or one
    larger than any deltastore writes."""
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    if INDEX_FILE not in sizes:
        raise NotADeltaRepo(repo_id, revision, f"it has no {INDEX_FILE}")
    if sizes[INDEX_FILE] is None or sizes[INDEX_FILE] > MAX_INDEX_BYTES:
        raise PulledDataRejected(repo_id, revision, INDEX_FILE, f"larger than {MAX_INDEX_BYTES} bytes")
    return sizes


def _downloader(hf: Any, repo_id: str, commit: str, cached: dict[str, Path], *, cache_dir: Any, token: str | None,
                endpoint: str | None, force_download: bool) -> Callable[[str], Path]:
    """A function that fetches one file of the repo at `commit` (from the local Hugging Face cache
    where it is there), and notes in `cached` the files the cache held before this pull."""
    def download(path: str) -> Path:
        before = None if force_download else hf.try_to_load_from_cache(repo_id, path, cache_dir=cache_dir,
                                                                       revision=commit)
        got = Path(hf.hf_hub_download(repo_id, path, revision=commit, cache_dir=cache_dir, token=token,
                                      endpoint=endpoint, library_name="deltastore",
                                      force_download=force_download))
        if isinstance(before, str):
            cached[path] = got
        return got
    return download


def _manifests(download: Callable[[str], Path], chosen: list[HubVersion], sizes: dict[str, int | None],
               repo_id: str, revision: str | None) -> Planned:
    """The chosen versions' manifests, each checked against its version id. Read first: they are
    small, and tell what the payload files must hold."""
    for hv in chosen:
        for path in (hv.manifest, hv.payloads):
            if path not in sizes or sizes[path] is None:
                raise PulledDataRejected(repo_id, revision, path, f"listed in {INDEX_FILE} but not in the repo")
        if sizes[hv.manifest] > MAX_MANIFEST_BYTES:
            raise PulledDataRejected(repo_id, revision, hv.manifest, f"larger than {MAX_MANIFEST_BYTES} bytes")
    planned: Planned = []
    for hv, path in zip(chosen, _download_all(download, [hv.manifest for hv in chosen])):
        text = read_pulled(path, MAX_MANIFEST_BYTES, repo_id, revision, hv.manifest)
        m, v = check_manifest_file(text, hv, repo_id, revision)
        planned.append((hv, m, v))
    return planned


def _payloads(download: Callable[[str], Path], todo: Planned, sizes: dict[str, int | None], repo_id: str,
              revision: str | None) -> tuple[dict[str, tuple[Path, int, int]], int]:
    """The payload files of the versions to pull, each checked (names, sizes, hashes) before the
    store sees any of it: object id -> (file, offset, size), and the bytes of the files read."""
    # The payload files' sizes follow from the manifests: refuse larger ones before downloading.
    for hv, m, v in todo:
        declared = sum(o.size for e in v.tensors for o in e.objects.values())
        if sizes[hv.payloads] > declared + 8 + MAX_PAYLOAD_HEADER_BYTES:
            raise PulledDataRejected(repo_id, revision, hv.payloads,
                                     f"{sizes[hv.payloads]} bytes, but its manifest declares {declared} bytes of payloads")
    # One download per file (snapshot_download's allow_patterns would match every file of
    # the repo against every pattern: quadratic in the versions pulled).
    paths = [hv.payloads for hv, _, _ in todo]
    files = dict(zip(paths, _download_all(download, paths)))
    located: dict[str, tuple[Path, int, int]] = {}  # object id -> (file, offset, size)
    downloaded = 0
    for hv, m, v in todo:
        located.update(check_payloads(files[hv.payloads], hv, m, v, repo_id, revision))
        downloaded += files[hv.payloads].stat().st_size
    return located, downloaded


def _land(store: Store, todo: Planned, located: dict[str, tuple[Path, int, int]], local: dict[str, str],
          repo_id: str, revision: str | None) -> dict[str, bool]:
    """The checked versions stored, all at once or none, each in its local stance under the
    repo's number: version id -> whether it landed."""
    def payload(object_id: str, size: int) -> bytes:
        path, start, length = located[object_id]
        if length != size:
            raise PulledDataRejected(repo_id, revision, path.name, f"object {object_id} changed size")
        return read_at(path, start, length)

    stances = {v.id: local.get(hv.stance, hv.stance) for hv, _, v in todo}
    numbers = {v.id: hv.number for hv, _, v in todo}
    try:
        return ({v.id: new for v, new in store.ingest([m for _, m, _ in todo], payload, stances=stances,
                                                      numbers=numbers)}
                if todo else {})
    except UnsafeInput as e:  # a payload file changed in the cache between the checks and the ingest
        raise PulledDataRejected(repo_id, revision, "payloads", str(e)) from None


def _fetch_base(store: Store, index: dict, base_id: str, ref: str, repo_id: str, revision: str | None,
                base_revision: str | None, **client: Any) -> Base:
    """The base `base_id` fetched from where the index says it is, and registered only when the
    weights there are that base."""
    b = index["bases"][base_id]
    at = base_revision or b.get("hub_revision")
    try:
        return fetch_base(store, b["hub_id"], revision=at, expected_id=base_id, **client)
    except BaseMismatch as e:
        if e.expected != base_id or e.actual is None:
            raise
        raise PulledBaseChanged(repo_id, revision, ref, base_id, e.actual, b["hub_id"], at or "main",
                                b.get("hub_revision")) from None


def _local_stances(chosen: list[HubVersion], into: str | None) -> dict[str, str]:
    """The repo's stance -> the local stance its versions land in."""
    stances = sorted({hv.stance for hv in chosen})
    if into is None:
        return {s: s for s in stances}
    check_into(stances, into)
    return {s: into for s in stances}


def _landed_as(hv: HubVersion, local: dict[str, str]) -> HubVersion:
    """The version as the store names it: under the local stance it was pulled into."""
    return replace(hv, stance=local.get(hv.stance, hv.stance))


def _download_all(download: Any, paths: list[str], workers: int = 8) -> list[Path]:
    """`download(path)` of every path, a few at a time (each is a request or two to the Hub), in
    order; the first failure is raised."""
    if len(paths) <= 1:
        return [download(p) for p in paths]
    pool = ThreadPoolExecutor(max_workers=min(workers, len(paths)))
    try:
        return list(pool.map(download, paths))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no more downloads


@contextmanager
def _cache_hint(cached: dict[str, Path]) -> Iterator[None]:
    """A file the local Hugging Face cache held before this pull that fails a check: say so, and
    how to fetch it afresh (a cache damaged on disk would otherwise fail every later pull as
    "tampered or corrupt")."""
    try:
        yield
    except PulledDataRejected as e:
        if e.file not in cached:
            raise
        raise PulledDataRejected(
            e.repo_id, e.revision, e.file,
            f"{e.reason}; this copy came from the local Hugging Face cache ({cached[e.file]}), which may be "
            "damaged: pull again with --force-download to fetch it afresh") from None
