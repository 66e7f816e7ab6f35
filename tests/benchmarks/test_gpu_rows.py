"""The bench's GPU rows open where CUDA and TensorRT are, shown with stand-ins of both (TensorRT's documented
API: tests/engines/trt_standin.py; torch.cuda: tests/engines/cuda_standins.py): ``trt-fp16`` opens a bundle's
fp16 engines, and is refused in one line where the engines are another precision."""
import shutil
import sys

import pytest
import torch

from benchmarks.configs import config_by_key, open_config
from sat_export.bundle.format import write_manifest
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


def test_auto_on_cuda_picks_the_engines_for_their_precision_and_the_default(engines_bundle):
    bundle = engines_bundle("fp16")
    for precision in ("fp16", "fp32"):  # fp32, the default, asks for no precision in particular
        with open_backend(bundle, "auto", "cuda", precision=precision) as backend:
            assert backend.name == "tensorrt"


def test_the_trt_fp16_row_refuses_fp32_engines_in_one_line(engines_bundle, tiny_ckpt):
    bundle = engines_bundle("fp32")
    with pytest.raises(BundleError) as info:
        open_config(config_by_key("trt-fp16"), tiny_ckpt, bundle)
    assert str(info.value) == (f"{bundle}: its TensorRT engines are fp32, not fp16; rebuild them with "
                               "`sat-export build --fp16 --trt`")
