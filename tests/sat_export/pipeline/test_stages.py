"""The stage report of real runs: where it is written, shares in [0, 1], and the bottleneck named when the
readers or the model are made slow."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from sat_export.options import InferOptions
from sat_export.pipeline.infer import open_for_readers, plan, run
from sat_export.pipeline.stages import STAGES, StageTimes, TimedFile, stage_report
from tests.conftest import tiny_model
from tests.sat_export.pipeline.test_infer import read_rows, write_images
from tests.sat_export.pipeline.test_shards import infer, write_image_tars
from training.checkpoint import save_checkpoint
from training.options import DecodeOptions


def assert_shares(report: dict) -> None:
    """Every share of ``report`` is in [0, 1] and the bottleneck is named with advice."""
    shares = [stage["busy"] for stage in report["stages"].values()]
    shares += [report["readers"]["busy"], report["readers"]["idle"], report["model"]["busy"],
               report["model"]["idle"], report["model"]["waited_for_images"]]
    assert all(0.0 <= share <= 1.0 for share in shares), report
    assert set(report["stages"]) == set(STAGES)
    assert report["bottleneck"] and report["advice"]


def test_a_jsonl_run_prints_its_report_and_writes_it_beside_the_output_or_where_asked(tmp_path, tiny_ckpt):
    write_images(tmp_path / "in", 12)
    out = tmp_path / "c.jsonl"
    output = infer(tmp_path / "in", "--out", out, "--model", tiny_ckpt, "--backend", "torch", "--batch-size", 4)
    record = json.loads((tmp_path / "c.jsonl.report.json").read_text())
    assert record["captioned"] == 12 and record["stages"]["workers"] >= 1
    assert_shares(record["stages"])
    stages = record["stages"]["stages"]
    assert stages["decode_image"]["seconds"] > 0 and stages["encode"]["seconds"] > 0
    assert "bottleneck: " in output and "busy: read " in output
    assert len(read_rows(out)) == 12  # the report is not a row
    infer(tmp_path / "in", "--out", tmp_path / "d.jsonl", "--model", tiny_ckpt, "--backend", "torch",
          "--report", tmp_path / "mine.json")
    assert json.loads((tmp_path / "mine.json").read_text())["captioned"] == 12
    assert not (tmp_path / "d.jsonl.report.json").exists()


def test_per_shard_results_keep_the_report_apart_and_a_rerun_resumes_beside_it(tmp_path, tiny_ckpt):
    (tmp_path / "shards").mkdir()
    write_image_tars(tmp_path / "shards", 2, 6)
    out = tmp_path / "results"
    infer(tmp_path / "shards", "--out", f"{out}/", "--model", tiny_ckpt, "--backend", "torch", "--batch-size", 4)
    record = json.loads((out / "_report.json").read_text())
    assert record["captioned"] == 12
    assert_shares(record["stages"])
    assert record["stages"]["stages"]["read"]["thread"] == "model"  # a shard's samples come from its stream
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    again = infer(tmp_path / "shards", "--out", f"{out}/", "--model", tiny_ckpt, "--backend", "torch")
    assert "already done 12" in again


def test_slow_readers_are_named_the_bottleneck(tmp_path, tiny_ckpt):
    """One reader decoding large PNGs for a millisecond model: the readers hold the run back."""
    rng = np.random.default_rng(0)
    (tmp_path / "big").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (1600, 1600, 3), dtype=np.uint8)).save(tmp_path / "big" / f"{i}.png",
                                                                               compress_level=1)
    with open_for_readers(tiny_ckpt, "torch", workers=1) as engine, \
            plan([tmp_path / "big"], tmp_path / "c.jsonl") as work:
        report = run(engine, work, InferOptions(batch_size=2, workers=1)).report
    assert_shares(report)
    assert report["bottleneck"] == "readers", report
    assert report["readers"]["busy"] >= 0.85 and "raise --workers (now 1)" in report["advice"]


def test_a_slow_model_is_named_the_bottleneck(tmp_path, vocab):
    """A wide decoder searching 6 beams over 16-px JPEGs: the decode loop holds the run back."""
    ckpt = save_checkpoint(tmp_path / "wide.pth", tiny_model(dec_dim=768, att_dim=256, emb_dim=128), vocab, {})
    (tmp_path / "small").mkdir()
    for i in range(24):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "small" / f"{i}.jpg")
    options = InferOptions(batch_size=8, workers=2, decode=DecodeOptions(beam=6, max_len=30))
    with open_for_readers(ckpt, "torch", workers=2) as engine, plan([tmp_path / "small"], tmp_path / "c.jsonl") as work:
        report = run(engine, work, options).report
    assert_shares(report)
    assert report["bottleneck"] == "decode_loop", report
    assert report["model"]["busy"] > report["readers"]["busy"]


def test_a_timed_file_counts_its_reads_and_a_disabled_timer_counts_nothing():
    f = TimedFile(io.BytesIO(b"x" * 10), opened_in=0.5)
    assert f.read(4) == b"xxxx" and f.seek(0) == 0 and f.read() == b"x" * 10
    assert f.seconds > 0.5
    off = StageTimes(enabled=False)
    with off.timed("encode"):
        pass
    assert list(off.inputs([1, 2])) == [1, 2] and off.seconds["encode"] == 0.0 and off.input == 0.0


def test_report_of_an_empty_run_has_zero_shares():
    report = stage_report(StageTimes(), 0.0, 2, 1)
    assert_shares(report)
    assert all(stage["busy"] == 0.0 for stage in report["stages"].values())


def test_a_run_that_was_mostly_its_first_batch_is_too_short_to_judge(tmp_path, tiny_ckpt):
    """Three large PNGs in one batch: the run is the wait for them, then one fast batch."""
    (tmp_path / "in").mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "in" / f"{i}.png", compress_level=1)
    with open_for_readers(tiny_ckpt, "torch", workers=1) as engine, \
            plan([tmp_path / "in"], tmp_path / "c.jsonl") as work:
        report = run(engine, work, InferOptions(batch_size=8, workers=1)).report
    assert_shares(report)
    assert report["bottleneck"] == "too short" and report["model"]["first_batch_s"] > report["wall_s"] / 2, report


def test_the_report_never_follows_a_link_and_one_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path,
                                                                                                 tiny_ckpt):
    write_images(tmp_path / "in", 4)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "c.jsonl.report.json").symlink_to(victim)
    infer(tmp_path / "in", "--out", tmp_path / "c.jsonl", "--model", tiny_ckpt, "--backend", "torch")
    assert victim.read_text() == "keep me"
    assert json.loads((tmp_path / "c.jsonl.report.json").read_text())["captioned"] == 4  # a file of its own now
    output = infer(tmp_path / "in", "--out", tmp_path / "d.jsonl", "--model", tiny_ckpt, "--backend", "torch",
                   "--report", tmp_path / "no-such-folder" / "r.json")  # exit 0 is asserted by infer
    assert "warning: " in output and "the run's report was not written" in output
    assert len(read_rows(tmp_path / "d.jsonl")) == 4
