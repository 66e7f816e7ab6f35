"""Per-shard Parquet results (``--out DIR/``): the JSONL rows and alphas, one file per shard, published whole,
skipped on a rerun, redone when their source changed or a run was killed in them, refused with other settings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.results.parquet import load_alphas, read_info, read_results
from tests.conftest import one_line_error
from tests.sat_export.pipeline.test_infer import read_rows
from tests.sat_export.pipeline.test_shards import infer, write_image_tars, write_parquet_shards, write_webdataset


def test_compare_per_shard_parquet_results_vs_jsonl_rows_and_alphas_files(tmp_path, tiny_ckpt):
    keys = write_webdataset(tmp_path / "wds", n_shards=2)
    common = ["--model", tiny_ckpt, "--backend", "torch", "--batch-size", "3"]
    infer(tmp_path / "wds", "--out", tmp_path / "c.jsonl", "--alphas", tmp_path / "alphas", *common)
    expected = read_rows(tmp_path / "c.jsonl")
    out = f"{tmp_path}/results/"
    assert "captioned 8, errors 0, already done 0" in infer(tmp_path / "wds", "--out", out, "--alphas", out, *common)
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "_report.json"]  # one file per shard, the run's report
    rows = list(read_results(out))
    assert [row["image"] for row in rows] == keys
    for row in rows:
        want = expected[row["image"]]
        assert {k: row[k] for k in ("shard", "key", "caption", "tokens", "score")} == {
            k: want[k] for k in ("shard", "key", "caption", "tokens", "score")}
        with np.load(tmp_path / want["alphas"]) as npz:
            np.testing.assert_array_equal(load_alphas(row["alphas"]), npz["alphas"].astype(np.float32))  # float16 both
    assert pq.read_schema(f"{out}/00000.parquet").names == ["key", "caption", "tokens", "score", "error", "error_kind",
                                                            "alphas", "alphas_shape"]


def test_a_rerun_skips_done_shards_redoes_a_changed_one_and_refuses_other_settings(tmp_path, tiny_ckpt):
    write_parquet_shards(tmp_path / "pq", n_shards=2)
    out = f"{tmp_path}/results/"
    common = [tmp_path / "pq", "--out", out, "--model", tiny_ckpt, "--backend", "torch"]
    assert "captioned 8, errors 2, already done 0" in infer(*common)
    assert read_info(fsspec.filesystem("file"), f"{out}/00000.parquet").record["settings"]["precision"] == "fp32"
    stamp = os.stat(f"{out}/00000.parquet").st_mtime_ns
    assert "captioned 0, errors 0, already done 10" in infer(*common)
    write_parquet_shards(tmp_path / "new", n_shards=2, failed=0)
    os.replace(tmp_path / "new" / "00001.parquet", tmp_path / "pq" / "00001.parquet")  # another 00001
    assert "captioned 4, errors 1, already done 5" in infer(*common)
    assert os.stat(f"{out}/00000.parquet").st_mtime_ns == stamp
    assert [row.get("error") is not None for row in read_results(f"{out}/00001.parquet")] == [True] + [False] * 4
    result = CliRunner().invoke(app, [*map(str, common), "--beam", "2"])
    assert result.exit_code == 1 and "00000.parquet: its rows were made with other settings (beam 1 -> 2" in \
        result.output
    assert "captioned 8, errors 2, already done 0" in infer(*common, "--beam", "2", "--overwrite")


def test_kill_9_mid_shard_leaves_no_result_for_it_and_the_rerun_redoes_it_whole(tmp_path, tiny_ckpt):
    keys = write_image_tars(tmp_path, n_shards=3, per_shard=80)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "*.tar"), "--out", f"{out}/",
           "--model", str(tiny_ckpt), "--backend", "torch", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "00000.parquet").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard published in 2 minutes"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "00002.parquet").exists(), "the kill came too late"
    shown = infer(*cmd[3:])
    assert "already done 80 " in shown or "already done 160 " in shown, shown  # whole shards only
    rows = list(read_results(f"{out}/"))
    assert sorted(row["image"] for row in rows) == sorted(keys)
    assert sorted(os.listdir(out)) == ["00000.parquet", "00001.parquet", "00002.parquet", "_report.json"]  # no temporary


def test_per_shard_results_need_shard_inputs_and_keep_alphas_inside(tmp_path):
    write_webdataset(tmp_path / "wds", n_shards=1)
    result = CliRunner().invoke(app, [str(tmp_path / "wds"), "--out", f"{tmp_path}/r/", "--alphas",
                                      str(tmp_path / "elsewhere")])
    assert result.exit_code == 1 and "pass --alphas with the same folder as --out" in result.output
    assert not Path(tmp_path / "r").exists()


def test_a_file_at_a_results_place_that_is_not_one_is_refused_and_left_as_it_is(tmp_path):
    write_webdataset(tmp_path / "wds", n_shards=1)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "00000.parquet").write_bytes(b"my own notes")
    result = CliRunner().invoke(app, [str(tmp_path / "wds"), "--out", f"{tmp_path}/r/"])
    one_line_error(result, "00000.parquet: not a sat-infer result (unreadable", "left as it is")
    assert (tmp_path / "r" / "00000.parquet").read_bytes() == b"my own notes"
