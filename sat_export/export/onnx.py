"""ONNX export of the two graphs of the contract: the model's own ``encode`` and ``step``.

Each graph is a thin wrapper module that calls the model's method (nothing is re-implemented),
traced with ``torch.onnx.export(dynamo=True)`` from an example of 2 images (3 beams each, for the step) with
the contract's dynamic axes (``batch``, ``beams``) symbolic on every input (an axis of size 1 in the example would
be baked in). Weights are stored
inside the ``.onnx`` files. ``fp16`` graphs come from a half-precision copy of the model; their
inputs and outputs stay float32 (cast at the graph boundary), so every runtime feeds them alike, and
the model's ``step`` keeps the attention softmax, the log-softmax and the LSTM cell state in float32
(``ShowAttendTell.step``): the state carried from step to step never passes through fp16. (Not a
block list in a graph conversion, as onnxconverter-common does: its converter, also onnxruntime's
``transformers.float16``, casts every kept node's output back to fp16, and the state input to fp16
before casting it up, so the state would still be rounded to fp16 at every step.)
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from engines.base import Backend, EncoderOutputs
from engines.contract import DECODER_STEP, DEFAULT_OPSET, DYNAMIC, ENCODER, GraphSpec
from engines.contract import check_graph_io as contract_io
from engines.errors import ShapeError
from sat_export.bundle.format import graph_file
from sat_export.errors import BundleError
from training.errors import first_line
from training.model import ShowAttendTell

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
EXAMPLE_BATCH = 2
EXAMPLE_BEAMS = 3  # not the batch: two example axes of one size could be taken for one axis


class EncoderGraph(nn.Module):
    """``images -> features, features_proj, h0, c0``: ``model.encode`` with float32 I/O."""

    def __init__(self, model: ShowAttendTell, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.float() for t in self.model.encode(images.to(self.dtype)))


class DecoderStepGraph(nn.Module):
    """``tokens, h, c, features, features_proj -> logprobs, alpha, h_next, c_next``: ``model.step``."""

    def __init__(self, model: ShowAttendTell, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor):
        features, features_proj = (t.to(self.dtype) for t in (features, features_proj))
        return tuple(t.float() for t in self.model.step(tokens, h, c, features, features_proj))


def random_images(model: ShowAttendTell | Backend, n_img: int, seed: int = 0) -> Tensor:
    """``(n_img, 3, crop, crop)`` standard-normal images, the size the model's preprocessing gives."""
    crop = model.config.preprocess.crop
    return torch.randn(n_img, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


def step_inputs(model: ShowAttendTell | Backend, images: Tensor, seed: int = 0,
                encoded: EncoderOutputs | None = None, beams: int = EXAMPLE_BEAMS) -> dict[str, Tensor]:
    """Inputs of ``decoder_step`` for ``images`` with ``beams`` rows each: the encoder's outputs (``encoded``, else
    ``model.encode``), the state of each beam apart (``h0``, ``c0`` plus noise) and random tokens."""
    if encoded is None:
        with torch.no_grad():
            encoded = model.encode(images)
    features, features_proj, h, c = encoded
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (images.size(0), beams), generator=gen)
    h, c = (x.unsqueeze(1) + 0.1 * torch.randn(x.size(0), beams, x.size(1), generator=gen).to(x) for x in (h, c))
    return {"tokens": tokens, "h": h, "c": c, "features": features, "features_proj": features_proj}


def export_graph(module: nn.Module, spec: GraphSpec, example: dict[str, Tensor], path: Path,
                 dims: dict[str, int], opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``module`` on ``example`` (each dynamic axis >= 2) into ``path`` and check it against ``spec``."""
    args = tuple(example[name] for name in spec.input_names)
    if any(x.shape[i] < 2 for t, x in zip(spec.inputs, args) for i, axis in enumerate(t.axes) if axis in DYNAMIC):
        raise ValueError(f"{spec.name}: export needs example sizes of at least 2 on {', '.join(DYNAMIC)} "
                         "(a size of 1 bakes a static axis)")
    dims_of = {axis: torch.export.Dim(axis, min=1) for axis in DYNAMIC}
    dynamic = tuple({i: dims_of[axis] for i, axis in enumerate(t.axes) if axis in DYNAMIC} for t in spec.inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # each axis is one Dim
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, verbose=False, external_data=False,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_shapes=dynamic, opset_version=opset)
    check_graph_io(path, spec, dims)
    return path


def export_onnx(model: ShowAttendTell, out_dir: str | Path, precision: str = "fp32",
                opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Export ``encoder`` and ``decoder_step`` of ``model`` into ``out_dir``; returns graph name -> path."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dtype = PRECISIONS[precision]
    traced = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    images = random_images(model, EXAMPLE_BATCH)
    dims = model.config.dims()
    examples = {ENCODER.name: {"images": images}, DECODER_STEP.name: step_inputs(model, images)}
    wrappers = {ENCODER.name: EncoderGraph, DECODER_STEP.name: DecoderStepGraph}
    return {spec.name: export_graph(wrappers[spec.name](traced, dtype), spec, examples[spec.name],
                                    out_dir / graph_file(spec, precision), dims, opset)
            for spec in (ENCODER, DECODER_STEP)}


def check_graph_io(path: Path, spec: GraphSpec, dims: dict[str, int]) -> None:
    """``onnx.checker`` passes and the graph's inputs/outputs are the contract's (names, dtypes, shapes,
    symbolic dynamic axes: ``engines.contract.check_graph_io``, as the runtimes check theirs).

    Raises ``BundleError`` naming the file and the first tensor that differs.
    """
    try:
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError,
            OSError, ValueError) as err:  # protobuf's DecodeError is a ValueError
        raise BundleError(f"{path}: not a valid ONNX model ({first_line(err, 160)})") from None
    found = {kind: [(t.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type)).name,
                     tuple(d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim))
                    for t in tensors] for kind, tensors in (("input", graph.input), ("output", graph.output))}
    try:
        contract_io(path, spec, found, dims)
    except ShapeError as err:
        raise BundleError(str(err)) from None
