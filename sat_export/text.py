"""Showing text that comes from files (names, vocabulary words, pickle globals) on a terminal or page.

A crafted name can hold a clear-screen sequence, a line feed that fakes a second message, or a
bidirectional override that reorders what is shown; a name that is not valid UTF-8 holds lone
surrogates (``surrogateescape``) that no UTF-8 stream can print. ``printable`` shows all of them
as escapes. Rows and JSON reports stay faithful (JSON escapes what it must); HTML is escaped as HTML.
"""
from __future__ import annotations

import re

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    ch = match.group()
    if "\udc80" <= ch <= "\udcff":  # an undecodable file name byte: show the byte
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode()


def printable(text: str) -> str:
    """``text`` with control characters, bidi controls and lone surrogates as backslash escapes."""
    return _UNPRINTABLE.sub(_escape, text)
