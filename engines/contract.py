"""The graph I/O contract: tensor names, dtypes and named axes of the two exported graphs.

Declared once here; the runtimes (``engines``), export, TensorRT profiles, the bundle manifest and the
tests all read it.

=============  ==========================================  ==========================================
graph          inputs                                      outputs
=============  ==========================================  ==========================================
encoder        images f32 (batch, 3, height, width)        features (batch, n_pix, enc_dim),
                                                           features_proj (batch, n_pix, att_dim),
                                                           h0, c0 (batch, dec_dim)
decoder_step   tokens i64 (batch,), h, c (batch, dec_dim),  logprobs (batch, vocab), alpha (batch, n_pix),
               features, features_proj                     h_next, c_next (batch, dec_dim)
=============  ==========================================  ==========================================

Only ``batch`` is dynamic; every other axis is fixed by the model config (see ``ModelConfig.dims``).
"""
from __future__ import annotations

from dataclasses import dataclass

from engines.errors import ShapeError

BATCH = "batch"
DEFAULT_OPSET = 18  # of both graphs (``sat-export build --opset``)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, numpy dtype name and named axes."""

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    def shape(self, dims: dict[str, int], batch: int | None = None) -> tuple[int | str, ...]:
        """Concrete shape; the batch axis stays symbolic (``"batch"``) unless ``batch`` is given."""
        return tuple(
            (batch if batch is not None else a) if a == BATCH else (dims[a] if isinstance(a, str) else a)
            for a in self.axes
        )


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its name, its fp32 file name, and ordered inputs and outputs."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_inputs(self, arrays: dict, dims: dict[str, int]) -> None:
        """Raise ``ShapeError`` naming the tensor if names, dtypes or shapes break the contract."""
        check_tensors(self.name, "input", self.inputs, arrays, dims)

    def check_outputs(self, arrays: dict, dims: dict[str, int]) -> None:
        check_tensors(self.name, "output", self.outputs, arrays, dims)


def check_tensors(graph: str, kind: str, specs, arrays: dict, dims: dict[str, int]) -> None:
    """Check ``arrays`` (numpy or torch) against ``specs``: names, then dtypes, then shapes."""
    expected = [s.name for s in specs]
    if sorted(arrays) != sorted(expected):
        raise ShapeError(f"{graph}: {kind} names {sorted(arrays)} != contract {sorted(expected)}")
    batch = None
    for spec in specs:
        arr = arrays[spec.name]
        dtype = str(arr.dtype).removeprefix("torch.")
        if dtype != spec.dtype:
            raise ShapeError(f"{graph}: {kind} '{spec.name}' has dtype {dtype}, contract says {spec.dtype}")
        batch = arr.shape[0] if batch is None else batch
        want = spec.shape(dims, batch)
        if tuple(arr.shape) != want:
            raise ShapeError(f"{graph}: {kind} '{spec.name}' has shape {tuple(arr.shape)}, contract says {want}")


def check_graph_io(path, spec: GraphSpec, found: dict[str, list[tuple[str, str, tuple]]], dims: dict[str, int]) -> None:
    """A graph's inputs and outputs (``found``: ``"input"``/``"output"`` -> ``(name, dtype, shape)``, ``BATCH``
    for a dynamic axis) are the contract's names, dtypes and sizes for this config, the batch symbolic:
    ``ShapeError`` naming file and tensor. The one comparison for an ONNX file as written
    (``sat_export.export.onnx.check_graph_io``) and as a runtime loaded it (so a graph that does not fit its
    config, say a hand-edited manifest, is refused before any image is read)."""
    for kind, wanted in (("input", spec.inputs), ("output", spec.outputs)):
        names = [name for name, _, _ in found[kind]]
        if names != [t.name for t in wanted]:
            raise ShapeError(f"{path}: {kind}s {names}, the contract says {[t.name for t in wanted]}")
        for (name, dtype, shape), want in zip(found[kind], wanted):
            if dtype != want.dtype:
                raise ShapeError(f"{path}: {kind} '{name}' has dtype {dtype}, the contract says {want.dtype}")
            if tuple(shape) != want.shape(dims):
                baked = any(w == BATCH and s != BATCH for s, w in zip(shape, want.shape(dims)))
                raise ShapeError(f"{path}: {kind} '{name}' has shape {list(shape)}, the model config says "
                                 f"{list(want.shape(dims))}" + (" (batch must be a symbolic axis)" if baked else ""))


def _f32(name: str, *axes) -> TensorSpec:
    return TensorSpec(name, "float32", axes)


ENCODER = GraphSpec(
    name="encoder",
    file="encoder.onnx",
    inputs=(_f32("images", BATCH, 3, "height", "width"),),
    outputs=(
        _f32("features", BATCH, "n_pix", "enc_dim"),
        _f32("features_proj", BATCH, "n_pix", "att_dim"),
        _f32("h0", BATCH, "dec_dim"),
        _f32("c0", BATCH, "dec_dim"),
    ),
)

DECODER_STEP = GraphSpec(
    name="decoder_step",
    file="decoder_step.onnx",
    inputs=(
        TensorSpec("tokens", "int64", (BATCH,)),
        _f32("h", BATCH, "dec_dim"),
        _f32("c", BATCH, "dec_dim"),
        _f32("features", BATCH, "n_pix", "enc_dim"),
        _f32("features_proj", BATCH, "n_pix", "att_dim"),
    ),
    outputs=(
        _f32("logprobs", BATCH, "vocab"),
        _f32("alpha", BATCH, "n_pix"),
        _f32("h_next", BATCH, "dec_dim"),
        _f32("c_next", BATCH, "dec_dim"),
    ),
)

GRAPHS = (ENCODER, DECODER_STEP)
