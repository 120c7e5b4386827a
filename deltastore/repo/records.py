"""What the store hands back: frozen records of bases, versions and tensor entries, and the
canonical manifest that a version id is the hash of.

Pure: no disk, no SQL. The manifest is the source of truth for a version; the catalog's rows
are an index over it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import names
from ..core.errors import ResultMismatch, UnsafeInput
from ..core.hashing import DTYPE_SIZES, is_id, manifest_id, raw_tensor_id, tensor_id
from ..core.limits import load_json, shown
from ..core.names import check_name

MANIFEST_FORMAT = "deltastore/version/1"
# A version stored against another version's result (chain.py): older builds refuse this format
# rather than read its deltas as deltas against the base.
CHAINED_FORMAT = "deltastore/version/2"
# Bounds on a manifest from outside, checked before it is parsed (FORMAT.md, section 9). A
# manifest is ~400 bytes per tensor entry; the largest models have tens of thousands of tensors.
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSORS = 100_000
# Objects and lists one tensor entry can hold: itself, shape, params (and a list in them),
# objects and up to three parts.
_CONTAINERS_PER_ENTRY = 8
MAX_DIMS = 64
MAX_TENSOR_BYTES = 1 << 40


@dataclass(frozen=True)
class Base:
    id: str
    name: str | None
    tensor_count: int
    bytes: int
    source: str | None = None
    hub_id: str | None = None  # the Hub repo the base is (a model card's base_model)
    created: str = ""
    hub_revision: str | None = None  # the commit of that repo it was fetched at: these very weights

    @classmethod
    def from_row(cls, row: dict) -> "Base":
        hub_id, hub_revision = split_hub_origin(row["hub_id"])
        return cls(row["id"], row["name"], row["tensor_count"], row["bytes"], row["source"],
                   hub_id, row["created"], hub_revision)


# A base's Hub origin is kept in one text field of its ref record and catalog row (FORMAT.md §6):
# the repo id, then `@` and the commit when the base was fetched at one. Repo ids hold no `@`.
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_origin(hub_id: str | None, hub_revision: str | None) -> str | None:
    if hub_id is None:
        return None
    return f"{hub_id}@{hub_revision}" if hub_revision else hub_id


def split_hub_origin(text: str | None) -> tuple[str | None, str | None]:
    """(repo id, commit or None) of a stored Hub origin; text whose `@` is not followed by a
    commit (given with `base add --hub-id`) is a repo id as it stands."""
    if not text:
        return None, None
    repo, _, commit = text.rpartition("@")
    if repo and _COMMIT.fullmatch(commit):
        return repo, commit
    return text, None


@dataclass(frozen=True)
class ObjectRef:
    id: str
    size: int  # uncompressed payload bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    params: dict[str, Any]
    objects: dict[str, ObjectRef]
    base_tensor_id: str | None
    target_tensor_id: str
    result_tensor_id: str
    rel_change: float | None
    rel_error: float | None
    # In a version stored against another (chain.py): the id of the tensor this entry's delta is
    # against (that version's result for it), and that version's id (the manifest's "against").
    against: str | None = None
    against_version: str | None = None

    @property
    def exact(self) -> bool:
        return self.result_tensor_id == self.target_tensor_id

    def check_result(self, result: Any, ref: str, *, untouched: str | None = None) -> None:
        """Refuse (``ResultMismatch``) a decoded tensor that is not what this entry recorded at
        commit; ``untouched`` names what the failure left as it was."""
        if tensor_id(result) != self.result_tensor_id:
            raise ResultMismatch(self.name, ref, untouched=untouched)

    def check_result_bytes(self, data: bytes | memoryview, ref: str, *, untouched: str | None = None) -> None:
        """`check_result` of a result given as its raw bytes (decoded without torch)."""
        if raw_tensor_id(self.dtype, self.shape, data) != self.result_tensor_id:
            raise ResultMismatch(self.name, ref, untouched=untouched)

    def to_manifest(self) -> dict:
        d = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "params": self.params,
            "objects": {part: {"id": o.id, "size": o.size} for part, o in sorted(self.objects.items())},
            "base": self.base_tensor_id, "target": self.target_tensor_id,
            "result": self.result_tensor_id,
            "rel_change": self.rel_change, "rel_error": self.rel_error,
        }
        if self.against is not None:  # absent otherwise: the ids of unchained versions stay as they were
            d["against"] = self.against
        return d

    @classmethod
    def from_manifest(cls, d: dict, against_version: str | None = None) -> "TensorEntry":
        return cls(
            d["name"], d["dtype"], tuple(d["shape"]), d["encoding"], dict(d.get("params") or {}),
            {part: ObjectRef(o["id"], int(o["size"])) for part, o in d["objects"].items()},
            d.get("base"), d["target"], d["result"], d.get("rel_change"), d.get("rel_error"),
            d.get("against") if against_version else None, against_version)


@dataclass(frozen=True)
class VersionNames:
    """What `Version` and `VersionInfo` open with: the version's id, where it sits (stance,
    number, parent) and what it is against; and what people call it, STANCE@N and its id's
    first 12 digits."""

    id: str
    stance: str
    number: int
    parent: str | None
    base_id: str
    encoding: str

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]


@dataclass(frozen=True)
class Version(VersionNames):
    selection: dict[str, Any]
    message: str
    metadata: dict[str, str]
    created: str
    tensors: tuple[TensorEntry, ...]
    tags: tuple[str, ...] = ()
    bytes: int = 0  # object bytes on disk, shared objects counted in full
    # The stance named in the manifest, where the stance was renamed since: a version's id
    # and manifest never change, the catalog says which stance it belongs to now.
    committed_as: str | None = None
    # Likewise the number, where the version took another number since (a merge, a remote).
    committed_number: int | None = None
    # The version whose result this one's deltas are against (chain.py); None: the base's.
    against: str | None = None

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    def entry(self, name: str) -> TensorEntry | None:
        for e in self.tensors:
            if e.name == name:
                return e
        return None

    def manifest(self) -> dict:
        number = self.number if self.committed_number is None else self.committed_number
        return manifest(stance=self.committed_as or self.stance, number=number, parent=self.parent,
                        base_id=self.base_id, encoding=self.encoding, selection=self.selection,
                        message=self.message, metadata=self.metadata, created=self.created,
                        tensors=self.tensors, against=self.against)

    def to_json(self) -> dict:
        """`show --json`: the summary `log --json` gives, its selection, the version it is stored
        against (null: the base) and every tensor entry."""
        return {**version_json(self), "selection": self.selection, "against": self.against,
                "tensor_entries": [e.to_manifest() for e in self.tensors]}

    @classmethod
    def from_manifest(cls, version_id: str, m: dict, *, tags: tuple[str, ...] = (), bytes: int = 0) -> "Version":
        against = m.get("against") if m.get("format") == CHAINED_FORMAT else None
        if m.get("format") == CHAINED_FORMAT and not (isinstance(against, str) and is_id(against)
                                                      and all(is_id(t.get("against") or "") for t in m["tensors"])):
            raise ValueError("a chained manifest names the version and each tensor it is against")
        return cls(version_id, m["stance"], m["number"], m.get("parent"), m["base"], m["encoding"],
                   m.get("selection") or {}, m.get("message") or "", dict(m.get("metadata") or {}),
                   m["created"], tuple(TensorEntry.from_manifest(t, against) for t in m["tensors"]),
                   tags, bytes, against=against)


@dataclass(frozen=True)
class VersionInfo(VersionNames):
    """A version as `log` lists it: everything but its tensor entries, read from the catalog
    without parsing manifests (a log of thousands of versions stays fast). `resolve`
    turns it into the whole `Version`."""

    message: str
    metadata: dict[str, str]
    created: str
    tensor_count: int
    bytes: int
    tags: tuple[str, ...] = ()

    @property
    def kl(self) -> float | None:
        """The KL to the fine-tune that a measured commit recorded (`commit --prompts`), or None."""
        return recorded_number(self.metadata, "fidelity.kl")

    @property
    def top1(self) -> float | None:
        """The top-1 agreement a measured commit recorded, or None."""
        return recorded_number(self.metadata, "fidelity.top1")

    def to_json(self) -> dict:
        """`log --json`: one version's summary, and the fidelity its commit measured."""
        return {**version_json(self), "kl": self.kl, "top1": self.top1}


