"""ONNX Runtime backend: the two graphs of the contract, from their ONNX files, on the CPU or CUDA.

One code path for both devices: IO binding of torch tensors. Inputs are bound by address, outputs to torch
tensors allocated before each run with the contract's shapes, so nothing is copied on either device and, on
CUDA, decoder state never leaves the GPU between steps. CPU: full graph optimisation, intra-op threads =
usable cores (not spinning between decoder steps). CUDA (``onnxruntime-gpu``, see ``gpu_install``): the
CUDA provider runs on the backend's own stream (``user_compute_stream``) and is told not to synchronise
the device after each run; fp32 stays fp32 (``use_tf32=0``: the provider's default lets cuBLAS and cuDNN round
fp32 inputs to TF32); the session must really have the CUDA provider (no silent CPU fallback).
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engines.base import GraphBackend
from engines.contract import DECODER_STEP, ENCODER, GraphSpec, check_graph_io
from engines.errors import BackendUnavailable, refused
from training.config import ModelConfig
from training.machine import usable_cores
from training.vocab import Vocab

CUDA = "CUDAExecutionProvider"


def gpu_install(extras: str) -> str:
    """The one command that installs the project with ``extras`` and ends with onnxruntime-gpu alone.

    onnxruntime-gpu and onnxruntime install the same ``onnxruntime`` package: only one may be installed. pip cannot
    swap a base dependency for an extra's, and every install of the project re-resolves the base ``onnxruntime``
    (``pip install -e '.[trt]'`` after the swap brings the CPU one back), so the swap comes last, after every extra.
    """
    return (f"pip install -e '.[{extras}]' && pip uninstall -y onnxruntime onnxruntime-gpu "
            "&& pip install --no-deps 'onnxruntime-gpu>=1.27'")


GPU_INSTALL = gpu_install("gpu")
GPU_TRT_INSTALL = gpu_install("gpu,trt")  # onnxruntime's CUDA provider and TensorRT
# onnxruntime_run_options_config_keys.h: skip the device-wide synchronisation at the end of each run
# (the torch ops that read the outputs are queued on the same stream).
NO_SYNC = "disable_synchronize_execution_providers"


def _import_ort():
    """onnxruntime, imported after torch (this module imports it first): torch loads the CUDA 13 cuBLAS and cuDNN 9
    of its nvidia wheels, which onnxruntime-gpu's CUDA provider needs (without torch: libcublasLt.so.13 not found)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailable(f"onnxruntime is not installed ({err}): pip install onnxruntime "
                                 f"(GPU: {GPU_INSTALL})") from None
    return onnxruntime


def installed_runtimes() -> dict[str, str]:
    """The onnxruntime distributions installed here (``{"onnxruntime": "1.32.0", ...}``)."""
    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def check_cuda_runtime(ort) -> None:
    """``BackendUnavailable`` unless exactly one onnxruntime (the GPU one) is installed and offers CUDA."""
    found = installed_runtimes()
    if len(found) > 1:
        raise BackendUnavailable(f"both {' and '.join(f'{n} {v}' for n, v in found.items())} are installed; they "
                                 f"overwrite each other's files (import onnxruntime gives the CPU one or a mix): "
                                 f"{GPU_INSTALL} (with TensorRT: {GPU_TRT_INSTALL})")
    if CUDA not in ort.get_available_providers():
        raise BackendUnavailable(f"onnxruntime {ort.__version__}: {CUDA} not available (providers "
                                 f"{ort.get_available_providers()}): {GPU_INSTALL}")


class OrtBackend(GraphBackend):
    """Two ``InferenceSession`` s following the graph contract (``encoder_path`` None: the decoder step alone,
    for a backend whose encoder runs elsewhere, ``engines.openvino``)."""

    name = "onnxruntime"

    def __init__(self, encoder_path: str | Path | None, decoder_path: str | Path, config: ModelConfig, vocab: Vocab,
                 device: torch.device | str = "cpu", threads: int | None = None):
        super().__init__(config, vocab, device)
        ort = _import_ort()
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda":
            check_cuda_runtime(ort)
            self.own_stream()
            providers = [(CUDA, {"device_id": self.device.index, "user_compute_stream": str(self.stream.cuda_stream),
                                 "use_tf32": "0"}), "CPUExecutionProvider"]
            self._run_options.add_run_config_entry(NO_SYNC, "1")
        else:
            providers = ["CPUExecutionProvider"]
        self.threads = threads or usable_cores()
        self.encoder_path = None if encoder_path is None else Path(encoder_path)
        self.decoder_path = Path(decoder_path)
        self._dims = config.dims()
        self._sessions = {spec.name: self._session(ort, spec, Path(path), providers)
                          for spec, path in ((ENCODER, encoder_path), (DECODER_STEP, decoder_path)) if path is not None}

    def _session(self, ort, spec: GraphSpec, path: Path, providers: list):
        """One ``InferenceSession`` whose I/O is checked against the contract; a file onnxruntime refuses
        is one ``EngineError`` line naming it. On CUDA, a session that did not get the CUDA provider (cuDNN
        missing, say: onnxruntime then falls back to the CPU with a warning) is refused."""
        with refused(path, f"onnxruntime cannot load this {spec.name} graph"):
            session = ort.InferenceSession(str(path), self._options(ort, spec), providers=providers)
        if self.device.type == "cuda" and CUDA not in session.get_providers():
            raise BackendUnavailable(f"{path}: onnxruntime could not start {CUDA} (the session has "
                                     f"{session.get_providers()}; see onnxruntime's warning above, often cuDNN or "
                                     "the CUDA libraries it was built for are missing)")
        self._check_io(session, spec, path)
        return session

    def _check_io(self, session, spec: GraphSpec, path: Path) -> None:
        found = {kind: [(t.name, _ORT_DTYPES.get(t.type, t.type),
                         tuple(d if isinstance(d, int) else str(d) for d in t.shape)) for t in tensors]
                 for kind, tensors in (("input", session.get_inputs()), ("output", session.get_outputs()))}
        check_graph_io(path, spec, found, self._dims)

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

    def run(self, spec: GraphSpec, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """IO binding on the backend's device: inputs by address, outputs into torch tensors of the contract's
        shapes allocated here (on CUDA by torch's caching allocator, on the backend's stream: no host sync)."""
        session = self._sessions[spec.name]
        kind, index = self.device.type, self.device.index or 0
        binding = session.io_binding()
        with self.on_stream():
            inputs = [x.to(self.device, _TORCH_DTYPES[t.dtype]).contiguous() for t, x in zip(spec.inputs, inputs)]
            sizes = spec.input_sizes(x.shape for x in inputs)
            outputs = [torch.empty(t.shape(self._dims, sizes), dtype=_TORCH_DTYPES[t.dtype], device=self.device)
                       for t in spec.outputs]
            for t, x in zip(spec.inputs, inputs):
                binding.bind_input(t.name, kind, index, _NP_DTYPES[t.dtype], tuple(x.shape), x.data_ptr())
            for t, y in zip(spec.outputs, outputs):
                binding.bind_output(t.name, kind, index, _NP_DTYPES[t.dtype], tuple(y.shape), y.data_ptr())
            session.run_with_iobinding(binding, self._run_options)  # raises if an output is not its bound shape
        return tuple(outputs)

    def close(self) -> None:
        self._sessions.clear()

    def describe(self) -> str:
        providers = next(iter(self._sessions.values())).get_providers()[0] if self._sessions else "closed"
        graph = (self.encoder_path or self.decoder_path).name
        return f"{self.name} {graph} on {providers} ({self.threads} threads)"


_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "float16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "float16": torch.float16}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}
