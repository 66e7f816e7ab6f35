"""The graph I/O contract: tensor names, dtypes and named axes of the two exported graphs.

Declared once here; the runtimes (``engines``), export, TensorRT profiles, the bundle manifest and the
tests all read it.

=============  ==========================================  ==========================================
graph          inputs                                      outputs
=============  ==========================================  ==========================================
encoder        images f32 (batch, 3, height, width)        features (batch, n_pix, enc_dim),
                                                           features_proj (batch, n_pix, att_dim),
                                                           h0, c0 (batch, dec_dim)
decoder_step   tokens i64 (batch, beams),                  logprobs (batch, beams, vocab),
               h, c (batch, beams, dec_dim),               alpha (batch, beams, n_pix),
               features (batch, n_pix, enc_dim),           h_next, c_next (batch, beams, dec_dim)
               features_proj (batch, n_pix, att_dim)
=============  ==========================================  ==========================================

``batch`` (images) and ``beams`` (decoder rows per image: 1 for greedy, k for beam search) are dynamic; every
other axis is fixed by the model config (see ``ModelConfig.dims``). The step reads each image's features once for
all its beams, so a beam search never copies the features per beam (bundle version 2; version 1 took one image's
features per row).
"""
from __future__ import annotations

from dataclasses import dataclass

from engines.errors import ShapeError

BATCH = "batch"
BEAMS = "beams"
DYNAMIC = (BATCH, BEAMS)
DEFAULT_OPSET = 18  # of both graphs (``sat-export build --opset``)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, numpy dtype name and named axes."""

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    def shape(self, dims: dict[str, int], sizes: dict[str, int] | None = None) -> tuple[int | str, ...]:
        """Concrete shape; a dynamic axis (``"batch"``, ``"beams"``) stays symbolic unless ``sizes`` gives it."""
        sizes = sizes or {}
        return tuple(sizes.get(a, a) if a in DYNAMIC else (dims[a] if isinstance(a, str) else a) for a in self.axes)

    def sizes(self, shape: tuple[int, ...]) -> dict[str, int]:
        """The dynamic axes' sizes in a tensor of this spec of ``shape``."""
        return {a: int(n) for a, n in zip(self.axes, shape) if a in DYNAMIC}


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

    def input_sizes(self, shapes) -> dict[str, int]:
        """The dynamic axes' sizes in inputs of ``shapes`` (in the contract's order), to shape the outputs by."""
        return {axis: n for t, shape in zip(self.inputs, shapes) for axis, n in t.sizes(tuple(shape)).items()}

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
    sizes: dict[str, int] = {}  # each dynamic axis takes the size it first has
    for spec in specs:
        arr = arrays[spec.name]
        dtype = str(arr.dtype).removeprefix("torch.")
        if dtype != spec.dtype:
            raise ShapeError(f"{graph}: {kind} '{spec.name}' has dtype {dtype}, contract says {spec.dtype}")
        sizes = {**spec.sizes(arr.shape), **sizes}
        want = spec.shape(dims, sizes)
        if tuple(arr.shape) != want:
            raise ShapeError(f"{graph}: {kind} '{spec.name}' has shape {tuple(arr.shape)}, contract says {want}")


def check_graph_io(path, spec: GraphSpec, found: dict[str, list[tuple[str, str, tuple]]], dims: dict[str, int]) -> None:
    """A graph's inputs and outputs (``found``: ``"input"``/``"output"`` -> ``(name, dtype, shape)``, a string for a
    symbolic axis) are the contract's names, dtypes and sizes for this config, the dynamic axes symbolic:
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
            wanted_shape = want.shape(dims)
            if len(shape) != len(wanted_shape) or not all(map(_axis_fits, shape, wanted_shape)):
                baked = [w for s, w in zip(shape, wanted_shape) if w in DYNAMIC and not isinstance(s, str)]
                note = f" ({' and '.join(baked)} must be symbolic axes)" if baked else ""
                raise ShapeError(f"{path}: {kind} '{name}' has shape {list(shape)}, the model config says "
                                 f"{list(wanted_shape)}{note}")


def _axis_fits(found: int | str, wanted: int | str) -> bool:
    """A graph's axis fits the contract's: symbolic (any name) where the contract's is dynamic, else its size."""
    return isinstance(found, str) if wanted in DYNAMIC else found == wanted


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
        TensorSpec("tokens", "int64", (BATCH, BEAMS)),
        _f32("h", BATCH, BEAMS, "dec_dim"),
        _f32("c", BATCH, BEAMS, "dec_dim"),
        _f32("features", BATCH, "n_pix", "enc_dim"),
        _f32("features_proj", BATCH, "n_pix", "att_dim"),
    ),
    outputs=(
        _f32("logprobs", BATCH, BEAMS, "vocab"),
        _f32("alpha", BATCH, BEAMS, "n_pix"),
        _f32("h_next", BATCH, BEAMS, "dec_dim"),
        _f32("c_next", BATCH, BEAMS, "dec_dim"),
    ),
)

GRAPHS = (ENCODER, DECODER_STEP)
