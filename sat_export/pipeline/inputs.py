"""What ``sat-infer`` captions: the inputs and their keys (``sat_export.results`` says where a key's side files go).

Inputs are folders (walked recursively, sorted), text files listing images (``.txt``/``.lst``,
one path a line, relative to the list's folder, ``#`` comments), or image files. Each input
gets a key, the ``image`` of its output row:

=============  ==========================================================
input          key
=============  ==========================================================
folder         path relative to that folder (``cats/01.jpg``)
list file      the line as written (``shots/a.png``)
image file     the path as given on the command line (``photos/a.jpg``)
=============  ==========================================================

Keys are POSIX paths and unique: two different files with one key are refused up front. A
name that is not valid UTF-8 keeps its bytes (``surrogateescape``; ``sat_export.pipeline.outputs`` says
how rows write it), and so does a list's line. A directory named like an image, or a folder
that cannot be listed, is an item too: the pipeline turns it into an error row, so nothing a
user pointed at disappears silently.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sat_export.errors import InputError
from sat_export.faults import IO
from training.images import image_suffixes

LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class InputItem:
    """One image to caption: where it is, its row key, and why it cannot be read (if known already).

    A shard's sample (``sat_export.pipeline.shards``) has its image in ``data`` (or ``opener`` opens
    it, or ``path``), its shard's name in ``shard`` and its key there in ``sample`` (None for the
    error item of a whole shard).
    """

    path: Path | None
    key: str
    error: str | None = None
    data: bytes | None = None
    opener: Callable[[], BinaryIO] | None = None
    shard: str | None = None
    sample: str | None = None
    error_kind: str = IO  # of ``error``: ``faults.INPUT`` (the bytes are bad) or ``faults.IO`` (cannot be read)


def discover(paths: Iterable[str | Path]) -> list[InputItem]:
    """All items under ``paths``, in order, with unique keys.

    Raises
    ------
    InputError
        A path does not exist, a list file cannot be read, or two different files share a key.
    """
    suffixes = image_suffixes()
    items: dict[str, InputItem] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found: Iterable[InputItem] = _walk(path, suffixes)
        elif path.suffix.lower() in LIST_SUFFIXES:
            found = _read_list(path)
        elif path.exists() or path.is_symlink():
            found = [InputItem(path, _posix(raw))]
        else:
            raise InputError(f"{raw}: no such file or folder")
        for item in found:
            seen = items.setdefault(item.key, item)
            if seen is not item and os.path.abspath(seen.path) != os.path.abspath(item.path):
                raise InputError(f"two inputs have the same key {item.key!r}: {seen.path} and {item.path}; "
                                 "caption them in separate runs or pass their common parent folder")
    return list(items.values())


def _walk(root: Path, suffixes: frozenset[str]) -> Iterator[InputItem]:
    unlisted: list[OSError] = []
    for folder, dirs, files in os.walk(root, onerror=unlisted.append):
        dirs.sort()
        for name in sorted(dirs + files):  # a directory named like an image becomes an error row
            if Path(name).suffix.lower() in suffixes:
                path = Path(folder, name)
                yield InputItem(path, path.relative_to(root).as_posix())
    for err in unlisted:
        bad = Path(err.filename)
        if bad == root:
            raise InputError(f"{root}: cannot list folder ({err.strerror})")
        yield InputItem(bad, bad.relative_to(root).as_posix(), f"cannot list folder: {err.strerror}")


def _read_list(list_file: Path) -> Iterator[InputItem]:
    try:
        if not stat.S_ISREG(list_file.stat().st_mode):  # a FIFO would block the run forever
            raise InputError(f"{list_file}: not a regular file; a list of images must be a text file")
        text = list_file.read_bytes()
    except OSError as err:
        raise InputError(f"{list_file}: cannot read the list of images ({err.strerror or err})") from None
    if b"\0" in text:
        raise InputError(f"{list_file}: holds NUL bytes, not a list of image paths (one a line)")
    for line in os.fsdecode(text).split("\n"):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield InputItem(list_file.parent / entry, _posix(entry))


def _posix(path: str | Path) -> str:
    return PurePosixPath(os.path.normpath(path).replace(os.sep, "/")).as_posix()
