"""The rules for names and text that enter the store, and how a ref is read.

Stance and tag names are what a user types to reach a version, so no name may read as
something else: a name of 8 or more hex digits only could shadow a version id prefix, and one
that is all digits a version number. Text that comes with a version (its message, its metadata)
is bounded in length when stored, whether a user typed it or a pull brought it. Refs are parsed
with bounds: a number past what the catalog can hold is "no such version", never an overflow.

Pure: no disk, no SQL. Order of resolution (FORMAT.md, section 5) lives in `parse_ref`'s
result and `Reader.resolve` (engine/reader.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import MetadataError, UnsafeInput, cut
from .limits import is_text

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_NAME = 128
# What a version id prefix looks like; a stance or tag name may not.
ID_PREFIX_DIGITS = 8
_HEX_ONLY = re.compile(r"^[0-9a-fA-F]{%d,}$" % ID_PREFIX_DIGITS)
_ID_PREFIX = re.compile(r"^(?:b3:)?[0-9a-f]{%d,64}$" % ID_PREFIX_DIGITS)
# Version numbers are SQLite integers the catalog compares; manifests hold them below 2^31
# (schema/manifest.schema.json), and a ref names no larger one. Every number that lands is in
# 1..MAX_NUMBER, wherever it came from: a number a ref cannot name is a version no one can reach.
MAX_NUMBER = (1 << 31) - 1
# Bounds on text stored with a version (FORMAT.md, section 5).
MAX_MESSAGE = 1 << 16
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1 << 16
MAX_METADATA_KEYS = 1024
# Tensor and file names in a model's weights (safetensors headers, shard indexes, manifests).
MAX_NAME_LEN = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_name(name: str) -> str:
    """Tensor and file names come from outside: refuse anything that could escape a folder."""
    if not name or len(name) > MAX_NAME_LEN:
        raise UnsafeInput(f"tensor name of {len(name)} characters; names must be 1 to {MAX_NAME_LEN}")
    if "/" in name or "\\" in name or ".." in name or _CONTROL.search(name):
        raise UnsafeInput(f"tensor name {name[:80]!r} has a path separator, '..' or a control character")
    if _SURROGATE.search(name):  # JSON's \udc80 escapes decode to text that is not UTF-8
        raise UnsafeInput(f"tensor name {name[:80]!r} is not valid Unicode (a lone surrogate)")
    return name


def check_stance_name(name: str) -> str:
    return _check_name(name, "stance name")


def check_base_name(name: str) -> str:
    return _check_name(name, "base name")


def check_tag_name(name: str) -> str:
    _check_name(name, "tag")
    if name.isdigit():
        raise UnsafeInput(f"tag {cut(name)} is not allowed: all digits would read as a version number")
    return name


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise UnsafeInput(f"{what} {cut(name)} is not allowed: use 1 to {MAX_NAME} letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit")
    if _HEX_ONLY.match(name):
        raise UnsafeInput(f"{what} {cut(name)} is not allowed: {ID_PREFIX_DIGITS} or more hex digits only "
                          "would read as a version id; add a letter outside a-f or a '-'")
    return name


def name_problem(name: Any, what: str = "stance name") -> str | None:
    """Why `name` is not a valid stance name, or None."""
    try:
        _check_name(name, what)
    except UnsafeInput as e:
        return str(e)
    return None


def number_problem(number: Any) -> str | None:
    """Why `number` cannot be a version's number, or None."""
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_NUMBER:
        return f"version number {cut(number, 24)} is out of range (1 to {MAX_NUMBER})"
    return None


def check_number(number: Any, where: str) -> int:
    """A version number `where` gives (a ref, an index), or UnsafeInput naming it."""
    problem = number_problem(number)
    if problem:
        raise UnsafeInput(f"{where}: {problem}")
    return number


def check_message(message: str, *, source: str = "the message") -> str:
    if not is_text(message):
        raise UnsafeInput(f"{source} holds bytes that are not UTF-8 text; write it as UTF-8")
    if len(message) > MAX_MESSAGE:
        raise UnsafeInput(f"{source} has {len(message)} characters; at most {MAX_MESSAGE} are stored")
    return message


