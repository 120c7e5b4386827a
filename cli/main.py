"""The `deltastore` group: its options, how errors end a command (one line on stderr, exit 1;
tracebacks only with DELTASTORE_DEBUG=1; Ctrl-C: one line saying what was stored, exit 130; a
closed pipe 141), and the registration of every command. The commands live by domain beside
this module (stances.py, bases.py, weights.py, sharing.py, analysis.py, upkeep.py); each
parses its options (a few complete one from the store: the store's only base, a remote's
name), makes one library call (gc two: the plan, then its execution; apply and export also
resolve REF to name it) and renders the result (or draws it, with --plot)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from deltastore import DeltastoreError
from deltastore.core.errors import DiskFull, OptionConflict, is_disk_full

from .output import Interrupted, as_program, ctrl_c_came, escape, interrupted_line, release

# Every command: its name -> the module beside this one that defines it, and the function's
# name there. A module is imported when one of its commands runs (or --help lists them all), so
# `deltastore log` starts without the other modules' imports.
COMMANDS = {
    "init": "upkeep:init", "fsck": "upkeep:fsck", "gc": "upkeep:gc", "stats": "upkeep:stats",
    "upgrade": "upkeep:upgrade", "status": "upkeep:status",
    "base": "bases:base",
    "commit": "stances:commit", "stances": "stances:stances", "stance": "stances:stance", "log": "stances:log",
    "show": "stances:show", "diff": "stances:diff", "tag": "stances:tag", "delete": "stances:delete",
    "apply": "weights:apply", "revert": "weights:revert", "export": "weights:export",
    "push": "sharing:push", "pull": "sharing:pull", "remote": "sharing:remote", "clone": "sharing:clone",
    "export-lora": "sharing:export_lora", "import-lora": "sharing:import_lora",
    "compare": "analysis:compare_command", "analyze": "analysis:analyze",
}


class DeltastoreGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            module, function = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(f"{__package__}.{module}"), function), name)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return self._finished(ctx)
        except BrokenPipeError:
            # The reader went away (`deltastore log | head -1`): stop quietly, as git does, with
            # the status of a process ended by SIGPIPE.
            _silence_stdout()
            raise click.exceptions.Exit(128 + 13) from None
        except OptionConflict as e:
            # A usage error of the command that raised it, shown with that command's usage line.
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            raise click.UsageError(escape(e), click.Context(command, info_name=name, parent=ctx)
                                   if command else ctx) from None
        except DeltastoreError as e:
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            raise click.ClickException(escape(e)) from None
        except (KeyboardInterrupt, click.Abort) as e:
            # Ctrl-C: the command's own clean-up (finally blocks, the store's close) has run by
            # now; one line says what it stored (its result, held, is not printed), and it
            # exits as an interrupted process does, whatever the moment (click says "Aborted!"
            # and exits 1).
            line = e.line if isinstance(e, Interrupted) else interrupted_line()
            release(printed=False)
            click.echo("\n" + escape(line), err=True)
            raise click.exceptions.Exit(130) from None
        except click.ClickException as e:
            e.message = escape(e.message)  # it may quote what the user typed
            raise
        except click.exceptions.Exit:
            raise
        except OSError as e:
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            if is_disk_full(e):
                raise click.ClickException(str(DiskFull())) from None
            raise click.ClickException(escape(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))) from None
        except UnicodeEncodeError as e:
            # Bytes that are not UTF-8 in an argument reach Python as lone surrogates, which
            # neither the catalog nor a manifest can hold.
            if os.environ.get("DELTASTORE_DEBUG") == "1":
                raise
            shown = str(e.object[max(0, e.start - 20):e.end + 20]) if isinstance(e.object, str) else ""
            raise click.ClickException(f"{shown!r} holds bytes that are not UTF-8 text; give names and values "
                                       "as UTF-8") from None

    def _finished(self, ctx: click.Context) -> Any:
        """The command's result, with the lines it held printed (before its error, if it
        failed). A Ctrl-C that came while it finished (its work done: the store closing) is
        an interrupt as any other; one that comes while it prints its result ends it with
        status 130 and nothing more (the result says what was stored)."""
        try:
            result = super().invoke(ctx)
        except (KeyboardInterrupt, click.Abort):
            raise
        except BaseException:
            release(printed=True)
            raise
        if ctrl_c_came():
            raise KeyboardInterrupt
        if release(printed=True):
            raise click.exceptions.Exit(130)
        return result


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left of it on exit raises nothing
    more (the fix Python's documentation of SIGPIPE gives)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (an in-process runner)
        pass


@click.group(cls=DeltastoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False), envvar=None,
              help="Store folder, or a folder holding one as .deltastore/ (default: $DELTASTORE_DIR, else for "
                   "`revert PATH` the store that patched PATH, else the nearest .deltastore/ upwards).")
@click.version_option(package_name="deltastore")
def cli(store: str | None) -> None:
    """Store, version, apply and share fine-tuning deltas of PyTorch language models."""


def main() -> None:
    as_program()
    try:
        cli(prog_name="deltastore")
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code == 0 and ctrl_c_came():
        code = 130  # Ctrl-C after the result was printed
    if code != 130:
        raise SystemExit(code)
    # Interrupted: skip the interpreter's teardown (with torch loaded, a second or two of
    # freeing memory the process is about to give back).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)
