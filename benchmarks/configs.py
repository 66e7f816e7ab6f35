"""The configurations ``sat-bench`` compares: the one table that says what each row runs.

=====================  ============================================  ===========  =========  =========
key                    what it runs                                  runtime      precision  device
=====================  ============================================  ===========  =========  =========
torch-fp32             PyTorch eager, as the model is (the baseline)  torch        fp32       cpu
torch-channels-last    + channels-last memory format                 torch        fp32       cpu
torch-bf16             + bf16 autocast (channels-last)               torch        bf16       cpu
torch-compile          ``torch.compile`` of the encoder              torch        fp32       cpu
ort-fp32               the bundle's fp32 graphs                      onnxruntime  fp32       cpu
ort-int8               int8 (QDQ) encoder + fp32 decoder step        onnxruntime  int8       cpu
ort-fp16               the bundle's fp16 graphs (for accuracy)       onnxruntime  fp16       cpu
ov-fp32                the fp32 encoder on OpenVINO, f32 pinned      openvino     fp32       cpu
ov-bf16                the fp32 encoder on OpenVINO, bf16            openvino     bf16       cpu
ov-int8                the NNCF int8 encoder on OpenVINO             openvino     int8       cpu
torch-cuda-fp32        PyTorch eager on the GPU                      torch        fp32       cuda
torch-cuda-fp16        + fp16 autocast + channels-last               torch        fp16       cuda
torch-cuda-compile     ``torch.compile`` of the encoder, fp16        torch        fp16       cuda
ort-cuda               the bundle's fp32 graphs, CUDA provider       onnxruntime  fp32       cuda
trt-fp16               the bundle's TensorRT fp16 engines            tensorrt     fp16       cuda
=====================  ============================================  ===========  =========  =========

Every row is opened by ``sat_export.registry.open_backend`` (the one place that maps a runtime
name to its backend); a row that cannot run here gets a status that says why, and the others go on.
``trt-fp16`` builds its engines when it opens, for the batch profile the run needs (``engines_for``),
so a failed build is that row's error. ``ort-fp16`` runs the fp16 graphs the GPU rows are built from; on
the CPU onnxruntime computes most of them through casts to fp32: the row judges their accuracy (the
same task rule as every row), its speed says nothing of a GPU's.
The OpenVINO rows (the ``[openvino]`` extra) run only the encoder on OpenVINO; their decoder step is
onnxruntime's fp32 one (``engines.openvino``).
A row whose precision this CPU only emulates (bf16 without AVX-512 BF16 or AMX) runs, is timed and
marked ``emulated`` (``emulated``); ``ov-bf16`` is marked too, and its backend refuses to run there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.base import Backend
from engines.errors import BackendUnavailable
from sat_export.bundler.tensorrt import engines_for
from sat_export.registry import open_backend
from training.machine import cpu_info


@dataclass(frozen=True)
class BenchConfig:
    """One row of the bench: a runtime, a precision, a device and the runtime's options."""

    key: str
    label: str
    runtime: str  # a backend name of sat_export.registry
    precision: str = "fp32"  # bundle graphs for onnxruntime; what the encoder computes in
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # TorchBackend keyword options
    baseline: bool = False
    quick: bool = True  # False: skipped by --quick (setup takes minutes)


CONFIGS: tuple[BenchConfig, ...] = (
    BenchConfig("torch-fp32", "PyTorch eager fp32", "torch", baseline=True),
    BenchConfig("torch-channels-last", "PyTorch channels-last", "torch", options={"channels_last": True}),
    BenchConfig("torch-bf16", "PyTorch bf16 autocast + channels-last", "torch", "bf16",
                options={"channels_last": True, "autocast": torch.bfloat16}),
    BenchConfig("torch-compile", "PyTorch torch.compile", "torch", options={"compile": True}, quick=False),
    BenchConfig("ort-fp32", "onnxruntime fp32", "onnxruntime"),
    BenchConfig("ort-int8", "onnxruntime int8 encoder", "onnxruntime", "int8"),
    BenchConfig("ort-fp16", "onnxruntime fp16 graphs", "onnxruntime", "fp16"),
    BenchConfig("ov-fp32", "OpenVINO fp32 encoder", "openvino"),
    BenchConfig("ov-bf16", "OpenVINO bf16 encoder", "openvino", "bf16"),
    BenchConfig("ov-int8", "OpenVINO NNCF int8 encoder", "openvino", "int8"),
    BenchConfig("torch-cuda-fp32", "PyTorch eager fp32 on CUDA", "torch", device="cuda"),
    BenchConfig("torch-cuda-fp16", "PyTorch fp16 autocast + channels-last on CUDA", "torch", "fp16", "cuda",
                options={"channels_last": True, "autocast": torch.float16}),
    BenchConfig("torch-cuda-compile", "PyTorch torch.compile, fp16 autocast on CUDA", "torch", "fp16", "cuda",
                options={"autocast": torch.float16, "compile": True}, quick=False),
    BenchConfig("ort-cuda", "onnxruntime CUDA fp32", "onnxruntime", device="cuda"),
    BenchConfig("trt-fp16", "TensorRT fp16", "tensorrt", "fp16", device="cuda"),
)
BASELINE = next(c for c in CONFIGS if c.baseline)


def config_by_key(key: str) -> BenchConfig:
    for config in CONFIGS:
        if config.key == key:
            return config
    raise ValueError(f"unknown configuration {key!r}; choose from {', '.join(c.key for c in CONFIGS)}")


def emulated(config: BenchConfig) -> str | None:
    """Why ``config`` runs only emulated on this CPU (bf16 without native bf16), or None."""
    if config.device == "cpu" and config.precision == "bf16" and not cpu_info().native_bf16:
        return f"bf16 is emulated on this CPU ({cpu_info().describe()})"
    return None


def unavailable(config: BenchConfig) -> str | None:
    """Why ``config`` cannot run on this machine, or None when it can be tried."""
    if config.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def open_config(config: BenchConfig, ckpt: Path, bundle: Path, profile: tuple[int, int, int]) -> Backend:
    """The backend ``config`` describes, for checkpoint ``ckpt`` and its bundle ``bundle``; TensorRT's engines
    are built into ``bundle`` first for the batch ``profile`` (min, opt, max) unless it has them.

    Raises ``BackendUnavailable`` when the row cannot run here (its message becomes the status).
    """
    reason = unavailable(config)
    if reason:
        raise BackendUnavailable(reason)
    if config.runtime == "torch":
        return open_backend(ckpt, "torch", config.device, **config.options)
    if config.runtime == "tensorrt":
        engines_for(bundle, config.precision, profile)
    return open_backend(bundle, config.runtime, config.device, precision=config.precision)


def trt_profile(batch_sizes: tuple[int, ...]) -> tuple[int, int, int]:
    """The TensorRT batch profile a run needs: up to its largest batch of images, so no call is split. An image's
    beams are the decoder step's own axis (``engines.trt_build.BEAM_PROFILE``, up to beam 8): a TensorRT row of a
    larger beam fails with the engine's shape error, the other rows go on."""
    return 1, max(batch_sizes), max(batch_sizes)
