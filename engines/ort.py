"""ONNX Runtime backend: the two graphs of the contract, from their ONNX files, on the CPU or CUDA.

CPU: full graph optimisation, intra-op threads = usable cores (not spinning between decoder
steps), torch CPU tensors passed to and from numpy without copies. CUDA (``onnxruntime-gpu``,
the ``[gpu]`` extra): IO binding on torch CUDA tensors, so decoder state never leaves the GPU
between steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engines.base import Backend, EncoderOutputs, StepOutputs
from engines.contract import BATCH, DECODER_STEP, ENCODER, GraphSpec, check_graph_io
from engines.errors import BackendUnavailable, refused
from training.config import ModelConfig
from training.machine import usable_cores
from training.vocab import Vocab


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailable(f"onnxruntime is not installed ({err}): pip install onnxruntime "
                                 "(or onnxruntime-gpu via the [gpu] extra)") from None
    return onnxruntime


class OrtBackend(Backend):
    """Two ``InferenceSession`` s following the graph contract (``encoder_path`` None: the decoder step alone,
    for a backend whose encoder runs elsewhere, ``engines.openvino``)."""

    name = "onnxruntime"

    def __init__(self, encoder_path: str | Path | None, decoder_path: str | Path, config: ModelConfig, vocab: Vocab,
                 device: torch.device | str = "cpu", threads: int | None = None):
        super().__init__(config, vocab, device)
        ort = _import_ort()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable(
                    "onnxruntime: CUDAExecutionProvider not available (install the [gpu] extra: "
                    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.threads = threads or usable_cores()
        self.encoder_path = None if encoder_path is None else Path(encoder_path)
        self.decoder_path = Path(decoder_path)
        self._sessions = {spec.name: self._session(ort, spec, Path(path), providers)
                          for spec, path in ((ENCODER, encoder_path), (DECODER_STEP, decoder_path)) if path is not None}

    def _session(self, ort, spec: GraphSpec, path: Path, providers: list):
        """One ``InferenceSession`` whose I/O is checked against the contract; a file onnxruntime refuses
        is one ``EngineError`` line naming it."""
        with refused(path, f"onnxruntime cannot load this {spec.name} graph"):
            session = ort.InferenceSession(str(path), self._options(ort, spec), providers=providers)
        self._check_io(session, spec, path)
        return session

    def _check_io(self, session, spec: GraphSpec, path: Path) -> None:
        found = {kind: [(t.name, _ORT_DTYPES.get(t.type, t.type),
                         tuple(BATCH if d is None or isinstance(d, str) else d for d in t.shape)) for t in tensors]
                 for kind, tensors in (("input", session.get_inputs()), ("output", session.get_outputs()))}
        check_graph_io(path, spec, found, self.config.dims())

    def _options(self, ort, spec: GraphSpec):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if spec is DECODER_STEP:
            # The decode loop runs small torch ops between steps; threads left spinning after a
            # step take the cores from them (measured: greedy decode at batch 32 216 -> 102 ms).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def _run(self, spec: GraphSpec, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        session = self._sessions[spec.name]
        if self.device.type == "cuda":
            return self._run_bound(session, spec, inputs)
        feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(spec.inputs, inputs)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in session.run(spec.output_names, feeds))

    def _run_bound(self, session, spec: GraphSpec, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """IO binding: inputs and outputs stay in CUDA memory owned by torch."""
        binding = session.io_binding()
        for t, x in zip(spec.inputs, inputs):
            x = x.to(self.device).contiguous()
            binding.bind_input(t.name, "cuda", self.device.index or 0, _NP_DTYPES[t.dtype], tuple(x.shape),
                               x.data_ptr())
        for name in spec.output_names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack")
                     else torch.from_numpy(o.numpy()).to(self.device) for o in binding.get_outputs())

    def encode(self, images: Tensor) -> EncoderOutputs:
        return self._run(ENCODER, (images.float(),))

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        return self._run(DECODER_STEP, (tokens.long(), h, c, features, features_proj))

    def close(self) -> None:
        self._sessions.clear()

    def describe(self) -> str:
        providers = next(iter(self._sessions.values())).get_providers()[0] if self._sessions else "closed"
        graph = (self.encoder_path or self.decoder_path).name
        return f"{self.name} {graph} on {providers} ({self.threads} threads)"


_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "float16": np.float16}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}
