"""ONNX Runtime: one IO-binding code path (run here on the CPU), and the CUDA session checked for what it got.

The CUDA tests follow ONNX Runtime's documented behaviour (onnxruntime.ai/docs/execution-providers/
CUDA-ExecutionProvider.html and docs/api/python, ``InferenceSession.get_providers``): a session asked for
``CUDAExecutionProvider`` that cannot load it (cuDNN missing, say) logs a warning and runs on the CPU; its
``get_providers()`` then lacks CUDA. The stand-in session is the real CPU session, created exactly so.
"""
import onnxruntime
import pytest
import torch

import engines.ort as ort_module
from engines.errors import BackendUnavailable
from engines.ort import CUDA, GPU_INSTALL, GPU_TRT_INSTALL, NO_SYNC, OrtBackend
from sat_export.bundle.format import load_bundle
from tests.engines.cuda_standins import FakeCuda
from training.decode import DecodeOptions, decode


def test_outputs_are_the_torch_tensors_bound_before_the_run(tiny_bundle):
    """No copy on the way out: each output ONNX Runtime wrote is the torch tensor allocated for it, with the
    contract's shape, bound by address (the path CUDA takes, on the CPU here)."""
    bundle = load_bundle(tiny_bundle)
    backend = OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cpu")
    bound = []
    session = backend._sessions["decoder_step"]
    real_binding = session.io_binding

    def recording_binding():
        binding = real_binding()
        bind_output = binding.bind_output
        binding.bind_output = lambda *args: (bound.append(args), bind_output(*args))[1]
        return binding

    session.io_binding = recording_binding
    dims = bundle.config.dims()
    n, k = 3, 2
    inputs = (torch.zeros(n, k, dtype=torch.long), torch.randn(n, k, dims["dec_dim"]), torch.randn(n, k, dims["dec_dim"]),
              torch.randn(n, dims["n_pix"], dims["enc_dim"]), torch.randn(n, dims["n_pix"], dims["att_dim"]))
    outputs = backend.step(*inputs)
    assert [(name, kind, index, tuple(shape)) for name, kind, index, _, shape, _ in bound] == [
        ("logprobs", "cpu", 0, (n, k, dims["vocab"])), ("alpha", "cpu", 0, (n, k, dims["n_pix"])),
        ("h_next", "cpu", 0, (n, k, dims["dec_dim"])), ("c_next", "cpu", 0, (n, k, dims["dec_dim"]))]
    assert [o.data_ptr() for o in outputs] == [args[-1] for args in bound]
    assert torch.allclose(outputs[0].exp().sum(2), torch.ones(n, k), atol=1e-5)  # written by the run: log-softmax


class _Session(onnxruntime.InferenceSession):
    """The real session, made with CPUExecutionProvider only: what ORT gives when CUDA fails to load."""

    asked: list = []
    claims_cuda = False

    def __init__(self, path, options, providers):
        type(self).asked.append(providers)
        super().__init__(path, options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return [CUDA, *super().get_providers()] if self.claims_cuda else super().get_providers()


def _installed(versions: dict):
    """``importlib.metadata.version`` where only ``versions`` are installed."""
    def version(name):
        if name not in versions:
            raise ort_module.PackageNotFoundError(name)
        return versions[name]
    return version


@pytest.fixture
def cuda_ort(monkeypatch):
    """onnxruntime-gpu alone installed, CUDA listed as available; torch.cuda as with two GPUs."""
    FakeCuda.install(monkeypatch)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _Session)
    monkeypatch.setattr(ort_module, "version", _installed({"onnxruntime-gpu": "1.31.1"}))
    _Session.asked, _Session.claims_cuda = [], False
    return _Session


def test_a_session_that_fell_back_to_the_cpu_is_refused(tiny_bundle, cuda_ort):
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(BackendUnavailable, match=r"encoder.onnx: onnxruntime could not start CUDAExecutionProvider "
                                                 r"\(the session has \['CPUExecutionProvider'\]"):
        OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cuda")


def test_cuda_sessions_run_on_the_backends_device_and_own_stream_without_end_of_run_sync(tiny_bundle, cuda_ort):
    cuda_ort.claims_cuda = True
    bundle = load_bundle(tiny_bundle)
    backend = OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cuda:1")
    assert backend.device == torch.device("cuda:1") and backend.stream.device == 1
    assert backend.stream.cuda_stream != 0
    options = {"device_id": 1, "user_compute_stream": str(backend.stream.cuda_stream), "use_tf32": "0"}
    assert cuda_ort.asked == [[(CUDA, options), "CPUExecutionProvider"]] * 2
    assert backend._run_options.get_run_config_entry(NO_SYNC) == "1"


def test_cuda_sessions_compute_fp32_in_fp32_not_tf32(tiny_bundle, cuda_ort):
    """The CUDA provider's ``use_tf32`` defaults to true (``cuda_execution_provider_info.h``: "By default, enable
    TF32 to speed up float GEMM/MatMul or cuDNN convolution"); ``"0"`` is parsed as false
    (``parse_string.h``). fp32 rows must compute in fp32."""
    cuda_ort.claims_cuda = True
    bundle = load_bundle(tiny_bundle)
    OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cuda")
    assert [dict(providers[0][1])["use_tf32"] for providers in cuda_ort.asked] == ["0", "0"]


def test_both_onnxruntime_distributions_installed_is_refused_on_cuda(tiny_bundle, cuda_ort, monkeypatch):
    monkeypatch.setattr(ort_module, "version", _installed({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}))
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(BackendUnavailable) as info:
        OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cuda")
    assert "both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are installed" in str(info.value)
    assert str(info.value).endswith(f"{GPU_INSTALL} (with TensorRT: {GPU_TRT_INSTALL})")


@pytest.mark.requires_cuda
def test_compare_ort_cuda_vs_ort_cpu_captions_with_the_loop_on_the_backends_stream(tiny_bundle, vocab):
    if CUDA not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime-gpu is not installed: {GPU_INSTALL}")
    bundle = load_bundle(tiny_bundle)
    images, options = torch.randn(5, 3, 64, 64), DecodeOptions(beam=3, max_len=6)
    with OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cpu") as cpu, \
            OrtBackend(*bundle.graph_paths("fp32"), bundle.config, bundle.vocab, "cuda") as gpu:
        ref = decode(cpu.step, cpu.encode(images), vocab.special_ids(), options)
        with gpu.running():
            enc = gpu.encode(images)
            assert all(x.device == gpu.device for x in enc)
            got = decode(gpu.step, enc, vocab.special_ids(), options)
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    assert all(abs(a.score - b.score) < 1e-3 and abs(a.alphas - b.alphas).max() < 1e-3 for a, b in zip(got, ref))
