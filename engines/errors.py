"""Errors of the runtimes: a runtime missing here, or tensors that break the graph contract."""
from training.errors import SatError


class BackendUnavailable(SatError):
    """A backend's runtime (onnxruntime, TensorRT, CUDA) is not installed or not usable here."""


class ShapeError(SatError):
    """A tensor's name, dtype or shape differs from the graph contract."""


class EngineError(SatError):
    """A graph or engine file cannot be used by its runtime (corrupt, or not what the contract says)."""
