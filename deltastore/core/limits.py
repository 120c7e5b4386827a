"""JSON from outside (safetensors headers, manifests, Hub indexes, shard indexes), parsed only
once it is known to be small enough to parse.

Python's parser turns a few bytes into tens of bytes of objects (`[{},{},...]`
costs some 25 bytes per byte of text) and recurses once per level of nesting, so a hostile
file can exhaust memory or the stack before any field is checked. Every reader of JSON from
outside goes through `load_json`, which refuses, before parsing, text over a byte bound or
holding more objects and lists than a file of that kind can, and turns every failure of the
parser into the caller's error, never a `RecursionError`. `read_bounded` reads such a file
without allocating its bound up front (`f.read(n)` does).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .errors import DeltastoreError, UnsafeInput

# Real files hold far fewer: a safetensors header entry has 3 objects and lists in ~50 bytes or
# more, a manifest entry 5 to 8 in ~400. One per 8 bytes bounds what a parse can cost to some
# 10 bytes of objects per byte of text.
BYTES_PER_CONTAINER = 8


def load_json(raw: bytes | str, what: str, *, max_bytes: int, max_containers: int | None = None,
              error: Callable[[str], DeltastoreError] = UnsafeInput) -> Any:
    """`raw` parsed, or `error(message)` naming `what` and the bound it breaks.

    The counts of `{` and `[` are taken over the raw text, strings included: an upper bound on
    the objects and lists the parse would make, found at memchr speed without parsing."""
    if len(raw) > max_bytes:
        raise error(f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed")
    brace, bracket = ("{", "[") if isinstance(raw, str) else (b"{", b"[")
    containers = raw.count(brace) + raw.count(bracket)
    bound = len(raw) // BYTES_PER_CONTAINER + 64
    if max_containers is not None:
        bound = min(bound, max_containers)
    if containers > bound:
        raise error(f"{what} holds {containers} JSON objects and lists, more than the {bound} "
                    "a file of its size and kind can")
    try:
        return json.loads(raw)
    except RecursionError:
        raise error(f"{what} is nested too deeply to be JSON deltastore wrote") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{what} is not JSON ({str(e)[:120]})") from None


def read_bounded(path: str | os.PathLike, limit: int) -> bytearray | None:
    """A file's bytes, or None when it holds more than `limit`. A file larger than that when
    opened is not read at all, and the rest is read in chunks, stopping one byte past the
    limit (a file that grows while read): memory follows the file's real size, never the
    bound (`f.read(n)` allocates all n bytes first)."""
    buf = bytearray()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            return None
        while len(buf) <= limit:
            chunk = f.read(min(1 << 20, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
    return buf if len(buf) <= limit else None


def is_text(value: str) -> bool:
    """Whether `value` can be stored: UTF-8 encodable, so no lone surrogates (what Python makes
    of bytes that are not UTF-8 in a command line or a file name)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(value: Any, limit: int = 80) -> str:
    """A value from outside, short enough for a one-line message, whatever its type, size or
    depth (a repr of a deeply nested list could itself recurse too deeply)."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a JSON {'object' if isinstance(value, dict) else 'list' if isinstance(value, list) else type(value).__name__}"
