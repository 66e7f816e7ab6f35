"""TensorRT backend: two ``.plan`` engines (from their files), torch CUDA tensors as device buffers.

Written against the TensorRT 10/11 Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). Input shapes are set only when they change (the
decode loop's batch shrinks as rows finish). An engine is valid only on the TensorRT version and
GPU that built it: whoever opens one checks that first (``sat_export.build.tensorrt.check_engines``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from engines.base import Backend, EncoderOutputs, StepOutputs
from engines.contract import DECODER_STEP, ENCODER, GraphSpec
from engines.errors import BackendUnavailable, EngineError
from training.config import ModelConfig
from training.vocab import Vocab


def import_tensorrt():
    """``tensorrt`` and a CUDA device, or ``BackendUnavailable`` saying which is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed: pip install -e .[trt] "
                                 "(needs an NVIDIA GPU and the CUDA runtime)") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False")
    return tensorrt


class _Engine:
    """One deserialised engine and its execution context."""

    def __init__(self, runtime, plan: Path, spec: GraphSpec):
        self.spec = spec
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan}: TensorRT could not deserialise the engine (corrupt or incompatible)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = set(spec.input_names) | set(spec.output_names)
        if names != expected:
            raise EngineError(f"{plan}: engine tensors {sorted(names)} != contract {sorted(expected)}")
        self.context = self.engine.create_execution_context()
        self.dtypes = {n: _TORCH_DTYPES[str(self.engine.get_tensor_dtype(n))] for n in names}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __call__(self, inputs: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
        stream = torch.cuda.current_stream(device)
        keep = []  # inputs converted here must outlive the asynchronous launch
        for t, x in zip(self.spec.inputs, inputs):
            x = x.to(device=device, dtype=self.dtypes[t.name]).contiguous()
            keep.append(x)
            if self.shapes.get(t.name) != tuple(x.shape):  # set shapes only when they change
                self.context.set_input_shape(t.name, tuple(x.shape))
                self.shapes[t.name] = tuple(x.shape)
            self.context.set_tensor_address(t.name, x.data_ptr())
        outputs = []
        for name in self.spec.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {self.spec.name}: execute_async_v3 failed")
        return tuple(o.float() for o in outputs)


class TensorRTBackend(Backend):
    """Encoder and decoder_step engines on one CUDA device."""

    name = "tensorrt"

    def __init__(self, encoder_plan: str | Path, decoder_plan: str | Path, config: ModelConfig, vocab: Vocab,
                 device: torch.device | str = "cuda"):
        trt = import_tensorrt()
        super().__init__(config, vocab, device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {ENCODER.name: _Engine(self._runtime, Path(encoder_plan), ENCODER),
                         DECODER_STEP.name: _Engine(self._runtime, Path(decoder_plan), DECODER_STEP)}

    def encode(self, images: Tensor) -> EncoderOutputs:
        return self._engines[ENCODER.name]((images,), self.device)

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        return self._engines[DECODER_STEP.name]((tokens, h, c, features, features_proj), self.device)

    def close(self) -> None:
        self._engines.clear()


_TORCH_DTYPES = {"DataType.FLOAT": torch.float32, "DataType.HALF": torch.float16, "DataType.INT64": torch.int64,
                 "DataType.INT32": torch.int32, "DataType.BF16": torch.bfloat16}
