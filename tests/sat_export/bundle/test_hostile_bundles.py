"""Bundles as untrusted input: every manifest field mutated and resealed, links and special files in the folder,
graphs onnxruntime refuses. `sat-export check` and `sat-infer` refuse the same bundles, in one line naming the
file (and the field), and caption with the ones they accept."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import external_data_helper
from typer.testing import CliRunner

from engines.contract import DECODER_STEP, ENCODER
from sat_export.bundler.check import check_bundle
from sat_export.bundle.format import DIGEST_KEY, MANIFEST_FILE, _render, io_table, load_bundle, write_manifest
from sat_export.cli.export import app as export_app
from sat_export.cli.infer import app as infer_app
from sat_export.pipeline.infer import plan, run
from sat_export.options import InferOptions
from sat_export.registry import open_backend
from tests.conftest import manifest_of, one_line_error, reseal
from tests.sat_export.pipeline.test_infer import read_rows, write_images
from training.config import ModelConfig
from training.errors import SatError


def check(bundle: Path):
    return CliRunner().invoke(export_app, ["check", str(bundle)])


def infer(bundle: Path, images: Path, out: Path):
    return CliRunner().invoke(infer_app, [str(images), "--out", str(out), "--model", str(bundle),
                                          "--backend", "onnxruntime", "--threads", "1"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 2)
    return folder


def both_refuse(bundle: Path, images: Path, tmp_path: Path, *names: str) -> None:
    """`sat-export check` and `sat-infer` both refuse ``bundle`` in one line naming ``names``; no row is written."""
    one_line_error(check(bundle), *names)
    out = tmp_path / "c.jsonl"
    one_line_error(infer(bundle, images, out), *names)
    assert not out.exists() or out.read_bytes() == b""


def paths_of(value, prefix=()) -> list[tuple]:
    """Every key / index path inside a JSON value (the whole manifest's fields, to any depth)."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, child in children for p in [(*prefix, key), *paths_of(child, (*prefix, key))]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def same_kind(value) -> st.SearchStrategy:
    """Another value of ``value``'s JSON type: mutations that may well stay valid."""
    kinds = {bool: st.booleans(), int: st.integers(-2, 300), float: st.floats(-1, 2), str: st.text(max_size=6),
             list: st.lists(json_values, max_size=3), dict: st.dictionaries(st.text(max_size=6), json_values, max_size=3)}
    return kinds.get(type(value), json_values)


def field(manifest: dict, path: tuple):
    for key in path:
        manifest = manifest[key]
    return manifest


def mutate(manifest: dict, path: tuple, value, delete: bool) -> None:
    parent = field(manifest, path[:-1])
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def agree(bundle: Path, images: Path, out: Path) -> bool:
    """True when check and inference both accept ``bundle`` (and every image gets a caption), False when both
    refuse it with a one-line error naming the manifest or a file of the bundle."""
    outcomes = []
    for attempt in (lambda: check_bundle(bundle), lambda: _caption(bundle, images, out)):
        try:
            attempt()
            outcomes.append(True)
        except SatError as err:
            assert "\n" not in str(err) and str(bundle) in str(err), str(err)
            outcomes.append(False)
    assert outcomes[0] == outcomes[1], f"check accepted: {outcomes[0]}, inference accepted: {outcomes[1]}"
    return outcomes[0]


def _caption(bundle: Path, images: Path, out: Path) -> None:
    with open_backend(bundle, "onnxruntime", threads=1) as backend, plan([images], out, overwrite=True) as work:
        run(backend, work, InferOptions(batch_size=2, workers=1))
    assert all("caption" in row for row in read_rows(out).values())


@pytest.fixture(scope="module")
def field_paths(tiny_bundle) -> list[tuple]:
    return [p for p in paths_of(manifest_of(tiny_bundle)) if p != (DIGEST_KEY,)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), delete=st.booleans())
def test_every_manifest_field_mutated_and_resealed_is_refused_in_one_line_or_runs(tiny_bundle, images, field_paths,
                                                                                 tmp_path_factory, data, delete):
    bundle = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("mutated") / "bundle")
    manifest = manifest_of(bundle)
    path = data.draw(st.sampled_from(field_paths), label="field")
    value = data.draw(same_kind(field(manifest, path)) | json_values, label="value")
    mutate(manifest, path, value, delete and not isinstance(value, bool))
    reseal(bundle, manifest)
    event("accepted" if agree(bundle, images, bundle.parent / "c.jsonl") else "refused")


