"""The one way this project makes a rich console.

On a terminal: colour and the terminal's width. Written to a pipe or a file (CI logs, ``2> build.log``): no
colour, and no line is wrapped or cut at rich's default 80 columns, so a parity line or a table row stays
one line a reader (or ``grep``) can take whole.
"""
from __future__ import annotations

from rich.console import Console

UNWRAPPED_WIDTH = 1000  # columns given to a console that is not a terminal: tables keep their natural width


def make_console(stderr: bool = True) -> Console:
    """A console on stderr (or stdout) that soft-wraps: ``print`` never inserts line breaks of its own."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console.width = UNWRAPPED_WIDTH
    return console
