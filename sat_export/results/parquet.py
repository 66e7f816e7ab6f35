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
alphas          binary                  with ``--alphas``: ``(T, grid, grid)`` float16, C order
alphas_shape    list<int32>             ``[T, grid, grid]``
==============  ======================  ===============================================

The file's key-value metadata ``sat_export`` holds the run record (JSON): the settings the rows
depend on (``settings``), the source shard (``source``: ``shard``, ``size``, ``etag``) and whether alphas are
inside (``alphas``). A rerun skips a shard whose result records the same.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sat_export.errors import OutputError
from training.errors import first_line

RECORD_KEY = b"sat_export"
FORMAT = "sat-infer-shard-results"
VERSION = 1
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet")


def result_name(shard: str) -> str:
    """``sub/00000.tar`` -> ``sub/00000.parquet``: where a shard's result goes under the output prefix."""
    lower = shard.lower()
    stem = next((shard[:-len(s)] for s in SHARD_SUFFIXES if lower.endswith(s)), shard)
    return stem + ".parquet"


def result_schema(alphas: bool, record: dict):
    """The Arrow schema of a result file, with ``record`` (the run record) in its metadata."""
    import pyarrow as pa

    fields = [("key", pa.string()), ("caption", pa.string()), ("tokens", pa.list_(pa.int32())),
              ("score", pa.float64()), ("error", pa.string())]
    if alphas:
        fields += [("alphas", pa.binary()), ("alphas_shape", pa.list_(pa.int32()))]
    return pa.schema(fields, metadata={RECORD_KEY: json.dumps({"format": FORMAT, "version": VERSION, **record})})


def columns_of(rows: list[dict], alphas: list[np.ndarray | None] | None) -> dict[str, list]:
    """Rows (``infer.caption_rows``'s) and their ``(T, grid, grid)`` alphas as the schema's columns."""
    cols = {"key": [row.get("key") for row in rows], "caption": [row.get("caption") for row in rows],
            "tokens": [row.get("tokens") for row in rows], "score": [row.get("score") for row in rows],
            "error": [row.get("error") for row in rows]}
    if alphas is not None:
        cols["alphas"] = [None if a is None else a.astype(np.float16).tobytes() for a in alphas]
        cols["alphas_shape"] = [None if a is None else list(a.shape) for a in alphas]
    return cols


@dataclass(frozen=True)
class ResultInfo:
    """What a result file's footer says: its run record, its rows and its error rows."""

    record: dict
    rows: int
    errors: int


def read_info(fs, path: str) -> ResultInfo:
    """The footer of the result at ``path`` on ``fs`` (one small read); ``OutputError`` if it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        record = json.loads((meta.metadata or {}).get(RECORD_KEY, b"null"))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise OutputError(f"{fs.unstrip_protocol(path)}: not a readable sat-infer result ({first_line(err)}); "
                          "left as it is: remove it or choose another --out") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise OutputError(f"{fs.unstrip_protocol(path)}: not a sat-infer result; left as it is: remove it or "
                          "choose another --out")
    error_col = meta.schema.names.index("error")
    errors = sum(meta.row_group(i).num_rows - meta.row_group(i).column(error_col).statistics.null_count
                 for i in range(meta.num_row_groups))
    return ResultInfo(record, meta.num_rows, errors)


def read_results(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Rows of every result file at ``url`` (a file, or a folder/prefix of them), in name order.

    Each row is a ``sat-infer`` JSONL row (``image`` = ``<shard>/<key>``, ``shard``, ``key``,
    ``caption``/``tokens``/``score`` or ``error``) plus ``result``, the file's URL, and ``attention``,
    the ``(T, grid, grid)`` float32 alphas when the file has them.
    """
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
    for file in files:
        try:
            with fs.open(file, "rb") as f:
                table = pq.read_table(f)
        except (pa.ArrowException, OSError) as err:
            raise OutputError(f"{fs.unstrip_protocol(file)}: cannot read results ({first_line(err)})") from None
        record = json.loads((table.schema.metadata or {}).get(RECORD_KEY, b"{}"))
        shard = (record.get("source") or {}).get("shard")
        if shard is None:
            raise OutputError(f"{fs.unstrip_protocol(file)}: not a sat-infer result (no run record)")
        url = fs.unstrip_protocol(file)
        yield from ({**_row(shard, each), "result": url} for each in table.to_pylist())


def _row(shard: str, each: dict) -> dict:
    key = each["key"]
    row = {"image": shard if key is None else f"{shard}/{key}", "shard": shard, "key": key}
    if each["error"] is not None:
        return {**row, "error": each["error"]}
    row.update(caption=each["caption"], tokens=each["tokens"], score=each["score"])
    if each.get("alphas") is not None:
        row["attention"] = np.frombuffer(each["alphas"], np.float16).reshape(each["alphas_shape"]).astype(np.float32)
    return row


def is_results(path: str | Path) -> bool:
    """``path`` names per-shard results: a ``.parquet`` file, a URL, or a folder (JSONL is a file)."""
    text = str(path)
    return text.endswith(".parquet") or "://" in text or Path(text).is_dir()


def alphas_ref(result: str, key: str | None) -> str:
    """Where a row's alphas are inside its result: ``<result URL>#<key>`` (``load_alphas`` reads it)."""
    return f"{result}#{key}"


@lru_cache(maxsize=2)
def _attention(url: str) -> dict[str | None, np.ndarray]:
    return {row["key"]: row["attention"] for row in read_results(url) if "attention" in row}


def load_alphas(ref: str | Path) -> np.ndarray:
    """A row's ``(T, grid, grid)`` alphas: from an ``alphas_ref`` into a Parquet result, or an ``.npz`` file.

    Raises ``OSError``, ``KeyError`` or ``ValueError`` (as ``np.load``) when they cannot be read.
    """
    url, inside, key = str(ref).partition(".parquet#")
    if inside:
        found = _attention(url + ".parquet").get(key)
        if found is None:
            raise KeyError(f"no alphas for {key!r} in {url}.parquet")
        return found
    with np.load(ref) as npz:
        return npz["alphas"]
