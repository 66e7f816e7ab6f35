"""sat-eval on crafted per-shard results (issue 26 rows 16 and 20): one-line refusals naming the file, never a
traceback; a small file of many large rows read in bounded memory (a fresh Python's peak beside a control's)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sat_export.cli.eval import app
from sat_export.results.parquet import FORMAT, RECORD_KEY, VERSION
from tests.conftest import one_line_error
from tests.sat_export.pipeline.test_hostile_shards import fresh_python

GRID, T = 14, 6


def crafted_result(path: Path, n_rows: int = 1, shape: list[int] | None = None, drop: str | None = None,
                   settings: object = None) -> Path:
    """A result file as sat-infer writes one (record, columns), with its alphas_shape, a column left out or the
    record's settings replaced; ``n_rows`` copies of one captioned row (``x`` of shard ``s.tar``)."""
    record = {"format": FORMAT, "version": VERSION, "settings": {} if settings is None else settings,
              "source": {"shard": "s.tar", "size": 1, "etag": None}, "alphas": True}
    shape = shape or [T, GRID, GRID]
    alphas = np.full(shape, 1 / GRID**2, np.float16).tobytes()
    row = {"key": "x", "caption": " ".join(["red"] * shape[0]), "tokens": [5] * shape[0], "score": -1.0, "error": None,
           "error_kind": None, "alphas": alphas, "alphas_shape": shape}
    table = pa.Table.from_pylist([row] * n_rows).cast(pa.schema([
        ("key", pa.string()), ("caption", pa.string()), ("tokens", pa.list_(pa.int32())), ("score", pa.float64()),
        ("error", pa.string()), ("error_kind", pa.string()), ("alphas", pa.binary()),
        ("alphas_shape", pa.list_(pa.int32()))]))
    if drop is not None:
        table = table.drop_columns([drop])
    pq.write_table(table.replace_schema_metadata({RECORD_KEY: json.dumps(record)}), path, compression="zstd")
    return path


@pytest.fixture
def refs(tmp_path) -> Path:
    (tmp_path / "captions.txt").write_text("image,caption\nx.jpg,a red square\n")
    return tmp_path / "captions.txt"


# row 16
@pytest.mark.parametrize("crafted, html, words", [
    (dict(drop="error"), False, "no error column"),
    (dict(settings=[1]), False, "its run record's 'settings' is not an object"),
    (dict(shape=[T, 0, 0]), False, f"row 0: alphas_shape [{T}, 0, 0] is not [T, grid, grid]"),
    (dict(shape=[T, 1, 3]), True, f"row 0: alphas_shape [{T}, 1, 3] is not [T, grid, grid]"),
])
def test_sat_eval_refuses_crafted_results_in_one_line_naming_the_file(tmp_path, refs, crafted, html, words):
    path = crafted_result(tmp_path / "r.parquet", **crafted)
    args = ["--pred", str(path), "--refs", str(refs)] + (["--html", str(tmp_path / "r.html")] if html else [])
    line = one_line_error(CliRunner().invoke(app, args), "r.parquet: not a sat-infer result", words)
    assert "Traceback" not in line and not (tmp_path / "r.html").exists()


def test_sat_eval_draws_a_results_alphas_read_row_by_row(tmp_path, refs):
    path = crafted_result(tmp_path / "r.parquet", n_rows=3)
    result = CliRunner().invoke(app, ["--pred", str(path), "--refs", str(refs), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().count("data:image/jpeg;base64,") == 0  # no image file: no overlays
    from sat_export.results.parquet import load_alphas
    assert [load_alphas(f"{path.as_uri()}#{i}").shape for i in (2, 0, 1)] == [(T, GRID, GRID)] * 3  # any order


EVAL = """
import sys
from sat_export.reports.evaluate import evaluate
report = evaluate(sys.argv[1], sys.argv[2])
RESULT = {"rows": report["counts"]["rows"], "scored": report["counts"]["scored"]}
"""


# row 20
def test_sat_eval_reads_a_small_result_of_many_large_rows_in_bounded_memory(tmp_path, refs):
    n_rows = 100_000  # 100,000 x 20 x 14 x 14 alphas: 1.6 GB as float32, 6 KB on disk
    big = crafted_result(tmp_path / "big.parquet", n_rows, shape=[20, GRID, GRID])
    small = crafted_result(tmp_path / "small.parquet", 1, shape=[20, GRID, GRID])
    assert big.stat().st_size < 200_000
    got, control = fresh_python(EVAL, big, refs, timeout=300), fresh_python(EVAL, small, refs)
    assert (got["rows"], got["scored"], control["rows"]) == (n_rows, 1, 1)
    assert got["rss_mb"] - control["rss_mb"] < 250, (got, control)  # +85 MB measured; all alphas at once: > 1,600
