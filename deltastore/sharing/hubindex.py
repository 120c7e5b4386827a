"""A Hub repo's layout (schema/FORMAT.md, section 9): its files, its index `deltastore.json`
(each version's entry, every field of an index read checked) and the versions a pull chooses
from it.

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

Each version is also tagged `<stance>-v<N>`, so that `pull --revision curious-uncertainty-v1`
fetches one version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import HubStanceNotFound, NotADeltaRepo, PulledDataRejected, UnsafeInput
from ..core.hashing import is_id
from ..core.limits import load_json
from ..core.names import name_problem, number_problem
from ..repo.records import Version
from ..weights.models import safe_relative
from .hubbase import is_commit
from .listed import ListedVersion

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
class HubVersion(ListedVersion):
    """One version as the repo lists it."""

    tag: str  # the Hub revision that names it
    payloads: str  # path in the repo of its .safetensors file
    manifest: str  # path in the repo of its manifest

    def to_json(self) -> dict:
        return {**super().to_json(), "revision": self.tag}


def version_tag(stance: str, number: int) -> str:
    return f"{stance}-v{number}"

def index_entry(v: Version) -> dict:
    folder = v.stance
    return {
        "number": v.number, "id": v.id, "parent": v.parent, "base": v.base_id, "encoding": v.encoding,
        "encodings": sorted({e.encoding for e in v.tensors}), "tensors": len(v.tensors),
        "bytes": sum(o.size for e in v.tensors for o in e.objects.values()),
        "created": v.created, "message": v.message, "tag": version_tag(v.stance, v.number),
        "files": {"payloads": f"{folder}/v{v.number}.safetensors", "manifest": f"{folder}/v{v.number}.json"},
    }


def hub_version(entry: dict, stance: str) -> HubVersion:
    return HubVersion(stance, entry["number"], entry["id"], entry["tag"], entry["files"]["payloads"],
                      entry["files"]["manifest"])

def empty_index() -> dict:
    return {"format": INDEX_FORMAT, "bases": {}, "stances": {}}

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


def choose(index: dict, repo_id: str, revision: str | None, stance: str | None) -> list[HubVersion]:
    listed = [hub_version(e, s) for s, es in sorted(index["stances"].items()) for e in es]
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
