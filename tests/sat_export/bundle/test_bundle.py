"""Bundles: the manifest's content, load_bundle, and `sat-export check` refusing any changed byte."""
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from engines.contract import DECODER_STEP, ENCODER
from sat_export.bundle.format import MANIFEST_FILE, io_table, load_bundle, sha256, write_manifest
from sat_export.cli.export import app
from sat_export.cli.infer import app as infer_app
from sat_export.errors import BundleError
from tests.conftest import manifest_of, reseal
from training.config import ModelConfig


@pytest.fixture
def bundle(tmp_path, tiny_bundle):
    """A private copy of the session bundle, free to damage."""
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def _check(path):
    result = CliRunner().invoke(app, ["check", str(path)])
    assert "Traceback" not in result.output
    return result


def test_manifest_records_everything_needed_to_run_the_bundle(tiny_bundle, vocab):
    manifest = manifest_of(tiny_bundle)
    assert manifest["format"] == "sat-bundle" and manifest["version"] == 2
    assert manifest["vocab"]["itos"] == vocab.itos and manifest["special_ids"] == vocab.special_ids()
    assert manifest["preprocess"] == {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406],
                                      "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
                                      "resize_mode": "shorter_side", "reducing_gap": 3.0, "draft_margin": 2.0}
    assert manifest["graphs"]["decoder_step"]["inputs"][0] == {"name": "tokens", "dtype": "int64",
                                                                  "shape": ["batch", "beams"]}
    assert manifest["graphs"]["encoder"]["outputs"][1]["shape"] == ["batch", 16, 16]  # features_proj
    assert manifest["precisions"] == {"fp32": {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx"}}
    assert set(manifest["files"]) == {"encoder.onnx", "decoder_step.onnx"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert {"torch", "onnx", "onnxruntime", "sat_export"} <= set(manifest["tools"])
    assert manifest["opset"] == 18 and manifest["parity"]["fp32"]["passed"] is True


def test_load_bundle_gives_config_vocab_and_graph_paths(tiny_bundle, vocab):
    b = load_bundle(tiny_bundle)
    assert b.config.dec_dim == 32 and b.vocab.itos == vocab.itos
    assert b.graph_paths() == (tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file)
    with pytest.raises(BundleError, match="no fp16 graphs.*--fp16"):
        b.graph_paths("fp16")
    with pytest.raises(BundleError, match="no TensorRT engines"):
        b.engine_paths()


def test_a_manifest_from_before_resize_modes_loads_with_todays_preprocessing(bundle):
    manifest = manifest_of(bundle)
    for pre in (manifest["preprocess"], manifest["model"]["preprocess"]):
        del pre["resize_mode"], pre["reducing_gap"], pre["draft_margin"]
    reseal(bundle, manifest)
    pre = load_bundle(bundle).config.preprocess
    assert (pre.resize, pre.crop, pre.resize_mode, pre.reducing_gap, pre.draft_margin) == (
        72, 64, "shorter_side", 3.0, 2.0)


def test_check_passes_on_a_fresh_bundle(tiny_bundle):
    result = _check(tiny_bundle)
    assert result.exit_code == 0, result.output
    assert "2 files verified" in result.output and "fp32" in result.output


@pytest.mark.parametrize("name", [ENCODER.file, DECODER_STEP.file, MANIFEST_FILE])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_check_refuses_a_single_changed_byte_naming_the_file(bundle, name, where):
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[int(where * (len(data) - 1))] ^= 0x01
    path.write_bytes(bytes(data))
    result = _check(bundle)
    assert result.exit_code == 1
    assert f"{path}:" in result.output.replace("\n", "")


def test_check_refuses_truncated_and_missing_files(bundle):
    (bundle / DECODER_STEP.file).write_bytes((bundle / DECODER_STEP.file).read_bytes()[:1000])
    assert "decoder_step.onnx: 1000 bytes" in _check(bundle).output.replace("\n", "")
    (bundle / DECODER_STEP.file).unlink()
    assert "decoder_step.onnx: missing" in _check(bundle).output.replace("\n", "")
    (bundle / MANIFEST_FILE).unlink()
    result = _check(bundle)
    assert result.exit_code == 1 and "manifest.json: not found" in result.output.replace("\n", "")


def test_check_refuses_a_resealed_bundle_whose_graphs_do_not_match(bundle):
    manifest = manifest_of(bundle)
    shutil.copy(bundle / ENCODER.file, bundle / DECODER_STEP.file)  # consistent checksums, wrong graph
    write_manifest(bundle, manifest)
    result = _check(bundle)
    assert result.exit_code == 1 and "decoder_step.onnx: inputs ['images']" in result.output.replace("\n", "")


def test_check_refuses_a_manifest_for_another_model(bundle):
    manifest = manifest_of(bundle)
    manifest["model"]["att_dim"] = 24
    manifest["graphs"] = io_table(ModelConfig.from_dict(manifest["model"]))
    write_manifest(bundle, manifest)
    result = _check(bundle)
    assert result.exit_code == 1 and "encoder.onnx: output 'features_proj' has shape" in result.output.replace("\n", "")


@pytest.mark.parametrize("field", ["vocab", "files", "graphs", "opset"])
def test_load_bundle_refuses_a_manifest_missing_a_field(bundle, field):
    manifest = manifest_of(bundle)
    del manifest[field]
    reseal(bundle, manifest)
    with pytest.raises(BundleError, match=f"manifest.json: manifest field '{field}': Field required"):
        load_bundle(bundle)


def test_load_bundle_refuses_files_outside_the_bundle(bundle):
    manifest = manifest_of(bundle)
    manifest["files"]["../escape.onnx"] = {"bytes": 1, "sha256": "0" * 64}
    reseal(bundle, manifest)
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(bundle)


def test_a_resealed_manifest_without_the_models_preprocessing_is_refused_in_one_line(bundle):
    manifest = manifest_of(bundle)
    del manifest["model"]["preprocess"]  # the schema fills in the default, which differs from 'preprocess'
    reseal(bundle, manifest)
    with pytest.raises(BundleError, match="'preprocess' differs from the model config's preprocessing"):
        load_bundle(bundle)


def _weights_outside(bundle, name: str = ENCODER.file, data: str = "encoder.onnx.data") -> None:
    """Re-save one graph with its weights in an external-data file beside it."""
    model = onnx.load(str(bundle / name))
    onnx.save_model(model, str(bundle / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data)  # tensors over 1 KB, as large exports do; small constants stay inline


def _caption(bundle, out):
    return CliRunner().invoke(infer_app, [str(Path(__file__).parents[3] / "examples" / "images"), "--model",
                                          str(bundle), "--out", str(out), "--backend", "onnxruntime"])


def test_compare_a_bundle_with_external_weights_vs_inline_sealed_and_refused_once_changed(bundle, tmp_path):
    """Every byte a bundle's runtimes read is sealed: a graph's external-data file is listed with its sha256,
    and a changed byte in it is refused by ``check`` and by ``sat-infer``, naming the file."""
    inline = _caption(bundle, tmp_path / "inline.jsonl")
    _weights_outside(bundle)
    write_manifest(bundle, manifest_of(bundle))
    assert "encoder.onnx.data" in manifest_of(bundle)["files"]
    assert _check(bundle).exit_code == 0
    external = _caption(bundle, tmp_path / "external.jsonl")
    assert inline.exit_code == external.exit_code == 0, inline.output + external.output
    assert (tmp_path / "inline.jsonl").read_text() == (tmp_path / "external.jsonl").read_text()
    data = bytearray((bundle / "encoder.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "encoder.onnx.data").write_bytes(bytes(data))
    assert f"{bundle / 'encoder.onnx.data'}: sha256 does not match" in _check(bundle).output.replace("\n", "")
    refused = _caption(bundle, tmp_path / "changed.jsonl")
    assert refused.exit_code == 1 and "encoder.onnx.data: sha256 does not match" in refused.output.replace("\n", "")
    assert not (tmp_path / "changed.jsonl").exists() or not (tmp_path / "changed.jsonl").read_text()


def test_a_graph_whose_external_weights_are_not_listed_is_refused(bundle):
    """A bundle resealed by a tool that hashed only the graphs (as sat-export did before): refused in one line."""
    _weights_outside(bundle)
    manifest = manifest_of(bundle)
    manifest["files"][ENCODER.file] = {"bytes": (bundle / ENCODER.file).stat().st_size,
                                       "sha256": sha256(bundle / ENCODER.file)}
    reseal(bundle, manifest)
    result = _check(bundle)
    assert result.exit_code == 1 and "keeps weights in 'encoder.onnx.data', which has no checksum entry" in \
        result.output.replace("\n", "")
    with pytest.raises(BundleError, match="encoder.onnx.data"):
        load_bundle(bundle)
