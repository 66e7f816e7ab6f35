"""Backends against the model they wrap; registry errors."""
import sys

import pytest
import torch

from engines.errors import BackendUnavailable
from engines.torch_eager import TorchBackend, fp32_math
from sat_export.registry import open_backend
from sat_export.bundle.format import load_bundle
from sat_export.errors import BundleError
from tests.conftest import manifest_of, reseal, tiny_model
from training.decode import decode
from training.errors import SatError
from training.options import DecodeOptions


def test_torch_backend_equals_model_and_drives_decode(tiny_ckpt, vocab):
    backend = open_backend(tiny_ckpt, "torch", "cpu")
    model = tiny_model()
    images = torch.randn(3, 3, 64, 64)
    with backend, torch.no_grad():
        enc = backend.encode(images)
        for a, b in zip(enc, model.encode(images)):
            assert torch.equal(a, b)
        caps = decode(backend.step, enc, vocab.special_ids(), DecodeOptions(max_len=5))
    ref = decode(model.step, model.encode(images), vocab.special_ids(), DecodeOptions(max_len=5))
    assert [c.tokens for c in caps] == [c.tokens for c in ref]


def test_torch_cpu_options_keep_float32_outputs_close_to_fp32(vocab):
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    ref = TorchBackend(model, vocab).encode(images)
    for opts, tol in (({"channels_last": True}, 1e-5), ({"autocast": torch.bfloat16}, 0.1)):
        out = TorchBackend(tiny_model(), vocab, **opts).encode(images)
        assert all(o.dtype == torch.float32 for o in out)
        rel = (out[0] - ref[0]).norm() / ref[0].norm()
        assert rel < tol, (opts, rel)


def test_torch_fp32_on_cuda_runs_without_tf32_and_leaves_the_callers_flags_alone():
    """torch's default lets cuDNN convolutions round fp32 to TF32 on Ampere and later GPUs
    (``torch.backends.cudnn.allow_tf32`` True): on a CUDA device the backend's encode and step run with cuDNN's and
    cuBLAS's TF32 off (the flags are torch's, global, read here without a GPU), and leave them as they were."""
    def flags():
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    before = flags()
    with fp32_math(torch.device("cuda:1")):
        assert flags() == (False, False)
    with fp32_math(torch.device("cpu")):
        assert flags() == before
    assert flags() == before


def test_registry_refuses_unknown_names_and_bad_combinations(tiny_ckpt, tmp_path):
    with pytest.raises(SatError, match="unknown backend"):
        open_backend(tiny_ckpt, "tvm")
    with pytest.raises(SatError, match="no such checkpoint"):
        open_backend(tmp_path / "missing.pth", "torch")
    with pytest.raises(SatError, match="needs a checkpoint"):
        open_backend(tmp_path, "torch")
    with pytest.raises(SatError, match="the torch backend has no precision to choose"):
        open_backend(tiny_ckpt, "torch", precision="bf16")


def test_cuda_request_without_gpu_is_a_clear_error(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for CPU-only machines")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        open_backend(tiny_ckpt, "torch", "cuda")


def test_auto_on_a_checkpoint_builds_the_bundle_once_and_matches_torch(tiny_ckpt, vocab, tmp_path, monkeypatch):
    from sat_export.bundler import cache as bundle_cache

    monkeypatch.setenv(bundle_cache.CACHE_ENV, str(tmp_path / "cache"))
    images = torch.randn(4, 3, 64, 64)
    with open_backend(tiny_ckpt, "auto", "cpu") as ort, open_backend(tiny_ckpt, "torch", "cpu") as eager:
        assert ort.name == "onnxruntime"
        enc = ort.encode(images)
        ref = eager.encode(images)
        for a, b in zip(enc, ref):
            assert ((a - b).norm() / b.norm()) < 1e-5
        opts = DecodeOptions(beam=2, max_len=6)
        caps = decode(ort.step, enc, vocab.special_ids(), opts)
        ref_caps = decode(eager.step, ref, vocab.special_ids(), opts)
        assert [c.tokens for c in caps] == [c.tokens for c in ref_caps]
    built = list((tmp_path / "cache" / "bundles").iterdir())
    assert len(built) == 1 and (built[0] / "manifest.json").is_file()
    mtime = (built[0] / "manifest.json").stat().st_mtime_ns
    open_backend(tiny_ckpt, "auto", "cpu").close()  # reused, not rebuilt
    assert (built[0] / "manifest.json").stat().st_mtime_ns == mtime
    (built[0] / "decoder_step.onnx").write_bytes(b"damaged")  # a damaged cache entry is rebuilt
    with open_backend(tiny_ckpt, "auto", "cpu") as again:
        assert again.encode(images)[0].shape == ref[0].shape
    manifest = manifest_of(built[0])
    reseal(built[0], {**manifest, "version": 1})  # a bundle cached by an older sat-export: rebuilt too
    with pytest.raises(BundleError, match="bundle version 1, made by an older sat-export.*sat-export build --ckpt"):
        load_bundle(built[0])
    open_backend(tiny_ckpt, "auto", "cpu").close()
    assert manifest_of(built[0])["version"] == 2


def test_tensorrt_backend_is_refused_in_one_line_without_tensorrt_or_cuda(tiny_bundle):
    import importlib.util

    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT and CUDA present: engines are covered by tests/sat_export/test_tensorrt.py")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed|needs a CUDA GPU") as info:
        open_backend(tiny_bundle, "tensorrt", "cpu")
    assert "\n" not in str(info.value)
    with open_backend(tiny_bundle, "auto", "cpu") as backend:  # auto never picks it here
        assert backend.name == "onnxruntime"


def test_openvino_backend_without_openvino_says_how_to_install_it_and_auto_never_picks_it(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError, installed or not
    for precision in ("fp32", "int8"):  # missing OpenVINO is said before a missing NNCF encoder
        with pytest.raises(BackendUnavailable) as info:
            open_backend(tiny_bundle, "openvino", precision=precision)
        assert str(info.value) == "OpenVINO is not installed: pip install 'sat-export[openvino]'"
    with open_backend(tiny_bundle, "auto", "cpu") as backend:
        assert backend.name == "onnxruntime"
