"""`deltastore status`: the folders patched in place (from the journals of the current store and
of every store this user has made or patched from, repo/knownstores.py), and, when asked (it
reads each remote), the versions each remote of the current store does not hold yet."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..core.errors import DeltastoreError
from ..repo import journalfiles, knownstores
from ..store import Store, current_store
from .remoteerrors import backend_errors
from .remotefs import Remote
from .remotenames import remotes


@dataclasses.dataclass(frozen=True)
class PatchedFolder:
    target: str
    ref: str  # the version applied: STANCE@N, or its id where its store cannot say
    since: str  # when apply recorded its journal
    state: str  # applied | applying (a write was under way) | reverting | gone (its files moved or replaced)
    store: str
    journal: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Status:
    store: str | None  # the current store; None where the current folder has none
    patched: tuple[PatchedFolder, ...]
    unpushed: dict[str, list[str]] | None  # remote name -> refs it lacks; None: not asked

    def to_json(self) -> dict:
        return {"store": self.store, "patched": [p.to_json() for p in self.patched], "unpushed": self.unpushed}


def status(root: str | os.PathLike | None, *, check_remotes: bool = False) -> Status:
    """What is patched (every known store's journals), and with `check_remotes` what each remote
    of the store at `root` lacks."""
    root = current_store(root) if root is not None else None  # a wrong --store is refused, not listed empty
    stores = ([Path(root)] if root is not None else []) + knownstores.known()
    seen, patched = set(), []
    for where in stores:
        if os.path.abspath(where) not in seen:
            seen.add(os.path.abspath(where))
            patched += _patched_by(Path(where))
    unpushed = _unpushed(root) if check_remotes and root is not None else None
    return Status(str(Path(root).absolute()) if root is not None else None,
                  tuple(sorted(patched, key=lambda p: (p.since, p.target))), unpushed)


def _patched_by(root: Path) -> list[PatchedFolder]:
    try:
        records = journalfiles.read_all(root)
    except (DeltastoreError, OSError):
        return []  # fsck on that store says why; status lists what it can
    refs = _refs(root, [r["version_id"] for r in records]) if records else {}
    return [PatchedFolder(r["target"], refs.get(r["version_id"], r["version_id"][:19]), r.get("created", ""),
                          _state(root, r), str(root.absolute()), r["id"]) for r in records]


def _state(root: Path, record: dict) -> str:
    if journalfiles.is_reverting(root, record["id"]):
        return "reverting"
    try:
        gone = journalfiles.files_gone(record)
    except (ValueError, KeyError, TypeError):
        gone = "unreadable"
    return "gone" if gone else record.get("state", "applied")


def _refs(root: Path, version_ids: list[str]) -> dict[str, str]:
    """STANCE@N of each version, read from its store's catalog (read-only)."""
    try:
        with Store.open(root, readonly=True) as store:
            rows = {i: store.catalog.version(i) for i in set(version_ids)}
    except (DeltastoreError, OSError):
        return {}
    return {i: f"{v['stance']}@{v['number']}" for i, v in rows.items() if v}


def _unpushed(root: str | os.PathLike) -> dict[str, list[str]]:
    """Per remote: the versions of the store that it does not hold (by id), oldest first."""
    with Store.open(root, readonly=True) as store:
        local = sorted(store.log(), key=lambda v: (v.stance, v.number))
        out = {}
        for name, url in remotes(store).items():
            with backend_errors(url):
                remote = Remote(url)
                there = {rv.id for rv in remote.versions()} if remote.is_remote() else set()
            out[name] = [f"{v.stance}@{v.number}" for v in local if v.id not in there]
    return out