def check_metadata(metadata: Mapping[Any, Any], *, source: str = "metadata") -> dict[str, str]:
    """Keys and values as stored: keys short, printable and without '='; values strings."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise MetadataError(f"{source}: {len(metadata)} keys; at most {MAX_METADATA_KEYS} are stored")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY or "=" in key \
                or any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise MetadataError(f"{source}: key {cut(key)} is not allowed: 1 to {MAX_METADATA_KEY} "
                                "printable characters, no '='")
        if not isinstance(value, str):
            raise MetadataError(f"{source}: the value of {cut(key)} must be a string")
        if not is_text(key) or not is_text(value):
            raise MetadataError(f"{source}: {cut(key)} holds bytes that are not UTF-8 text")
        if len(value) > MAX_METADATA_VALUE:
            raise MetadataError(f"{source}: the value of {cut(key)} is longer than {MAX_METADATA_VALUE} characters")
        out[key] = value
    return out


@dataclass(frozen=True)
class Ref:
    """A ref as typed, read without touching the store. Exactly one way applies:
    `stance` with `number` (STANCE@N), `stance` with `tag` (STANCE@TAG), `stance` alone (its
    newest version, or an id prefix when `id_prefix` is set too), or `id_prefix` alone (b3:...).
    `impossible`: no version can match (a number past MAX_NUMBER, an empty part)."""

    text: str
    stance: str | None = None
    number: int | None = None
    tag: str | None = None
    id_prefix: str | None = None  # "b3:" + hex digits, when the ref can be read as one
    impossible: bool = False


def parse_ref(text: str) -> Ref:
    stance, at, rest = text.partition("@")
    if at:
        if not stance or not rest:
            return Ref(text, impossible=True)
        if rest.isascii() and rest.isdigit():
            # Bounded before int(): a 5,000-digit string is refused by int(), one of 20 digits by SQLite.
            if len(rest) > len(str(MAX_NUMBER)) or int(rest) > MAX_NUMBER or int(rest) < 1:
                return Ref(text, stance=stance, impossible=True)
            return Ref(text, stance=stance, number=int(rest))
        return Ref(text, stance=stance, tag=rest)
    prefix = None
    if _ID_PREFIX.match(text):
        prefix = text if text.startswith("b3:") else "b3:" + text
    if text.startswith("b3:"):
        return Ref(text, id_prefix=prefix, impossible=prefix is None)
    return Ref(text, stance=text, id_prefix=prefix)


# -- names a few edits apart: a typo's suggestions, and the guard against starting a stance by one

SEPARATORS = "-_."


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, counting a swap of two neighbours as one edit ("uncertanity")."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def close_names(name: str, existing: list[str], *, most: int = 3, series: bool = True) -> list[str]:
    """The existing names a few edits from `name` (1 for names of up to 7 characters, 2 up to
    16, 3 beyond), the closest first, at most `most`. `series=False` leaves out the names that
    are of a series with `name` (`in_series`), and every name when `name` is under 5
    characters: what a commit's typo guard asks (would this name start a stance by mistake?),
    where a lookup asks only what the user may have meant."""
    if len(name) > 4 * MAX_NAME or (not series and len(name) < 5):
        return []  # longer than any name: nothing is close, and the distance is quadratic
    limit = 1 if len(name) < 8 else 2 if len(name) <= 16 else 3
    scored = sorted((edit_distance(name.lower(), other.lower()), other) for other in existing
                    if other != name and (series or not in_series(name, other)))
    return [other for distance, other in scored[:most] if distance <= limit]


def in_series(a: str, b: str) -> bool:
    """Whether two names are a series made on purpose: after a shared stem that ends at a
    separator or a digit, each has its own suffix (`run-a`/`run-b`, `v1`/`v2`, `run`/`run-2`).
    A letter left out, doubled or swapped is a typo, near the end as anywhere else
    (`curious-uncertainy`, `run-aa`)."""
    common = len(_common_prefix(a, b))
    stem, rest_a, rest_b = a[:common], a[common:], b[common:]
    at_boundary = (bool(stem) and (stem[-1] in SEPARATORS or stem[-1].isdigit())) or all(
        not rest or rest[0] in SEPARATORS or rest[0].isdigit() for rest in (rest_a, rest_b))
    return at_boundary and not _slip(rest_a, rest_b)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _slip(a: str, b: str) -> bool:
    """Whether `b` is `a` with one character left out or doubled, or two neighbours swapped (or
    the other way round): what a hand does, unlike a suffix chosen on purpose. Not digits:
    `v1` and `v11`, `v12` and `v21` are numbers, each its own."""
    short, long = sorted((a, b), key=len)
    if len(long) == len(short) + 1:
        return any(long[:i] + long[i + 1:] == short and not long[i].isdigit() for i in range(len(long)))
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                and a[diff[1]] == b[diff[0]] and not (a[diff[0]].isdigit() and a[diff[1]].isdigit()))
    return False
