"""int8 encoder: static QDQ quantisation calibrated on the user's images, within the int8 tolerance."""
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from engines.contract import DECODER_STEP, ENCODER
from sat_export.cli.export import app
from sat_export.errors import BundleError
from sat_export.export.onnx import check_graph_io
from sat_export.export.parity import verify_onnx
from sat_export.quantize.ort import (ImageCalibrationReader, _least_error_range, _Replay, calibration_files, head_nodes,
                                     mse_ranges, quantize_encoder)
from sat_export.quantize.search import HeldBack
from tests.conftest import fake_cpu, fake_verdict, manifest_of, tiny_model


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(10):
        arr = (np.linspace(0, 255, 96)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.integers(0, 60, (80, 96, 3)))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_quantize_encoder_writes_per_channel_qdq_graph_within_int8_tolerance(tmp_path, tiny_bundle, calib_dir, vocab):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    int8 = quantize_encoder(bundle, calib_dir)
    assert int8 == bundle / "encoder.int8.onnx"
    model = tiny_model()
    check_graph_io(int8, ENCODER, model.config.dims())
    graph = onnx.load(str(int8)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 10 and ops["DequantizeLinear"] > 10
    inits = {t.name: t for t in graph.initializer}
    weight_scales = [n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_scales and all(len(inits[s].dims) == 1 and inits[s].dims[0] > 1 for s in weight_scales)  # per channel
    report = verify_onnx(model, vocab, int8, bundle / DECODER_STEP.file, "int8", graphs=(ENCODER,), n_captions=2)
    assert report.passed, report.to_dict()
    assert 1e-4 < max(d.rel_l2 for d in report.diffs) <= 0.5  # really quantised
    producers = {o: n for n in graph.node for o in n.output}
    outputs = [producers[o.name] for o in graph.output]
    assert all(n.op_type != "DequantizeLinear" for n in outputs)  # the head stays fp32: outputs never rounded


def test_head_nodes_are_the_last_convolution_and_everything_after_it(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "encoder.onnx"))
    head = head_nodes(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [c for c in convs if c in head] == convs[-1:]
    producers = {o: n.name for n in model.graph.node for o in n.output}
    assert {producers[o.name] for o in model.graph.output} <= set(head)
    assert len(head) < len(model.graph.node) / 2


def test_calibration_reader_preprocesses_images_and_skips_unreadable(tmp_path, calib_dir):
    files = calibration_files(calib_dir)
    assert len(files) == 10 and files == sorted(files)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    reader = ImageCalibrationReader([tmp_path / "broken.jpg", *files[:5]], tiny_model().config.preprocess, batch=4)
    batches = iter(reader.get_next, None)
    assert [b["images"].shape for b in batches] == [(4, 3, 64, 64), (1, 3, 64, 64)]
    assert len(reader.skipped) == 1 and "broken.jpg" in reader.skipped[0]


def test_quantize_refuses_an_empty_or_unreadable_calibration_set(tmp_path, tiny_bundle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="empty: no images"):
        quantize_encoder(tiny_bundle, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="none of the 1 calibration images could be read"):
        quantize_encoder(tiny_bundle, tmp_path / "bad")
    with pytest.raises(BundleError, match="nowhere: calibration folder not found"):
        quantize_encoder(tiny_bundle, tmp_path / "nowhere")


def test_build_with_int8_encoder_registers_it_and_check_runs_it(tmp_path, tiny_ckpt, calib_dir, copy_instead_of_export):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(out), "--int8-encoder",
                                      "--calib", str(calib_dir)])
    assert result.exit_code == 0, result.output
    manifest = manifest_of(out)
    assert manifest["precisions"]["int8"] == {"encoder": "encoder.int8.onnx", "decoder_step": "decoder_step.onnx"}
    assert manifest["parity"]["int8"]["passed"] and "encoder.int8.onnx" in manifest["files"]
    result = CliRunner().invoke(app, ["check", str(out)])
    assert result.exit_code == 0 and "int8" in result.output, result.output
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(out), "--int8-encoder"])
    assert result.exit_code == 2 and "--calib" in result.output


