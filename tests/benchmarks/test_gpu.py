"""The prepared GPU bench: every GPU row of ``benchmarks.configs``, and a plain refusal where there is no GPU."""
import pytest
import torch
from typer.testing import CliRunner

from benchmarks.configs import CONFIGS
from benchmarks.gpu import GPU_ROWS, app


def test_the_gpu_bench_runs_every_cuda_row_of_the_bench():
    assert set(GPU_ROWS) == {c.key for c in CONFIGS if c.device == "cuda"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the refusal cannot be observed")
def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["--json", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.replace("\n", " ").startswith("error: no CUDA GPU here (torch.cuda.is_available() is False)")
    assert "nothing was run" in result.output.replace("\n", " ") and not out.exists()


@pytest.mark.requires_cuda
@pytest.mark.slow
def test_gpu_bench_times_every_gpu_row_greedy_and_beam_3(tmp_path):
    import importlib.util
    import json

    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["--images", "4", "--batch-sizes", "1,4", "--repeats", "1", "--max-len", "4",
                                      "--backbone", "mobilenet_v3_small_s16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["beam_1", "beam_3"]
    for beam, doc in zip((1, 3), runs.values()):
        rows = {r["key"]: r for r in doc["rows"]}
        assert list(rows) == ["torch-fp32", *GPU_ROWS]
        for key in GPU_ROWS[:4]:
            assert rows[key]["status"] == "ok" and rows[key]["batches"]["4"]["speedup_vs_eager"] > 0, rows[key]
            assert rows[key]["accuracy"] is not None and rows[key]["agreement"] is not None
        trt = rows["trt-fp16"]
        if importlib.util.find_spec("tensorrt"):
            assert trt["status"] == "ok" and trt["batch_profile"] == [1, 4, 4] and trt["accuracy"] is not None
        else:
            assert trt["status"].startswith("unavailable: TensorRT")


def test_its_model_and_bundle_are_prepared_without_a_gpu_and_without_tensorrt(tmp_path, monkeypatch):
    """What a GPU run starts from, made here: images, a seeded checkpoint, a bundle with fp32 and fp16 graphs and no
    engines, so the GPU run cannot fail on its preparation, even where TensorRT is installed (here a stand-in of its
    documented API) and cannot build: the TensorRT row builds its own engines, and fails alone."""
    import sys

    from benchmarks.gpu import prepare
    from sat_export.bundle.format import load_bundle
    from tests.engines import trt_standin

    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.tensorrt("10.13.0", fail_build=True))
    model = prepare(tmp_path, 3, "mobilenet_v3_small_s16")
    bundle = load_bundle(model.bundle)
    assert len(model.images) == 3 and model.ckpt.is_file()
    assert set(bundle.precisions) == {"fp32", "fp16"} and not bundle.manifest.get("tensorrt")
