"""Shard sources: WebDataset ``.tar`` and Parquet files, on disk or behind an fsspec URL, streamed as samples.

A shard input is a URL (``s3://bucket/prefix/``, ``gs://``, ``https://``, ``file://``), a ``.tar``
(``.tgz``, ``.tar.gz``) or ``.parquet`` file, a folder holding such files at its top and no image
anywhere, a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}``) or a glob (``shards/*.parquet``).
A folder that holds both ``.tar`` and ``.parquet`` files is img2dataset's WebDataset output: its Parquet files
are metadata, its tars the shards. A shard's ``name`` is its path relative to the input's root (the
folder, the prefix, or the folder before the first pattern); a sample's row key is ``<shard>/<key>``.

Tars are read with the standard ``tarfile`` in stream mode (``r|*``: one pass, no seeks, gzip
allowed), members grouped into samples as WebDataset does: the key is the member path up to the
first dot of its base name, the rest its extension (``000000001.jpg``, ``.json``, ``.txt``). Parquet
is read with pyarrow, a record batch at a time. Only one sample's bytes are held per item; the
reader pool's bounded read-ahead (``infer.prefetch``) bounds memory.

Nothing here stops a run: a truncated or corrupt tar gives the samples before the damage, then one
error row named after the shard saying where it broke; an unreadable Parquet file, a missing
object, a sample without an image: error rows. A named ``--image-column`` that a Parquet file
lacks is refused up front (``check_image_column``), listing the columns found.
"""
from __future__ import annotations

import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sat_export.errors import InputError
from sat_export.faults import INPUT, error_kind
from sat_export.options import SourceOptions
from sat_export.pipeline.inputs import InputItem
from training.errors import first_line
from training.images import image_suffixes

SHARD_SUFFIXES = {".tar": "tar", ".tgz": "tar", ".tar.gz": "tar", ".parquet": "parquet"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preferred, in this order, when a sample holds several images
PATH_COLUMNS = ("image", "path", "file", "filename", "filepath", "file_name", "image_path", "url", "image_url")
BATCH_ROWS = 64  # Parquet rows read per record batch
BRACES = re.compile(r"\{[^}]*(\.\.|,)[^}]*\}")  # {00000..00999} or {a,b}


@dataclass(frozen=True)
class Shard:
    """One shard: its filesystem and path on it, its name in rows, and its size and etag (the run record's)."""

    fs: Any  # an fsspec filesystem (picklable: Ray ships shards to workers)
    path: str
    name: str
    size: int | None = None
    etag: str | None = None
    error: str | None = None  # why it cannot be read at all (a missing object)

    @property
    def kind(self) -> str:
        return shard_kind(self.path) or "tar"

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)


def shard_kind(name: str) -> str | None:
    """``tar``, ``parquet``, or None for a name that is not a shard's."""
    lower = name.lower()
    return next((kind for suffix, kind in SHARD_SUFFIXES.items() if lower.endswith(suffix)), None)


def is_url(raw: str | Path) -> bool:
    return "://" in str(raw)


def has_pattern(raw: str) -> bool:
    return bool(re.search(r"[*?\[]", raw) or BRACES.search(raw))


def is_shard_input(raw: str | Path) -> bool:
    """A URL, a pattern, a shard file, or a local folder whose top holds shard files and that holds no
    image anywhere (img2dataset's ``files`` output, images in subfolders and metadata Parquet files at
    the top, is an image folder)."""
    text = str(raw)
    if is_url(text) or shard_kind(text):
        return True
    if not os.path.isdir(text):
        return not os.path.lexists(text) and has_pattern(text)  # an image named a[1].jpg is no pattern
    try:
        names = [entry.name for entry in os.scandir(text) if entry.is_file()]
    except OSError:
        return False
    suffixes = image_suffixes()
    return any(shard_kind(n) for n in names) and not any(
        Path(n).suffix.lower() in suffixes for _, _, files in os.walk(text) for n in files)


