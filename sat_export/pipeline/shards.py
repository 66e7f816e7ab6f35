"""Shard sources: WebDataset ``.tar`` and Parquet files, on disk or behind an fsspec URL, found and streamed as samples.

A shard input is a URL (``s3://bucket/prefix/``, ``gs://``, ``https://``, ``file://``), a ``.tar``
(``.tgz``, ``.tar.gz``) or ``.parquet`` file, a folder holding such files (at any depth) and no image
anywhere, a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}``) or a glob (``shards/*.parquet``):
``patterns.Pattern``. A folder that holds both ``.tar`` and ``.parquet`` files is img2dataset's WebDataset
output: its Parquet files are metadata, its tars the shards. A shard's ``name`` is its path relative to the
input's root (the folder, the prefix, or the folder before the first pattern); a sample's row key is
``<shard>/<key>``.

A brace pattern naming at most ``NAMED_LIMIT`` shards, and no glob, names shards: each is found in one
listing (or asked for by name where the store does not list), and one that is missing is an error row. A
wider pattern, or a glob, is matched against the listing: it costs what exists, not what it could name.
Every call to a store here is retried as ``sat_export.faults.Retrying`` says (``--retry-for``).

Reading: ``tar_shards`` and ``parquet_shards``; both continue a shard where a transient failure broke it.
Nothing here stops a run but a store down past the budget: a damaged shard, a missing object, a FIFO or
device named like a shard, a sample without an image are error rows.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

from sat_export.errors import InputError
from sat_export.faults import INPUT, RetryPolicy, Retrying, transient
from sat_export.options import SourceOptions
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.parquet_shards import check_image_column, parquet_samples
from sat_export.pipeline.patterns import Pattern, has_pattern
from sat_export.pipeline.shard_samples import Shard, shard_error, shard_kind
from sat_export.pipeline.stores import filesystem, is_url
from sat_export.pipeline.tar_shards import tar_samples
from training.images import image_suffixes

NAMED_LIMIT = 100_000  # names a brace pattern may make and still name shards (a missing one: an error row)


def new_retrying(sources: SourceOptions) -> Retrying:
    """A run's ``Retrying`` under ``sources.retry_for``."""
    return Retrying(RetryPolicy(retry_for=sources.retry_for))


def is_shard_input(raw: str | Path) -> bool:
    """A URL, a pattern, a shard file, or a local folder holding shard files and no image anywhere
    (img2dataset's ``files`` output, images in subfolders and metadata Parquet files at the top, is an
    image folder)."""
    text = str(raw)
    if is_url(text) or shard_kind(text):
        return True
    if not os.path.isdir(text):
        return not os.path.lexists(text) and has_pattern(text)  # an image named a[1].jpg is no pattern
    suffixes, shards = image_suffixes(), False
    for _, _, files in os.walk(text):
        for name in files:
            if Path(name).suffix.lower() in suffixes:
                return False
            shards = shards or shard_kind(name) is not None
    return shards


def shard_inputs(paths: Iterable[str | Path], sources: SourceOptions = SourceOptions(),
                 retrying: Retrying | None = None) -> list[Shard] | None:
    """The shards of ``paths`` with their image column checked (``check_image_column``), or None when
    ``paths`` are folders, lists and files of images; both kinds in one run are refused."""
    paths = list(paths)
    kinds = [is_shard_input(p) for p in paths]
    if not any(kinds):
        return None
    if not all(kinds):
        images = next(p for p, shard in zip(paths, kinds) if not shard)
        raise InputError(f"{images}: images and shards cannot be captioned in one run; caption them separately")
    try:
        import fsspec  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise InputError(f"reading shards needs pyarrow and fsspec ({err}): pip install 'sat-export[shards]'") from None
    retrying = retrying or new_retrying(sources)
    shards = find_shards(paths, sources, retrying)
    check_image_column(shards, sources, retrying)
    return shards


def stream(shards: Iterable[Shard], sources: SourceOptions = SourceOptions(),
           retrying: Retrying | None = None) -> Iterator[InputItem]:
    """The samples of every shard, one shard after the other."""
    retrying = retrying or new_retrying(sources)
    for shard in shards:
        yield from samples(shard, sources, retrying)


def samples(shard: Shard, sources: SourceOptions = SourceOptions(),
            retrying: Retrying | None = None) -> Iterator[InputItem]:
    """The samples of ``shard`` as items (encoded image in ``data``, or a ``path``/``opener`` to it), in order;
    a shard that cannot be read, or what is left of a damaged one, is one error item named after the shard."""
    retrying = retrying or new_retrying(sources)
    if shard.error:
        yield shard_error(shard, shard.error, shard.error_kind)
    elif shard.kind == "tar":
        yield from tar_samples(shard, sources, retrying)
    else:
        yield from parquet_samples(shard, sources, retrying)


