"""TensorRT engines: a one-line refusal where TensorRT/CUDA is missing, the version/GPU check,
and (on a machine with both) a real build from the tiny bundle."""
import importlib.util
import shutil
import types

import pytest
import torch
from typer.testing import CliRunner

import sat_export.bundler.tensorrt as tb
from engines.trt_build import check_profile
from sat_export.bundle.format import load_bundle, write_manifest
from sat_export.cli.export import app
from sat_export.errors import BundleError
from sat_export.registry import open_backend
from tests.conftest import manifest_of, tiny_model

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and CUDA are available here: the refusal cannot be observed")
def test_trt_where_tensorrt_or_cuda_is_missing_fails_in_one_line_before_exporting(tmp_path, tiny_ckpt):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(out), "--trt"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "TensorRT" in result.output and len(result.output.strip().splitlines()) <= 2
    assert not out.exists()


@pytest.mark.parametrize("profile", [(0, 1, 2), (4, 2, 8), (1, 8, 4), (1, 2)])
def test_check_profile_refuses_bad_batch_ranges(profile):
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profile(profile)


def test_bad_profile_on_the_command_line_is_a_usage_error(tiny_ckpt, tmp_path):
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "b"),
                                      "--trt-profile", "8,1,64"])
    assert result.exit_code == 2 and "--trt-profile" in result.output


@pytest.fixture
def bundle_with_engines(tmp_path, tiny_bundle):
    """The tiny bundle plus stand-in .plan files recorded as built by TensorRT 10.9.0 on an H100."""
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    for name in ("encoder.plan", "decoder_step.plan"):
        (bundle / name).write_bytes(b"engine bytes")
    manifest = manifest_of(bundle)
    manifest["tensorrt"] = {"tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "precision": "fp32",
                            "profile": {"min": 1, "opt": 16, "max": 64},
                            "files": {"encoder": "encoder.plan", "decoder_step": "decoder_step.plan"}}
    write_manifest(bundle, manifest)
    return bundle


@pytest.mark.parametrize("version,gpu,error", [
    ("10.9.0", "NVIDIA H100 80GB HBM3", None),
    ("10.13.1", "NVIDIA H100 80GB HBM3", "encoder.plan: engine built with TensorRT 10.9.0, this is TensorRT 10.13.1"),
    ("10.9.0", "NVIDIA L4", "encoder.plan: engine built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA L4"),
])
def test_engines_from_another_tensorrt_version_or_gpu_are_refused(monkeypatch, bundle_with_engines, version, gpu,
                                                                  error):
    monkeypatch.setattr(tb, "import_tensorrt", lambda: types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    bundle = load_bundle(bundle_with_engines)
    assert bundle.engine_paths()[0] == bundle_with_engines / "encoder.plan"
    if error is None:
        tb.check_engines(bundle)
    else:
        with pytest.raises(BundleError, match=error):
            tb.check_engines(bundle)


def test_engines_are_checked_against_the_gpu_they_will_run_on(monkeypatch, bundle_with_engines):
    monkeypatch.setattr(tb, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.9.0"))
    names = {"None": "NVIDIA H100 80GB HBM3", "cuda:0": "NVIDIA H100 80GB HBM3", "cuda:1": "NVIDIA L4"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[str(device)])
    bundle = load_bundle(bundle_with_engines)
    tb.check_engines(bundle)
    tb.check_engines(bundle, torch.device("cuda:0"))
    with pytest.raises(BundleError, match="this GPU is NVIDIA L4"):
        tb.check_engines(bundle, torch.device("cuda:1"))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is available: engines are checked for real")
def test_check_verifies_engine_checksums_and_says_engines_were_not_checked(bundle_with_engines):
    result = CliRunner().invoke(app, ["check", str(bundle_with_engines)])
    assert result.exit_code == 0, result.output
    assert "4 files verified" in result.output and "not checked" in result.output
    (bundle_with_engines / "decoder_step.plan").write_bytes(b"engine bytez")
    result = CliRunner().invoke(app, ["check", str(bundle_with_engines)])
    assert result.exit_code == 1 and "decoder_step.plan: sha256" in result.output.replace("\n", "")


@pytest.mark.requires_trt
def test_build_engines_from_the_tiny_bundle_and_compare_vs_eager(tmp_path, tiny_bundle):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = manifest_of(bundle)
    manifest["tensorrt"] = tb.build_engines(bundle, profile=(1, 4, 8))
    write_manifest(bundle, manifest)
    assert (bundle / "encoder.plan").stat().st_size > 0 and (bundle / tb.TIMING_CACHE).is_file()
    assert manifest["tensorrt"]["gpu"] == torch.cuda.get_device_name(0)
    tb.check_engines(load_bundle(bundle))
    model = tiny_model()
    images = torch.randn(3, 3, 64, 64)
    with open_backend(bundle, "tensorrt") as trt, torch.inference_mode():
        for ref, got in zip(model.encode(images), trt.encode(images.cuda())):
            assert torch.linalg.vector_norm(got.cpu() - ref) <= 1e-2 * torch.linalg.vector_norm(ref)


@pytest.mark.parametrize("after_build", ["kept", "none"])
def test_rebuild_over_a_timing_cache_from_another_gpu(monkeypatch, tmp_path, tiny_bundle, after_build):
    """The path the version/GPU refusal recommends: rebuilding into the same folder, whose timing cache came
    from another GPU (TensorRT's stand-in: tests/engines/trt_standin.py)."""
    from tests.engines import trt_standin
    from tests.engines.cuda_standins import FakeCuda

    FakeCuda.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt_standin.tensorrt("10.13.0", timing_cache=after_build))
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / tb.TIMING_CACHE).write_bytes(trt_standin.FOREIGN_CACHE)
    notes = []
    section = tb.build_engines(bundle, profile=(1, 4, 8), notes=notes)
    assert notes == [f"{bundle / tb.TIMING_CACHE}: the timing cache was made on another GPU or TensorRT version: "
                     "building with a new one"]  # the decoder's build reuses the encoder's new cache
    assert (bundle / "encoder.plan").read_bytes() == b"encoder:1,4,8"
    if after_build == "kept":
        assert section["timing_cache"] == tb.TIMING_CACHE and (bundle / tb.TIMING_CACHE).read_bytes() != \
            trt_standin.FOREIGN_CACHE
    else:
        assert section["timing_cache"] is None and not (bundle / tb.TIMING_CACHE).exists()
