"""Where a row's side files (alphas ``.npz``, overlay folders) go, for the writers and the readers of results."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

SIDECAR_NAME_MAX = 255 - len(".tmp")  # most file systems' name limit, less 4 (as when temporary names had ".tmp" added)


def confined_parts(name: str) -> list[str]:
    """The parts of ``name`` (a key or shard name from data) as a path that stays under any root: no anchor,
    no ``.``, each ``..`` as ``__``; ``["_"]`` for a name with no part left."""
    return ["__" if p == ".." else p for p in PurePosixPath(name).parts if p not in ("/", ".")] or ["_"]


def sidecar_path(key: str, root: Path, suffix: str) -> Path:
    """Where the file for ``key`` goes under ``root``: the key's tree mirrored, ``suffix`` appended.

    The whole file name is kept (``a.jpg`` -> ``a.jpg.npz``) so ``a.jpg`` and ``a.png`` do not
    collide; an absolute key loses its anchor and ``..`` becomes ``__`` so nothing leaves ``root``.
    A name that would pass ``SIDECAR_NAME_MAX`` bytes is cut and ends with a hash of the whole name.
    """
    parts = confined_parts(key)
    name = os.fsencode(parts[-1])
    if len(name) + len(suffix) > SIDECAR_NAME_MAX:
        name = name[:SIDECAR_NAME_MAX - len(suffix) - 17] + b"~" + hashlib.sha256(name).hexdigest()[:16].encode()
    return root.joinpath(*parts[:-1], os.fsdecode(name) + suffix)
