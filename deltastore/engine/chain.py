"""Versions stored against another version's result instead of the base: chains, like git's
deltas against a similar object.

A chained version's manifest names the version it is against by id (``against``), and each of
its entries the id of the tensor its delta is against: that version's result for the tensor,
or the base tensor where that version does not store it. Every tensor the other version stores
is listed again in the chained one (a tensor left out applies as the base, as in any version).
The reader resolves a chained entry link by link (reader.py); this module keeps chains sound:

A chain is at most ``MAX_DEPTH`` links long, refused at commit. A version others are stored
against is never lost through a delete: deleting its stance is refused while a version of
another stance is against one of its versions (history.py asks ``dependents``). fsck names the
chains that no longer resolve, and pushes refuse chained versions.
"""

from __future__ import annotations

from ..core.errors import DeltastoreError, short
from ..repo.records import Version
from .reader import MAX_DEPTH, ChainError, Reader

__all__ = ["ChainError", "MAX_DEPTH", "broken_chains", "check_depth", "dependents", "refuse_chained"]


def check_depth(reader: Reader, against: Version, base_id: str) -> None:
    """Refuse, before any work, a commit against ``against`` that would be too deep or of
    another base."""
    if against.base_id != base_id:
        raise ChainError(f"{against.ref} is a version of base {short(against.base_id)}, not of {short(base_id)}: "
                         "a version is stored against a version of its own base")
    links = len(reader.chain_of(against))  # the new version would be this many links from its base
    if links > MAX_DEPTH:
        raise ChainError(f"{against.ref} is {links - 1} links from its base already; a version may be at most "
                         f"{MAX_DEPTH}: commit against a version nearer the base, or without --against")


def dependents(reader: Reader, version_ids: set[str]) -> list[Version]:
    """The versions outside ``version_ids`` stored against one of them (read from every
    manifest: run inside the transaction of the change that would lose them)."""
    found: list[Version] = []
    if not reader.holds_chains:
        return found
    for row in reader.repo.catalog.version_rows():
        if row["id"] in version_ids:
            continue
        v = reader.resolve(row["id"])
        if v.against in version_ids:
            found.append(v)
    return found


def broken_chains(reader: Reader) -> list[tuple[Version, str]]:
    """(version, why) for each chained version whose chain cannot be resolved: a link missing
    from the store (deleted by a build that knew no chains), of another base, or too deep.
    Manifests that cannot be read are fsck's other checks' to report."""
    broken: list[tuple[Version, str]] = []
    if not reader.holds_chains:
        return broken
    for row in reader.repo.catalog.version_rows():
        try:
            version = reader.resolve(row["id"])
        except DeltastoreError:
            continue
        if version.against is None:
            continue
        try:
            reader.chain_of(version)
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
