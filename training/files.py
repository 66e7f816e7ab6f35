"""Files written whole or not at all: a fresh temporary name beside the target, renamed into place.

A fixed temporary name (``NAME.tmp``) would follow a link or open a FIFO planted at its place; a fresh random
name created with ``O_EXCL`` (``tempfile.mkstemp``) never does. Used by results, alphas, run records, bundle
manifests and checkpoints alike.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

UMASK = os.umask(0o022)  # read (set back at once) when this module is imported: new files' permissions
os.umask(UMASK)


def fresh_temp(folder: str | Path, prefix: str = ".sat-infer-") -> tuple[BinaryIO, str]:
    """A new hidden temporary file in ``folder``, open for writing, and its path: a fresh random name created with
    ``O_EXCL`` (``tempfile.mkstemp``), so a link or FIFO planted at a temporary file's place is never followed."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)  # as open() would create it (mkstemp makes it 0600)
    return os.fdopen(fd, "wb"), tmp


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a ``fresh_temp`` beside ``path``, then rename it to ``path`` (a link there is replaced,
    not followed); a failure leaves no temporary file."""
    f, tmp = fresh_temp(path.parent)
    try:
        with f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path