@dataclass(frozen=True)
class TagChange:
    """A tag set or removed (`tag`, `untag`): the version it names, or named."""

    version: Version
    tag: str
    deleted: bool = False

    def to_json(self) -> dict:
        """`tag --json`."""
        return {"id": self.version.id, "ref": self.version.ref, "tag": self.tag,
                **({"deleted": True} if self.deleted else {})}


@dataclass(frozen=True)
class ModelWritten:
    """A model folder written from the store (`export`, `apply --out`): where, and of which
    version (`ref`, at `scale` when one was given) or of which mix."""

    out: Path
    ref: str | None = None
    scale: float | None = None
    mix: Mapping[str, float] | None = None

    def to_json(self) -> dict:
        """`export --json`, `apply --out --json`: the fields given, then `out`."""
        given = {"ref": self.ref, "scale": self.scale, "mix": None if self.mix is None else dict(self.mix)}
        return {**{k: v for k, v in given.items() if v is not None}, "out": str(self.out)}


def recorded_number(metadata: Mapping[str, str], key: str) -> float | None:
    """A number a commit recorded in metadata (text, as all metadata), or None when absent or
    not a finite number (metadata a user gave by hand may hold anything)."""
    try:
        value = float(metadata[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def version_json(v: Version | VersionInfo) -> dict:
    """A version's summary as `log --json` and `show --json` give it."""
    return {"id": v.id, "ref": v.ref, "stance": v.stance, "number": v.number, "parent": v.parent,
            "base": v.base_id, "created": v.created, "message": v.message, "encoding": v.encoding,
            "tensors": v.tensor_count, "bytes": v.bytes, "tags": list(v.tags), "metadata": v.metadata}


def manifest(*, stance: str, number: int, parent: str | None, base_id: str, encoding: str,
             selection: dict, message: str, metadata: dict[str, str], created: str,
             tensors: tuple[TensorEntry, ...] | list[TensorEntry], against: str | None = None) -> dict:
    m = {
        "format": MANIFEST_FORMAT, "stance": stance, "number": number, "parent": parent,
        "base": base_id, "encoding": encoding, "selection": selection, "message": message,
        "metadata": metadata, "created": created,
        "tensors": [t.to_manifest() for t in sorted(tensors, key=lambda t: t.name)],
    }
    if against is not None:
        m["format"], m["against"] = CHAINED_FORMAT, against
    return m


def parse_manifest(text: str | bytes) -> dict:
    """A manifest's text as a dict, refused before parsing when it is larger or holds more
    objects and lists than a manifest of `MAX_TENSORS` entries can."""
    m = load_json(text, "manifest", max_bytes=MAX_MANIFEST_BYTES,
                  max_containers=_CONTAINERS_PER_ENTRY * MAX_TENSORS + 64)
    if not isinstance(m, dict) or m.get("format") not in (MANIFEST_FORMAT, CHAINED_FORMAT):
        raise UnsafeInput(f"not a deltastore manifest (format must be {MANIFEST_FORMAT!r} or {CHAINED_FORMAT!r})")
    return m


@dataclass(frozen=True)
class CommitResult:
    version: Version
    tensors_stored: int
    unchanged: int
    bytes_stored: int  # bytes of all objects the version references, on disk
    bytes_new: int  # of which this commit wrote (the rest was shared)
    left_out: tuple[str, ...] = ()
    left_out_energy_fraction: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    # Of every tensor, unchanged ones at 0: a fine-tune's is far under NOT_A_FINE_TUNE.
    median_rel_change: float | None = None

    def to_json(self) -> dict:
        """`commit --json`."""
        v = self.version
        return {"id": v.id, "stance": v.stance, "number": v.number, "tensors_stored": self.tensors_stored,
                "tensors_unchanged": self.unchanged, "bytes_stored": self.bytes_stored, "bytes_new": self.bytes_new,
                "left_out": list(self.left_out), "left_out_energy_fraction": self.left_out_energy_fraction,
                "median_rel_change": self.median_rel_change}


def check_manifest(m: Any) -> Version:
    """A manifest from outside (a pull), checked field by field before anything reads it as a
    version: types, ids, names (no path separators or '..'), sizes. Returns the version it
    describes, with its id computed here rather than believed."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UnsafeInput(f"manifest: {what}")

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    need(isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT, f"format must be {MANIFEST_FORMAT!r}")
    keys = {"format", "stance", "number", "parent", "base", "encoding", "selection", "message",
            "metadata", "created", "tensors"}
    need(set(m) == keys, f"fields must be {sorted(keys)}")
    problem = names.name_problem(m["stance"])
    need(problem is None and ".." not in m["stance"], (problem or f"stance name {shown(m['stance'])} is not allowed"))
    need(is_int(m["number"]) and 1 <= m["number"] < 1 << 31, "number must be a positive integer")
    need(m["parent"] is None or (isinstance(m["parent"], str) and is_id(m["parent"])), "parent must be a version id")
    need(isinstance(m["base"], str) and is_id(m["base"]), "base must be a base id")
    need(isinstance(m["encoding"], str) and isinstance(m["message"], str) and isinstance(m["created"], str),
         "encoding, message and created must be strings")
    need(isinstance(m["selection"], dict), "selection must be an object")
    need(isinstance(m["metadata"], dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in m["metadata"].items()),
         "metadata must map strings to strings")
    # Stored text is bounded whoever wrote it: the same rules as a local commit's.
    try:
        names.check_metadata(m["metadata"])
        names.check_message(m["message"], source="the message")
    except (UnsafeInput, ValueError) as e:
        need(False, str(e))
    need(len(m["created"]) <= 64 and len(m["encoding"]) <= names.MAX_NAME,
         "created and encoding must be short strings")
    need(isinstance(m["tensors"], list), "tensors must be a list")
    need(len(m["tensors"]) <= MAX_TENSORS, f"{len(m['tensors'])} tensor entries, more than the {MAX_TENSORS} allowed")
    seen = set()
    for t in m["tensors"]:
        need(isinstance(t, dict) and isinstance(t.get("name"), str), "a tensor entry without a name")
        check_name(t["name"])
        need(t["name"] not in seen, f"tensor {t['name']!r} appears twice")
        seen.add(t["name"])
        need(isinstance(t.get("dtype"), str) and t["dtype"] in DTYPE_SIZES, f"tensor {t['name']!r}: unknown dtype")
        # Each dimension bounded too: an empty tensor (one dimension 0) has no size to bound the rest.
        need(isinstance(t.get("shape"), list) and len(t["shape"]) <= MAX_DIMS
             and all(is_int(d) and 0 <= d <= MAX_TENSOR_BYTES for d in t["shape"]),
             f"tensor {t['name']!r}: malformed shape")
        need(math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]] <= MAX_TENSOR_BYTES,
             f"tensor {t['name']!r}: shape {t['shape']} is more than {MAX_TENSOR_BYTES} bytes")
        need(isinstance(t.get("encoding"), str) and isinstance(t.get("params"), dict),
             f"tensor {t['name']!r}: malformed encoding")
        need(isinstance(t.get("objects"), dict), f"tensor {t['name']!r}: objects must be an object")
        for part, o in t["objects"].items():
            check_name(part)
            need(isinstance(o, dict) and set(o) == {"id", "size"} and isinstance(o["id"], str)
                 and is_id(o["id"]) and is_int(o["size"]) and 0 <= o["size"] < 1 << 40,
                 f"tensor {t['name']!r}: object {part!r} needs an id and a size")
        need(t.get("base") is None or (isinstance(t["base"], str) and is_id(t["base"])),
             f"tensor {t['name']!r}: base must be a tensor id")
        need(all(isinstance(t.get(k), str) and is_id(t[k]) for k in ("target", "result")),
             f"tensor {t['name']!r}: target and result must be tensor ids")
        need(all(t.get(k) is None or (isinstance(t[k], (int, float)) and not isinstance(t[k], bool))
                 for k in ("rel_change", "rel_error")), f"tensor {t['name']!r}: malformed statistics")
    try:
        return Version.from_manifest(manifest_id(m), m)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise UnsafeInput(f"manifest: malformed ({str(e)[:120]})") from None
