"""Typed errors for users: every message names the file or tensor and what was expected.

``SatError`` is the base of every error a user sees as one line; each layer adds its own in its
``errors`` module (``engines.errors``, ``sat_export.errors``). Command-line tools print
``str(err)`` (no traceback) and exit non-zero.
"""


class SatError(Exception):
    """Base class for errors shown to users as one line."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``err``'s message, ``clip``ped to ``limit`` characters (its type's name when it has
    none): how a library's own exception is quoted inside one of ours."""
    text = str(err).strip()
    return clip(text.splitlines()[0], limit) if text else type(err).__name__


def clip(text: str, limit: int = 200) -> str:
    """``text`` in at most ``limit`` characters: whole, or cut after a word and ending ``...`` so a reader
    knows it was cut (a single word longer than half the limit is cut inside it)."""
    if len(text) <= limit:
        return text
    head = text[:limit - 4]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip(" ,;:.") + " ..."


class CheckpointError(SatError):
    """A checkpoint file is missing, corrupt, unsafe or does not match its config."""


class WeightsUnavailable(SatError):
    """Pretrained backbone weights cannot be downloaded or read."""


class DatasetError(SatError):
    """A captions or boxes file is missing or malformed; the message names the file and line."""


class ImageDecodeError(ValueError):
    """The file is not a decodable image within the limits; the message is the row's ``error``."""
