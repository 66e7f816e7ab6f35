"""What every command-line tool shares: one rich console and user errors printed as one line.

Messages may echo names read from files; they are printed through ``sat_export.text.printable``
(control characters escaped) so a crafted name cannot rewrite the terminal.
"""
from __future__ import annotations

import functools

import typer
from rich.markup import escape

from sat_export.text import printable
from training.console import make_console
from training.errors import SatError

console = make_console()


def new_app(**options) -> typer.Typer:
    """A typer app as every tool has it: no shell-completion commands, and help texts shown as written (rich
    markup off: a ``[trt]`` or ``[default: ...]`` in a help text would otherwise vanish as a style tag)."""
    return typer.Typer(add_completion=False, rich_markup_mode=None, **options)


def user_errors(fn):
    """Decorate a typer command: a ``SatError`` becomes ``error: <message>`` (escaped) and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SatError as err:
            console.print(f"[bold red]error:[/] {escape(printable(str(err)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
