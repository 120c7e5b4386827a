"""Sizes as people read them, in decimal units (kB, MB, GB) as the Hub shows them: the command
line's tables and a pushed repo's card use the same words."""

from __future__ import annotations

from typing import Any


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
