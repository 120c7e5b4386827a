"""Sharing versions through the Hugging Face Hub: `push` and `pull`.

It reaches the `huggingface_hub` client through hubclient.py, only when called, so that the
rest of the library works without it. It owns the repo layout (schema/FORMAT.md, section 9) and
the checks on what a pull brings in. A pulled repo is untrusted: every name, size and hash in it
is checked, file by file, before `Store.ingest` stores anything, and that stores all the pulled
versions in one transaction or none. This module never writes to the store any other way (but
for the folder in the store's tmp/ where a push writes the files it uploads, and the bases
`pull --fetch-base` registers through hubbase.py, checked against the ids the versions need
before any version is stored). A pulled version joins a
local stance only when that stance holds nothing but versions the repo's stance lists; else it
is pulled `into` another name, or not at all.

A repo, as `push` writes it::

    alice/qwen-stances/
      README.md                       model card: YAML front matter, stances, how to apply
      deltastore.json                 index: bases, stances -> versions (ids, files, tags)
      curious-uncertainty/
        v1.safetensors                the version's objects as U8 tensors "<tensor>::<part>";
                                      __metadata__ holds the manifest
        v1.json                       the manifest, canonical JSON (its BLAKE3 is the version id)
        v2.safetensors
        v2.json

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
from typing import Any, Iterator, Sequence

import torch

from ..engine.chain import refuse_chained
from ..core.errors import (BaseMismatch, DeltastoreError, HubConflict, HubStanceNotFound, LocalStanceDiffers,
                     ModelFormatError, NotADeltaRepo, PulledBaseChanged, PulledBaseMissing, PulledDataRejected,
                     UnsafeInput)
from ..core.hashing import bytes_id, canonical_json, is_id, manifest_id
from .hubbase import fetch_base, is_commit
from .hubclient import client as _hf, hub_errors as _hub_errors, progress_bars as _progress_bars
from ..weights.models import TensorInfo, read_header, safe_relative, write_safetensors
from ..core.names import check_stance_name, name_problem, number_problem
from ..core.limits import load_json, read_bounded
from ..repo.records import Base, Version, check_manifest, parse_manifest
from ..store import Store
from ..core.units import size

INDEX_FILE = "deltastore.json"
CARD_FILE = "README.md"
INDEX_FORMAT = "deltastore/hub/1"
PART_SEPARATOR = "::"  # payload tensor name: "<tensor name>::<part>"
META_FORMAT, META_VERSION, META_MANIFEST = "deltastore.format", "deltastore.version", "deltastore.manifest"
# Bounds on what a pull reads before it knows better: an index or a manifest larger than this is
# not one deltastore wrote (a manifest is ~400 bytes per tensor entry).
MAX_INDEX_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_PAYLOAD_HEADER_BYTES = 64 << 20


@dataclass(frozen=True)
class HubVersion:
    """One version as the repo lists it."""

    stance: str
    number: int
    id: str
    tag: str  # the Hub revision that names it
    payloads: str  # path in the repo of its .safetensors file
    manifest: str  # path in the repo of its manifest

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    def to_json(self) -> dict:
        return {"ref": self.ref, "stance": self.stance, "number": self.number, "id": self.id, "revision": self.tag}


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
        index = _remote_index(hf, api, repo_id, head, Path(tmp) / "remote") or _empty_index()
        listed = {e["id"]: e for entries in index["stances"].values() for e in entries}
        new = [v for v in versions if v.id not in listed]
        for v in new:
            _check_pushable(hf, api, repo_id, index, tags, v, Path(tmp) / "tags")
        ops, uploaded, commit = [], 0, None
        if new:
            for v in new:
                entry = _index_entry(v)
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
    hub_versions = {v.id: _hub_version(_index_entry(v), v.stance) for v in versions}
    return PushResult(repo_id, branch, f"{api.endpoint.rstrip('/')}/{repo_id}", commit,
                      tuple(hub_versions[v.id] for v in new),
                      tuple(hub_versions[v.id] for v in versions if v.id in listed),
                      tuple(created), uploaded)


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


def version_tag(stance: str, number: int) -> str:
    return f"{stance}-v{number}"


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
        there = _remote_index(hf, api, repo_id, tags[tag], folder / tag) or _empty_index()
        if not any(e["id"] == v.id for e in there["stances"].get(v.stance, [])):
            raise HubConflict(f"tag {tag} of {repo_id} already names another version than {v.ref} {v.id[:19]}; "
                              "push to another repo", repo_id=repo_id, revision=tag)


def _index_entry(v: Version) -> dict:
    folder = v.stance
    return {
        "number": v.number, "id": v.id, "parent": v.parent, "base": v.base_id, "encoding": v.encoding,
        "encodings": sorted({e.encoding for e in v.tensors}), "tensors": len(v.tensors),
        "bytes": sum(o.size for e in v.tensors for o in e.objects.values()),
        "created": v.created, "message": v.message, "tag": version_tag(v.stance, v.number),
        "files": {"payloads": f"{folder}/v{v.number}.safetensors", "manifest": f"{folder}/v{v.number}.json"},
    }


def _hub_version(entry: dict, stance: str) -> HubVersion:
    return HubVersion(stance, entry["number"], entry["id"], entry["tag"], entry["files"]["payloads"],
                      entry["files"]["manifest"])


def _version_files(store: Store, v: Version, tmp: Path) -> dict[str, Path]:
    """Write a version's payload file and manifest under `tmp`: path in the repo -> local file."""
    entry = _index_entry(v)
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


