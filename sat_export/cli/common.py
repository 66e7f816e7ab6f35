"""What every command-line tool shares: one rich console and errors printed as one line, never a traceback.

Messages may echo names read from files; they are printed through ``sat_export.text.printable``
(control characters escaped) so a crafted name cannot rewrite the terminal.
"""
from __future__ import annotations

import functools
import os
import tempfile
import traceback

import typer
from rich.markup import escape

from sat_export.text import printable
from training.console import make_console
from training.errors import SatError, first_line

DEBUG_ENV = "SAT_EXPORT_DEBUG"  # =1: an unexpected error's traceback on the terminal instead of a log file

console = make_console()


def new_app(**options) -> typer.Typer:
    """A typer app as every tool has it: no shell-completion commands, and help texts shown as written (rich
    markup off: a ``[trt]`` or ``[default: ...]`` in a help text would otherwise vanish as a style tag)."""
    return typer.Typer(add_completion=False, rich_markup_mode=None, **options)

# typer's exits and usage errors (``typer.BadParameter``...): their click is vendored inside typer since 0.2x,
# the click package before, so the usage errors' base class is found from typer itself
PASS_THROUGH = (typer.Exit, typer.Abort,
                next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def user_errors(fn):
    """Decorate a typer command: every error ends it in one line, ``error: <message>`` (escaped), exit code 1.

    A ``SatError`` is the product's own message. Any other exception (a storage, network or cluster library's
    error that got through: botocore, aiohttp, fsspec, pyarrow, OSError, or a bug) is shown by its type and first
    line, its traceback written to a log file the line names (``SAT_EXPORT_DEBUG=1``: raised as it is, traceback
    shown). typer's and click's own exits (``typer.Exit``, usage errors, Ctrl-C) pass through unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SatError as err:
            _fail(str(err))
        except PASS_THROUGH:
            raise
        except Exception as err:  # noqa: BLE001 - the one place an unexpected error becomes a line, not a traceback
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            _fail(f"{type(err).__name__}: {first_line(err)} ({_log_traceback(err)}; {DEBUG_ENV}=1 shows it here)")

    return wrapper


def _fail(message: str):
    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _log_traceback(err: BaseException) -> str:
    """Write ``err``'s traceback to a new log file in the temporary folder; where it went, in words."""
    try:
        fd, path = tempfile.mkstemp(prefix="sat-export-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as log:
            log.write("".join(traceback.format_exception(err)))
    except OSError as log_err:
        return f"its traceback could not be saved: {log_err.strerror or log_err}"
    return f"traceback in {path}"