CASES = {  # the findings: field path -> new value, and the field the refusal must name
    "model as a string": (("model",), "resnet", "field 'model'"),
    "parity as a list": (("parity",), [1, 2], "field 'parity'"),
    "tensorrt as a list": (("tensorrt",), ["encoder.plan"], "field 'tensorrt'"),
    "bytes as a string": (("files", "encoder.onnx", "bytes"), "123", "field 'files.encoder.onnx.bytes'"),
    "grid 8.0": (("model", "grid"), 4.0, "field 'model.grid'"),
    "crop 64.0": (("model", "preprocess", "crop"), 64.0, "field 'model.preprocess.crop'"),
    "a word that is an int": (("vocab", "itos", 5), 5, "field 'vocab.itos.5'"),
    "mean with 2 values": (("model", "preprocess", "mean"), [0.5, 0.5], "field 'model.preprocess.mean"),
    "opset as a string": (("opset",), "18", "field 'opset'"),
    "precisions naming a path": (("precisions", "fp32", "encoder"), "../../etc/hostname", "points outside the bundle"),
    "deeply nested JSON": (("parity", "fp32", "outputs"), "NESTED", "nested too deeply"),
    "OpenVINO IR naming a path": (("openvino_int8",), {"encoder": "../../etc/x.xml"}, "points outside the bundle"),
    "OpenVINO IR that is not .xml": (("openvino_int8",), {"encoder": "encoder.onnx"}, "must name an OpenVINO IR"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_manifests_that_gave_tracebacks_are_refused_by_check_and_by_sat_infer_alike(tiny_bundle, images, tmp_path,
                                                                                      case):
    path, value, field = CASES[case]
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    mutate(manifest, path, value, delete=False)
    reseal(bundle, manifest)
    if value == "NESTED":  # deeper than any JSON parser recurses
        (bundle / MANIFEST_FILE).write_bytes(_render(manifest).replace(b'"NESTED"', b"[" * 100_000 + b"]" * 100_000))
    both_refuse(bundle, images, tmp_path, f"{bundle / MANIFEST_FILE}:", field)


def test_a_config_that_does_not_fit_its_graphs_is_refused_by_inference_as_by_check(tiny_bundle, images, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    for cfg in (manifest["model"]["preprocess"], manifest["preprocess"]):
        cfg.update(resize=80, crop=72)  # consistent everywhere in the manifest, but the graphs take 64 px
    manifest["graphs"] = io_table(ModelConfig.from_dict(manifest["model"]))
    reseal(bundle, manifest)
    both_refuse(bundle, images, tmp_path, str(bundle / ENCODER.file), "images")


def outside_copy(bundle: Path, name: str) -> Path:
    """``name`` moved outside the bundle, and linked back: its checksum still matches."""
    target = bundle.parent / f"outside-{name}"
    (bundle / name).rename(target)
    (bundle / name).symlink_to(target)
    return target


@pytest.mark.parametrize("name", [ENCODER.file, MANIFEST_FILE])
def test_a_link_in_a_bundle_is_refused_before_it_is_read_even_when_its_checksum_matches(tiny_bundle, images, tmp_path,
                                                                                       name):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    target = outside_copy(bundle, name)
    both_refuse(bundle, images, tmp_path, f"{bundle / name}: a symlink")
    assert str(target.stat().st_size) not in check(bundle).output  # nothing about the target leaks


def test_an_unlisted_link_or_a_special_file_in_a_bundle_is_refused(tiny_bundle, images, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (bundle / "notes").symlink_to("/etc/hostname")
    both_refuse(bundle, images, tmp_path, f"{bundle / 'notes'}: a symlink")
    (bundle / "notes").unlink()
    (bundle / DECODER_STEP.file).unlink()
    os.mkfifo(bundle / DECODER_STEP.file)  # reading it would block for ever
    both_refuse(bundle, images, tmp_path, f"{bundle / DECODER_STEP.file}: not a regular file")


def test_graphs_onnxruntime_refuses_are_one_line_in_check_and_in_sat_infer(tiny_bundle, images, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    (bundle / ENCODER.file).write_bytes(os.urandom(4096))  # garbage, resealed
    write_manifest(bundle, manifest)
    both_refuse(bundle, images, tmp_path, str(bundle / ENCODER.file))

    model = onnx.load(tiny_bundle / ENCODER.file)  # weights stored outside the bundle folder
    tensor = next(t for t in model.graph.initializer if t.raw_data)
    (tmp_path / "weights.bin").write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location="../weights.bin")
    tensor.ClearField("raw_data")
    onnx.save(model, bundle / ENCODER.file)
    write_manifest(bundle, manifest)
    both_refuse(bundle, images, tmp_path, str(bundle / ENCODER.file))


def test_check_says_the_seal_proves_integrity_not_authenticity(tiny_bundle):
    result = check(tiny_bundle)
    assert result.exit_code == 0 and "integrity" in result.output and "not authenticity" in result.output


def test_a_vocabulary_that_passes_the_schema_is_still_checked_as_a_vocabulary(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    manifest["vocab"]["itos"][5] = manifest["vocab"]["itos"][6]
    reseal(bundle, manifest)
    with pytest.raises(SatError, match="manifest.json: invalid vocabulary \\(vocabulary has duplicate words\\)"):
        load_bundle(bundle)
