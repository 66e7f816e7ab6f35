"""Accuracy-aware int8: held-back split, module groups, and exclusion until the task rule is met."""
import json
import shutil

import onnx
import pytest
import torch

import sat_export.quantize.search as qs
from engines.ort import OrtBackend
from sat_export.bundle.format import load_bundle
from sat_export.quantize.search import node_groups, search_int8_encoder, split_held_back
from tests.conftest import fake_verdict
from training.options import DecodeOptions
from training.shapes import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 12, size=64) / "images"


def test_every_second_calibration_image_is_held_back():
    files = [f"{i}.jpg" for i in range(10)]
    calib, held = split_held_back(files)
    assert held == ["1.jpg", "3.jpg", "5.jpg", "7.jpg", "9.jpg"] and calib == [f for f in files if f not in held]
    assert split_held_back(["a", "b"]) == (["a"], ["b"])


def test_groups_follow_the_module_tree_of_the_export(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "encoder.onnx"))
    groups = node_groups(model, model)
    assert {"backbone.0.1", "backbone.1", "backbone.4", "attention.enc_att", "init_h", "init_c"} <= set(groups)
    assert sum(len(v) for v in groups.values()) == len(model.graph.node)


def test_search_excludes_groups_one_at_a_time_until_the_task_rule_is_met(tmp_path, tiny_bundle, shapes, monkeypatch):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    real = qs.HeldBack.score
    calls = []

    def rising(self, encoder):  # 60 %, 80 %, 100 % of fp32's metrics: two exclusions needed for a 0.9 target
        _, rel = real(self, encoder)
        calls.append(encoder)
        return fake_verdict(0.4 + 0.2 * len(calls)), rel

    monkeypatch.setattr(qs.HeldBack, "score", rising)
    result = search_int8_encoder(bundle, shapes, "minmax", target=0.9)
    assert [s.worst_ratio for s in result.steps] == pytest.approx([0.6, 0.8, 1.0])
    assert [s.faithful for s in result.steps] == [False, False, True]
    assert len(result.excluded_groups) == 2 and result.reached and result.n_held_back == 6
    graph = onnx.load(str(result.path)).graph
    float_weights = {i.name for i in graph.initializer}
    convs = {n.name: n.input[1] in float_weights for n in graph.node if n.op_type == "Conv"}
    excluded = set(result.excluded_nodes)
    assert result.head_nodes and not excluded & set(result.head_nodes)
    excluded |= set(result.head_nodes)  # the head after the last convolution always stays fp32
    assert any(convs[n] for n in convs if n in excluded)  # excluded convolutions keep float weights
    assert not any(convs[n] for n in convs if n not in excluded)  # the others read int8 ones
    json.dumps(result.to_dict())


def test_search_on_the_real_scores_keeps_a_runnable_encoder(tmp_path, tiny_bundle, shapes):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    result = search_int8_encoder(bundle, shapes, "minmax", target=0.5)
    assert result.steps[0].excluded is None and result.verdict["images"] == 6
    assert result.references.startswith("human captions")  # make-shapes wrote captions.txt beside images/
    assert result.to_dict()["verdict"]["bleu4"]["ci95"][0] <= result.to_dict()["verdict"]["bleu4"]["difference"]
    b = load_bundle(bundle)
    with OrtBackend(result.path, b.graph_paths()[1], b.config, b.vocab) as ort:
        features = ort.encode(torch.randn(2, 3, 64, 64))[0]
    assert features.shape == (2, 16, 48)


def test_without_a_captions_file_fp32_captions_are_the_references(tmp_path, tiny_bundle, shapes):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    images = shutil.copytree(shapes, tmp_path / "calib")  # the images without their captions.txt
    held = qs.HeldBack(load_bundle(bundle), sorted(images.glob("*.jpg"))[:3])
    assert not held.human and held.references == [[c] for c in held.captions]
    verdict_fp32, rel = held.score(held.encoder)  # fp32 judged against itself
    assert verdict_fp32["faithful"] and verdict_fp32["agreement"] == 1.0 and rel == 0.0
    result = search_int8_encoder(bundle, images, "minmax", target=0.01, max_excluded=0)
    assert result.references.startswith("the fp32 captions")


def test_the_search_judges_the_int8_encoder_on_captions_decoded_with_the_beam_it_will_run_with(tmp_path, tiny_bundle,
                                                                                              shapes, monkeypatch):
    from training.decode import decode

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    b = load_bundle(bundle)
    files = sorted(shapes.glob("*.jpg"))[:4]
    held = qs.HeldBack(b, files, beam=3)
    with OrtBackend(*b.graph_paths(), b.config, b.vocab) as ort:
        enc = ort.encode(held.images)
        beam3 = [b.vocab.decode(c.tokens) for c in decode(ort.step, enc, b.vocab.special_ids(),
                                                          DecodeOptions(beam=3, max_len=20))]
    assert held.captions == beam3 and held.options.beam == 3
    beams = []
    real_decode = qs.decode
    monkeypatch.setattr(qs, "decode", lambda step, enc, ids, options: beams.append(options.beam) or
                        real_decode(step, enc, ids, options))
    result = search_int8_encoder(bundle, shapes, "minmax", target=0.01, max_excluded=0, beam=3)
    assert set(beams) == {3} and len(beams) >= 2  # the fp32 references and every int8 candidate
    assert result.beam == 3 and result.to_dict()["beam"] == 3
