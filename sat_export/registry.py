"""The one place that turns "which model, which runtime" into an open backend.

A model is a checkpoint file, a bundle folder (``sat-export build``) or None, the embedded demo
checkpoint; ``is_bundle`` is the one test that tells them apart.

=============  ===========================  ==============================================
model          backend="auto" picks         notes
=============  ===========================  ==============================================
None           the embedded demo model      its bundle is built once into the cache
checkpoint     onnxruntime (cached bundle)  ``backend="torch"`` runs it eagerly instead
bundle dir     tensorrt if it has engines   of the precision asked for and TensorRT + CUDA are
                                            usable, else onnxruntime
=============  ===========================  ==============================================

``backend="openvino"`` (the ``[openvino]`` extra) is never picked by ``auto``: it runs the bundle's
fp32 encoder on OpenVINO in fp32 or bf16 (CPUs with native bf16), or its NNCF int8 encoder
(``precision="int8"``, ``sat_export.quantize.openvino``), always on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.base import Backend
from engines.errors import BackendUnavailable
from sat_export.bundler.tensorrt import open_engines
from sat_export.bundle.format import MANIFEST_FILE, Bundle, load_bundle, sha256
from sat_export.options import BACKEND_NAMES, OPENVINO_PRECISIONS
from training.checkpoint import load_checkpoint
from training.config import ModelConfig
from training.errors import SatError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_bundle(path: Path) -> bool:
    """A bundle is a folder; a checkpoint is a file."""
    return path.is_dir()


def model_path(model: str | Path | None) -> Path:
    """The checkpoint or bundle folder ``model`` names (None: the embedded demo checkpoint); it must exist."""
    if model is None:
        from sat_export.assets import demo_checkpoint_path

        return demo_checkpoint_path()
    path = Path(model)
    if not path.exists():
        raise SatError(f"{path}: no such checkpoint or bundle")
    return path


def model_config(model: str | Path | None) -> ModelConfig:
    """The config (preprocessing included) of a checkpoint, a bundle, or (None) the demo model."""
    path = model_path(model)
    return load_bundle(path).config if is_bundle(path) else load_checkpoint(path).config


def model_sha256(model: str | Path | None) -> str:
    """The model's identity: sha256 of the checkpoint, or of the bundle's sealed manifest (not its path)."""
    path = model_path(model)
    return sha256(path / MANIFEST_FILE if is_bundle(path) else path)


def resolve_model(model: str | Path | None, backend: str = "auto") -> Path | Bundle:
    """What ``backend`` opens for ``model``: the checkpoint file for torch, else the verified bundle.

    A checkpoint given to a bundle backend is built once into the cache (``sat_export.bundler.cache``).
    """
    if backend not in BACKEND_NAMES:
        raise SatError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    path = model_path(model)
    if backend == "torch":
        if is_bundle(path):
            raise SatError(f"{path}: the torch backend needs a checkpoint (.pth), not a bundle folder")
        return path
    if is_bundle(path):
        return load_bundle(path)
    from sat_export.bundler.cache import cached_bundle

    return cached_bundle(path)


def open_backend(model: str | Path | None = None, backend: str = "auto", device: str | torch.device | None = None,
                 threads: int | None = None, precision: str = "fp32", **options) -> Backend:
    """A ready backend for ``model`` (checkpoint file, bundle folder, or None for the demo model).

    Parameters
    ----------
    threads : inference threads: torch's pool (the torch backend, and the decode loop's own tensor
        ops), onnxruntime's and OpenVINO's; None keeps the runtimes' defaults.
    precision : which of a bundle's graphs onnxruntime runs (fp32, fp16 or int8); for openvino, the
        encoder's precision (fp32, bf16) or its NNCF int8 encoder (int8); tensorrt's engines must have been
        built in it. Always the precision that runs: a run records it (``pipeline.infer.run_settings``).
    options : ``TorchBackend`` options (``channels_last``, ``autocast``, ``compile``).
    """
    if device is None:
        device = "cpu" if backend == "openvino" else default_device()
    device = torch.device(device)
    if precision != "fp32" and backend == "torch":
        raise SatError(f"the torch backend has no precision to choose (asked for {precision}): onnxruntime runs "
                       "a bundle's fp16 or int8 graphs, openvino bf16 or int8, tensorrt its engines' precision")
    resolved = resolve_model(model, backend)
    if threads:
        torch.set_num_threads(threads)
    if backend == "torch":
        from engines.torch_eager import TorchBackend

        return TorchBackend.from_checkpoint(resolved, device, **options)
    bundle = resolved
    if backend == "openvino":
        return _open_openvino(bundle, device, threads, precision)
    engines = bundle.manifest.get("tensorrt")
    if backend == "tensorrt" or (backend == "auto" and device.type == "cuda" and engines
                                 and precision == engines["precision"]):
        try:
            return open_engines(bundle, device, precision)
        except BackendUnavailable:
            if backend == "tensorrt":
                raise
    from engines.ort import OrtBackend

    encoder, decoder = bundle.graph_paths(precision)
    return OrtBackend(encoder, decoder, bundle.config, bundle.vocab, device, threads)


def _open_openvino(bundle: Bundle, device: torch.device, threads: int | None, precision: str) -> Backend:
    from engines.openvino import OpenVinoBackend, import_openvino

    if precision not in OPENVINO_PRECISIONS:
        raise SatError(f"the openvino backend runs {', '.join(OPENVINO_PRECISIONS)}, not {precision!r}")
    import_openvino()  # say that it is missing before looking for an int8 encoder
    encoder, decoder = bundle.graph_paths("fp32")
    if precision == "int8":
        encoder = bundle.openvino_int8_path()
    return OpenVinoBackend(encoder, decoder, bundle.config, bundle.vocab, device, threads,
                           "fp32" if precision == "int8" else precision)
