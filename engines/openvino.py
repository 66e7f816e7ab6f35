"""OpenVINO backend: the encoder compiled by OpenVINO on the CPU, the decoder step on ONNX Runtime.

The encoder is an ONNX file (OpenVINO reads it directly) or an OpenVINO IR ``.xml`` (the NNCF int8
encoder of ``sat_export.quantize.openvino``). Its inference precision is always pinned, f32 or bf16:
left alone, OpenVINO runs bf16 on a CPU with native bf16. bf16 is refused where the CPU would only
emulate it. One dynamic-batch model per performance hint, compiled when first needed: a batch of one
image on ``LATENCY`` (one request, every thread), larger batches on ``THROUGHPUT``, split into one
request per stream and run together. Measured on the bench's ResNet-101 at 224 px, bf16, 2 cores:
``THROUGHPUT`` 1.00-1.03x ``LATENCY`` at batch 8 to 32 on a quiet machine, 1.09-1.40x under load
(load average 4), 0.53-0.57x at batch 1. One dynamic-batch model is within 3 % of models reshaped
to each batch size (which ``sat-infer``'s last batch would add), compiled once (0.3 s, ~230 MB)
instead of once per batch size (~300 MB each).

The decoder step stays on ``engines.ort.OrtBackend`` (fp32): the decode loop drops finished rows,
so the step's batch changes every call, where OpenVINO measured 3x slower than ONNX Runtime, and
bf16 changed 20 % of the captions there. Images and encoder outputs are torch CPU tensors whose
memory OpenVINO reads and writes directly (no copies).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from engines.base import Backend, EncoderOutputs, StepOutputs
from engines.contract import BATCH, ENCODER, check_graph_io
from engines.errors import BackendUnavailable, refused
from engines.ort import OrtBackend
from training.config import ModelConfig
from training.machine import cpu_info
from training.vocab import Vocab

PRECISIONS = ("fp32", "bf16")  # the encoder's inference precision (an int8 IR keeps its int8 layers)


def import_openvino():
    """The ``openvino`` module, or ``BackendUnavailable`` with the install command."""
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("OpenVINO is not installed: pip install 'sat-export[openvino]'") from None
    return openvino


class OpenVinoBackend(Backend):
    """The encoder on OpenVINO (CPU), the decoder step on ONNX Runtime; ``precision`` is the encoder's."""

    name = "openvino"

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path, config: ModelConfig, vocab: Vocab,
                 device: torch.device | str = "cpu", threads: int | None = None, precision: str = "fp32"):
        super().__init__(config, vocab, device)
        if self.device.type != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU, not {self.device}")
        if precision not in PRECISIONS:
            raise ValueError(f"openvino precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "bf16" and not cpu_info().native_bf16:
            raise BackendUnavailable(f"bf16 would be emulated on this CPU ({cpu_info().describe()}): use fp32")
        self._ov = import_openvino()
        self.encoder_path, self.precision = Path(encoder_path), precision
        self._decoder = OrtBackend(None, decoder_path, config, vocab, "cpu", threads)
        self.threads = self._decoder.threads
        self._core = self._ov.Core()
        with refused(self.encoder_path, "OpenVINO cannot read this encoder"):
            self._model = self._core.read_model(str(self.encoder_path))
        found = {kind: [(t.get_any_name(), str(t.get_element_type().to_dtype()),
                         tuple(str(d) if d.is_dynamic else d.get_length() for d in t.get_partial_shape()))
                        for t in tensors] for kind, tensors in (("input", self._model.inputs),
                                                                ("output", self._model.outputs))}
        check_graph_io(self.encoder_path, ENCODER, found, config.dims())
        self._compiled: dict[str, list] = {}  # performance hint -> its infer requests (one per stream)
        self._requests("THROUGHPUT")  # a model OpenVINO cannot compile is refused here, not at the first batch

    def _requests(self, hint: str) -> list:
        """The infer requests of the encoder compiled with ``hint`` (compiled on first use)."""
        if hint not in self._compiled:
            props, hints, types = self._ov.properties, self._ov.properties.hint, self._ov.Type
            config = {props.inference_num_threads: self.threads,
                      hints.inference_precision: {"fp32": types.f32, "bf16": types.bf16}[self.precision],
                      hints.performance_mode: getattr(hints.PerformanceMode, hint)}
            with refused(self.encoder_path, "OpenVINO cannot compile this encoder"):
                compiled = self._core.compile_model(self._model, "CPU", config)
            n = compiled.get_property(props.optimal_number_of_infer_requests)
            self._compiled[hint] = [compiled.create_infer_request() for _ in range(max(1, n))]
        return self._compiled[hint]

    def encode(self, images: Tensor) -> EncoderOutputs:
        images = images.detach().to("cpu", torch.float32).contiguous()
        dims = self.config.dims()
        ENCODER.check_inputs({ENCODER.input_names[0]: images}, dims)
        n = images.size(0)
        requests = self._requests("LATENCY" if n == 1 else "THROUGHPUT")[:max(1, n)]
        outputs = tuple(torch.empty(spec.shape(dims, {BATCH: n})) for spec in ENCODER.outputs)
        parts = zip(requests, images.tensor_split(len(requests)), *(o.tensor_split(len(requests)) for o in outputs))
        started = []
        try:
            for request, x, *ys in parts:  # contiguous slices of the batch: OpenVINO reads and writes torch's memory
                request.set_input_tensor(0, self._ov.Tensor(x.numpy(), shared_memory=True))
                for i, y in enumerate(ys):
                    request.set_output_tensor(i, self._ov.Tensor(y.numpy(), shared_memory=True))
                request.start_async()
                started.append(request)
        finally:  # never leave a request writing into memory that is given back
            for request in started:
                request.wait()
        return outputs

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        return self._decoder.step(tokens, h, c, features, features_proj)

    def close(self) -> None:
        self._compiled.clear()
        self._decoder.close()

    def describe(self) -> str:
        return (f"{self.name} {self.encoder_path.name} on CPU ({self.precision}, {self.threads} threads; "
                f"decoder step: onnxruntime fp32)")
