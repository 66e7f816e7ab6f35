"""What every command-line tool shares: one rich console and user errors printed as one line.

Messages may echo names read from files; they are printed through ``sat_export.text.printable``
(control characters escaped) so a crafted name cannot rewrite the terminal.
"""
from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from sat_export.text import printable
from training.errors import SatError

console = Console(stderr=True)


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
