"""What a Hub pull reads, checked before the store sees any of it: each manifest against its
version id, the versions against the store (its bases, its stances, its numbers), each payload
file against its manifest, and every file read bounded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import (LocalStanceDiffers, ModelFormatError, PulledBaseMissing, PulledDataRejected,
                           UnsafeInput)
from ..core.hashing import bytes_id
from ..core.limits import read_bounded
from ..repo.records import Version, check_manifest, parse_manifest
from ..weights.models import read_header
from .hubindex import META_MANIFEST, META_VERSION, PART_SEPARATOR, HubVersion

if TYPE_CHECKING:
    from ..store import Store


def check_manifest_file(text: bytes, hv: HubVersion, repo_id: str, revision: str | None) -> tuple[dict, Version]:
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


def check_against_store(store: Store, planned: list[tuple[HubVersion, dict, Version]], index: dict,
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


def check_payloads(path: Path, hv: HubVersion, m: dict, v: Version, repo_id: str,
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
        if bytes_id(read_at(path, t.start, size)) != o.id:
            raise bad(f"tensor {name!r} does not hash to its object id {o.id[:19]} (tampered or corrupt)")
        located[o.id] = (path, t.start, size)
    return located


def read_at(path: Path, start: int, size: int) -> bytes:
    buf = bytearray(size)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != size:
            raise UnsafeInput(f"{path.name} is shorter than its header says")
    return bytes(buf)


def read_pulled(path: Path, limit: int, repo_id: str, revision: str | None, name: str) -> bytearray:
    data = read_bounded(path, limit)
    if data is None:
        raise PulledDataRejected(repo_id, revision, name, f"larger than {limit} bytes")
    return data