def filesystem(raw: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs``: the filesystem of ``raw`` (credentials from ``storage_options`` or the
    standard variables, e.g. ``AWS_*`` for s3fs) and the path on it; a missing driver is one line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(raw, **(storage_options or {}))
    except ImportError as err:
        raise InputError(f"{raw}: cannot open this URL ({err}); for s3:// install 'sat-export[s3]'") from None
    except ValueError as err:
        raise InputError(f"{raw}: {err}") from None


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx a00by a01bx ...``: numeric ranges keep the first bound's zero padding."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1))
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def shard_inputs(paths: Iterable[str | Path], sources: SourceOptions = SourceOptions()) -> list[Shard] | None:
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
    shards = find_shards(paths, sources.storage_options)
    check_image_column(shards, sources.image_column)
    return shards


def stream(shards: Iterable[Shard], column: str | None = None) -> Iterator[InputItem]:
    """The samples of every shard, one shard after the other."""
    for shard in shards:
        yield from samples(shard, column)


def find_shards(paths: Iterable[str | Path], storage_options: dict | None = None) -> list[Shard]:
    """Every shard under ``paths``, in order, with unique names.

    Raises ``InputError`` for an input that does not exist, a pattern that matches nothing, a folder
    or prefix with no shards, or two shards with one name.
    """
    shards: dict[str, Shard] = {}
    for raw in map(str, paths):
        fs, path = filesystem(raw, storage_options)
        for shard in _shards_of(raw, fs, path):
            seen = shards.setdefault(shard.name, shard)
            if seen is not shard:
                raise InputError(f"two shards have the name {shard.name!r}: {seen.url} and {shard.url}; "
                                 "caption them in separate runs or pass their common parent")
    return list(shards.values())


def _shards_of(raw: str, fs, path: str) -> Iterator[Shard]:
    if has_pattern(path):
        root = _fixed_root(path)
        if BRACES.search(path):  # braces name shards: a missing one is an error row
            for each in expand_braces(path):
                if fs.exists(each):
                    yield _shard(fs, each, root)
                else:
                    yield Shard(fs, each, posixpath.relpath(each, root), error="no such object")
            return
        found = sorted(p for p in fs.glob(path) if shard_kind(p))
        if not found:
            raise InputError(f"{raw}: matches no .tar or .parquet shard")
        yield from (_shard(fs, p, root) for p in found)
        return
    if not fs.exists(path):
        raise InputError(f"{raw}: no such file, folder or object")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if shard_kind(p))
        tars = [p for p in found if shard_kind(p) == "tar"]
        if not found:
            raise InputError(f"{raw}: holds no .tar or .parquet shard")
        yield from (_shard(fs, p, path.rstrip("/")) for p in tars or found)  # beside tars: img2dataset metadata
        return
    if not shard_kind(path):
        raise InputError(f"{raw}: not a shard (.tar, .tgz, .tar.gz or .parquet)")
    yield _shard(fs, path, posixpath.dirname(path))


def _fixed_root(path: str) -> str:
    """The folder before the first pattern character."""
    first = re.search(r"[*?\[{]", path).start()
    return posixpath.dirname(path[:first])


def _shard(fs, path: str, root: str) -> Shard:
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
    name = posixpath.relpath(path, root) if root else path
    return Shard(fs, path, name, info.get("size"), None if etag is None else str(etag).strip('"'))


def check_image_column(shards: list[Shard], column: str | None) -> None:
    """Refuse, before anything runs, a ``column`` the first readable Parquet shard lacks (listing its
    columns), or a first shard whose image column cannot be told without ``--image-column``."""
    for shard in shards:
        if shard.kind != "parquet" or shard.error:
            continue
        try:
            with _parquet_file(shard) as file:
                schema = file.schema_arrow
        except Exception:  # noqa: BLE001 - an unreadable shard becomes an error row when its turn comes
            continue
        image_column(schema, column, shard.name)
        return


def image_column(schema, column: str | None, where: str) -> str:
    """The column of ``schema`` holding the images: ``column``, else the one binary column, else the one
    ``{bytes, path}`` struct, else the one string column named like a path or URL (``PATH_COLUMNS``)."""
    import pyarrow as pa

    names = schema.names
    if column is not None:
        if column not in names:
            raise InputError(f"{where}: has no column {column!r}; its columns: {', '.join(names)}")
        return column
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    paths = [f.name for f in schema if pa.types.is_string(f.type) and f.name.lower() in PATH_COLUMNS]
    for found in (binary, structs, paths):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    raise InputError(f"{where}: cannot tell which column holds the images (columns: {', '.join(names)}); "
                     "name it with --image-column")


def samples(shard: Shard, column: str | None = None) -> Iterator[InputItem]:
    """The samples of ``shard`` as items (encoded image in ``data``, or a ``path``/``opener`` to it), in
    order; a damaged or missing shard ends with one error item whose key is the shard's name."""
    if shard.error:
        yield InputItem(None, shard.name, f"{shard.name}: {shard.error}", shard=shard.name)
    elif shard.kind == "tar":
        yield from _tar_samples(shard, column)
    else:
        yield from _parquet_samples(shard, column)


