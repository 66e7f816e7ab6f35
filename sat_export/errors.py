"""Errors of the product: bundles, the parity gate, inputs and outputs of the command-line tools."""
from training.errors import SatError


class BundleError(SatError):
    """An exported bundle is missing files, tampered with, or does not match the graph contract."""


class ParityError(SatError):
    """An exported graph is out of the parity gate's bounds, or (``check --strict``) a stored gate did not pass."""


class InputError(SatError):
    """An input path is missing or unreadable, or two inputs share a key."""


class OutputError(SatError):
    """An output cannot be written: not sat-infer's, in use by another run, of the wrong kind, or the disk is full."""


class EvalError(SatError):
    """A predictions, references or boxes file is missing or malformed; the message names it."""


class UsageError(SatError):
    """Options that do not fit together."""
