"""Parquet shards as samples: read with pyarrow a row group at a time, continued where the store broke off.

- **Image column**: ``--image-column``, else the one binary column but ``key`` (img2dataset's ``jpg``), else the one
  ``{bytes, path}`` struct with binary ``bytes`` (Hugging Face's ``image``), else the one string column named
  like a path or URL (``PATH_COLUMNS``). A column of any other type (numbers, lists) is refused.
- **Keys**: the ``key`` column (img2dataset's) where it holds text, bytes (UTF-8; other bytes kept as
  ``surrogateescape``, as tar member names are) or integers, else the row number; a null key is the row number,
  a repeated one made unique (``SampleKeys``).
- **Values**: bytes are the image. Text is a path or URL, read as ``image_source`` allows: a relative path
  beside the Parquet file on its store, never above it; a URL on the shard's own store (with its
  ``--storage-options``), on the web (``http(s)://``) or on an object store (``REMOTE_SCHEMES``, with its
  standard credentials). Refused, as error rows: absolute paths and ``file://`` (a shard does not choose which
  local files the run reads: caption a folder or a ``.txt`` list for that), ``..``, other schemes
  (``github://``, ``ftp://``...) and chained URLs (``zip://...::``). A remote image is fetched whole
  (``stores.fetch``: timeouts, retries per host, at most ``max_sample_bytes``).
- **Memory**: a row group is read ``BATCH_BYTES`` at a time by its image column's size in the footer (at most
  ``BATCH_ROWS`` rows); a value over ``max_sample_bytes`` is an error row. pyarrow decodes a page whole, so a
  row group whose image column the footer says inflates more than ``max_sample_bytes`` at over ``BOMB_RATIO``
  times its stored size (a decompression bomb: images do not compress) is not read: its rows are error rows.
  (A footer that understates its sizes is not caught.)
- **Damage**: a row group that cannot be read costs its rows, each an error row (keys from its ``key`` column
  where that reads), and the next is read; a file whose footer cannot be read is one error row.
- **Resume**: the position is (row group, rows of it read): after a transient failure the file is opened again
  and that row group read from the row after.
"""
from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

from sat_export.errors import InputError
from sat_export.faults import INPUT, Retrying, error_kind, transient
from sat_export.options import SourceOptions
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.shard_samples import SampleKeys, Shard, resumable, sample_item, shard_error
from sat_export.pipeline.stores import fetch, filesystem, is_url, over_limit, protocols, scheme
from training.errors import first_line