def find_shards(paths: Iterable[str | Path], sources: SourceOptions = SourceOptions(),
                retrying: Retrying | None = None) -> list[Shard]:
    """Every shard under ``paths``, in order, with unique names.

    Raises ``InputError`` for an input that does not exist, a pattern that matches nothing, a folder
    or prefix with no shards, or two shards with one name; ``StorageUnavailable`` past the retry budget.
    """
    retrying = retrying or new_retrying(sources)
    shards: dict[str, Shard] = {}
    for raw in map(str, paths):
        fs, path = filesystem(raw, sources)
        for shard in _shards_of(raw, fs, path, partial(_ask, retrying, raw)):
            seen = shards.setdefault(shard.name, shard)
            if seen is not shard:
                raise InputError(f"two shards have the name {shard.name!r}: {seen.url} and {shard.url}; "
                                 "caption them in separate runs or pass their common parent")
    return list(shards.values())


def _ask(retrying: Retrying, raw: str, fn: Callable):
    return retrying.call(fn, raw)


def _shards_of(raw: str, fs, path: str, ask: Callable) -> Iterator[Shard]:
    if has_pattern(path):
        yield from _matches(raw, fs, Pattern(path), ask)
        return
    info = ask(partial(_info, fs, path))
    if info is None:
        raise InputError(f"{raw}: no such file, folder or object")
    if info.get("type") == "directory" or not shard_kind(path) and ask(partial(fs.isdir, path)):  # http: a page
        found = {p: info for p, info in sorted(ask(partial(fs.find, path, detail=True)).items()) if shard_kind(p)}
        tars = {p: info for p, info in found.items() if shard_kind(p) == "tar"}
        if not found:
            raise InputError(f"{raw}: holds no .tar or .parquet shard")
        for p, info in (tars or found).items():  # beside tars, Parquet files are img2dataset's metadata
            yield _shard(fs, p, path.rstrip("/"), info, ask)
        return
    if not shard_kind(path):
        raise InputError(f"{raw}: not a shard (.tar, .tgz, .tar.gz or .parquet)")
    yield _shard(fs, path, posixpath.dirname(path), info, ask)


def _matches(raw: str, fs, pattern: Pattern, ask: Callable) -> Iterator[Shard]:
    """The shards a pattern names (each of its names, a missing one an error row) or matches (those listed)."""
    named = not pattern.has_glob and pattern.count() <= NAMED_LIMIT
    listed = {p: info for p, info in ask(partial(_listing, fs, pattern)).items()
              if pattern.matches(p) and (named or shard_kind(p))}
    if named:
        for name in pattern.names():
            info = listed.get(name) or ask(partial(_info, fs, name))
            yield _shard(fs, name, pattern.root, info, ask) if info else Shard(
                fs, name, _relative(name, pattern.root), error="no such object")
        return
    if not listed:
        raise InputError(f"{raw}: matches no .tar or .parquet shard")
    for path in sorted(listed):
        yield _shard(fs, path, pattern.root, listed[path], ask)


def _listing(fs, pattern: Pattern) -> dict[str, dict]:
    """Path -> info of the files under the pattern's root, as deep as it reaches; none where nothing is there."""
    try:
        return fs.find(pattern.root, maxdepth=pattern.depth, detail=True)
    except FileNotFoundError as err:
        if transient(err):
            raise
        return {}


def _info(fs, path: str) -> dict | None:
    """``fs.info(path)``, or None where nothing is there (fsspec's HTTP says "not found" for a timeout too: that
    one is raised, to be retried)."""
    try:
        return fs.info(path)
    except FileNotFoundError as err:
        if transient(err):
            raise
        return None


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path


def _shard(fs, path: str, root: str, info: dict, ask: Callable) -> Shard:
    """A shard from its listing ``info`` (asked for where the listing lacks its size: an HTTP index page); one
    that is not a regular file (a FIFO, a device, a folder) is an error row at once: opening a FIFO would block."""
    name = _relative(path, root)
    if info.get("size") is None:
        info = ask(partial(fs.info, path))
    if info.get("type", "file") != "file":
        return Shard(fs, path, name, error="not a regular file (a FIFO, device or folder)", error_kind=INPUT)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
    return Shard(fs, path, name, info.get("size"), None if etag is None else str(etag).strip('"'))
