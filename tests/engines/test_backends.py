"""Backends against the model they wrap; registry errors."""
import pytest
import torch

from engines import open_backend
from engines.decode import DecodeOptions, decode
from engines.torch_eager import TorchBackend
from sat_export.errors import BackendUnavailable, SatError
from tests.conftest import tiny_model


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


def test_registry_refuses_unknown_names_and_bad_combinations(tiny_ckpt, tmp_path):
    with pytest.raises(SatError, match="unknown backend"):
        open_backend(tiny_ckpt, "tvm")
    with pytest.raises(SatError, match="no such checkpoint"):
        open_backend(tmp_path / "missing.pth", "torch")
    with pytest.raises(SatError, match="needs a checkpoint"):
        open_backend(tmp_path, "torch")


def test_cuda_request_without_gpu_is_a_clear_error(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for CPU-only machines")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        open_backend(tiny_ckpt, "torch", "cuda")
