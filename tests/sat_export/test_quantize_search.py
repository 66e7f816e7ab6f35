"""Accuracy-aware int8: held-back split, module groups, and exclusion until the target is met."""
import json
import shutil

import onnx
import pytest
import torch

import sat_export.quantize_search as qs
from engines.ort import OrtBackend
from sat_export.bundle import load_bundle
from sat_export.quantize_search import node_groups, search_int8_encoder, split_held_back
from training.shapes import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 12, size=64) / "images"


def test_every_fourth_calibration_image_is_held_back():
    files = [f"{i}.jpg" for i in range(10)]
    calib, held = split_held_back(files)
    assert held == ["3.jpg", "7.jpg"] and calib == [f for f in files if f not in held]
    assert split_held_back(["a", "b"]) == (["a"], ["b"])


def test_groups_follow_the_module_tree_of_the_export(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "encoder.onnx"))
    groups = node_groups(model, model)
    assert {"backbone.0.1", "backbone.1", "backbone.4", "attention.enc_att", "init_h", "init_c"} <= set(groups)
    assert sum(len(v) for v in groups.values()) == len(model.graph.node)


def test_search_excludes_groups_one_at_a_time_until_agreement_reaches_the_target(tmp_path, tiny_bundle, shapes,
                                                                                 monkeypatch):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    real = qs.HeldBack.score
    calls = []

    def rising(self, encoder):  # 60 %, 80 %, 100 %: two exclusions needed for a 0.9 target
        _, rel = real(self, encoder)
        calls.append(encoder)
        return 0.4 + 0.2 * len(calls), rel

    monkeypatch.setattr(qs.HeldBack, "score", rising)
    result = search_int8_encoder(bundle, shapes, "minmax", target=0.9)
    assert [s.agreement for s in result.steps] == pytest.approx([0.6, 0.8, 1.0])
    assert len(result.excluded_groups) == 2 and result.reached and result.n_held_back == 3
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
    assert result.agreement >= 0.5 and result.steps[0].excluded is None
    b = load_bundle(bundle)
    with OrtBackend(result.path, b.graph_paths()[1], b.config, b.vocab) as ort:
        features = ort.encode(torch.randn(2, 3, 64, 64))[0]
    assert features.shape == (2, 16, 48)
