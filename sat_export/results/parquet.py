"""Per-shard Parquet results: the schema ``sat-infer SHARDS --out DIR/`` writes, and their reader.

One file per input shard, ``DIR/<shard name less its suffix>.parquet``, one row per sample:

==============  ======================  ===============================================
column          type                    value
==============  ======================  ===============================================
key             string                  the sample's key in its shard (null: the shard's own error row)
caption         string                  null in an error row
tokens          list<int32>             the caption's token ids
score           float64                 its log-probability (rounded as JSONL rows are)
error           string                  why there is no caption; null otherwise
error_kind      string                  an error row's kind: ``input`` (bad bytes) or ``io`` (could not be read)
alphas          binary                  with ``--alphas``: ``(T, grid, grid)`` float16, C order
alphas_shape    list<int32>             ``[T, grid, grid]``
==============  ======================  ===============================================

The file's key-value metadata ``sat_export`` holds the run record (JSON): the settings the rows
depend on (``settings``), the source shard (``source``: ``shard``, ``size``, ``etag``) and whether alphas are
inside (``alphas``). A rerun skips a shard whose result records the same.

Text is UTF-8: a key (or an error naming it) from a tar member name that is not valid UTF-8 holds lone
surrogates (PEP 383, ``surrogateescape``); each is written as the six characters ``\\udcXY`` (XY the
original byte), the text a JSONL row's line holds for it. Results written before ``error_kind`` existed lack
that column.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from sat_export.errors import OutputError
from sat_export.faults import IO, transient
from sat_export.results.paths import confined_parts
from training.errors import first_line

RECORD_KEY = b"sat_export"
FORMAT = "sat-infer-shard-results"
VERSION = 1
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet")


def result_name(shard: str) -> str:
    """``sub/00000.tar`` -> ``sub/00000.parquet``: where a shard's result goes under the output prefix, confined
    to it (``paths.confined_parts``: ``../x.tar`` -> ``__/x.parquet``, ``/abs/x.tar`` -> ``abs/x.parquet``)."""
    name = "/".join(confined_parts(shard))
    lower = name.lower()
    stem = next((name[:-len(s)] for s in SHARD_SUFFIXES if lower.endswith(s)), name)
    return stem + ".parquet"


def result_schema(alphas: bool, record: dict):
    """The Arrow schema of a result file, with ``record`` (the run record) in its metadata."""
    import pyarrow as pa

    fields = [("key", pa.string()), ("caption", pa.string()), ("tokens", pa.list_(pa.int32())),
              ("score", pa.float64()), ("error", pa.string()), ("error_kind", pa.string())]
    if alphas:
        fields += [("alphas", pa.binary()), ("alphas_shape", pa.list_(pa.int32()))]
    return pa.schema(fields, metadata={RECORD_KEY: json.dumps({"format": FORMAT, "version": VERSION, **record})})


def utf8(text: str | None) -> str | None:
    """``text`` with each lone surrogate (an undecodable name byte) as its ``\\udcXY`` escape: valid UTF-8."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def columns_of(rows: list[dict], alphas: list[np.ndarray | None] | None) -> dict[str, list]:
    """Rows (``infer.caption_rows``'s) and their ``(T, grid, grid)`` alphas as the schema's columns."""
    cols = {"key": [utf8(row.get("key")) for row in rows], "caption": [row.get("caption") for row in rows],
            "tokens": [row.get("tokens") for row in rows], "score": [row.get("score") for row in rows],
            "error": [utf8(row.get("error")) for row in rows], "error_kind": [row.get("error_kind") for row in rows]}
    if alphas is not None:
        cols["alphas"] = [None if a is None else a.astype(np.float16).tobytes() for a in alphas]
        cols["alphas_shape"] = [None if a is None else list(a.shape) for a in alphas]
    return cols


def not_a_result(url: str, why: str, hint: str = "") -> OutputError:
    return OutputError(f"{url}: not a sat-infer result ({why}){hint}")


