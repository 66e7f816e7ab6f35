"""ONNX export: the graphs follow the contract, keep their weights inside, and match eager at any batch."""
from unittest import mock

import numpy as np
import onnx
import pytest
import torch

from engines.contract import BEAMS, DECODER_STEP, ENCODER
from engines.ort import OrtBackend
from sat_export.errors import BundleError
from sat_export.export.onnx import (DecoderStepGraph, EncoderGraph, check_graph_io, export_graph, export_onnx,
                                    step_inputs)
from sat_export.export.parity import verify_onnx
from tests.conftest import tiny_model


def _rel_l2(got, ref):
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def test_graphs_pass_checker_with_symbolic_batch_on_every_input_and_output(tiny_bundle):
    for spec in (ENCODER, DECODER_STEP):
        path = tiny_bundle / spec.file
        check_graph_io(path, spec, tiny_model().config.dims())
        graph = onnx.load(str(path)).graph
        for value in [*graph.input, *graph.output]:
            dim = value.type.tensor_type.shape.dim
            assert dim[0].dim_param, f"{spec.file}: {value.name} has a static batch"
            if BEAMS in next(t for t in (*spec.inputs, *spec.outputs) if t.name == value.name).axes:
                assert dim[1].dim_param not in ("", dim[0].dim_param), f"{value.name}: beams is not its own axis"
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.initializer)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_compare_eager_vs_onnxruntime_at_batch(tiny_bundle, vocab, batch):
    model = tiny_model()
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    with OrtBackend(tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file, model.config, vocab) as ort, \
            torch.inference_mode():
        for ref, got in zip(model.encode(images), ort.encode(images)):
            assert got.shape == ref.shape and _rel_l2(got, ref) <= 1e-5
        feeds = step_inputs(model, images, seed=batch)
        args = [feeds[n] for n in DECODER_STEP.input_names]
        for ref, got in zip(model.step(*args), ort.step(*args)):
            assert got.shape == ref.shape and _rel_l2(got, ref) <= 1e-5


def test_features_proj_is_computed_once_in_the_encoder_graph(tiny_bundle):
    enc_att = tiny_model().attention.enc_att.weight.detach().numpy()

    def holds_enc_att(path):
        arrays = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
        return any(a.shape in (enc_att.shape, enc_att.T.shape) and
                   (np.array_equal(a, enc_att) or np.array_equal(a, enc_att.T)) for a in arrays)

    assert holds_enc_att(tiny_bundle / ENCODER.file)
    assert not holds_enc_att(tiny_bundle / DECODER_STEP.file)


def test_wrappers_call_the_models_own_encode_and_step():
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    with mock.patch.object(model, "encode", wraps=model.encode) as encode, torch.inference_mode():
        EncoderGraph(model)(images)
    encode.assert_called_once()
    feeds = step_inputs(model, images)
    with mock.patch.object(model, "step", wraps=model.step) as step, torch.inference_mode():
        out = DecoderStepGraph(model)(*(feeds[n] for n in DECODER_STEP.input_names))
    step.assert_called_once()
    torch.testing.assert_close(out[0], model.step(*(feeds[n] for n in DECODER_STEP.input_names))[0])


def test_export_refuses_a_batch_1_or_beams_1_example(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="at least 2"):
        export_graph(EncoderGraph(model), ENCODER, {"images": torch.randn(1, 3, 64, 64)}, tmp_path / "e.onnx",
                     model.config.dims())
    with pytest.raises(ValueError, match="at least 2 on batch, beams"):
        export_graph(DecoderStepGraph(model), DECODER_STEP, step_inputs(model, torch.randn(2, 3, 64, 64), beams=1),
                     tmp_path / "d.onnx", model.config.dims())


def test_check_graph_io_names_the_file_on_contract_mismatch(tiny_bundle, tmp_path):
    dims = tiny_model().config.dims()
    with pytest.raises(BundleError, match="decoder_step.onnx: inputs"):
        check_graph_io(tiny_bundle / DECODER_STEP.file, ENCODER, dims)
    static = onnx.load(str(tiny_bundle / ENCODER.file))
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # bake a static batch
    onnx.save(static, str(tmp_path / "static.onnx"))
    with pytest.raises(BundleError, match="static.onnx: input 'images'.*symbolic"):
        check_graph_io(tmp_path / "static.onnx", ENCODER, dims)
    static = onnx.load(str(tiny_bundle / DECODER_STEP.file))
    static.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 3  # bake the beams of h
    onnx.save(static, str(tmp_path / "static_beams.onnx"))
    with pytest.raises(BundleError, match=r"static_beams.onnx: input 'h' has shape \['batch', 3, 32\].*\(beams must "):
        check_graph_io(tmp_path / "static_beams.onnx", DECODER_STEP, dims)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="junk.onnx: not a valid ONNX model"):
        check_graph_io(tmp_path / "junk.onnx", ENCODER, dims)


def test_fp16_pair_keeps_float32_io_and_passes_fp16_parity(tmp_path, vocab):
    model = tiny_model()
    paths = export_onnx(model, tmp_path, "fp16")
    assert [p.name for p in paths.values()] == ["encoder.fp16.onnx", "decoder_step.fp16.onnx"]
    for spec in (ENCODER, DECODER_STEP):
        check_graph_io(paths[spec.name], spec, model.config.dims())  # dtypes as in the contract: float32 I/O
        ops = {init.data_type for init in onnx.load(str(paths[spec.name])).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in ops
    report = verify_onnx(model, vocab, paths[ENCODER.name], paths[DECODER_STEP.name], "fp16")
    assert report.passed, report.to_dict()
    assert max(d.rel_l2 for d in report.diffs) > 1e-6  # really reduced precision, not an fp32 copy


def test_fp16_step_keeps_its_softmaxes_and_the_cell_state_in_float32(tmp_path):
    """The attention softmax and the log-softmax read float32, and nothing on the way from the cell state ``c`` to
    ``c_next`` is fp16: the state carried across steps is never rounded to fp16."""
    path = export_onnx(tiny_model(), tmp_path, "fp16")[DECODER_STEP.name]
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    softmaxes = [n for n in graph.node if n.op_type in ("Softmax", "LogSoftmax")]
    assert len(softmaxes) == 2 and all(dtype[n.input[0]] == onnx.TensorProto.FLOAT for n in softmaxes)
    after_c, producer = {"c"}, {out: n for n in graph.node for out in n.output}
    for node in graph.node:  # topological order: every tensor computed from c
        if after_c & set(node.input):
            after_c.update(node.output)
    path_to_c_next, todo = set(), ["c_next"]
    while todo:  # every tensor c_next is computed from
        name = todo.pop()
        if name not in path_to_c_next:
            path_to_c_next.add(name)
            todo += list(producer[name].input) if name in producer else []
    on_the_way = after_c & path_to_c_next
    shapes = {onnx.TensorProto.INT64}  # the rows' count, read off c's shape to reshape it
    assert {"c", "c_next"} < on_the_way and {dtype[t] for t in on_the_way} - shapes == {onnx.TensorProto.FLOAT}