def test_the_int8_encoder_pairs_with_the_fp32_decoder_step_also_in_a_bundle_with_fp16_graphs(tmp_path, tiny_ckpt,
                                                                                              calib_dir,
                                                                                              copy_instead_of_export):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(out), "--fp16", "--int8-encoder",
                                      "--calib", str(calib_dir)])
    assert result.exit_code == 0, result.output
    assert manifest_of(out)["precisions"]["int8"] == {"encoder": "encoder.int8.onnx", "decoder_step": "decoder_step.onnx"}


def test_build_says_when_the_int8_target_is_not_reached(tmp_path, tiny_ckpt, calib_dir, copy_instead_of_export,
                                                        monkeypatch):
    monkeypatch.setattr(HeldBack, "score", lambda self, encoder: (fake_verdict(0.25), 0.3))  # never faithful
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--ckpt", str(tiny_ckpt), "--out", str(out), "--int8-encoder",
                                      "--calib", str(calib_dir)])
    assert result.exit_code == 0, result.output
    assert "int8 target not reached" in result.output and "keeps 25.0%" in result.output
    assert manifest_of(out)["int8"]["reached"] is False


def test_the_least_error_range_clips_a_long_tail_and_keeps_a_uniform_spread():
    uniform = np.full(100, 1000.0)
    assert _least_error_range(uniform, 0.0, 10.0) == (0.0, 10.0)  # clipping any of it costs more than it saves
    tail = np.zeros(100)
    tail[:10], tail[-1] = 1e6, 1.0  # almost everything below 1, one value near 10
    low, high = _least_error_range(tail, 0.0, 10.0)
    assert low == 0.0 and high < 5.0


def test_mse_calibration_shrinks_ranges_and_gives_a_runnable_int8_encoder(tmp_path, tiny_bundle, calib_dir, vocab):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    prepared = tmp_path / "pre.onnx"
    quant_pre_process(str(bundle / "encoder.onnx"), str(prepared))
    reader = ImageCalibrationReader(calibration_files(calib_dir), tiny_model().config.preprocess)
    batches = list(iter(reader.get_next, None))
    mse_ranges(prepared, batches, tmp_path / "mse.json")
    shrunk = load_tensors_data(tmp_path / "mse.json").data
    calibrator = create_calibrator(prepared, augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(_Replay(batches))
    minmax = calibrator.compute_data().data
    assert set(shrunk) == set(minmax)
    span = {n: (float(np.min(t.lowest)), float(np.max(t.highest))) for n, t in shrunk.items()}
    full = {n: (min(float(np.min(t.lowest)), 0), max(float(np.max(t.highest)), 0)) for n, t in minmax.items()}
    for name, (lo, hi) in span.items():  # inside the min/max range (widened to hold 0, as uint8 does)
        assert full[name][0] - 1e-6 <= lo and hi <= full[name][1] + 1e-6, (name, span[name], full[name])
    assert any(hi < 0.99 * full[n][1] for n, (lo, hi) in span.items())  # some tail was clipped
    int8 = quantize_encoder(bundle, calib_dir, method="mse")
    report = verify_onnx(tiny_model(), vocab, int8, bundle / DECODER_STEP.file, "int8", graphs=(ENCODER,), n_captions=2)
    assert report.passed, report.to_dict()


def test_without_vnni_weights_are_quantised_to_7_bits(tmp_path, tiny_bundle, calib_dir, monkeypatch):
    import sat_export.quantize.ort

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    ranges = {}
    for vnni in (True, False):
        cpu = fake_cpu(vnni=vnni)
        monkeypatch.setattr(sat_export.quantize.ort, "cpu_info", lambda cpu=cpu: cpu)
        graph = onnx.load(str(quantize_encoder(bundle, calib_dir, out=tmp_path / f"vnni{vnni}.onnx"))).graph
        weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        ranges[vnni] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert ranges[True] > 64 and ranges[False] <= 64  # reduce_range: 7-bit weights, no VPMADDUBSW saturation
