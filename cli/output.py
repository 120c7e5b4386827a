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
import signal
import sys
import threading
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
    if err:
        click.echo(escape(text), err=True)
    else:
        _out(escape(text))


# -- Ctrl-C ------------------------------------------------------------------------------------
# A command that stores something holds its result lines until it has ended: Ctrl-C during
# its work (or while it renders) prints one line instead, saying what was stored, never the
# result and "interrupted" both. What that line says comes from the command (`on_interrupt`).

_held: list[str] | None = None
_report: Callable[[], str] | None = None
_caught: list[int] = []
_previous: list[Any] = []  # the SIGINT handler `finishing` replaced
_program: list[bool] = []  # set by cli/main.py's main(): the process ends with the command


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what the interrupted command had stored."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


def _out(text: str) -> None:
    if _held is None:
        click.echo(text)
    else:
        _held.append(text)


def hold() -> None:
    """Keep this command's stdout lines until `release` (after the command's end)."""
    global _held
    if _held is None:
        _held = []


def on_interrupt(report: Callable[[], str] | None) -> None:
    """What to say if Ctrl-C comes during this command: `report()` says what it stored."""
    global _report
    _report = report


def interrupted_line() -> str:
    """The one line for a Ctrl-C now (the command's report, checked as it stands)."""
    if _report is None:
        return "interrupted"
    try:
        return f"interrupted; {_report()}"
    except BaseException:  # (a second Ctrl-C, an unreadable store) what was stored stays unsaid
        return "interrupted; what it stored was not checked: `deltastore log` shows the versions"


def finishing() -> None:
    """The command's work is done: a Ctrl-C from now on is kept for the end (cli/main.py), so
    that the store closes and the result is printed whole or not at all."""
    if threading.current_thread() is threading.main_thread() and not _previous \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _previous.append(signal.signal(signal.SIGINT, lambda signum, frame: _caught.append(signum)))


def ctrl_c_came() -> bool:
    """Whether Ctrl-C came since `finishing` (or, in a program, since the result was printed)."""
    return bool(_caught)


def as_program() -> None:
    """This process runs one command and exits: see `release`."""
    _program.append(True)


def release(*, printed: bool) -> bool:
    """Print the held lines (or drop them, `printed=False`), forget the command's report and put
    Ctrl-C back; whether a Ctrl-C came while the command was finishing."""
    global _held, _report
    lines, _held, _report = _held, None, None
    try:
        for line in lines if printed and lines else ():
            click.echo(line)
    finally:
        # A program keeps Ctrl-C deferred to its exit (main() says 130): restored here, one
        # coming before the exit would end it by click's "Aborted!" after the result.
        if _previous and not _program:
            signal.signal(signal.SIGINT, _previous.pop())
    caught = bool(_caught)
    _caught.clear()
    return caught


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
    _out(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[("-" if c is None else escape(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    _out("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def largest(shares: list[tuple[str, float]], total: float, of: str, *, most: int = 3) -> str | None:
    """The summary line of a long table: its few largest rows by their part of `total`, and
    what they hold together ("largest: a 41.2%, b 20.1% of ||dW||^2 (together 61.3%)"); None
    when nothing has a part."""
    ranked = sorted(((label, value) for label, value in shares if value > 0), key=lambda lv: -lv[1])[:most]
    if not ranked or not total > 0:
        return None
    parts = ", ".join(f"{label} {value / total:.1%}" for label, value in ranked)
    together = f" (together {sum(v for _, v in ranked) / total:.1%})" if len(ranked) > 1 else ""
    return f"largest: {parts} of {of}{together}"


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
