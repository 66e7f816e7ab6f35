"""The TensorRT backend and plan builder against a stand-in of TensorRT's documented API
(``tests/engines/trt_standin.py`` says which document each call follows) and of ``torch.cuda``
(``tests/engines/cuda_standins.py``): every return value that reports failure is checked, work beyond the
profile is split, engines live on the backend's device and run on its own stream."""
import sys

import pytest
import torch

from engines.errors import EngineError, ShapeError
from engines.trt import ALIGNMENT, TensorRTBackend, aligned
from engines.trt_build import NEW_CACHE_NOTE, build_plan
from engines.contract import DECODER_STEP, ENCODER
from tests.conftest import tiny_model
from tests.engines import trt_standin
from tests.engines.cuda_standins import FakeCuda
from training.decode import DecodeOptions, decode


@pytest.fixture
def plans(tmp_path):
    for name in (ENCODER.name, DECODER_STEP.name):
        (tmp_path / f"{name}.plan").write_text(name)
    return tmp_path / "encoder.plan", tmp_path / "decoder_step.plan"


def _backend(monkeypatch, plans, vocab, device="cuda", **standin):
    FakeCuda.install(monkeypatch)
    model = tiny_model()
    trt = trt_standin.tensorrt("10.9.0", model, model.config.dims(), **standin)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return TensorRTBackend(*plans, model.config, vocab, device), trt, model


def test_engines_are_deserialised_and_run_on_the_backends_device_and_own_stream(monkeypatch, plans, vocab):
    backend, trt, _ = _backend(monkeypatch, plans, vocab, "cuda:1")
    assert backend.device == torch.device("cuda:1") and [e.device for e in trt.engines] == [1, 1]
    assert backend.stream.device == 1 and backend.stream.cuda_stream != 0  # not the legacy default stream
    caller = torch.cuda.current_stream()
    trt_standin.on_host(backend).encode(torch.randn(2, 3, 64, 64))
    assert trt.engines[0].contexts[0].launches == [(backend.stream.cuda_stream, 2)]
    assert backend.stream.waited == [caller] and caller.waited == [backend.stream]


def test_work_beyond_the_profile_runs_in_runs_of_its_maximum_with_the_same_captions(monkeypatch, plans, vocab):
    backend, trt, model = _backend(monkeypatch, plans, vocab, profile=(1, 2, 4))
    trt_standin.on_host(backend)
    images, options = torch.randn(5, 3, 64, 64), DecodeOptions(beam=3, max_len=6)  # 5 images, profile max 4
    enc = backend.encode(images)
    ref_enc = model.encode(images)
    for got, ref in zip(enc, ref_enc):
        assert torch.allclose(got, ref, atol=1e-6)
    caps = decode(backend.step, enc, vocab.special_ids(), options)
    ref = decode(model.step, ref_enc, vocab.special_ids(), options)
    assert [c.tokens for c in caps] == [c.tokens for c in ref]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(caps, ref))
    assert all(torch.allclose(torch.from_numpy(a.alphas), torch.from_numpy(b.alphas), atol=1e-6)
               for a, b in zip(caps, ref))
    batches = [b for e in trt.engines for ctx in e.contexts for _, b in ctx.launches]
    assert max(batches) == 4 and 5 not in batches


def test_runs_of_a_split_batch_are_bound_at_256_byte_aligned_addresses(monkeypatch, plans, vocab):
    """``--trt-profile 1,4,8``: 13 images at beam 2 run as 8 + 5 images; the second run's int64 tokens (2 a
    image) start 128 bytes into the batch's, and TensorRT takes 256-byte aligned addresses only (the stand-in
    refuses others, as setTensorAddress's precondition says)."""
    backend, trt, model = _backend(monkeypatch, plans, vocab, profile=(1, 4, 8))
    trt_standin.on_host(backend)
    enc, options = model.encode(torch.randn(13, 3, 64, 64)), DecodeOptions(beam=2, max_len=4)
    caps = decode(backend.step, enc, vocab.special_ids(), options)
    assert [c.tokens for c in caps] == [c.tokens for c in decode(model.step, enc, vocab.special_ids(), options)]
    assert [b for _, b in trt.engines[1].contexts[0].launches[:2]] == [8, 5]


def test_only_a_misaligned_input_is_copied():
    tokens = aligned(torch.arange(40))
    assert tokens.data_ptr() % ALIGNMENT == 0 and aligned(tokens) is tokens
    view = tokens[20:]  # 160 bytes in
    copy = aligned(view)
    assert copy.data_ptr() % ALIGNMENT == 0 and torch.equal(copy, view)


