"""Sizes as people read them, in decimal units (kB, MB, GB) as the Hub shows them: the command
line's tables and a pushed repo's card use the same words."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size(n: Any) -> str:
    """`n` bytes as "1.5 MB"; "-" where there is no number (None, or a value from outside that
    is not one)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def parse_size(text: str) -> int:
    """A size as people write it, in bytes: `16800000`, `16.8MB`, `16.8 MB`, `500kB`, `2GiB`
    (kB, MB, GB decimal as `size` prints them; KiB, MiB, GiB binary). ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not unit:
        raise ValueError(f"{str(text)[:40]!r} is not a size: write bytes, or a number with kB, MB or GB "
                         "(e.g. 16.8MB)")
    value = float(m.group(1)) * unit
    if value < 1:
        raise ValueError(f"{str(text)[:40]!r} is less than one byte")
    return int(value)
