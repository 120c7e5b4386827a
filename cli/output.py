"""Rendering for the command line: JSON, plain tables, sizes and progress bars.

Text for people goes through `escape` (by `echo` and `table`): messages, metadata, names and
dates come from manifests, pulled repos and files, and a terminal obeys the control characters
in them (set its title, clear it, write the clipboard, hide or reorder text). JSON output
is exact: `json.dumps` writes every control character as a `\\u` escape already.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click

from deltastore.core.units import size  # noqa: F401 (the CLI's name for it: output.size)


# C0 (newline and tab included: one record is one line), DEL, C1, the bidirectional marks,
# embeddings, overrides and isolates, the Unicode line and paragraph separators, and lone
# surrogates (which no terminal encoding can carry).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                      "\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(match: re.Match) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: Any) -> str:
    """`text` with every control character shown as an escape (`\\x1b`, `\\n`, `\\u202e`),
    so that it prints as what it is and never acts on the terminal."""
    return _CONTROL.sub(_escaped, str(text))


def echo(text: Any = "", *, err: bool = False) -> None:
    """One line for people, escaped."""
    click.echo(escape(text), err=err)


def to_jsonable(value: Any) -> Any:
    """A result as JSON: its own `to_json()` form where it has one, else its fields."""
    if callable(getattr(value, "to_json", None)):
        return to_jsonable(value.to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[("-" if c is None else escape(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@contextmanager
def progress(label: str, *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a bar on stderr, or None when it would be noise (under
    --json, or when stderr is not a terminal)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar = None
    shown = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - shown)
        shown = done

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
