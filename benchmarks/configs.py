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
ort-cuda               the bundle's fp32 graphs, CUDA provider       onnxruntime  fp32       cuda
trt-fp16               the bundle's TensorRT fp16 engines            tensorrt     fp16       cuda
=====================  ============================================  ===========  =========  =========

Every row is opened by the loader of its runtime (``LOADERS``); a row that cannot run here gets
a status that says why, and the others go on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.base import Backend
from sat_export.errors import BackendUnavailable


@dataclass(frozen=True)
class BenchConfig:
    """One row of the bench: a runtime, a precision, a device and the runtime's options."""

    key: str
    label: str
    runtime: str  # a key of LOADERS
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
    BenchConfig("ort-cuda", "onnxruntime CUDA fp32", "onnxruntime", device="cuda"),
    BenchConfig("trt-fp16", "TensorRT fp16", "tensorrt", "fp16", device="cuda"),
)
BASELINE = next(c for c in CONFIGS if c.baseline)


def config_by_key(key: str) -> BenchConfig:
    for config in CONFIGS:
        if config.key == key:
            return config
    raise ValueError(f"unknown configuration {key!r}; choose from {', '.join(c.key for c in CONFIGS)}")


def unavailable(config: BenchConfig) -> str | None:
    """Why ``config`` cannot run on this machine, or None when it can be tried."""
    if config.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def _open_torch(config: BenchConfig, ckpt: Path, bundle: Path) -> Backend:
    from engines.torch_eager import TorchBackend

    return TorchBackend.from_checkpoint(ckpt, config.device, **config.options)


def _open_ort(config: BenchConfig, ckpt: Path, bundle: Path) -> Backend:
    from engines.ort import OrtBackend

    return OrtBackend.from_bundle(bundle, config.device, precision=config.precision)


def _open_trt(config: BenchConfig, ckpt: Path, bundle: Path) -> Backend:
    from engines.trt import TensorRTBackend

    return TensorRTBackend.from_bundle(bundle, config.device)


LOADERS: dict[str, Callable[[BenchConfig, Path, Path], Backend]] = {
    "torch": _open_torch, "onnxruntime": _open_ort, "tensorrt": _open_trt}


def open_config(config: BenchConfig, ckpt: Path, bundle: Path) -> Backend:
    """The backend ``config`` describes, for checkpoint ``ckpt`` and its bundle ``bundle``.

    Raises ``BackendUnavailable`` when the row cannot run here (its message becomes the status).
    """
    reason = unavailable(config)
    if reason:
        raise BackendUnavailable(reason)
    return LOADERS[config.runtime](config, ckpt, bundle)
