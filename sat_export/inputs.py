"""What ``sat-infer`` captions, and what an earlier run already wrote.

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

Keys are POSIX paths and unique: two different files with one key are refused up front.
A directory named like an image, or a folder that cannot be listed, is an item too: the
pipeline turns it into an error row, so nothing a user pointed at disappears silently.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sat_export.errors import InputError
from training.images import image_suffixes

LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class InputItem:
    """One file to caption: where it is, its row key, and why it cannot be read (if known already)."""

    path: Path
    key: str
    error: str | None = None


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
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{list_file}: cannot read the list of images ({err})") from None
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield InputItem(list_file.parent / entry, _posix(entry))


def _posix(path: str | Path) -> str:
    return PurePosixPath(os.path.normpath(path).replace(os.sep, "/")).as_posix()


def sidecar_path(key: str, root: Path, suffix: str) -> Path:
    """Where the file for ``key`` goes under ``root``: the key's tree mirrored, ``suffix`` appended.

    The whole file name is kept (``a.jpg`` -> ``a.jpg.npz``) so ``a.jpg`` and ``a.png`` do not
    collide; an absolute key loses its anchor and ``..`` becomes ``__`` so nothing leaves ``root``.
    """
    parts = ["__" if p == ".." else p for p in PurePosixPath(key).parts if p not in ("/", ".")]
    return root.joinpath(*parts[:-1], parts[-1] + suffix)


def run_record_path(out: Path) -> Path:
    """``captions.jsonl`` -> ``captions.jsonl.run.json``: what produced the rows of ``out``."""
    return out.with_name(out.name + ".run.json")


def check_run_record(out: Path, settings: dict, overwrite: bool = False) -> None:
    """Refuse to resume ``out`` with other ``settings`` (model, decoding) than the rows were made with.

    An output without a record (written before records were kept) is resumed as it is; the caller
    (re)writes the record with ``write_run_record`` once ``out`` is accepted.

    Raises
    ------
    InputError
        ``out`` holds rows and its record differs from ``settings``; nothing is changed.
    """
    record = run_record_path(out)
    if not overwrite and record.is_file() and out.is_file() and out.stat().st_size:
        try:
            before = json.loads(record.read_text())
        except ValueError:
            raise InputError(f"{record}: unreadable run record; pass --overwrite to start over") from None
        changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if before.get(key) != value]
        if changed:
            raise InputError(f"{out}: its rows were made with other settings ({'; '.join(changed)}); pass "
                             "--overwrite to start over or choose another --out")


def write_run_record(out: Path, settings: dict) -> None:
    """Record beside ``out`` the settings its rows are made with (``check_run_record`` reads it)."""
    run_record_path(out).write_text(json.dumps(settings, indent=1) + "\n")


def resume_output(out: Path, overwrite: bool = False) -> dict[str, bool]:
    """Prepare ``out`` for appending; map the key of each row it already holds to "is an error row".

    A torn last line (a run killed mid-write) is cut off; ``overwrite`` empties the file.

    Raises
    ------
    InputError
        A complete line is not a JSON object with an ``image`` key: the file is not ours to append to.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not out.exists():
        out.write_bytes(b"")
        return {}
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with out.open("r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            row = json.loads(line)
            done[row["image"]] = "error" in row
        except (ValueError, TypeError, KeyError):
            raise InputError(f"{out}: line {number} is not a sat-infer row; pass --overwrite to start over "
                             "or choose another --out") from None
    return done
