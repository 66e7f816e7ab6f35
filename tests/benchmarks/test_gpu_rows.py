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
    with open_config(config_by_key("trt-fp16"), tiny_ckpt, engines_bundle("fp16")) as backend:
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


def test_the_trt_fp16_row_refuses_fp32_engines_in_one_line(engines_bundle, tiny_ckpt):
    bundle = engines_bundle("fp32")
    with pytest.raises(BundleError) as info:
        open_config(config_by_key("trt-fp16"), tiny_ckpt, bundle)
    assert str(info.value) == (f"{bundle}: its TensorRT engines are fp32, not fp16; ask for fp32 (--precision fp32) "
                               "or rebuild them with `sat-export build --fp16 --trt`")