def test_a_batch_below_the_profile_is_a_shape_error_and_nothing_is_cached(monkeypatch, plans, vocab):
    backend, trt, _ = _backend(monkeypatch, plans, vocab, profile=(2, 2, 4))
    trt_standin.on_host(backend)
    with pytest.raises(ShapeError, match=r"encoder.plan: input 'images' of shape \(1, 3, 64, 64\) is outside the "
                                         r"engine's profile \(batch 2..4\)"):
        backend.encode(torch.randn(1, 3, 64, 64))
    assert backend._engines["encoder"].shapes == {}
    assert backend.encode(torch.randn(2, 3, 64, 64))[0].shape[0] == 2


def test_a_launch_that_fails_is_an_engine_error(monkeypatch, plans, vocab):
    backend, _, _ = _backend(monkeypatch, plans, vocab, fail_launch=True)
    with pytest.raises(EngineError, match="encoder.plan: TensorRT could not launch the engine"):
        trt_standin.on_host(backend).encode(torch.randn(2, 3, 64, 64))


def test_a_plan_tensorrt_cannot_deserialise_is_named(monkeypatch, plans, vocab):
    plans[1].write_bytes(b"garbage")
    with pytest.raises(EngineError, match="decoder_step.plan: TensorRT could not deserialise the engine"):
        _backend(monkeypatch, plans, vocab)


def _build(tmp_path, version, fp16=False, cache=b"", timing_cache="kept", stale_cache="none"):
    trt = trt_standin.tensorrt(version, timing_cache=timing_cache, stale_cache=stale_cache)
    onnx = tmp_path / "encoder.onnx"
    return trt, build_plan(trt, onnx, ENCODER, tiny_model().config.dims(), (1, 2, 4), fp16=fp16, cache=cache)


def test_a_timing_cache_from_another_gpu_is_replaced_with_a_note(tmp_path):
    trt, (plan, cache, note) = _build(tmp_path, "10.9.0", cache=trt_standin.FOREIGN_CACHE)
    assert plan == b"encoder:1,2,4" and trt.builds[0][2] == b"" and cache == b"+timings"
    assert note == NEW_CACHE_NOTE == ("the timing cache was made on another GPU or TensorRT version: building "
                                      "with a new one")
    trt, (_, cache, note) = _build(tmp_path, "10.9.0", cache=b"ours")
    assert trt.builds[0][2] == b"ours" and cache == b"ours+timings" and note is None


@pytest.mark.parametrize("stale_cache", ["none", "raise"])
def test_a_timing_cache_tensorrt_cannot_read_is_replaced_with_a_note(tmp_path, stale_cache):
    """After a TensorRT upgrade (the rebuild the version refusal recommends) ``create_timing_cache`` may give
    None for the old cache, or raise; Polygraphy's loader guards both."""
    trt, (plan, cache, note) = _build(tmp_path, "10.13.0", cache=trt_standin.STALE_CACHE, stale_cache=stale_cache)
    assert plan == b"encoder:1,2,4" and trt.builds[0][2] == b"" and cache == b"+timings" and note == NEW_CACHE_NOTE


def test_the_decoder_steps_profile_spans_the_batch_and_greedy_to_beam_8(tmp_path, monkeypatch, plans, vocab):
    trt = trt_standin.tensorrt("10.9.0")
    dims = tiny_model().config.dims()
    build_plan(trt, tmp_path / "decoder_step.onnx", DECODER_STEP, dims, (1, 2, 4))
    shapes = trt.builds[0][4]
    assert shapes["tokens"] == ((1, 1), (2, 1), (4, 8))
    assert shapes["h"] == ((1, 1, dims["dec_dim"]), (2, 1, dims["dec_dim"]), (4, 8, dims["dec_dim"]))
    assert shapes["features"] == tuple((b, dims["n_pix"], dims["enc_dim"]) for b in (1, 2, 4))
    backend = trt_standin.on_host(_backend(monkeypatch, plans, vocab)[0])
    enc = backend.encode(torch.randn(2, 3, 64, 64))
    with pytest.raises(ShapeError, match=r"'tokens' of shape \(2, 9\) is outside the engine's profile \(batch 1..4, "
                                         r"beams 1..8\)"):
        backend.step(torch.zeros(2, 9, dtype=torch.long), *(x.unsqueeze(1).expand(2, 9, -1) for x in enc[2:]),
                     *enc[:2])


def test_no_timing_cache_after_a_build_is_no_error(tmp_path):
    assert _build(tmp_path, "10.9.0", timing_cache="none")[1] == (b"encoder:1,2,4", None, None)


@pytest.mark.parametrize("version,strongly_typed", [("10.11.0", False), ("10.12.0", True), ("11.0.1", True)])
def test_fp16_is_a_strongly_typed_network_from_tensorrt_10_12(tmp_path, version, strongly_typed):
    trt, _ = _build(tmp_path, version, fp16=True)
    flags, builder_flags = trt.builds[0][:2]
    assert flags == (1 << 1 if strongly_typed else 0)
    assert ("FP16" in builder_flags) is not strongly_typed