def _item(shard: Shard, key: str, **what) -> InputItem:
    return InputItem(what.pop("path", None), f"{shard.name}/{key}", shard=shard.name, sample=key, **what)


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ``dir/000001.seg.png`` -> (``dir/000001``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _tar_samples(shard: Shard, column: str | None) -> Iterator[InputItem]:
    last = None
    try:
        with shard.fs.open(shard.path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile() or posixpath.basename(member.name).startswith("."):
                    continue
                name, ext = split_member(member.name)
                if name != key and key is not None:
                    yield _tar_item(shard, key, members, column)
                    members = {}
                key = name
                members[ext] = tar.extractfile(member).read()
                last = member.name
            if key is not None:
                yield _tar_item(shard, key, members, column)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        where = f"after {last}" if last else "at its start"
        yield InputItem(None, shard.name, f"{shard.name}: truncated or corrupt tar, broken {where} ({first_line(err)})",
                        shard=shard.name, error_kind=error_kind(err))


def _tar_item(shard: Shard, key: str, members: dict[str, bytes], column: str | None) -> InputItem:
    suffixes = image_suffixes()
    images = [ext for ext in members if "." + ext.rsplit(".", 1)[-1] in suffixes]
    if column is not None:
        images = [column] if column in members else []
    if not images:
        what = f"no {column!r} member" if column else "no image member"
        return _item(shard, key, error=f"sample has {what} (members: {', '.join(sorted(members)) or 'none'})",
                     error_kind=INPUT)
    ext = min(images, key=lambda e: IMAGE_EXTS.index(e) if e in IMAGE_EXTS else len(IMAGE_EXTS))
    return _item(shard, key, data=members[ext])


@contextmanager
def _parquet_file(shard: Shard) -> Iterator:
    """``shard`` open as a ``pyarrow.parquet.ParquetFile``, closed (with its file on the store) on leaving."""
    import pyarrow.parquet as pq

    with shard.fs.open(shard.path, "rb") as f, pq.ParquetFile(f) as file:
        yield file


def _parquet_samples(shard: Shard, column: str | None) -> Iterator[InputItem]:
    import pyarrow as pa

    row = 0
    try:
        with _parquet_file(shard) as file:
            name = image_column(file.schema_arrow, column, shard.name)
            keyed = "key" in file.schema_arrow.names
            for batch in file.iter_batches(BATCH_ROWS, columns=[name, "key"] if keyed and name != "key" else [name]):
                keys = batch.column("key").to_pylist() if keyed else range(row, row + batch.num_rows)
                for key, value in zip(keys, batch.column(name).to_pylist()):
                    yield _parquet_item(shard, str(row if key is None else key), name, value)
                    row += 1
    except InputError as err:
        yield InputItem(None, shard.name, str(err), shard=shard.name, error_kind=INPUT)
    except (pa.ArrowException, OSError, ValueError) as err:
        where = f"after row {row}" if row else "at its start"
        yield InputItem(None, shard.name, f"{shard.name}: cannot read Parquet, broken {where} ({first_line(err)})",
                        shard=shard.name, error_kind=error_kind(err))


def _parquet_item(shard: Shard, key: str, column: str, value) -> InputItem:
    if isinstance(value, dict):  # Hugging Face's image struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return _item(shard, key, data=value)
    if not value:
        return _item(shard, key, error=f"sample has no image (column {column!r} is empty)", error_kind=INPUT)
    if is_url(value) and value.partition("://")[0] not in protocols(shard.fs):
        try:
            fs, path = filesystem(value)  # another store: credentials from its standard variables
        except InputError as err:
            return _item(shard, key, error=str(err))
        return _item(shard, key, opener=partial(fs.open, path, "rb"))
    if is_url(value):  # the shard's own store: its credentials (--storage-options)
        path = shard.fs._strip_protocol(value)
    else:
        path = value if posixpath.isabs(value) else posixpath.join(posixpath.dirname(shard.path), value)
    if "file" in protocols(shard.fs):
        return _item(shard, key, path=Path(path))
    return _item(shard, key, opener=partial(shard.fs.open, path, "rb"))


def protocols(fs) -> tuple[str, ...]:
    """The URL schemes an fsspec filesystem answers to (``("file", "local")``, ``("s3", "s3a")``...)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
