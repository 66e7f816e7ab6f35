"""The bench's GPU rows open where CUDA and TensorRT are, shown with stand-ins of both (TensorRT's documented
API: tests/engines/trt_standin.py; torch.cuda: tests/engines/cuda_standins.py): ``trt-fp16`` opens a bundle's
fp16 engines, and is refused in one line where the engines are another precision."""
import shutil
import sys

import pytest
import torch

from benchmarks.configs import config_by_key, open_config
from sat_export.bundle.format import load_bundle, write_manifest
from sat_export.errors import BundleError
from sat_export.registry import open_backend
from tests.conftest import manifest_of, tiny_model
from tests.engines import trt_standin
from tests.engines.cuda_standins import FakeCuda

GPU = "Stand-in GPU"


@pytest.fixture
def engines_bundle(tmp_path, tiny_bundle, monkeypatch):
    """Make the tiny bundle's copy hold TensorRT engines of a given precision, built here (stand-ins)."""
    FakeCuda.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    model = tiny_model()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.tensorrt("10.13.0", model, model.config.dims()))

    def make(precision):
        bundle = shutil.copytree(tiny_bundle, tmp_path / precision)
        for name in ("encoder", "decoder_step"):
            (bundle / f"{name}.plan").write_text(name)
        manifest = manifest_of(bundle)
        manifest["tensorrt"] = {"tensorrt": "10.13.0", "gpu": GPU, "precision": precision,
                                "profile": {"min": 1, "opt": 16, "max": 64},
                                "files": {"encoder": "encoder.plan", "decoder_step": "decoder_step.plan"}}
        write_manifest(bundle, manifest)
        return bundle
    return make


def test_the_trt_fp16_row_opens_the_bundles_fp16_engines(engines_bundle, tiny_ckpt):
    with open_config(config_by_key("trt-fp16"), tiny_ckpt, engines_bundle("fp16"), (1, 16, 64)) as backend:
        assert backend.name == "tensorrt" and backend.device == torch.device("cuda:0")


def test_fp16_engines_open_only_when_fp16_is_asked_for(engines_bundle, monkeypatch):
    """The precision asked for is the one that runs (and that a run records): the default, fp32, never opens fp16
    engines; ``auto`` then goes to onnxruntime's fp32 graphs (on CUDA here: refused, onnxruntime-gpu is absent)."""
    bundle = engines_bundle("fp16")
    with pytest.raises(BundleError, match=r"its TensorRT engines are fp16, not fp32; ask for fp16 \(--precision "
                                          r"fp16\) or rebuild them with `sat-export build --trt`"):
        open_backend(bundle, "tensorrt", "cuda")
    with open_backend(bundle, "auto", "cuda", precision="fp16") as backend:
        assert backend.name == "tensorrt" and backend.precision == "fp16"
    opened = []
    monkeypatch.setattr("engines.ort.OrtBackend.__init__", lambda self, *args, **kw: opened.append(args[:2]))
    open_backend(bundle, "auto", "cuda")
    assert opened == [load_bundle(bundle).graph_paths("fp32")]


def test_fp32_engines_asked_for_fp16_are_refused_in_one_line(engines_bundle):
    bundle = engines_bundle("fp32")
    with pytest.raises(BundleError) as info:
        open_backend(bundle, "tensorrt", "cuda", precision="fp16")
    assert str(info.value) == (f"{bundle}: its TensorRT engines are fp32, not fp16; ask for fp32 (--precision fp32) "
                               "or rebuild them with `sat-export build --fp16 --trt`")


@pytest.fixture
def bench_on_a_standin_gpu(tmp_path, tiny_ckpt, tiny_bundle, monkeypatch):
    """``run(options, **standin)``: ``run_bench`` on a copy of the tiny bundle without engines, with TensorRT 10.9 (fp16
    engines from the fp32 graphs) and torch.cuda stand-ins; the TensorRT row's captioning itself cannot run here
    (its buffers would be CUDA tensors)."""
    from benchmarks.bench import run_bench
    from benchmarks.prepare import BenchModel
    from sat_export.cli.common import console
    from training.shapes import make_shapes

    FakeCuda.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    images = sorted((make_shapes(tmp_path / "shapes", 4, size=64) / "images").glob("*.jpg"))
    model = tiny_model()

    def run(options, **standin):
        trt = trt_standin.tensorrt("10.9.0", model, model.config.dims(), **standin)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle", dirs_exist_ok=True)
        return trt, run_bench(BenchModel(tiny_ckpt, bundle, images), options, console)
    return run


def test_the_trt_row_builds_engines_for_its_largest_batch_and_the_table_says_so(bench_on_a_standin_gpu):
    """Beam 3 at batches 1 and 4 steps 4 images of 3 beams at once: the engines' batch profile reaches 4 images
    (the beams are the decoder step's own axis, profiled 1..8), so no call would be split, and the row says which
    profile it ran (the engines are opened here, not run: ``tests/engines/test_trt.py`` runs them)."""
    from io import StringIO

    from rich.console import Console

    from benchmarks.options import BenchOptions
    from benchmarks.report import document, print_table

    trt, result = bench_on_a_standin_gpu(BenchOptions(batch_sizes=(1, 4), beam=3, repeats=1, keys=("trt-fp16",)))
    assert [build[3] for build in trt.builds] == [(1, 4, 4)] * 2  # encoder, decoder step
    assert trt.builds[1][4]["tokens"] == ((1, 1), (4, 1), (4, 8))  # beams 1..8
    doc = document(result, {})
    row = next(r for r in doc["rows"] if r["key"] == "trt-fp16")
    assert row["batch_profile"] == [1, 4, 4] and "batch profile 1/4/4" in row["backend"]
    out = StringIO()
    print_table(doc, Console(file=out, width=250))
    assert "TRT profile" in out.getvalue() and "1/4/4" in out.getvalue()


def test_a_failed_tensorrt_build_is_that_rows_error_and_the_other_rows_are_timed(bench_on_a_standin_gpu):
    from benchmarks.options import BenchOptions

    _, result = bench_on_a_standin_gpu(BenchOptions(batch_sizes=(2,), repeats=1, keys=("ort-fp32", "trt-fp16")),
                                       fail_build=True)
    rows = {r.config.key: r for r in result.rows}
    assert rows["trt-fp16"].status.startswith("error while opening: EngineError: ")
    assert "TensorRT failed to build an engine" in rows["trt-fp16"].status
    assert [len(rows[key].timings[2]) for key in ("torch-fp32", "ort-fp32")] == [1, 1]
