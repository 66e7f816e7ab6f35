"""OpenVINO backend against onnxruntime on the tiny bundle; the NNCF int8 encoder; refusals."""
import shutil

import pytest
import torch

from engines.contract import ENCODER
from engines.errors import BackendUnavailable, EngineError, ShapeError
from sat_export.bundle.format import load_bundle
from sat_export.errors import BundleError
from sat_export.export.parity import TOLERANCES, compare, synthetic_images, verify
from sat_export.registry import open_backend
from tests.conftest import fake_cpu
from training.errors import SatError
from training.machine import cpu_info
from training.shapes import make_shapes

pytestmark = pytest.mark.requires_openvino


@pytest.fixture(scope="module")
def ort(tiny_bundle):
    with open_backend(tiny_bundle, "onnxruntime", "cpu") as backend:
        yield backend


def test_compare_openvino_vs_ort_fp32_within_tolerance_and_identical_captions(tiny_bundle, ort):
    with open_backend(tiny_bundle, "openvino") as ov:
        assert ov.name == "openvino" and "fp32" in ov.describe()
        report = verify(ort, ov, "fp32", graphs=(ENCODER,))
    assert report.passed, report.to_dict()
    assert report.captions["identical"] == report.captions["images"]  # gated at fp32


def test_batch_sizes_1_3_8_in_one_backend_match_onnxruntime(tiny_bundle, ort):
    images = synthetic_images(ort, 8)
    expected = ort.encode(images)
    with open_backend(tiny_bundle, "openvino") as ov:
        for n in (8, 1, 3, 8):  # a batch of one runs on another compiled model; then back
            got = ov.encode(images[:n])
            assert all(g.dtype == torch.float32 for g in got)
            diffs = compare(ENCODER, tuple(e[:n] for e in expected), got, "image-like", n, TOLERANCES["fp32"])
            assert all(d.ok for d in diffs), diffs


def test_bf16_encoder_stays_within_the_fp16_tolerance(tiny_bundle, ort):
    if not cpu_info().native_bf16:
        pytest.skip(f"bf16 is not native on this CPU ({cpu_info().describe()})")
    with open_backend(tiny_bundle, "openvino", precision="bf16") as ov:
        assert "bf16" in ov.describe()
        report = verify(ort, ov, "fp16", graphs=(ENCODER,))
    assert all(d.ok for d in report.diffs), report.to_dict()


def test_bf16_is_refused_where_the_cpu_would_emulate_it(tiny_bundle, monkeypatch):
    import engines.openvino

    monkeypatch.setattr(engines.openvino, "cpu_info", fake_cpu)
    with pytest.raises(BackendUnavailable, match="bf16 would be emulated on this CPU"):
        open_backend(tiny_bundle, "openvino", precision="bf16")


def test_an_encoder_that_breaks_the_contract_or_is_no_model_is_refused_in_one_line(tiny_bundle, vocab, tmp_path):
    from engines.openvino import OpenVinoBackend

    bundle = load_bundle(tiny_bundle)
    encoder, decoder = bundle.graph_paths()
    with pytest.raises(ShapeError, match=r"decoder_step.onnx: inputs \['tokens', .*\], the contract says \['images'\]"):
        OpenVinoBackend(decoder, decoder, bundle.config, vocab)
    (tmp_path / "encoder.xml").write_text("<net>not a model")
    with pytest.raises(EngineError, match="encoder.xml: OpenVINO cannot read this encoder"):
        OpenVinoBackend(tmp_path / "encoder.xml", decoder, bundle.config, vocab)
    with OpenVinoBackend(encoder, decoder, bundle.config, vocab) as ov, pytest.raises(ShapeError, match="images"):
        ov.encode(torch.zeros(2, 3, 32, 32))


def test_registry_refuses_other_precisions_and_a_bundle_without_an_nncf_encoder(tiny_bundle):
    with pytest.raises(SatError, match="openvino backend runs fp32, bf16, int8, not 'fp16'"):
        open_backend(tiny_bundle, "openvino", precision="fp16")
    with pytest.raises(BundleError, match="no OpenVINO int8 encoder in this bundle"):
        open_backend(tiny_bundle, "openvino", precision="int8")


def test_nncf_int8_encoder_is_quantised_judged_registered_and_checksummed(tmp_path, tiny_bundle):
    from sat_export.quantize.openvino import quantize_openvino_encoder

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    shapes = make_shapes(tmp_path / "shapes", 12, size=64) / "images"
    record = quantize_openvino_encoder(bundle, shapes, target=0.5)
    assert record["n_calib"] == 6 and record["n_held_back"] == 6 and record["verdict"]["images"] == 6
    assert record["references"] == "human captions" and record["reached"] == record["verdict"]["faithful"]
    loaded = load_bundle(bundle)  # the IR's graph and weights are checksummed with the rest
    assert {"encoder.openvino-int8.xml", "encoder.openvino-int8.bin"} <= set(loaded.manifest["files"])
    assert loaded.manifest["openvino_int8"]["verdict"] == record["verdict"]
    with open_backend(bundle, "openvino", precision="int8") as ov:
        assert "encoder.openvino-int8.xml" in ov.describe()
        features = ov.encode(synthetic_images(ov, 3))[0]
    assert features.shape == (3, 16, 48) and features.dtype == torch.float32
    weights = bundle / "encoder.openvino-int8.bin"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="encoder.openvino-int8.bin: sha256 does not match"):
        open_backend(bundle, "openvino", precision="int8")
