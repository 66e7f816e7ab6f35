"""Errors of the runtimes: a runtime missing here, or tensors that break the graph contract."""
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.errors import SatError, first_line


class BackendUnavailable(SatError):
    """A backend's runtime (onnxruntime, TensorRT, CUDA) is not installed or not usable here."""


class ShapeError(SatError):
    """A tensor's name, dtype or shape differs from the graph contract."""


class EngineError(SatError):
    """A graph or engine file cannot be used by its runtime (corrupt, or not what the contract says)."""


@contextmanager
def refused(path: Path, what: str) -> Iterator[None]:
    """A runtime's own exception while it reads ``path`` becomes one ``EngineError`` line: ``path: what (reason)``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - each runtime raises its own exception types for a file it cannot use
        raise EngineError(f"{path}: {what} ({first_line(err)})") from None
