"""Inference backends (PyTorch eager, ONNX Runtime, TensorRT) and the decode loop that drives them.

``open_backend`` is the one place that turns "which model, which runtime" into a ``Backend``:

=============  ===========================  ==============================================
model          backend="auto" picks         notes
=============  ===========================  ==============================================
None           the embedded demo model      its bundle is built once into the cache
checkpoint     onnxruntime (cached bundle)  ``backend="torch"`` runs it eagerly instead
bundle dir     tensorrt if it has engines   and TensorRT + CUDA are usable, else onnxruntime
=============  ===========================  ==============================================
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.base import Backend
from sat_export.errors import BackendUnavailable, SatError

BACKEND_NAMES = ("auto", "torch", "onnxruntime", "tensorrt")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_backend(model: str | Path | None = None, backend: str = "auto", device: str | torch.device | None = None,
                 **options) -> Backend:
    """A ready backend for ``model`` (checkpoint file, bundle folder, or None for the demo model)."""
    device = torch.device(device) if device is not None else default_device()
    path = resolve_model(model, backend)
    if backend == "torch":
        from engines.torch_eager import TorchBackend

        return TorchBackend.from_checkpoint(path, device, **options)
    if backend == "tensorrt" or (backend == "auto" and device.type == "cuda" and _has_engines(path)):
        from engines.trt import TensorRTBackend

        try:
            return TensorRTBackend.from_bundle(path, device)
        except BackendUnavailable:
            if backend == "tensorrt":
                raise
    from engines.ort import OrtBackend

    return OrtBackend.from_bundle(path, device, **options)


def model_path(model: str | Path | None) -> Path:
    """The checkpoint or bundle folder ``model`` names (None: the embedded demo checkpoint); it must exist."""
    if model is None:
        from sat_export.assets import demo_checkpoint_path

        return demo_checkpoint_path()
    path = Path(model)
    if not path.exists():
        raise SatError(f"{path}: no such checkpoint or bundle")
    return path


def resolve_model(model: str | Path | None, backend: str = "auto") -> Path:
    """What ``backend`` opens for ``model``: the checkpoint for torch, else a bundle folder.

    A checkpoint given to a bundle backend is built once into the cache (``sat_export.bundle_cache``).
    """
    if backend not in BACKEND_NAMES:
        raise SatError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    path = model_path(model)
    if backend == "torch":
        if path.is_dir():
            raise SatError(f"{path}: the torch backend needs a checkpoint (.pth), not a bundle folder")
        return path
    if path.is_dir():
        return path
    from sat_export.bundle_cache import cached_bundle

    return cached_bundle(path)


def _has_engines(bundle_dir: Path) -> bool:
    from sat_export.bundle import load_bundle

    return bool(load_bundle(bundle_dir).manifest.get("tensorrt"))
