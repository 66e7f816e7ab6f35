"""Typed errors for users. Every message names the file or tensor and what was expected.

Command-line tools print ``str(err)`` (no traceback) and exit non-zero.
"""


class SatError(Exception):
    """Base class for errors shown to users as one line."""


class CheckpointError(SatError):
    """A checkpoint file is missing, corrupt, unsafe or does not match its config."""


class BundleError(SatError):
    """An exported bundle is missing files, tampered with, or does not match the graph contract."""


class ParityError(SatError):
    """An exported graph disagrees with PyTorch eager beyond tolerance."""


class ShapeError(SatError):
    """A tensor's name, dtype or shape differs from the graph contract."""


class BackendUnavailable(SatError):
    """A backend's runtime (onnxruntime, TensorRT, CUDA) is not installed or not usable here."""


class WeightsUnavailable(SatError):
    """Pretrained backbone weights cannot be downloaded or read."""
