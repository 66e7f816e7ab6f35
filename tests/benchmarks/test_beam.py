"""benchmarks.beam: greedy and beam-k timed in one run under each load, which it starts and stops itself."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.beam import app, load


def test_a_load_runs_only_inside_its_block():
    with load("none") as none:
        assert none is None
    for kind in ("spin", "copy"):
        with load(kind) as proc:
            assert proc.poll() is None  # running
        assert proc.poll() is not None  # stopped by its pid


def test_beam_bench_times_greedy_and_beam_under_each_load_and_writes_the_ratios(tmp_path, tiny_ckpt,
                                                                                 copy_instead_of_export):
    from training.shapes import make_shapes

    images = make_shapes(tmp_path / "shapes", 6, size=64) / "images"
    out = tmp_path / "beam.json"
    result = CliRunner().invoke(app, ["--ckpt", str(tiny_ckpt), "--images", str(images), "--config", "ort-fp32",
                                      "--batch", "4", "--beam", "3", "--max-len", "6", "--repeats", "2",
                                      "--load", "none,spin", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu"] and doc["machine"]["isa"] and list(doc["loads"]) == ["none", "spin"]
    for measured in doc["loads"].values():
        greedy, beam = measured["greedy"], measured["beam3"]
        assert len(greedy["runs_ms"]) == len(beam["runs_ms"]) == 2
        assert 0 < greedy["step_ms"] <= greedy["decode_ms"] and 0 < beam["step_ms"] <= beam["decode_ms"]
        assert measured["ratios"]["decode_per_beam"] == round(beam["decode_ms"] / (3 * greedy["decode_ms"]), 3)
        assert measured["ratios"]["images_per_s"] == round(beam["images_per_s"] / greedy["images_per_s"], 3)
        encoder = np.median([r["encoder"] for mode in (greedy, beam) for r in mode["runs_ms"]])
        decode = [np.median([r["decode"] for r in mode["runs_ms"]]) for mode in (greedy, beam)]
        pooled = (encoder + decode[0]) / (encoder + decode[1])
        assert measured["ratios"]["images_per_s_pooled_encoder"] == pytest.approx(pooled, abs=2e-3)
    assert "beam 3 vs greedy" in result.output and "img/s ratio" in result.output
