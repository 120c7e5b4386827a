"""Versions stored against another version's result instead of the base: chains, like git's
deltas against a similar object.

A chained version's manifest names the version it is against by id (``against``), and each of
its entries the id of the tensor its delta is against: that version's result for the tensor,
or the base tensor where that version does not store it. Every tensor the other version stores
is listed again in the chained one (a tensor left out applies as the base, as in any version).
Resolving an entry walks the chain down to the base: base -> each link's result -> this one,
each link's manifest read by its id (verified), its objects verified, and each link's result
checked against the id recorded for it, before anything uses it. So apply, export, mix and
materialize need nothing of their own: ``Store.decode_entry`` asks ``reference`` for what an
entry's delta is against.

A chain is at most ``MAX_DEPTH`` links long, refused at commit. A version others are stored
against is never lost through a delete: deleting its stance is refused while a version of
another stance is against one of its versions (history.py asks ``dependents``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..core.errors import DeltastoreError, short
from ..core.hashing import tensor_id
from ..repo.records import TensorEntry, Version

if TYPE_CHECKING:  # no torch at import: store.py imports this module, and read commands load no torch
    import torch

    from ..store import Store

__all__ = ["ChainError", "MAX_DEPTH", "broken_chains", "chain_of", "check_depth", "dependents", "reference",
           "reference_tensor", "refuse_chained"]

#: The most links between a version and its base (git's default pack depth is 50; a stance
#: chain is read whole at every apply, so it stays short).
MAX_DEPTH = 4


_reading = threading.Lock()


class ChainError(DeltastoreError, ValueError):
    """A chain that cannot be made or resolved: too deep, of another base, a link that is
    missing from the store or does not give the tensor its entry records."""


def _link(store: Store, version_id: str, of: str) -> Version:
    row = store.catalog.version(version_id)
    if row is None:
        raise ChainError(f"{of} is stored against version {short(version_id)}, which is not in this store; "
                         "run `deltastore fsck` to see what it breaks")
    return store.resolve(version_id)  # reads its manifest by id: verified


def chain_of(store: Store, version: Version) -> list[Version]:
    """``version`` and every version under it, nearest first, each checked: in the store, of
    the same base, at most ``MAX_DEPTH`` links."""
    links = [version]
    while links[-1].against is not None:
        if len(links) > MAX_DEPTH:
            raise ChainError(f"{version.ref} is more than {MAX_DEPTH} links from its base")
        nxt = _link(store, links[-1].against, links[-1].ref)
        if nxt.base_id != version.base_id:
            raise ChainError(f"{links[-1].ref} is stored against {nxt.ref}, a version of another base")
        links.append(nxt)
    return links


def check_depth(store: Store, against: Version, base_id: str) -> None:
    """Refuse, before any work, a commit against ``against`` that would be too deep or of
    another base."""
    if against.base_id != base_id:
        raise ChainError(f"{against.ref} is a version of base {short(against.base_id)}, not of {short(base_id)}: "
                         "a version is stored against a version of its own base")
    links = len(chain_of(store, against))  # the new version would be this many links from its base
    if links > MAX_DEPTH:
        raise ChainError(f"{against.ref} is {links - 1} links from its base already; a version may be at most "
                         f"{MAX_DEPTH}: commit against a version nearer the base, or without --against")


def reference_tensor(store: Store, against: Version, name: str, base_tensor: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, str | None]:
    """What apply of ``against`` gives tensor ``name`` (its own chain resolved), and its id;
    the base tensor where ``against`` does not store it."""
    entry = against.entry(name)
    if entry is None:
        return base_tensor, (tensor_id(base_tensor) if base_tensor is not None else None)
    result = store.decode_entry(entry, base_tensor)
    entry.check_result(result, against.ref, untouched="nothing was changed")
    return result, entry.result_tensor_id


def reference(store: Store, entry: TensorEntry, base_tensor: torch.Tensor | None) -> torch.Tensor:
    """The tensor a chained entry's delta is against, verified to be the one recorded."""
    assert entry.against_version is not None
    against = _checked_link(store, entry.against_version)
    result, result_id = reference_tensor(store, against, entry.name, base_tensor)
    if result is None or result_id != entry.against:
        raise ChainError(f"tensor {entry.name}: {against.ref} does not give the tensor the version stored against "
                         "it records; nothing was changed; run `deltastore fsck`")
    return result


def _checked_link(store: Store, version_id: str) -> Version:
    # Each link's chain is read and checked once per open store: a manifest is immutable (its
    # id is its hash), and every tensor of an apply asks for the same links. Their objects and
    # results are verified at every use.
    # Apply's workers ask at once: one of them reads the chain, the others wait for it.
    with _reading:
        cache = store.chain_links
        if version_id not in cache:
            cache[version_id] = chain_of(store, _link(store, version_id, "a version"))[0]
        return cache[version_id]


def dependents(store: Store, version_ids: set[str]) -> list[Version]:
    """The versions outside ``version_ids`` stored against one of them (read from every
    manifest: run inside the transaction of the change that would lose them)."""
    found: list[Version] = []
    if not store.holds_chains:
        return found
    for row in store.catalog.version_rows():
        if row["id"] in version_ids:
            continue
        v = store.resolve(row["id"])
        if v.against in version_ids:
            found.append(v)
    return found


def broken_chains(store: Store) -> list[tuple[Version, str]]:
    """(version, why) for each chained version whose chain cannot be resolved: a link missing
    from the store (deleted by a build that knew no chains), of another base, or too deep.
    Manifests that cannot be read are fsck's other checks' to report."""
    broken: list[tuple[Version, str]] = []
    if not store.holds_chains:
        return broken
    for row in store.catalog.version_rows():
        try:
            version = store.resolve(row["id"])
        except DeltastoreError:
            continue
        if version.against is None:
            continue
        try:
            chain_of(store, version)
        except ChainError as e:
            broken.append((version, str(e)))
    return broken


def refuse_chained(versions: list[Version], what: str) -> None:
    """Refuse ``what`` (a push: a remote or the Hub) for a version stored against another: its
    readers would need the whole chain, which pushes do not carry."""
    for v in versions:
        if v.against is not None:
            raise ChainError(f"{v.ref} is stored against another version ({short(v.against)}); {what} does not carry "
                             f"chains: commit the model again without --against to {what} it")
