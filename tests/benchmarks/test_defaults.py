"""The defaults bench: the default setting and a grid on the demo model, a folder and shards, head to head."""
import json

from typer.testing import CliRunner

from benchmarks.defaults import app


def test_defaults_bench_compares_the_default_with_the_grid_and_times_the_report(tmp_path):
    out = tmp_path / "defaults.json"
    result = CliRunner().invoke(app, ["--models", "demo", "--demo-images", "8", "--rounds", "1", "--batch-sizes", "4",
                                      "--workers", "1,2", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert set(doc["cases"]) == {"demo/folder", "demo/shards"} and doc["machine"]["isa"]
    for case in doc["cases"].values():
        assert case["images"] == 8 and len(case["grid"]) == 3 and min(g["images_per_s"] for g in case["grid"]) > 0
        assert case["best"]["setting"] != case["default"]["setting"]  # the best of the others
        names = ("batch_size", "workers", "threads")
        assert case["best"]["setting"] in [{k: g[k] for k in names} for g in case["grid"]]
        assert len(case["head_to_head"]) == 2 and min(case["head_to_head"]) > 0
        assert case["default_share_of_best"] == round(case["head_to_head"][0] / case["head_to_head"][1], 3)
        assert len(case["timed_over_untimed"]) == 1 and case["timed_over_untimed"][0] > 0
        assert case["default_bottleneck"] in ("too short", "readers", "cores", "read", "write", "encode", "decode_loop")
    assert "default/best" in result.output
