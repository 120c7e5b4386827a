"""Reading a store: refs resolved to versions (and, for one that matches nothing, the names a
typo away), the log, bases and their weights, and the tensors a version describes, each
decoded from verified objects; a chained entry's reference resolved down its chain.

Chains (chain.py): a chained version's manifest names the version it is against by id, and
each of its entries the id of the tensor its delta is against. Resolving an entry walks the
chain down to the base: base -> each link's result -> this one, each link's manifest read by
its id (verified), its objects verified, and each link's result checked against the id
recorded for it, before anything uses it. So apply, export, mix and materialize need nothing
of their own: `decode_entry` resolves what an entry's delta is against.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..core import names
from ..core.errors import (AmbiguousRef, BaseMismatch, BaseNotFound, BaseWeightsMissing, DeltastoreError,
                           RefNotFound, short, shown_names)
from ..core.hashing import tensor_id
from ..repo.openjournals import open_journal_on
from ..repo.records import Base, TensorEntry, Version, VersionInfo, parse_manifest
from ..repo.repo import Repo

# torch, and the modules that import it when loaded (encodings, hashing.DTYPES, models), are
# imported inside the methods where a tensor is at hand: read commands (log, show, stances)
# then start without loading torch (tests/test_startup.py).
if TYPE_CHECKING:
    import torch

    from ..weights.models import TensorInfo, TensorSource

ModelLike = Any  # a path, a state dict, an nn.Module or a TensorSource

#: The most links between a version and its base (git's default pack depth is 50; a stance
#: chain is read whole at every apply, so it stays short).
MAX_DEPTH = 4

# Apply's workers ask for a chain's links at once: one of them reads the chain, the others wait.
_reading = threading.Lock()


class ChainError(DeltastoreError, ValueError):
    """A chain that cannot be made or resolved: too deep, of another base, a link that is
    missing from the store or does not give the tensor its entry records."""


class Reader:
    """What a store holds, read from `repo`."""

    def __init__(self, repo: Repo):
        self.repo = repo
        # Bases a commit in progress was given as weights (their rows, their tensors' rows):
        # read as registered until the version lands (landing.py).
        self.unregistered: dict[str, tuple[dict, list[dict]]] = {}
        # Versions others are stored against, each chain checked once.
        self.chain_links: dict[str, Version] = {}

    # -- refs ----------------------------------------------------------------------------------

    def resolve(self, ref: str | Version) -> Version:
        """`STANCE`, `STANCE@N`, `STANCE@TAG` or a version id prefix of 8+ hex digits (FORMAT.md,
        section 5, gives the order): `STANCE@...` when the ref holds an '@' (all digits: a number,
        else a tag); `b3:...`, always an id prefix; else a stance's newest version, and only
        when no stance has that name, an id prefix. New stance names of 8 or more hex digits are
        refused, so that the last two never compete; a store that holds such a name from before
        gets an ambiguity error when its ref is also a version id prefix."""
        if isinstance(ref, Version):
            return ref
        if isinstance(ref, VersionInfo):
            ref = ref.id
        parsed = names.parse_ref(ref)
        catalog = self.repo.catalog
        row = None
        if parsed.impossible:
            pass
        elif parsed.number is not None:
            row = catalog.version_at(parsed.stance, parsed.number)
        elif parsed.tag is not None:
            tagged = catalog.tag_target(parsed.stance, parsed.tag)
            row = catalog.version(tagged) if tagged else None
        else:
            row = catalog.latest(parsed.stance) if parsed.stance is not None else None
            rows = catalog.versions_with_prefix(parsed.id_prefix) if parsed.id_prefix else []
            if row and rows:
                raise AmbiguousRef(ref, [f"stance {ref} (write {ref}@N)"]
                                   + [f"{r['id'][:15]} ({r['stance']}@{r['number']})" for r in rows])
            if len(rows) > 1:
                raise AmbiguousRef(ref, [f"{r['id'][3:15]} ({r['stance']}@{r['number']})" for r in rows])
            row = row or (rows[0] if rows else None)
        if row:
            return self._version(row)
        raise RefNotFound(ref, self.close_refs(ref))

    def close_refs(self, ref: str) -> list[str]:
        """What a ref that matches nothing may have meant: stances and tags a few edits away."""
        known = [s["name"] for s in self.repo.catalog.stances()]
        known += [f"{t['stance']}@{t['name']}" for t in self.repo.catalog.tags()]
        return names.close_names(ref, known)

    def _version(self, row: dict, tags: list[str] | None = None) -> Version:
        if tags is None:
            tags = [t["name"] for t in self.repo.catalog.tags(row["id"])]
        # The manifest is the object the version id names; reading it verifies it.
        text = self.repo.objects.get(row["id"])
        try:
            v = Version.from_manifest(row["id"], parse_manifest(text), tags=tuple(tags), bytes=row["bytes"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise DeltastoreError(f"the manifest of {row['stance']}@{row['number']} ({row['id'][:19]}) is "
                                  "malformed; run `deltastore fsck` to see what it breaks") from None
        if row["stance"] != v.stance or row["number"] != v.number:
            # Renamed or merged since it was committed: the refs say where it lives and its
            # number, the manifest (and so the id) keeps the name and number it was committed under.
            v = dataclasses.replace(v, stance=row["stance"], number=row["number"], committed_as=v.stance,
                                    committed_number=v.number)
        return v

    def log(self, stance: str | None = None, *, where: Mapping[str, str] | None = None) -> list[VersionInfo]:
        """Versions, newest first: of one stance, or of all; `where` keeps those whose metadata
        has every key=value given. Summaries without tensor entries (`resolve` gives those)."""
        catalog = self.repo.catalog
        if stance is not None and not catalog.has_stance(stance):
            raise RefNotFound(stance, self.close_refs(stance))
        rows = catalog.version_summaries(stance, where=dict(where or {}))
        # Every version listed: read every tag and metadata row rather than look each one up.
        ids = None if stance is None and not where else [r["id"] for r in rows]
        tags = catalog.tags_by_version(ids) if rows else {}
        meta = catalog.metadata_by_version(ids) if rows else {}
        return [VersionInfo(r["id"], r["stance"], r["number"], r["parent"], r["base_id"], r["encoding"],
                            r["message"], meta.get(r["id"], {}), r["created"], r["tensors"], r["bytes"],
                            tuple(tags.get(r["id"], []))) for r in rows]

    def stances(self) -> list[dict]:
        return self.repo.catalog.stances()

    @property
    def holds_chains(self) -> bool:
        """Whether a version stored against another was ever committed here."""
        return self.repo.holds_chains

    # -- bases ---------------------------------------------------------------------------------

    def bases(self) -> list[Base]:
        return [Base.from_row(r) for r in self.repo.catalog.bases()]

    def base(self, ref: str | Base) -> Base:
        """A base by id, id prefix (8+ hex digits) or name."""
        if isinstance(ref, Base):
            return ref
        rows = self.repo.catalog.bases()
        exact = [r for r in rows if r["id"] == ref or r["name"] == ref]
        if not exact and len(ref.removeprefix("b3:")) >= 8:
            exact = [r for r in rows if r["id"].removeprefix("b3:").startswith(ref.removeprefix("b3:"))]
        if len(exact) == 1:
            return Base.from_row(exact[0])
        if len(exact) > 1:
            raise AmbiguousRef(ref, [r["id"][:19] for r in exact])
        known = [r["name"] or r["id"][:19] for r in rows]
        raise BaseNotFound(ref, known)

    def base_tensors(self, base: str | Base) -> dict[str, dict]:
        if isinstance(base, Base) and base.id in self.unregistered:
            return {r["name"]: r for r in self.unregistered[base.id][1]}
        bid = self.base(base).id
        return {r["name"]: r for r in self.repo.catalog.base_tensors(bid)}

    def fitting_base(self, shapes: Mapping[str, list[int]], *, other_than: str) -> Base | None:
        """A registered base (other than `other_than`) whose tensors have these names and shapes
        (read from the catalog, no weights): the one a model was likely made from, or is."""
        for candidate in self.bases():
            if candidate.id == other_than or candidate.tensor_count != len(shapes):
                continue
            rows = self.base_tensors(candidate)
            if rows.keys() == shapes.keys() and all(json.loads(r["shape"]) == shapes[n] for n, r in rows.items()):
                return candidate
        return None

    def base_source(self, base: Base, weights: ModelLike | None = None, *, mapped: bool = False) -> TensorSource:
        """The base's weights: those given, else where `base add` found them (`mapped`: see
        models.open_files)."""
        from ..weights.models import open_model

        if weights is not None:
            return open_model(weights, mapped=mapped)
        return open_model(self.base_folder(base), mapped=mapped)

    @staticmethod
    def base_folder(base: Base) -> str:
        """Where `base add` found the base's weights; refused (`BaseWeightsMissing`) when it was
        registered without them (a clone, a pull) or they are not there any more."""
        if not base.source or not Path(base.source).exists():
            raise BaseWeightsMissing(f"{base.name + ' ' if base.name else ''}{short(base.id)}", base.source)
        return base.source

    def base_changed(self, base: Base, source: TensorSource, names: list[str]) -> BaseMismatch:
        """The error for base weights that are no longer those registered, naming the open
        journal when a stance applied in place to them is why."""
        line = None
        if source.path is not None:
            line = open_journal_on(self.repo.catalog, source.path)
        if line is None:
            return BaseMismatch(base.id, None, names, "the base weights differ from those registered")
        return BaseMismatch(base.id, None, names, message=(
            f"the weights at {source.path} differ from those of base {base.name or base.id[:19]} "
            f"({shown_names(names)}): {line}"))

    # -- tensors -------------------------------------------------------------------------------

    def read_parts(self, entry: TensorEntry) -> dict[str, bytes | bytearray]:
        """The payloads of one entry's objects, each verified against its id."""
        return {part: self.repo.objects.get(o.id, raw_size=o.size) for part, o in entry.objects.items()}

    def decode_entry(self, entry: TensorEntry, base_tensor: torch.Tensor | None,
                     parts: dict[str, bytes | bytearray] | None = None, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor apply produces for one entry, from verified objects (read here unless
        `parts` holds them already); `out`: see Encoding.decode."""
        import torch

        from ..codecs import encodings
        from ..core.hashing import DTYPES

        parts = self.read_parts(entry) if parts is None else parts
        enc = encodings.from_params(entry.encoding, entry.params)
        if entry.against_version is not None:
            # Stored against another version's result: that result, its chain resolved and verified.
            base_tensor = self.reference(entry, base_tensor)
        base = base_tensor if base_tensor is not None else torch.empty(0)
        return enc.decode(base, encodings.Encoded(parts, entry.params), dtype=DTYPES[entry.dtype],
                          shape=entry.shape, out=out)

    def materialize(self, ref: str | Version, *, base_weights: ModelLike | None = None
                    ) -> tuple[dict[str, TensorInfo], Callable[[str], torch.Tensor]]:
        """The fine-tuned model a version describes: every tensor's description, and a function
        that produces one tensor at a time, verified against the ids recorded at commit."""
        version = self.resolve(ref)
        base = self.base(version.base_id)
        source = self.base_source(base, base_weights)
        expected = self.base_tensors(base)
        entries = {e.name: e for e in version.tensors}
        missing = sorted(n for n in expected if n not in source)
        if missing:
            raise BaseMismatch(base.id, None, missing, "the base weights lack these tensors")

        def tensor(name: str) -> torch.Tensor:
            base_tensor = None
            if name in expected:
                base_tensor = source.get(name)
                if tensor_id(base_tensor) != expected[name]["tensor_id"]:
                    raise self.base_changed(base, source, [name])
            entry = entries.get(name)
            if entry is None:
                return base_tensor
            result = self.decode_entry(entry, base_tensor)
            entry.check_result(result, version.ref)
            return result
        return _infos(source, expected, entries), tensor

    def tensors(self, ref: str | Version, *, base_weights: ModelLike | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the fine-tuned model a version describes, one at a time, verified."""
        infos, tensor = self.materialize(ref, base_weights=base_weights)
        for name in infos:
            yield name, tensor(name)

    # -- chains --------------------------------------------------------------------------------

    def chain_of(self, version: Version) -> list[Version]:
        """`version` and every version under it, nearest first, each checked: in the store, of
        the same base, at most `MAX_DEPTH` links."""
        links = [version]
        while links[-1].against is not None:
            if len(links) > MAX_DEPTH:
                raise ChainError(f"{version.ref} is more than {MAX_DEPTH} links from its base")
            nxt = self._link(links[-1].against, links[-1].ref)
            if nxt.base_id != version.base_id:
                raise ChainError(f"{links[-1].ref} is stored against {nxt.ref}, a version of another base")
            links.append(nxt)
        return links

    def reference_tensor(self, against: Version, name: str, base_tensor: torch.Tensor | None
                         ) -> tuple[torch.Tensor | None, str | None]:
        """What apply of `against` gives tensor `name` (its own chain resolved), and its id;
        the base tensor where `against` does not store it."""
        entry = against.entry(name)
        if entry is None:
            return base_tensor, (tensor_id(base_tensor) if base_tensor is not None else None)
        result = self.decode_entry(entry, base_tensor)
        entry.check_result(result, against.ref, untouched="nothing was changed")
        return result, entry.result_tensor_id

    def reference(self, entry: TensorEntry, base_tensor: torch.Tensor | None) -> torch.Tensor:
        """The tensor a chained entry's delta is against, verified to be the one recorded."""
        assert entry.against_version is not None
        against = self._checked_link(entry.against_version)
        result, result_id = self.reference_tensor(against, entry.name, base_tensor)
        if result is None or result_id != entry.against:
            raise ChainError(f"tensor {entry.name}: {against.ref} does not give the tensor the version stored "
                             "against it records; nothing was changed; run `deltastore fsck`")
        return result

    def _link(self, version_id: str, of: str) -> Version:
        row = self.repo.catalog.version(version_id)
        if row is None:
            raise ChainError(f"{of} is stored against version {short(version_id)}, which is not in this store; "
                             "run `deltastore fsck` to see what it breaks")
        return self.resolve(version_id)  # reads its manifest by id: verified

    def _checked_link(self, version_id: str) -> Version:
        # Each link's chain is read and checked once per open store: a manifest is immutable (its
        # id is its hash), and every tensor of an apply asks for the same links. Their objects and
        # results are verified at every use.
        with _reading:
            cache = self.chain_links
            if version_id not in cache:
                cache[version_id] = self.chain_of(self._link(version_id, "a version"))[0]
            return cache[version_id]


def _infos(source: TensorSource, expected: dict[str, dict], entries: dict[str, TensorEntry]
           ) -> dict[str, TensorInfo]:
    """Each tensor of the model a version describes: an entry's dtype and shape where it stores
    one (in the base's file), the base's own description elsewhere."""
    from ..weights.models import TensorInfo

    infos = {}
    for name in sorted(set(expected) | set(entries)):
        info = source.infos.get(name)
        entry = entries.get(name)
        if entry is not None:
            infos[name] = TensorInfo(name, entry.dtype, tuple(entry.shape), info.file if info else None)
        else:
            infos[name] = info
    return infos
