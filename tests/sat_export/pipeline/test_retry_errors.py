"""``sat-infer --retry-errors`` (issue 25): the items of io error rows (could not be read) are captioned again,
input error rows (bad bytes) never; JSONL keeps one row per image, per-shard results are redone whole. The summary
line counts both kinds, retries and failed shards; the exit code says whether every item got its row."""
from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.results.parquet import read_results
from tests.sat_export.pipeline.test_hostile_shards import tar_of
from tests.sat_export.pipeline.test_shards import infer, photo


def test_jsonl_retry_errors_redoes_io_rows_only_and_keeps_one_row_per_image(tmp_path, tiny_ckpt):
    (tmp_path / "a.jpg").write_bytes(photo(0, 0))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "list.txt").write_text("a.jpg\nlater.jpg\nbad.jpg\n")  # later.jpg is not there yet: io
    out = tmp_path / "c.jsonl"
    args = [tmp_path / "list.txt", "--out", out, "--model", tiny_ckpt, "--backend", "torch"]
    assert "captioned 1, errors 2, already done 0" in (first := infer(*args))
    assert "error rows io 1, input 1; retries 0; failed shards 0" in first
    rows = {row["image"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert (rows["later.jpg"]["error_kind"], rows["bad.jpg"]["error_kind"]) == ("io", "input")
    (tmp_path / "later.jpg").write_bytes(photo(0, 1))
    assert "captioned 0, errors 0, already done 3" in infer(*args)  # a plain rerun keeps them
    bad_line = next(line for line in out.read_text().splitlines() if '"bad.jpg"' in line)
    assert "captioned 1, errors 0, already done 2" in infer(*args, "--retry-errors")
    lines = out.read_text().splitlines()
    rows = {row["image"]: row for row in map(json.loads, lines)}
    assert len(lines) == 3 and sorted(rows) == ["a.jpg", "bad.jpg", "later.jpg"] and rows["later.jpg"]["caption"]
    assert bad_line in lines  # an input error is never retried
    assert "captioned 0, errors 0, already done 3" in infer(*args, "--retry-errors")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_shard_results_holding_io_rows_are_redone_whole_and_the_others_kept(tmp_path, tiny_ckpt):
    tar_of(tmp_path / "0.tar", [("k.jpg", photo(0, 0)), ("bad.jpg", b"not an image")])
    out = f"{tmp_path}/out/"
    args = [f"{tmp_path}/{{0..1}}.tar", "--out", out, "--model", tiny_ckpt, "--backend", "torch"]
    assert "captioned 1, errors 2, already done 0" in infer(*args)  # 1.tar is missing: its own io row
    assert {row["image"]: row.get("error_kind") for row in read_results(out)} == {
        "0.tar/k": None, "0.tar/bad": "input", "1.tar": "io"}
    kept = os.stat(f"{out}/0.parquet").st_mtime_ns
    tar_of(tmp_path / "1.tar", [("m.jpg", photo(0, 1)), ("n.jpg", photo(0, 2))])
    assert "captioned 2, errors 0, already done 2" in infer(*args, "--retry-errors")
    assert sorted(row["image"] for row in read_results(out)) == ["0.tar/bad", "0.tar/k", "1.tar/m", "1.tar/n"]
    assert os.stat(f"{out}/0.parquet").st_mtime_ns == kept  # its error is an input error: never retried
    assert "captioned 0, errors 0, already done 4" in infer(*args, "--retry-errors")


def test_strict_exits_1_on_error_rows_and_0_without(tmp_path, tiny_ckpt):
    tar_of(tmp_path / "0.tar", [("k.jpg", photo(0, 0))])
    out = f"{tmp_path}/out/"
    args = [str(tmp_path / "0.tar"), "--out", out, "--model", str(tiny_ckpt), "--backend", "torch", "--strict"]
    assert CliRunner().invoke(app, args).exit_code == 0
    tar_of(tmp_path / "1.tar", [("bad.jpg", b"not an image")])
    result = CliRunner().invoke(app, [str(tmp_path / "1.tar"), *args[1:]])
    assert result.exit_code == 1 and "1 file(s) could not be captioned (--strict)" in result.output


def test_failed_shards_make_the_run_fail_naming_them():
    from sat_export.pipeline.infer import Summary

    assert Summary(captioned=3).failure() is None
    failure = Summary(failed_shards=[f"{i:05d}.tar" for i in range(12)]).failure()
    assert failure.startswith("12 shard(s) got no result: 00000.tar, ") and "00009.tar ..." in failure
    assert "00010.tar" not in failure and "failed shards 12" in Summary(failed_shards=["a"] * 12).line("out/", "fp32")
