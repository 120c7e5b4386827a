"""Which open journals cover a model: those that recorded one of its files (by device and
inode, whatever path reached it; a journal from before file identities, by its path), and the
line an error about that model's weights adds to say a stance is applied in place to them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import DeltastoreError, short
from ..weights.target import FileId, Target, resolve
from .catalog import Catalog


def journal_files(row: dict) -> list[FileId] | None:
    """The files a journal recorded, by identity; None for a journal from before identities."""
    ids = json.loads(row["plan"]).get("identity")
    return None if ids is None else [FileId.from_json(d) for d in ids]


def covering(rows: list[dict], target: Target) -> list[dict]:
    """Of these journals, those that recorded one of the target's files."""
    out = []
    for row in rows:
        ids = journal_files(row)
        if target.shares_a_file(ids) if ids is not None else row["target"] in (
                str(target.model), os.path.abspath(target.given)):
            out.append(row)
    return out


def journals_covering(rows: list[dict], path: str | os.PathLike) -> list[dict]:
    """Of these journals (a store's files, or its rows), those that revert would take up for
    `path`; for a path that no longer exists, those whose target is its text."""
    given = Path(path)
    if not given.exists():
        here = {os.path.abspath(given), os.path.join(os.path.realpath(given.parent), given.name)}
        return [r for r in rows if r["target"] in here]
    try:
        return covering(rows, resolve(given))
    except (DeltastoreError, OSError):
        return []


def journals_on(catalog: Catalog, target: Target) -> list[dict]:
    """The open journals of a target, from the catalog."""
    return covering(catalog.open_journals(), target)


def applied_ref(catalog: Catalog, row: dict) -> str:
    """The version a journal applied, as people name it (STANCE@N)."""
    v = catalog.version(row["version_id"])
    return f"{v['stance']}@{v['number']}" if v else f"version {short(row['version_id'])}"


def open_journal_on(catalog: Catalog, path: str | os.PathLike) -> str | None:
    """If a stance is applied in place to the model at `path`: a line saying so and how to undo
    it, for errors about that model's weights."""
    try:
        target = resolve(path)
    except (DeltastoreError, OSError):
        return None
    rows = journals_on(catalog, target)
    if not rows:
        return None
    return (f"{path} has {applied_ref(catalog, rows[-1])} applied in place (an open journal): "
            f"run `deltastore revert {path}` first")