PATH_COLUMNS = ("image", "path", "file", "filename", "filepath", "file_name", "image_path", "url", "image_url")
REMOTE_SCHEMES = ("http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
LOCAL_SCHEMES = ("file", "local")
BATCH_ROWS = 64  # most rows per record batch
BATCH_BYTES = 16 * 2**20  # image bytes per record batch, by the footer's sizes
BOMB_RATIO = 100  # decoded / stored bytes of an image column past which it is a decompression bomb


@contextmanager
def open_parquet(shard: Shard) -> Iterator:
    """``shard`` open as a ``pyarrow.parquet.ParquetFile``, closed (with its file on the store) on leaving."""
    import pyarrow.parquet as pq

    with shard.fs.open(shard.path, "rb") as f, pq.ParquetFile(f) as file:
        yield file


def image_column(schema, column: str | None, where: str) -> str:
    """The column of ``schema`` holding the images (see the module's docstring); ``InputError`` naming the columns
    found when there is none, several, or ``column`` holds no bytes, paths or URLs."""
    import pyarrow as pa

    names = schema.names
    if column is not None:
        if column not in names:
            raise InputError(f"{where}: has no column {column!r}; its columns: {', '.join(names)}")
        if not _holds_images(schema.field(column).type):
            raise InputError(f"{where}: column {column!r} is {schema.field(column).type}, not image bytes, "
                             "paths or URLs")
        return column
    fields = [f for f in schema if f.name != "key"]  # the samples' keys
    binary = [f.name for f in fields if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    structs = [f.name for f in fields if pa.types.is_struct(f.type) and _holds_images(f.type)]
    paths = [f.name for f in fields if _is_text(f.type) and f.name.lower() in PATH_COLUMNS]
    for found in (binary, structs, paths):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    raise InputError(f"{where}: cannot tell which column holds the images (columns: {', '.join(names)}); "
                     "name it with --image-column")


def check_image_column(shards: list[Shard], sources: SourceOptions, retrying: Retrying) -> None:
    """Refuse, before anything runs, an image column the first readable Parquet shard lacks or that holds no
    images (listing its columns), or one that cannot be told without ``--image-column``."""
    import pyarrow as pa

    for shard in shards:
        if shard.kind != "parquet" or shard.error:
            continue
        try:
            schema = retrying.call(partial(_schema, shard), shard.url)
        except (pa.ArrowException, OSError, ValueError):  # an unreadable shard is an error row when its turn comes
            continue
        image_column(schema, sources.image_column, shard.name)
        return


def _schema(shard: Shard):
    with open_parquet(shard) as file:
        return file.schema_arrow


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _holds_images(kind) -> bool:
    """Bytes, text, or a struct whose ``bytes`` field is bytes."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_images(kind.field(index).type) and not pa.types.is_struct(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _is_text(kind)


def _usable_key(kind) -> bool:
    import pyarrow as pa

    return _is_text(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_integer(kind)


def parquet_samples(shard: Shard, sources: SourceOptions, retrying: Retrying) -> Iterator[InputItem]:
    """The samples of a Parquet shard, in order; an unreadable file is one error item named after the shard."""
    import pyarrow as pa

    reader = _ParquetReader(shard, sources, retrying)
    try:
        yield from resumable(shard, retrying, reader.read, (0, 0))
    except InputError as err:
        yield InputItem(None, shard.name, str(err), shard=shard.name, error_kind=INPUT)
    except (pa.ArrowException, OSError, ValueError) as err:
        where = f"after row {reader.rows}" if reader.rows else "at its start"
        yield shard_error(shard, f"cannot read Parquet, broken {where} ({first_line(err)})", error_kind(err))


class _ParquetReader:
    def __init__(self, shard: Shard, sources: SourceOptions, retrying: Retrying):
        self.shard, self.sources, self.retrying = shard, sources, retrying
        self.keys = SampleKeys()
        self.rows = 0  # rows given so far, for the error row

    def read(self, start: tuple[int, int]) -> Iterator[tuple[InputItem, tuple[int, int]]]:
        """The samples from row ``start[1]`` of row group ``start[0]`` on, each with the position after it."""
        first_group, skip = start
        with open_parquet(self.shard) as file:
            schema, meta = file.schema_arrow, file.metadata
            column = image_column(schema, self.sources.image_column, self.shard.name)
            keyed = "key" in schema.names and column != "key" and _usable_key(schema.field("key").type)
            row = sum(meta.row_group(g).num_rows for g in range(first_group))
            for group in range(first_group, meta.num_row_groups):
                for done, item in enumerate(self._group(file, group, column, keyed, row, skip), start=skip + 1):
                    yield item, (group, done)
                row, skip = row + meta.row_group(group).num_rows, 0

    def _group(self, file, group: int, column: str, keyed: bool, first: int, skip: int) -> Iterator[InputItem]:
        """The items of the rows of ``group`` (whose first row is ``first``) after its first ``skip``: samples, or
        error items for rows that are not read (a decompression bomb) or cannot be."""
        import pyarrow as pa

        end = first + file.metadata.row_group(group).num_rows
        stored, decoded = _column_sizes(file.metadata.row_group(group), column)
        if decoded > max(self.sources.max_sample_bytes, BOMB_RATIO * stored):
            message = (f"row group {group} is not read: its column {column!r} inflates {decoded:,} bytes from "
                       f"{stored:,} (a decompression bomb)")
            yield from self._lost(file, group, keyed, first + skip, end, message, INPUT)
            return
        done = skip
        try:
            for key, value in self._rows(file, group, column, keyed, first, skip):
                done += 1
                yield self._item(key, column, value)
        except (pa.ArrowException, OSError, ValueError) as err:
            if transient(err):
                raise
            yield from self._lost(file, group, keyed, first + done, end,
                                  f"row group {group} cannot be read ({first_line(err)})", error_kind(err))

    def _rows(self, file, group: int, column: str, keyed: bool, first: int, skip: int) -> Iterator[tuple[str, object]]:
        """(key, value) of the rows of ``group`` after the first ``skip``; ``first`` is the group's first row."""
        columns = [column, "key"] if keyed else [column]
        row = first
        for batch in file.iter_batches(_batch_rows(file.metadata.row_group(group), column), row_groups=[group],
                                       columns=columns):
            keys = batch.column("key").to_pylist() if keyed else [None] * batch.num_rows
            for key, value in zip(keys, batch.column(column).to_pylist()):
                if row - first >= skip:
                    yield _key(key, row), value
                row += 1

    def _lost(self, file, group: int, keyed: bool, first: int, end: int, message: str,
              kind: str) -> Iterator[InputItem]:
        """An error item for each row ``first``..``end - 1`` of ``group``, whose images cannot be read."""
        import pyarrow as pa

        keys: list = [None] * (end - first)
        if keyed:
            try:
                keys = file.read_row_group(group, columns=["key"]).column("key").to_pylist()[-(end - first):]
            except (pa.ArrowException, OSError, ValueError) as err:  # damaged too: the row numbers stand in
                if transient(err):
                    raise
        for row, key in zip(range(first, end), keys):
            yield self._error(_key(key, row), message, kind)

    def _sample(self, key: str, **what) -> InputItem:
        self.rows += 1
        return sample_item(self.shard, self.keys.unique(key), **what)

    def _error(self, key: str, message: str, kind: str = INPUT) -> InputItem:
        return self._sample(key, error=message, error_kind=kind)

    def _item(self, key: str, column: str, value) -> InputItem:
        if isinstance(value, dict):  # Hugging Face's image struct
            value = value.get("bytes") or value.get("path")
        if not value:
            return self._error(key, f"sample has no image (column {column!r} is empty)")
        limit = self.sources.max_sample_bytes
        if isinstance(value, bytes) and len(value) > limit:
            return self._error(key, over_limit("the image", len(value), limit))
        if isinstance(value, bytes):
            return self._sample(key, data=value)
        if not isinstance(value, str):
            return self._error(key, f"column {column!r} holds {type(value).__name__}, not image bytes, a path or a URL")
        try:
            fs, path = image_source(self.shard, value, self.sources)
        except InputError as err:
            return self._error(key, str(err))
        if fs is None:
            return self._sample(key, path=Path(path))
        return self._sample(key, opener=partial(fetch, fs, path, self.sources, self.retrying))


def _key(value, row: int) -> str:
    if value is None:
        return str(row)
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _column_sizes(group_meta, column: str) -> tuple[int, int]:
    """The bytes ``column`` (all its leaves) takes in a row group, stored and decoded, as the footer says."""
    chunks = [group_meta.column(i) for i in range(group_meta.num_columns)
              if group_meta.column(i).path_in_schema.split(".")[0] == column]
    return sum(c.total_compressed_size for c in chunks), sum(c.total_uncompressed_size for c in chunks)


def _batch_rows(group_meta, column: str) -> int:
    """Rows per record batch of a row group, so that one holds about ``BATCH_BYTES`` of its image column."""
    per_row = max(1, _column_sizes(group_meta, column)[1] // max(1, group_meta.num_rows))
    return max(1, min(BATCH_ROWS, BATCH_BYTES // per_row))


def image_source(shard: Shard, value: str, sources: SourceOptions) -> tuple:
    """Where a Parquet value that is a path or URL is read: ``(None, local path)`` beside a shard on disk, or
    ``(fs, path)``; ``InputError`` saying why it is not read (see the module's docstring)."""
    if "::" in value:
        raise InputError("a chained URL (::) is not read from a Parquet value")
    if is_url(value):
        kind = scheme(value)
        if kind in protocols(shard.fs) and kind not in LOCAL_SCHEMES:  # the shard's own store: its credentials
            return shard.fs, shard.fs._strip_protocol(value)
        if kind not in REMOTE_SCHEMES:
            raise InputError(f"{kind}:// URLs are not read from a Parquet value (only relative paths, the "
                             f"shard's own store and {', '.join(REMOTE_SCHEMES)})")
        return filesystem(value, replace(sources, storage_options={}))  # their standard variables
    relative = posixpath.normpath(value)
    if posixpath.isabs(relative):
        raise InputError("an absolute path is not read from a Parquet value (only paths relative to the shard's "
                         "folder; for local images caption a folder or a .txt list)")
    if relative == ".." or relative.startswith("../"):
        raise InputError("a path that leaves the shard's folder (..) is not read from a Parquet value")
    path = posixpath.join(posixpath.dirname(shard.path), relative)
    return (None, path) if LOCAL_SCHEMES[0] in protocols(shard.fs) else (shard.fs, path)
