"""Where a store is, and what format it holds: its folder, named (`--store`), found from the
working folder or `$DELTASTORE_DIR`, or found as the store whose open journal covers a patched
model; its `STORE` marker, made by `init` and read before anything else."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import DeltastoreError, OldStoreFormat, StoreExists, StoreNotFound
from . import journalfiles, knownstores
from .catalog import Catalog
from .openjournals import journals_covering

STORE_FILE = "STORE"
STORE_FORMAT = "deltastore/store/2"
# A store that holds (or held) a version stored against another (chain.py) is marked so by its
# first such commit: a build that does not know chains must not open it, for its delete and gc
# would not keep the versions a chained one needs.
CHAINED_STORE_FORMAT = "deltastore/store/3"
READABLE_FORMATS = (STORE_FORMAT, CHAINED_STORE_FORMAT)
OLD_FORMATS = ("deltastore/store/1",)
DEFAULT_DIR = ".deltastore"


def find_store(start: str | os.PathLike | None = None, *, patched: str | os.PathLike | None = None) -> Path:
    """`$DELTASTORE_DIR`, else (given `patched`, a model path) the store whose open journal
    covers that model, else the nearest `.deltastore/` from `start` upwards. Refused, naming the
    nearest store this user has made or patched from (knownstores.py), when there is none."""
    env = os.environ.get("DELTASTORE_DIR")
    if env:
        return Path(env)
    here = Path(start or os.getcwd()).resolve()
    found = next((f / DEFAULT_DIR for f in (here, *here.parents) if (f / DEFAULT_DIR / STORE_FILE).is_file()), None)
    if patched is not None:
        owner = store_patching(patched, first=found)
        if owner is not None:
            return owner
    if found is not None:
        return found
    near = knownstores.nearest(here)
    raise StoreNotFound(str(here), searched_up=True, nearest=str(near) if near else None)


def store_patching(path: str | os.PathLike, *, first: Path | None = None, besides: Path | None = None) -> Path | None:
    """The store (`first`, then those of knownstores.py, but never `besides`) whose open
    journal covers the model at `path` (or has that id), found by identity as revert finds it (FORMAT.md §7)
    from the journal files alone; None where none does."""
    skip = os.path.abspath(besides) if besides is not None else None
    for root in ([first] if first is not None else []) + knownstores.known():
        if skip is not None and os.path.abspath(root) == skip:
            continue
        try:
            rows = journalfiles.read_all(root)
            if journals_covering(rows, path) or any(r["id"] == str(path) for r in rows):  # `revert --forget ID`
                return root
        except (DeltastoreError, OSError):
            continue  # an unreadable store cannot be the one; its own commands say why
    return None


def store_at(path: str | os.PathLike) -> Path:
    """`--store PATH`: the store's folder, or a folder holding one as `.deltastore/` (what
    `init` in that folder made)."""
    path = Path(path)
    if not (path / STORE_FILE).is_file() and (path / DEFAULT_DIR / STORE_FILE).is_file():
        return path / DEFAULT_DIR
    return path


def store_format(root: Path) -> str | None:
    marker = Path(root) / STORE_FILE
    if not marker.is_file():
        near = knownstores.nearest(root)
        raise StoreNotFound(str(root), nearest=str(near) if near else None)
    try:
        return json.loads(marker.read_bytes()[:4096]).get("format")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object
        return None


def current_store(path: str | os.PathLike | None) -> Path:
    """The store's folder (`path`, else the one `find_store` finds), refused unless it holds a
    store of a format this deltastore reads."""
    root = store_at(path) if path is not None else find_store()
    fmt = store_format(root)
    if fmt in OLD_FORMATS:
        raise OldStoreFormat(str(root), fmt)
    if fmt not in READABLE_FORMATS:
        raise DeltastoreError(f"{root} is a store of format {fmt!r}; this deltastore reads "
                              f"{' and '.join(map(repr, READABLE_FORMATS))}")
    return root


def create(path: str | os.PathLike) -> Path:
    """A new, empty store at `path` (`init`), remembered among this user's stores."""
    root = Path(path)
    if (root / STORE_FILE).exists():
        raise StoreExists(str(root))
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("objects", "tmp", "journals"):
        (root / sub).mkdir(exist_ok=True)
    (root / "refs.log").touch()
    Catalog(root / "catalog.db", create=True).close()
    # The marker last: a folder without it is no store, whatever an interrupted init left.
    (root / STORE_FILE).write_text(json.dumps({"format": STORE_FORMAT}) + "\n")
    knownstores.remember(root)
    return root
