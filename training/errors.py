"""Typed errors for users: every message names the file or tensor and what was expected.

``SatError`` is the base of every error a user sees as one line; each layer adds its own in its
``errors`` module (``engines.errors``, ``sat_export.errors``). Command-line tools print
``str(err)`` (no traceback) and exit non-zero.
"""


class SatError(Exception):
    """Base class for errors shown to users as one line."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``err``'s message, cut to ``limit`` characters (its type's name when it has none):
    how a library's own exception is quoted inside one of ours."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


class CheckpointError(SatError):
    """A checkpoint file is missing, corrupt, unsafe or does not match its config."""


class WeightsUnavailable(SatError):
    """Pretrained backbone weights cannot be downloaded or read."""


class DatasetError(SatError):
    """A captions or boxes file is missing or malformed; the message names the file and line."""


class ImageDecodeError(ValueError):
    """The file is not a decodable image within the limits; the message is the row's ``error``."""