def result_record(url: str, schema, hint: str = "") -> dict:
    """The run record of the result file at ``url`` whose Arrow schema is ``schema``, checked with its columns.

    Raises ``OutputError`` (``not_a_result``, ``hint`` appended) naming ``url`` and what is wrong: no record, a
    record whose ``settings`` or ``source`` is not an object, a column missing or of another type.
    """
    try:
        record = json.loads((schema.metadata or {}).get(RECORD_KEY, b"null"))
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise not_a_result(url, "no sat-infer run record", hint)
    for key, kind, name in (("settings", dict, "an object"), ("source", dict, "an object"),
                            ("alphas", bool, "a boolean")):
        if not isinstance(record.get(key), kind):
            raise not_a_result(url, f"its run record's {key!r} is not {name}", hint)
    if not isinstance(record["source"].get("shard"), str):
        raise not_a_result(url, "its run record names no source shard", hint)
    for field in result_schema(record["alphas"], {}):
        i = schema.get_field_index(field.name)
        if i < 0 and field.name == "error_kind":
            continue  # written before error rows had a kind
        if i < 0 or schema.field(i).type != field.type:
            raise not_a_result(url, f"no {field.name} column of type {field.type}", hint)
    return record


@dataclass(frozen=True)
class ResultInfo:
    """What a result file's footer says: its run record, its rows and its error rows (and, where asked for, its
    ``io`` error rows, which ``--retry-errors`` redoes; else None)."""

    record: dict
    rows: int
    errors: int
    io_errors: int | None = None


OUT_HINT = "; left as it is: remove it or choose another --out"


def read_info(fs, path: str, count_io: bool = False) -> ResultInfo:
    """The footer of the result at ``path`` on ``fs`` (one small read; with ``count_io``, its ``error_kind``
    column too). A transient failure of the store propagates as it is (the caller retries it).

    Raises ``OutputError`` in one line naming the file when it is not a sat-infer result: unreadable, no run record
    or one whose ``settings`` is not an object, a column missing, no null counts in its column statistics.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    url = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            meta, record = parquet.metadata, result_record(url, parquet.schema_arrow, OUT_HINT)
            kinds = (parquet.read(columns=["error_kind"]).column(0)
                     if count_io and "error_kind" in parquet.schema_arrow.names else None)
    except (pa.ArrowException, OSError, ValueError) as err:
        if transient(err):
            raise
        raise not_a_result(url, f"unreadable: {first_line(err)}", OUT_HINT) from None
    column = meta.schema.to_arrow_schema().get_field_index("error")
    errors = 0
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_null_count:
            raise not_a_result(url, "no null counts in its column statistics", OUT_HINT)
        errors += meta.row_group(i).num_rows - stats.null_count
    io_errors = None if not count_io else 0 if kinds is None else pc.sum(pc.equal(kinds, IO)).as_py() or 0
    return ResultInfo(record, meta.num_rows, errors, io_errors)


BATCH_ROWS = 1024  # rows of a result read at a time: memory is bounded by a batch's, not the file's


def _files(url: str, storage_options: dict | None) -> tuple[Any, list[str]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]


def read_results(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Rows of every result file at ``url`` (a file, or a folder/prefix of them), in name order, read a batch
    of ``BATCH_ROWS`` at a time (the alphas are not read: ``load_alphas`` reads one row's).

    Each row is a ``sat-infer`` JSONL row (``image`` = ``<shard>/<key>``, ``shard``, ``key``,
    ``caption``/``tokens``/``score`` or ``error`` and ``error_kind``) plus ``result``, the file's URL, and,
    when the file has them, ``alphas``: ``alphas_ref`` of the row's attention.

    Raises ``OutputError`` in one line naming the file when it cannot be read or is not a sat-infer result
    (``result_record``; an ``alphas_shape`` that is not ``[T, grid, grid]`` for the row's T tokens).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, files = _files(url, storage_options)
    for file in files:
        url = fs.unstrip_protocol(file)
        try:
            with fs.open(file, "rb") as f:
                parquet = pq.ParquetFile(f)
                shard = result_record(url, parquet.schema_arrow)["source"]["shard"]
                columns = [name for name in parquet.schema_arrow.names if name != "alphas"]
                number = 0
                for batch in parquet.iter_batches(BATCH_ROWS, columns=columns):
                    for each in batch.to_pylist():
                        yield {**_row(url, shard, each, number), "result": url}
                        number += 1
        except (pa.ArrowException, OSError) as err:
            raise OutputError(f"{url}: cannot read results ({first_line(err)})") from None


def _row(url: str, shard: str, each: dict, number: int) -> dict:
    key = each["key"]
    row = {"image": shard if key is None else f"{shard}/{key}", "shard": shard, "key": key}
    if each["error"] is not None:
        return {**row, "error": each["error"], "error_kind": each.get("error_kind") or IO}
    row.update(caption=each["caption"], tokens=each["tokens"], score=each["score"])
    shape = each.get("alphas_shape")
    if shape is not None:
        n_tokens = len(each["tokens"] or ())
        if len(shape) != 3 or shape[0] != n_tokens or shape[1] != shape[2] or shape[1] < 1:
            raise not_a_result(url, f"row {number}: alphas_shape {shape} is not [T, grid, grid] for its "
                               f"{n_tokens} tokens")
        row["alphas"] = alphas_ref(url, number)
    return row


def is_results(path: str | Path) -> bool:
    """``path`` names per-shard results: a ``.parquet`` file, a URL, or a folder (JSONL is a file)."""
    text = str(path)
    return text.endswith(".parquet") or "://" in text or Path(text).is_dir()


def alphas_ref(result: str, number: int) -> str:
    """Where a row's alphas are: ``<result URL>#<row number in the file>`` (``load_alphas`` reads it)."""
    return f"{result}#{number}"


