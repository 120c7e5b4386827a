"""What the store hands back: frozen records of bases, versions and tensor entries, and the
canonical manifest that a version id is the hash of.

Pure: no disk, no SQL. The manifest is the source of truth for a version; the catalog's rows
are an index over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FORMAT = "deltastore/version/1"


@dataclass(frozen=True)
class Base:
    id: str
    name: str | None
    tensor_count: int
    bytes: int
    source: str | None = None
    hub_id: str | None = None
    created: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "Base":
        return cls(row["id"], row["name"], row["tensor_count"], row["bytes"], row["source"],
                   row["hub_id"], row["created"])


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

    @property
    def exact(self) -> bool:
        return self.result_tensor_id == self.target_tensor_id

    def to_manifest(self) -> dict:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "params": self.params,
            "objects": {part: {"id": o.id, "size": o.size} for part, o in sorted(self.objects.items())},
            "base": self.base_tensor_id, "target": self.target_tensor_id,
            "result": self.result_tensor_id,
            "rel_change": self.rel_change, "rel_error": self.rel_error,
        }

    @classmethod
    def from_manifest(cls, d: dict) -> "TensorEntry":
        return cls(
            d["name"], d["dtype"], tuple(d["shape"]), d["encoding"], dict(d.get("params") or {}),
            {part: ObjectRef(o["id"], int(o["size"])) for part, o in d["objects"].items()},
            d.get("base"), d["target"], d["result"], d.get("rel_change"), d.get("rel_error"))


@dataclass(frozen=True)
class Version:
    id: str
    stance: str
    number: int
    parent: str | None
    base_id: str
    encoding: str
    selection: dict[str, Any]
    message: str
    metadata: dict[str, str]
    created: str
    tensors: tuple[TensorEntry, ...]
    tags: tuple[str, ...] = ()
    bytes: int = 0  # object bytes on disk, shared objects counted in full

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]

    def entry(self, name: str) -> TensorEntry | None:
        for e in self.tensors:
            if e.name == name:
                return e
        return None

    def manifest(self) -> dict:
        return manifest(stance=self.stance, number=self.number, parent=self.parent,
                        base_id=self.base_id, encoding=self.encoding, selection=self.selection,
                        message=self.message, metadata=self.metadata, created=self.created,
                        tensors=self.tensors)

    @classmethod
    def from_manifest(cls, version_id: str, m: dict, *, tags: tuple[str, ...] = (), bytes: int = 0) -> "Version":
        return cls(version_id, m["stance"], m["number"], m.get("parent"), m["base"], m["encoding"],
                   m.get("selection") or {}, m.get("message") or "", dict(m.get("metadata") or {}),
                   m["created"], tuple(TensorEntry.from_manifest(t) for t in m["tensors"]),
                   tags, bytes)


def manifest(*, stance: str, number: int, parent: str | None, base_id: str, encoding: str,
             selection: dict, message: str, metadata: dict[str, str], created: str,
             tensors: tuple[TensorEntry, ...] | list[TensorEntry]) -> dict:
    return {
        "format": MANIFEST_FORMAT, "stance": stance, "number": number, "parent": parent,
        "base": base_id, "encoding": encoding, "selection": selection, "message": message,
        "metadata": metadata, "created": created,
        "tensors": [t.to_manifest() for t in sorted(tensors, key=lambda t: t.name)],
    }


def parse_manifest(text: str | bytes) -> dict:
    m = json.loads(text)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        from .errors import UnsafeInput

        raise UnsafeInput(f"not a deltastore manifest (format must be {MANIFEST_FORMAT!r})")
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
