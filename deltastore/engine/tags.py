"""Tags: a name for one version of a stance (STANCE@NAME), set, moved on request, removed."""

from __future__ import annotations

from ..core import names
from ..core.errors import RefNotFound, TagExists, TagNotFound, UnsafeInput, cut, short
from ..repo.records import TagChange, Version
from .reader import Reader


def tag(reader: Reader, ref: str | Version, name: str, *, force: bool = False) -> TagChange:
    """Name a version: STANCE@NAME then refers to it. Returns the version, tagged. A tag
    that names another version already is refused (`TagExists`) unless `force` moves it."""
    reader.repo.check_writable()
    names.check_tag_name(name)
    version = reader.resolve(ref)
    if not force:
        check_tag_free(reader, version.stance, name, version.id, "--force")
    reader.repo.catalog.set_tag(version.stance, name, version.id)
    return TagChange(reader.resolve(version.id), name)


def check_tag_free(reader: Reader, stance: str, name: str, version_id: str | None, option: str) -> None:
    """Refuse a tag of `stance` that names a version other than `version_id` (None: a
    version still to be made) already; the message says which, and `option` to move it."""
    catalog = reader.repo.catalog
    current = catalog.tag_target(stance, name)
    if current is not None and current != version_id:
        row = catalog.version(current)
        where = f"{row['stance']}@{row['number']} {short(current)}" if row else short(current)
        raise TagExists(stance, name, where, option)


def untag(reader: Reader, ref: str, name: str | None = None) -> TagChange:
    """Remove a tag, `untag("STANCE@TAG")` or `untag(REF, TAG)` where REF names the stance
    (or one of its versions). Returns the version the tag named; the version stays."""
    reader.repo.check_writable()
    catalog = reader.repo.catalog
    if name is None:
        stance, at, name = ref.partition("@")
        if not at or not name or name.isdigit():
            raise UnsafeInput(f"{cut(ref)} names no tag; give STANCE@TAG, or REF and TAG")
    else:
        stance = ref if catalog.has_stance(ref) else reader.resolve(ref).stance
    if not catalog.has_stance(stance):
        raise RefNotFound(stance, reader.close_refs(stance))
    vid = catalog.delete_tag(stance, name)
    if vid is None:
        raise TagNotFound(stance, name, [t["name"] for t in catalog.tags() if t["stance"] == stance])
    return TagChange(reader.resolve(vid), name, deleted=True)
