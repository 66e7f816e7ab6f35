"""TensorRT backend: two ``.plan`` engines (from their files), torch CUDA tensors as device buffers.

Written against the TensorRT 10/11 Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), as NVIDIA's samples and Polygraphy's runner use it:
engines are deserialised and run on the backend's own device (``cuda:N``) and non-default stream, every
call that reports failure by its return value is checked, input shapes are set only when they change
(the decode loop's batch shrinks as rows finish), and work larger than the optimisation profile's maximum
batch is split into runs of that size. Outputs are torch tensors of the contract's shapes, allocated on the
backend's stream by torch's caching allocator (no ``cudaMalloc``, no host synchronisation). Every address
bound is 256-byte aligned, as ``setTensorAddress`` requires (``NvInferRuntime.h``): a run of a split batch
starts rows into its tensors (int64 ``tokens`` at row 20: 160 bytes), so an input that is not aligned is
copied first. An engine is valid only on the TensorRT version and GPU that built it: whoever opens one
checks that first (``sat_export.bundler.tensorrt.open_engines``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from engines.base import GraphBackend
from engines.contract import BEAMS, DECODER_STEP, ENCODER, GraphSpec
from engines.errors import BackendUnavailable, EngineError, ShapeError, refused
from engines.ort import GPU_TRT_INSTALL
from training.config import ModelConfig
from training.vocab import Vocab

ALIGNMENT = 256  # bytes: every address given to setTensorAddress (NvInferRuntime.h)


def import_tensorrt():
    """``tensorrt`` and a CUDA device, or ``BackendUnavailable`` saying which is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {GPU_TRT_INSTALL} (needs an NVIDIA GPU and the CUDA "
                                 "runtime)") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False")
    return tensorrt


def empty_aligned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` at an ``ALIGNMENT``-aligned address (CUDA's caching allocator gives one already; the
    host's aligns to 64 bytes)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.data_ptr() % ALIGNMENT == 0:
        return out
    nbytes = out.numel() * out.element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    start = -raw.data_ptr() % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).view(shape)


def aligned(x: Tensor) -> Tensor:
    """``x`` (contiguous) where its address is ``ALIGNMENT``-aligned, else a copy that is."""
    return x if x.data_ptr() % ALIGNMENT == 0 else empty_aligned(tuple(x.shape), x.dtype, x.device).copy_(x)


class _Engine:
    """One deserialised engine, its execution context and its profile's batch range (profile 0)."""

    def __init__(self, runtime, plan: Path, spec: GraphSpec, dims: dict[str, int], device: torch.device):
        self.plan, self.spec, self.dims, self.device = plan, spec, dims, device
        with refused(plan, "TensorRT could not deserialise the engine"):
            self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan}: TensorRT could not deserialise the engine (corrupt or incompatible)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = set(spec.input_names) | set(spec.output_names)
        if names != expected:
            raise EngineError(f"{plan}: engine tensors {sorted(names)} != contract {sorted(expected)}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{plan}: TensorRT could not create an execution context (out of device memory?)")
        self.dtypes = {n: _TORCH_DTYPES[str(self.engine.get_tensor_dtype(n))] for n in names}
        ranges = [self.engine.get_tensor_profile_shape(t.name, 0) for t in spec.inputs]  # [min, opt, max] each
        self.min_batch, self.max_batch = max(r[0][0] for r in ranges), min(r[2][0] for r in ranges)
        self.opt_batch = ranges[0][1][0]
        beams = [r[2][t.axes.index(BEAMS)] for t, r in zip(spec.inputs, ranges) if BEAMS in t.axes]
        self.max_beams = min(beams) if beams else None
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __call__(self, inputs: tuple[Tensor, ...], stream: int) -> tuple[Tensor, ...]:
        """Run on ``stream`` (a CUDA stream handle), in runs of at most the profile's maximum batch."""
        n, most = inputs[0].size(0), self.max_batch
        if n <= most:
            return self._run(inputs, stream)
        parts = [self._run(tuple(x[i:i + most] for x in inputs), stream) for i in range(0, n, most)]
        return tuple(torch.cat(outs) for outs in zip(*parts))

    def _run(self, inputs: tuple[Tensor, ...], stream: int) -> tuple[Tensor, ...]:
        sizes = self.spec.input_sizes(x.shape for x in inputs)
        keep = []  # inputs converted here must outlive the asynchronous launch
        for t, x in zip(self.spec.inputs, inputs):
            x = aligned(x.to(device=self.device, dtype=self.dtypes[t.name]).contiguous())
            keep.append(x)
            shape = tuple(x.shape)
            if self.shapes.get(t.name) != shape:  # set shapes only when they change
                self.shapes.pop(t.name, None)
                if not self.context.set_input_shape(t.name, shape):
                    beams = f", beams 1..{self.max_beams}" if self.max_beams else ""
                    raise ShapeError(f"{self.plan}: input '{t.name}' of shape {shape} is outside the engine's "
                                     f"profile (batch {self.min_batch}..{self.max_batch}{beams})")
                self.shapes[t.name] = shape
            self._bind(t.name, x)
        outputs = []
        for t in self.spec.outputs:
            want, got = t.shape(self.dims, sizes), tuple(self.context.get_tensor_shape(t.name))
            if got != want:
                raise ShapeError(f"{self.plan}: output '{t.name}' has shape {got}, the contract says {want}")
            out = empty_aligned(want, self.dtypes[t.name], self.device)
            self._bind(t.name, out)
            outputs.append(out)
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.plan}: TensorRT could not launch the engine (execute_async_v3 returned "
                              "False; see its log above)")
        return tuple(o.float() for o in outputs)

    def _bind(self, name: str, tensor: Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise EngineError(f"{self.plan}: TensorRT refused the address of tensor '{name}'")


class TensorRTBackend(GraphBackend):
    """Encoder and decoder_step engines on one CUDA device, run on the backend's own stream."""

    name = "tensorrt"

    def __init__(self, encoder_plan: str | Path, decoder_plan: str | Path, config: ModelConfig, vocab: Vocab,
                 device: torch.device | str = "cuda", precision: str = "fp32"):
        trt = import_tensorrt()
        super().__init__(config, vocab, device)
        self.precision = precision  # what the engines were built with
        self.own_stream()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dims = config.dims()
        with torch.cuda.device(self.device):  # TensorRT deserialises onto, and runs on, the current device
            self._engines = {spec.name: _Engine(self._runtime, Path(plan), spec, dims, self.device)
                             for spec, plan in ((ENCODER, encoder_plan), (DECODER_STEP, decoder_plan))}

    def run(self, spec: GraphSpec, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        with self.on_stream():
            return self._engines[spec.name](inputs, self.stream.cuda_stream)

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` batch of the engines' optimisation profile (opt: the decoder step's)."""
        engines = list(self._engines.values())
        return (max(e.min_batch for e in engines), engines[-1].opt_batch, min(e.max_batch for e in engines))

    def close(self) -> None:
        self._engines.clear()

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}, batch profile {'/'.join(map(str, self.batch_profile))}"


_TORCH_DTYPES = {"DataType.FLOAT": torch.float32, "DataType.HALF": torch.float16, "DataType.INT64": torch.int64,
                 "DataType.INT32": torch.int32, "DataType.BF16": torch.bfloat16}
