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
    for doc in runs.values():
        rows = {r["key"]: r for r in doc["rows"]}
        assert list(rows) == ["torch-fp32", *GPU_ROWS]
        for key in GPU_ROWS[:4]:
            assert rows[key]["status"] == "ok" and rows[key]["batches"]["4"]["speedup_vs_eager"] > 0, rows[key]
        trt = rows["trt-fp16"]["status"]
        assert trt == "ok" if importlib.util.find_spec("tensorrt") else trt.startswith("unavailable: TensorRT")


def test_its_model_and_bundle_are_prepared_without_a_gpu(tmp_path):
    """What a GPU run starts from, made here: images, a seeded checkpoint, a bundle with fp32 and fp16 graphs
    (and no engines without TensorRT), so the GPU run cannot fail on its preparation."""
    import importlib.util

    from benchmarks.gpu import prepare
    from sat_export.bundle.format import load_bundle

    model = prepare(tmp_path, 3, "mobilenet_v3_small_s16")
    bundle = load_bundle(model.bundle)
    assert len(model.images) == 3 and model.ckpt.is_file()
    assert set(bundle.precisions) == {"fp32", "fp16"}
    assert bool(bundle.manifest.get("tensorrt")) == (importlib.util.find_spec("tensorrt") is not None)