class _Attention:
    """The alphas of one result file read forward a batch at a time: row n's without the whole file's."""

    def __init__(self, url: str):
        self.url = url
        self._restart()

    def _restart(self) -> None:
        import fsspec
        import pyarrow.parquet as pq

        self._file = fsspec.open(self.url, "rb").open()
        self._batches = pq.ParquetFile(self._file).iter_batches(BATCH_ROWS, columns=["alphas", "alphas_shape"])
        self.start, self.batch = 0, None

    def row(self, number: int) -> np.ndarray:
        if number < self.start:
            self._file.close()
            self._restart()
        while self.batch is None or number >= self.start + self.batch.num_rows:
            self.start += 0 if self.batch is None else self.batch.num_rows
            self.batch = next(self._batches, None)
            if self.batch is None:
                raise KeyError(f"{self.url}: no row {number}")
        i = number - self.start
        raw, shape = self.batch.column(0)[i].as_py(), self.batch.column(1)[i].as_py()
        if raw is None or shape is None:
            raise KeyError(f"{self.url}: no alphas in row {number}")
        return np.frombuffer(raw, np.float16).reshape(shape).astype(np.float32)  # (T, grid, grid)


@lru_cache(maxsize=2)
def _attention(url: str) -> _Attention:
    return _Attention(url)


def load_alphas(ref: str | Path) -> np.ndarray:
    """A row's ``(T, grid, grid)`` alphas: from an ``alphas_ref`` into a Parquet result, or an ``.npz`` file.
    Rows of a result read in order cost one pass over its alphas, a batch at a time.

    Raises ``OSError``, ``KeyError`` or ``ValueError`` (as ``np.load``) when they cannot be read.
    """
    url, inside, number = str(ref).rpartition(".parquet#")
    if inside:
        return _attention(url + ".parquet").row(int(number))
    with np.load(ref) as npz:
        return npz["alphas"]
