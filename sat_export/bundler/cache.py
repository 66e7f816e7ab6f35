"""One bundle per checkpoint, built once into the user's cache and reused by later runs.

This is how ``sat-infer`` runs the embedded demo model (or any checkpoint) on ONNX Runtime
without a separate ``sat-export build`` step. The cache key is the checkpoint's sha256, so a
retrained checkpoint gets a fresh bundle; a cached bundle that no longer verifies is rebuilt.
Set ``SAT_EXPORT_CACHE`` to move the cache (default ``~/.cache/sat-export``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from sat_export.bundler.builder import build_bundle
from sat_export.bundle.format import Bundle, load_bundle, sha256
from sat_export.errors import BundleError
from sat_export.options import BuildOptions
from training.console import make_console

CACHE_ENV = "SAT_EXPORT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sat-export")


def cached_bundle(ckpt: str | Path, console: Console | None = None) -> Bundle:
    """The verified bundle of ``ckpt`` in the cache, building it (with the parity gate) if needed."""
    ckpt = Path(ckpt)
    out = cache_dir() / "bundles" / f"{ckpt.stem}-{sha256(ckpt)[:16]}"
    if out.is_dir():
        try:
            return load_bundle(out)
        except BundleError:
            shutil.rmtree(out, ignore_errors=True)  # stale or damaged: rebuild below
    console = console or make_console()
    console.print(f"building the ONNX bundle of {ckpt.name} once, into {out}", highlight=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build_bundle(ckpt, tmp, BuildOptions(), console)
        try:
            tmp.rename(out)  # atomic: a concurrent run that finished first keeps its bundle
        except OSError:
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(out)
