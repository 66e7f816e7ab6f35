"""Shard name patterns: brace expansion as the shell does it, and globs, without ever listing every name.

``Pattern("shards/{00000..00999}.tar")`` understands brace alternatives ``{a,b}`` (nested: ``x{a,{b,c}}``),
numeric ranges ``{00..99}`` (zero padding of the first bound kept; ``{05..01}`` counts down) and the glob
characters ``*`` (within a folder), ``**`` (across folders), ``?`` and ``[...]``, combined (``{a,b}*.tar``). A
brace that is not a group (``{x}``, an unclosed ``{``) is a character of the name.

Its names are generated lazily (``names``) and counted without generating them (``count``): a pattern
naming a billion shards costs what is matched, not what it could name. ``matches`` tells whether a listed
path is one of the pattern's; ``root`` is the folder before the first pattern character and ``depth``
how many folders below it a match may be (None: any, for ``**`` or a ``/`` inside braces).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

GLOB_CHARS = re.compile(r"[*?\[]")
BRACES = re.compile(r"\{[^}]*(\.\.|,)[^}]*\}")  # a brace group: {00000..00999} or {a,b}
RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def has_pattern(raw: str) -> bool:
    return bool(GLOB_CHARS.search(raw) or BRACES.search(raw))


@dataclass(frozen=True)
class _Text:
    """Characters of the name; glob characters in them match as globs do."""

    text: str

    def count(self) -> int:
        return 1

    def names(self) -> Iterator[str]:
        yield self.text

    def regex(self, ranges: list) -> str:
        return _glob_regex(self.text)


@dataclass(frozen=True)
class _Range:
    """``{lo..hi}``, either way, each number zero-padded to the first bound's width."""

    first: int
    last: int
    width: int

    def count(self) -> int:
        return abs(self.last - self.first) + 1

    def names(self) -> Iterator[str]:
        step = 1 if self.last >= self.first else -1
        return (f"{i:0{self.width}d}" for i in range(self.first, self.last + step, step))

    def regex(self, ranges: list) -> str:
        ranges.append(self)
        return r"(\d+)"

    def accepts(self, digits: str) -> bool:
        value = int(digits)
        return min(self.first, self.last) <= value <= max(self.first, self.last) and digits == f"{value:0{self.width}d}"


@dataclass(frozen=True)
class _Choice:
    """``{a,b,...}``: each alternative a sequence of parts."""

    options: tuple[tuple, ...]

    def count(self) -> int:
        return sum(_count(option) for option in self.options)

    def names(self) -> Iterator[str]:
        for option in self.options:
            yield from _names(option)

    def regex(self, ranges: list) -> str:
        return "(?:" + "|".join(_regex(option, ranges) for option in self.options) + ")"


def _count(parts: tuple) -> int:
    total = 1
    for part in parts:
        total *= part.count()
    return total


def _names(parts: tuple) -> Iterator[str]:
    if not parts:
        yield ""
        return
    for head in parts[0].names():
        for tail in _names(parts[1:]):
            yield head + tail


def _regex(parts: tuple, ranges: list) -> str:
    return "".join(part.regex(ranges) for part in parts)


def _glob_regex(text: str) -> str:
    """A glob's regular expression: ``**`` any characters (``**/`` any folders, or none), ``*`` and ``?`` none of
    them a ``/``, ``[!...]`` negated."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("**/", i):  # any folders, none too
            out.append("(?:.*/)?")
            i += 3
        elif text.startswith("**", i):
            out.append(".*")
            i += 2
        elif text[i] == "*":
            out.append("[^/]*")
            i += 1
        elif text[i] == "?":
            out.append("[^/]")
            i += 1
        elif text[i] == "[" and "]" in text[i + 2:]:
            end = text.index("]", i + 2)
            body = text[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(text[i]))
            i += 1
    return "".join(out)


def _parse(text: str, i: int, inside: bool) -> tuple[tuple, int]:
    """The parts of ``text`` from ``i`` to its end (``inside`` a group: to a ``,`` or ``}``), and where it stopped."""
    parts, chars = [], []
    while i < len(text) and not (inside and text[i] in ",}"):
        group = _group(text, i) if text[i] == "{" else None
        if group is None:
            chars.append(text[i])
            i += 1
            continue
        if chars:
            parts.append(_Text("".join(chars)))
            chars = []
        parts.append(group[0])
        i = group[1]
    if chars:
        parts.append(_Text("".join(chars)))
    return tuple(parts), i


def _group(text: str, i: int):
    """The brace group at ``text[i] == "{"`` and the index after it, or None where it is not a group."""
    numbers = RANGE.match(text, i)
    if numbers:
        first, last = numbers.groups()
        return _Range(int(first), int(last), len(first)), numbers.end()
    options, j = [], i + 1
    while True:
        option, j = _parse(text, j, inside=True)
        options.append(option)
        if j >= len(text):
            return None  # never closed
        if text[j] == "}":
            break
        j += 1  # past the comma
    return (_Choice(tuple(options)), j + 1) if len(options) > 1 else None


class Pattern:
    """A shard path pattern (see the module's docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.parts, _ = _parse(text, 0, inside=False)
        self._ranges: list[_Range] = []
        self._regex = re.compile(_regex(self.parts, self._ranges), re.DOTALL)
        prefix = self.parts[0].text if self.parts and isinstance(self.parts[0], _Text) else ""
        fixed = prefix[:m.start()] if (m := GLOB_CHARS.search(prefix)) else prefix
        self.root = (fixed.rsplit("/", 1)[0] or "/") if "/" in fixed else ""
        self.has_glob = any(isinstance(p, _Text) and GLOB_CHARS.search(p.text) for p in _walk(self.parts))

    @property
    def depth(self) -> int | None:
        """How many folders below ``root`` a match is at most (None: any)."""
        if "**" in self.text or any(isinstance(p, _Text) and "/" in p.text for p in _walk(self.parts, braces=True)):
            return None
        return self.text[len(self.root):].strip("/").count("/") + 1

    def count(self) -> int:
        """How many names its braces make (a glob's matches are not counted)."""
        return _count(self.parts)

    def names(self) -> Iterator[str]:
        """The names its braces make, in their order, one at a time."""
        return _names(self.parts)

    def matches(self, path: str) -> bool:
        found = self._regex.fullmatch(path)
        if found is None:
            return False
        return all(digits is None or part.accepts(digits) for part, digits in zip(self._ranges, found.groups()))


def _walk(parts: tuple, braces: bool = False) -> Iterator:
    """Every part, nested ones too; with ``braces``, only those inside a group."""
    for part in parts:
        if isinstance(part, _Choice):
            for option in part.options:
                yield from _walk(option)
        elif not braces:
            yield part