def _empty_index() -> dict:
    return {"format": INDEX_FORMAT, "bases": {}, "stances": {}}


# -- the model card --------------------------------------------------------------------------------


def model_card(repo_id: str, index: dict) -> str:
    """README.md: YAML front matter the Hub reads, then what the repo holds and how to use it."""
    hub_ids = sorted({b["hub_id"] for b in index["bases"].values() if b.get("hub_id")})
    encodings = sorted({enc.split(":")[0] for es in index["stances"].values() for e in es for enc in e["encodings"]})
    q = json.dumps  # a JSON string is a YAML scalar, whatever it holds
    yaml = ["---", "library_name: deltastore"]
    if len(hub_ids) == 1:
        yaml.append(f"base_model: {q(hub_ids[0])}")
    elif hub_ids:
        yaml += ["base_model:"] + [f"- {q(h)}" for h in hub_ids]
    yaml.append("base_model_relation: adapter")
    yaml += ["tags:"] + [f"- {q(t)}" for t in ["deltastore", "stance-delta", *encodings]]
    yaml.append("---")

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = yaml + ["", f"# {repo_id}", "",
                    "Fine-tuning deltas (\"stances\") of a base model, stored with deltastore: each version holds "
                    "per-tensor differences against its base, identified by content hashes, and verified "
                    "when pulled.", "", "## Bases", "",
                    "| base id | name | Hub id | Hub commit | tensors | size |", "| --- | --- | --- | --- | --- | --- |"]
    for bid, b in sorted(index["bases"].items()):
        commit = f"`{b['hub_revision']}`" if b.get("hub_revision") else "-"
        lines.append(f"| `{bid[:19]}` | {cell(b.get('name') or '-')} | {cell(b.get('hub_id') or '-')} | {commit} | "
                     f"{b.get('tensors', '-')} | {size(b.get('bytes'))} |")
    lines += ["", "## Stances", "",
              "| stance | version | revision | id | encodings | tensors | size | created | message |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stance, entries in sorted(index["stances"].items()):
        for e in entries:
            lines.append(f"| {cell(stance)} | {e['number']} | `{e['tag']}` | `{e['id'][:15]}` | "
                         f"{cell(', '.join(e['encodings']))} | {e['tensors']} | {size(e['bytes'])} | "
                         f"{cell(e['created'][:10])} | {cell(e['message'] or '-')} |")
    first = next(((s, es[-1]) for s, es in sorted(index["stances"].items()) if es), None)
    ref = f"{first[0]}@{first[1]['number']}" if first else "STANCE@N"
    tag = first[1]["tag"] if first else "STANCE-vN"
    base_hint = f" --hub-id {hub_ids[0]}" if len(hub_ids) == 1 else ""
    name = ref.split("@")[0]
    if index["bases"] and all(b.get("hub_revision") for b in index["bases"].values()):
        # Every base was fetched from the Hub at a known commit: a pull can fetch that one.
        lines += ["", "## How to apply", "",
                  "In Python, in one line: the base is fetched from the Hub at the commit the stances were "
                  "made on, the stance pulled (every hash checked) and applied in place:", "", "```python",
                  "import deltastore", "",
                  f"model = deltastore.load({q(repo_id)}, stance={q(name)})", "model.generate(...)",
                  "model.deltastore.revert()   # the base again, bit for bit; .switch(\"STANCE\") for another",
                  "```", "", "or from the command line (the pull refuses a base whose weights at that commit are "
                  "not those the stances were made on):", "", "```bash", "pip install deltastore",
                  "deltastore init",
                  f"deltastore pull {repo_id} --fetch-base    # everything; --stance S for one stance",
                  f"deltastore pull {repo_id} --revision {tag} --fetch-base   # one version",
                  f"deltastore export {ref} --out ./{ref.replace('@', '-v')}",
                  "```", ""]
    else:
        lines += ["", "## How to apply", "",
                  "Register your copy of the base model, pull, then apply a version (the pull refuses any "
                  "delta whose base differs from yours, and checks every hash):", "", "```bash",
                  "pip install deltastore", "deltastore init",
                  f"deltastore base add path/to/base-model{base_hint}",
                  f"deltastore pull {repo_id}                 # everything; --stance S for one stance",
                  f"deltastore pull {repo_id} --revision {tag}   # one version",
                  f"deltastore apply {ref} path/to/base-model --out ./{ref.replace('@', '-v')}",
                  "```", "", "or on a loaded model, in place and reverted exactly afterwards:", "", "```python",
                  "from deltastore import Store", "from deltastore.hub import pull", "",
                  "store = Store.open()", f"pull(store, {q(repo_id)})",
                  f"with store.applied(model, {q(ref)}):", "    model.generate(...)", "```", ""]
    lines += [
              "## Reading it without deltastore", "",
              f"`{INDEX_FILE}` lists the stances and versions. Each version is `STANCE/vN.safetensors`, "
              f"whose `uint8` tensors `<tensor name>{PART_SEPARATOR}<part>` are the encoded deltas, with the "
              f"manifest (encodings, shapes, hashes) in its metadata under `{META_MANIFEST}`, and "
              "`STANCE/vN.json`, the same manifest; its BLAKE3 is the version id. Each version is "
              "also the Hub revision `STANCE-vN`.", ""]
    return "\n".join(lines)


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
    store._writable()
    if into is not None:
        check_stance_name(into)
    api = hf.HfApi(endpoint=endpoint, token=token)
    cached: dict[str, Path] = {}  # repo path -> the cached file a check read, when it was cached before this pull
    with _hub_errors(repo_id, revision, api.endpoint), _progress_bars(progress), _cache_hint(cached):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        if INDEX_FILE not in sizes:
            raise NotADeltaRepo(repo_id, revision, f"it has no {INDEX_FILE}")
        if sizes[INDEX_FILE] is None or sizes[INDEX_FILE] > MAX_INDEX_BYTES:
            raise PulledDataRejected(repo_id, revision, INDEX_FILE, f"larger than {MAX_INDEX_BYTES} bytes")

        def download(path: str) -> Path:
            before = None if force_download else hf.try_to_load_from_cache(repo_id, path, cache_dir=cache_dir,
                                                                           revision=commit)
            got = Path(hf.hf_hub_download(repo_id, path, revision=commit, cache_dir=cache_dir, token=token,
                                          endpoint=endpoint, library_name="deltastore",
                                          force_download=force_download))
            if isinstance(before, str):
                cached[path] = got
            return got

        index = check_index(_read_bounded(download(INDEX_FILE), MAX_INDEX_BYTES, repo_id, revision, INDEX_FILE),
                            repo_id, revision)
        chosen = _choose(index, repo_id, revision, stance)
        local = _local_stances(chosen, into)
        # Manifests first: they are small, and tell what the payload files must hold.
        for hv in chosen:
            for path in (hv.manifest, hv.payloads):
                if path not in sizes or sizes[path] is None:
                    raise PulledDataRejected(repo_id, revision, path, f"listed in {INDEX_FILE} but not in the repo")
            if sizes[hv.manifest] > MAX_MANIFEST_BYTES:
                raise PulledDataRejected(repo_id, revision, hv.manifest, f"larger than {MAX_MANIFEST_BYTES} bytes")
        planned: list[tuple[HubVersion, dict, Version]] = []
        for hv, path in zip(chosen, _download_all(download, [hv.manifest for hv in chosen])):
            text = _read_bounded(path, MAX_MANIFEST_BYTES, repo_id, revision, hv.manifest)
            m, v = _check_manifest_file(text, hv, repo_id, revision)
            planned.append((hv, m, v))
        todo, missing = _check_against_store(store, planned, index, repo_id, revision, local, fetch_base)
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
        # Verify every payload (names, sizes, hashes) before the store sees any of it.
        located: dict[str, tuple[Path, int, int]] = {}  # object id -> (file, offset, size)
        downloaded = 0
        for hv, m, v in todo:
            located.update(_check_payloads(files[hv.payloads], hv, m, v, repo_id, revision))
            downloaded += files[hv.payloads].stat().st_size

    def payload(object_id: str, size: int) -> bytes:
        path, start, length = located[object_id]
        if length != size:
            raise PulledDataRejected(repo_id, revision, path.name, f"object {object_id} changed size")
        return _read_at(path, start, length)

    fetched = tuple(_fetch_base(store, index, base_id, ref, repo_id, revision, base_revision, token=token,
                                endpoint=endpoint, cache_dir=cache_dir, progress=progress)
                    for base_id, ref in missing.items())
    stances = {v.id: local.get(hv.stance, hv.stance) for hv, _, v in todo}
    numbers = {v.id: hv.number for hv, _, v in todo}
    try:
        landed = ({v.id: new for v, new in store.ingest([m for _, m, _ in todo], payload, stances=stances,
                                                        numbers=numbers)}
                  if todo else {})
    except UnsafeInput as e:  # a payload file changed in the cache between the checks and the ingest
        raise PulledDataRejected(repo_id, revision, "payloads", str(e)) from None
    pulled = tuple(_landed_as(hv, local) for hv, _, v in todo if landed.get(v.id))
    new_ids = {hv.id for hv in pulled}
    here = tuple(_landed_as(hv, local) for hv in chosen if hv.id not in new_ids)
    return PullResult(repo_id, revision, commit, pulled, here, downloaded, fetched)


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
    if len(stances) > 1:
        raise UnsafeInput(f"--into takes the versions of one stance, and this pull has {len(stances)} "
                          f"({', '.join(stances[:5])}{', ...' if len(stances) > 5 else ''}); add --stance S")
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


def check_index(raw: bytes, repo_id: str, revision: str | None) -> dict:
    """The repo index, every field checked: names, ids, numbers, file paths."""
    def bad(what: str) -> PulledDataRejected:
        return PulledDataRejected(repo_id, revision, INDEX_FILE, what)

    index = load_json(raw, "the index", max_bytes=MAX_INDEX_BYTES, error=bad)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise NotADeltaRepo(repo_id, revision, f"{INDEX_FILE} is not of format {INDEX_FORMAT!r}")
    if not isinstance(index.get("bases"), dict) or not isinstance(index.get("stances"), dict):
        raise bad("it needs 'bases' and 'stances' objects")
    for bid, b in index["bases"].items():
        if not is_id(bid) or not isinstance(b, dict) \
                or not all(b.get(k) is None or isinstance(b[k], str) for k in ("name", "hub_id")) \
                or not all(_is_count(b.get(k)) for k in ("tensors", "bytes")) \
                or not (b.get("hub_revision") is None or (b.get("hub_id") and is_commit(b["hub_revision"]))):
            raise bad(f"malformed base {bid[:80]!r}")
    for stance, entries in index["stances"].items():
        problem = name_problem(stance)
        if problem or ".." in stance:
            raise bad(problem or f"stance name {stance[:80]!r} is not allowed")
        if not isinstance(entries, list):
            raise bad(f"stance {stance!r}: versions must be a list")
        for e in entries:
            try:
                ok = (number_problem(e["number"]) is None
                      and isinstance(e["id"], str) and is_id(e["id"]) and isinstance(e["base"], str)
                      and is_id(e["base"]) and e["tag"] == version_tag(stance, e["number"])
                      and isinstance(e["files"], dict) and isinstance(e["encodings"], list)
                      and all(isinstance(x, str) for x in e["encodings"])
                      and _is_count(e["tensors"]) and _is_count(e["bytes"]) and isinstance(e["created"], str)
                      and isinstance(e["message"], str)
                      and (e["parent"] is None or (isinstance(e["parent"], str) and is_id(e["parent"]))))
                files = [e["files"]["payloads"], e["files"]["manifest"]] if ok else []
            except (KeyError, TypeError):
                ok = False
            if not ok:
                problem = number_problem(e.get("number")) if isinstance(e, dict) else None
                raise bad(f"stance {stance!r}: {problem}" if problem else f"malformed version entry in stance {stance!r}")
            for path, suffix in zip(files, (".safetensors", ".json")):
                try:
                    safe_relative(path if isinstance(path, str) else "")
                except UnsafeInput as err:
                    raise bad(str(err)) from None
                # The names push writes, and no others: nothing else in the repo is ever read.
                if path != f"{stance}/v{e['number']}{suffix}":
                    raise bad(f"file name {path[:80]!r} of {stance}@{e['number']} is not {stance}/v{e['number']}{suffix}")
    return index


def _is_count(x: Any) -> bool:
    """A whole number of tensors or bytes as the index gives it (None where unknown)."""
    return x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


def _choose(index: dict, repo_id: str, revision: str | None, stance: str | None) -> list[HubVersion]:
    listed = [_hub_version(e, s) for s, es in sorted(index["stances"].items()) for e in es]
    chosen = [hv for hv in listed if hv.tag == revision] or listed  # a version's tag: that version
    if stance is not None:
        chosen = [hv for hv in chosen if hv.stance == stance]
        if not chosen:
            raise HubStanceNotFound(repo_id, revision, stance, sorted({hv.stance for hv in listed}))
    seen = set()
    for hv in chosen:
        if (hv.stance, hv.number) in seen:
            raise PulledDataRejected(repo_id, revision, INDEX_FILE, f"{hv.ref} is listed twice")
        seen.add((hv.stance, hv.number))
    return chosen


def _check_manifest_file(text: bytes, hv: HubVersion, repo_id: str, revision: str | None) -> tuple[dict, Version]:
    try:
        m = parse_manifest(text)
        v = check_manifest(m)
    except (UnicodeDecodeError, ValueError) as e:  # UnsafeInput is a ValueError
        raise PulledDataRejected(repo_id, revision, hv.manifest, str(e).removeprefix("manifest: ")) from None
    if v.id != hv.id:
        raise PulledDataRejected(repo_id, revision, hv.manifest,
                                 f"the manifest hashes to {v.id[:19]}, not to the version id {hv.id[:19]}")
    # The index says where the version lives: a version renamed or merged before it was pushed
    # keeps the manifest that names the stance and number it was committed under.
    return m, replace(v, stance=hv.stance, number=hv.number)


def _check_against_store(store: Store, planned: list[tuple[HubVersion, dict, Version]], index: dict,
                         repo_id: str, revision: str | None, local: dict[str, str], fetch_base: bool = False
                         ) -> tuple[list[tuple[HubVersion, dict, Version]], dict[str, str]]:
    """Refuse versions the store cannot take (no such base here, a local stance holding versions
    the repo's stance lacks, a number taken by another version); return those it does not have
    yet, and (`fetch_base`) the bases they need that the index places on the Hub: base id -> the
    first version needing it."""
    bases = {b.id for b in store.bases()}
    missing: dict[str, str] = {}
    for remote, name in local.items():
        listed = {e["id"] for e in index["stances"].get(remote, [])}
        # The repo's whole history of the stance counts, not only what this pull fetches: a
        # stance pulled before (one version at a time, or all) takes its next versions.
        own = [r for r in store.catalog.versions(name, columns="id, stance, number") if r["id"] not in listed]
        if own:
            raise LocalStanceDiffers(repo_id, revision, remote, name, [f"{r['stance']}@{r['number']}" for r in own])
    todo = []
    for hv, m, v in planned:
        hub_id = (index["bases"].get(v.base_id) or {}).get("hub_id")
        if v.base_id not in bases and not (fetch_base and hub_id):
            raise PulledBaseMissing(repo_id, revision, v.ref, v.base_id, hub_id)
        if store.is_new(replace(v, stance=local.get(v.stance, v.stance))):  # v: as the index places it
            if v.base_id not in bases:
                missing.setdefault(v.base_id, v.ref)
            todo.append((hv, m, v))
    return todo, missing


def _check_payloads(path: Path, hv: HubVersion, m: dict, v: Version, repo_id: str,
                    revision: str | None) -> dict[str, tuple[Path, int, int]]:
    """A payload file checked against its manifest: the manifest in its metadata, then each
    tensor's name, dtype and size (from the header, before any data is read), then each
    payload's hash. Returns object id -> (file, offset, size)."""
    def bad(what: str) -> PulledDataRejected:
        return PulledDataRejected(repo_id, revision, hv.payloads, what)

    try:
        tensors, metadata, _ = read_header(path)
    except (ModelFormatError, UnsafeInput) as e:
        raise bad(str(e)) from None
    try:
        inner = parse_manifest(metadata.get(META_MANIFEST, ""))
    except UnsafeInput:
        raise bad(f"its metadata has no manifest ({META_MANIFEST})") from None
    if inner != m or metadata.get(META_VERSION) != v.id:
        raise bad(f"the manifest in its metadata is not that of {hv.ref} ({hv.manifest})")
    expected = {f"{e.name}{PART_SEPARATOR}{part}": o for e in v.tensors for part, o in e.objects.items()}
    if len(expected) != sum(len(e.objects) for e in v.tensors):
        raise bad("two of its manifest's payloads have the same tensor name")
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise bad(f"its tensors are not the manifest's objects (extra: {extra[:3]}, missing: {missing[:3]})")
    located = {}
    for name, o in sorted(expected.items()):
        t = tensors[name]
        size = t.end - t.start
        if t.dtype != "U8" or len(t.shape) != 1 or size != o.size:
            raise bad(f"tensor {name!r} holds {size} bytes ({t.dtype} {list(t.shape)}), "
                      f"its manifest declares {o.size} (U8)")
        if bytes_id(_read_at(path, t.start, size)) != o.id:
            raise bad(f"tensor {name!r} does not hash to its object id {o.id[:19]} (tampered or corrupt)")
        located[o.id] = (path, t.start, size)
    return located


def _read_at(path: Path, start: int, size: int) -> bytes:
    buf = bytearray(size)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != size:
            raise UnsafeInput(f"{path.name} is shorter than its header says")
    return bytes(buf)


def _read_bounded(path: Path, limit: int, repo_id: str, revision: str | None, name: str) -> bytearray:
    data = read_bounded(path, limit)
    if data is None:
        raise PulledDataRejected(repo_id, revision, name, f"larger than {limit} bytes")
    return data
