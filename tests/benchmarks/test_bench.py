"""sat-bench: every configuration gets a row with a status; the verdict compares the right rows."""
import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

import benchmarks.configs
import sat_export.bundler.builder
from benchmarks.cli import app
from benchmarks.configs import CONFIGS
from benchmarks.prepare import Int8Options, Recipe, reference_model
from benchmarks.report import verdict
from sat_export.cli.common import console
from tests.conftest import bench_row, fake_cpu, fake_verdict, has_openvino
from training.shapes import make_shapes


@pytest.fixture
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 8, size=64) / "images"


def break_runtime(monkeypatch, broken: str) -> None:
    """Every bench row of the runtime ``broken`` fails to open with ``RuntimeError: boom``."""
    real_open = benchmarks.configs.open_backend

    def open_backend(model, runtime, *args, **kwargs):
        if runtime == broken:
            raise RuntimeError("boom")
        return real_open(model, runtime, *args, **kwargs)

    monkeypatch.setattr(benchmarks.configs, "open_backend", open_backend)


def test_quick_bench_has_a_row_with_a_status_for_every_configuration(tmp_path, tiny_ckpt, tiny_bundle, shapes,
                                                                        monkeypatch):
    def copy_graphs(model, out_dir, precision="fp32", opset=18):  # the tiny bundle's graphs: same model
        out_dir.mkdir(parents=True, exist_ok=True)
        return {g: shutil.copy(tiny_bundle / f"{g}.onnx", out_dir / f"{g}.onnx") for g in ("encoder", "decoder_step")}

    monkeypatch.setattr(sat_export.bundler.builder, "export_onnx", copy_graphs)
    break_runtime(monkeypatch, "tensorrt")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["--quick", "--ckpt", str(tiny_ckpt), "--images", str(shapes), "--calib-method",
                                      "minmax", "--cache",
                                      str(tmp_path / "cache"), "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    assert list(rows) == [c.key for c in CONFIGS]
    assert all(r["status"] for r in rows.values())
    for key in ("torch-fp32", "torch-channels-last", "torch-bf16", "ort-fp32", "ort-int8", "ort-fp16"):
        assert rows[key]["status"] == "ok", rows[key]
        assert set(rows[key]["batches"]) == {"1", "4"}
        # a row emulated on this CPU (bf16 without avx512_bf16/AMX) is timed in the first round only
        assert len(rows[key]["batches"]["4"]["runs_ms"]) == (1 if rows[key]["emulated"] else 2), rows[key]
        assert rows[key]["agreement_images"] == (doc["images"]["timing_images"] if rows[key]["emulated"] else 8)
    assert rows["torch-fp32"]["agreement"] == 1.0 and rows["ort-fp32"]["agreement"] == 1.0
    assert rows["torch-fp32"]["accuracy"]["faithful"] and rows["ort-fp32"]["accuracy"]["faithful"]
    assert doc["images"]["references"] == "eager's captions"  # --ckpt without --refs
    assert doc["machine"]["isa"] and doc["machine"]["cpu_features"]["capability"]
    assert rows["torch-compile"]["status"].startswith("skipped: --quick")
    if not doc["machine"]["gpu"]:
        assert rows["trt-fp16"]["status"].startswith("unavailable")
    assert doc["summary"]["batch"] == 4 and doc["images"]["n"] == 8
    assert doc["libraries"]["onnxruntime"] and doc["model"]["source"] == "--ckpt"
    ov = {key: rows[key]["status"] for key in ("ov-fp32", "ov-bf16", "ov-int8")}
    if not has_openvino():
        assert set(ov.values()) == {"unavailable: OpenVINO is not installed: pip install 'sat-export[openvino]'"}
        return
    assert ov["ov-fp32"] == ov["ov-int8"] == "ok" and rows["ov-fp32"]["agreement"] == 1.0
    assert doc["model"]["openvino_int8"]["verdict"]["images"] == 4  # 8 calibration images, half held back
    if rows["ov-bf16"]["emulated"]:
        assert ov["ov-bf16"].startswith("unavailable: bf16 would be emulated on this CPU")
    else:
        assert ov["ov-bf16"] == "ok" and rows["ov-bf16"]["accuracy"] is not None


def test_a_configuration_that_fails_gets_its_error_and_the_others_go_on(tmp_path, tiny_ckpt, tiny_bundle, shapes,
                                                                         monkeypatch):
    from benchmarks.bench import run_bench
    from benchmarks.options import BenchOptions
    from benchmarks.prepare import BenchModel

    break_runtime(monkeypatch, "onnxruntime")
    model = BenchModel(tiny_ckpt, tiny_bundle, sorted(shapes.glob("*.jpg")))
    result = run_bench(model, BenchOptions(batch_sizes=(2,), repeats=1, keys=("ort-fp32", "torch-channels-last")),
                       console)
    status = {r.config.key: r.status for r in result.rows}
    assert status == {"torch-fp32": "ok", "torch-channels-last": "ok",
                      "ort-fp32": "error while opening: RuntimeError: boom"}
    assert all(len(r.timings[2]) == 1 for r in result.rows if r.ok)


def test_without_openvino_its_rows_say_how_to_install_it_and_the_others_go_on(tiny_ckpt, tiny_bundle, shapes,
                                                                              monkeypatch):
    from benchmarks.bench import run_bench
    from benchmarks.options import BenchOptions
    from benchmarks.prepare import BenchModel

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError, installed or not
    model = BenchModel(tiny_ckpt, tiny_bundle, sorted(shapes.glob("*.jpg")))
    result = run_bench(model, BenchOptions(batch_sizes=(2,), repeats=1, keys=("ov-fp32", "ov-int8", "ort-fp32")),
                       console)
    status = {r.config.key: r.status for r in result.rows}
    missing = "unavailable: OpenVINO is not installed: pip install 'sat-export[openvino]'"
    assert status == {"torch-fp32": "ok", "ort-fp32": "ok", "ov-fp32": missing, "ov-int8": missing}


def test_verdict_takes_the_fastest_faithful_configuration_and_the_fastest_torch_option():
    rows = [bench_row("torch-fp32", "torch", 1000, 1.0, True), bench_row("torch-bf16", "torch", 400, 0.9, True),
            bench_row("ort-fp32", "onnxruntime", 600, 1.0, True),
            bench_row("ort-int8", "onnxruntime", 200, 0.9, True),  # other words, no worse: faithful
            bench_row("fast-but-wrong", "onnxruntime", 50, 0.95, False)]
    v = verdict(rows, 32)
    assert v["fastest_faithful"] == "ort-int8" and v["speedup_vs_eager"] == 5.0
    assert v["best_torch"] == "torch-bf16" and v["speedup_vs_best_torch"] == 2.0
    assert v["ort_fp32_speedup_vs_eager"] == 1.67 and v["ort_fp32_identical"]
    assert v["rule"].startswith("BLEU-4 and CIDEr-D >= 99% of eager fp32's on 500 images") and not v["emulated"]


@pytest.mark.slow
def test_reference_model_is_prepared_once_then_read_from_the_cache(tmp_path):
    recipe = Recipe(backbone="mobilenet_v3_small_s16", image_size=64, n_train=24, n_calib=8, n_test=4, grid=4,
                    phases=((72, 64, 1, True),), batch_size=12)
    first = reference_model(recipe, Int8Options("minmax"), tmp_path, console)
    assert first.info["training"]["phases"][0]["steps"] >= 1 and first.info["bundle_built_s"] is not None
    assert len(first.images) == 4 and set(first.references) == {p.name for p in first.images}
    second = reference_model(recipe, Int8Options("minmax"), tmp_path, console)
    assert second.info["bundle_built_s"] is None and second.info["int8_search"]["method"] == "minmax"
    assert second.info["checkpoint_sha256"] == first.info["checkpoint_sha256"]


def test_a_row_this_cpu_only_emulates_is_marked_timed_once_and_not_judged(tmp_path, tiny_ckpt, tiny_bundle, shapes,
                                                                          monkeypatch):
    from benchmarks.bench import run_bench
    from benchmarks.options import BenchOptions
    from benchmarks.prepare import BenchModel
    from benchmarks.report import document

    no_bf16 = fake_cpu()
    monkeypatch.setattr(benchmarks.configs, "cpu_info", lambda: no_bf16)
    model = BenchModel(tiny_ckpt, tiny_bundle, sorted(shapes.glob("*.jpg")))
    result = run_bench(model, BenchOptions(batch_sizes=(2,), repeats=3, timing_images=4, keys=("torch-bf16",)),
                       console)
    rows = {r["key"]: r for r in document(result, {})["rows"]}
    assert rows["torch-bf16"]["emulated"].startswith("bf16 is emulated on this CPU (test cpu (AVX2")
    assert len(rows["torch-bf16"]["batches"]["2"]["runs_ms"]) == 1 and rows["torch-bf16"]["accuracy"] is None
    assert rows["torch-bf16"]["agreement_images"] == 4
    assert rows["torch-bf16"]["batches"]["2"]["encoder_share_of_gemm"] is None  # an emulation has no ceiling
    assert len(rows["torch-fp32"]["batches"]["2"]["runs_ms"]) == 3 and rows["torch-fp32"]["accuracy"]["faithful"]


def test_the_int8_verdict_names_a_faithful_int8_row_or_says_why_none_is():
    from benchmarks.report import int8_verdict, verdict_lines

    def int8_row(key, runtime, ratio, faithful):
        row = bench_row(key, runtime, 200, 0.9, faithful)
        row.update(precision="int8", status="ok")
        row["accuracy"].update(ratio_required=0.99, bleu4={"ratio": ratio}, cider_d={"ratio": ratio + 0.005})
        return row

    rows = [{**bench_row("torch-fp32", "torch", 1000, 1.0, True), "precision": "fp32"},
            int8_row("ort-int8", "onnxruntime", 0.98, False), int8_row("ov-int8", "openvino", 0.97, False)]
    info = {"int8_search": {"beam": 1, "verdict": fake_verdict(1.0, 0.99), "excluded_groups": ["backbone.7.2"]},
            "openvino_int8": {"beam": 3, "verdict": fake_verdict(0.985, 0.99)}}
    none = int8_verdict(rows, info, beam=3)
    assert none["faithful"] == [] and set(none["why_not"]) == {"ort-int8", "ov-int8"}
    assert none["why_not"]["ort-int8"] == (
        "BLEU-4 98.0% and CIDEr-D 98.5% of eager's with beam 3 (needs 99% each); its int8 encoder was judged with "
        "greedy on 6 held-back calibration images: faithful, 1 groups in fp32 (rebuild it judged with beam 3: "
        "sat-export build --int8-beam 3)")
    assert none["why_not"]["ov-int8"].endswith("judged with beam 3 on 6 held-back calibration images: not faithful "
                                               "(98.5%)")
    line = verdict_lines({**verdict(rows, 32), "int8": none})[-1]
    assert line.startswith("no faithful int8 row with beam 3: ort-int8: BLEU-4 98.0%")
    rows[1] = int8_row("ort-int8", "onnxruntime", 1.0, True)
    some = int8_verdict(rows, info, beam=3)
    assert some == {"beam": 3, "faithful": ["ort-int8"], "why_not": {}}
    assert verdict_lines({**verdict(rows, 32), "int8": some})[-1] == "int8 with beam 3: faithful: ort-int8"


def test_bench_with_beam_judges_int8_with_beam_captions_and_says_whether_a_faithful_int8_row_exists(
        tmp_path, tiny_ckpt, shapes, copy_instead_of_export):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["--quick", "--ckpt", str(tiny_ckpt), "--images", str(shapes), "--calib-method",
                                      "minmax", "--beam", "3", "--configs", "ort-int8", "--cache",
                                      str(tmp_path / "cache"), "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["options"]["beam"] == 3 and doc["model"]["int8_search"]["beam"] == 3
    int8 = doc["summary"]["int8"]
    row = next(r for r in doc["rows"] if r["key"] == "ort-int8")
    assert int8["faithful"] == (["ort-int8"] if row["accuracy"]["faithful"] else [])
    said = ("int8 with beam 3: faithful: ort-int8" if int8["faithful"]
            else "no faithful int8 row with beam 3: ort-int8: ")
    assert said in " ".join(result.output.split())
