"""Self-describing checkpoints: a plain dict, written with ``torch.save``, read with ``weights_only=True``.

Layout (version 1)::

    {"format": "sat-checkpoint", "version": 1,
     "config": ModelConfig.to_dict(),      # dims, backbone, attention kind, gate, preprocess
     "vocab": {"itos": [...]},
     "state_dict": {...},
     "train": {...}}                        # epoch, step, metrics; optimiser/scheduler/RNG state to resume

Preprocessing lives inside ``config["preprocess"]``: one place, read by export and inference.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.config import ModelConfig
from training.errors import CheckpointError, clip
from training.files import write_atomically
from training.model import ShowAttendTell
from training.vocab import Vocab

FORMAT = "sat-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "vocab", "state_dict")
# What torch's loaders say of a file that ends early: zip (no central directory) or pickle (cut between opcodes,
# or inside one's argument: "pickle data was truncated").
TRUNCATION_SIGNS = ("failed finding central directory", "Ran out of input", "EOF", "pickle data was truncated")


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint."""

    config: ModelConfig
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]
    train: dict = field(default_factory=dict)
    path: Path | None = None

    def build_model(self) -> ShowAttendTell:
        """The model in eval mode with these weights."""
        model = ShowAttendTell(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: str | Path, model: ShowAttendTell, vocab: Vocab, train: dict | None = None) -> Path:
    """Write ``model`` + ``vocab`` (+ training state) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} words, model config says {model.config.vocab_size}")
    payload = {
        "format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
        "vocab": {"itos": list(vocab.itos)},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "train": train or {},
    }
    return write_atomically(path, lambda f: torch.save(payload, f))


def read_payload(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with every failure turned into one ``CheckpointError`` line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():  # a FIFO would block, a folder is not a checkpoint
        raise CheckpointError(f"{path}: not a regular file, not a checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: refusing to load: the file pickles Python objects or code, not only tensors "
                f"({load_reason(err)}; loading it could execute code). "
                "Convert trusted files with `sat-export import --trust-pickle`."
            ) from None
        raise CheckpointError(f"{path}: corrupt file, not a PyTorch checkpoint ({load_reason(err)})") from None
    except PermissionError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        kind = "truncated" if is_truncated(err) else "corrupt"
        raise CheckpointError(f"{path}: {kind} checkpoint ({load_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - the unpickler raises arbitrary types on garbage input
        raise CheckpointError(f"{path}: corrupt file, not a PyTorch checkpoint ({load_reason(err)})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a sat-export checkpoint: format, version, keys, config, vocab and tensor shapes."""
    path = Path(path)
    payload = read_payload(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: holds a {type(payload).__name__}, not a sat-export checkpoint dict")
    if payload.get("format") != FORMAT:
        hint = (" (it looks like a bare state_dict: convert it with `sat-export import`)"
                if "format" not in payload and all(isinstance(v, torch.Tensor) for v in payload.values()) else "")
        raise CheckpointError(f"{path}: not a sat-export checkpoint (format={payload.get('format')!r}){hint}")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r} is not supported (this tool reads <= {VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing keys {missing}")
    config = ModelConfig.from_dict(payload["config"], source=str(path))
    itos = payload["vocab"].get("itos") if isinstance(payload["vocab"], dict) else None
    if not isinstance(itos, (list, tuple)):
        raise CheckpointError(f"{path}: invalid vocabulary (expected {{'itos': [words]}}, "
                              f"got a {type(payload['vocab']).__name__})")
    try:
        vocab = Vocab(itos)
    except ValueError as err:
        raise CheckpointError(f"{path}: invalid vocabulary ({err})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} words, config says vocab_size={config.vocab_size}")
    train = payload.get("train")
    train = {} if train is None else train
    if not isinstance(train, dict):
        raise CheckpointError(f"{path}: training record is a {type(train).__name__}, expected a dict")
    state_dict = payload["state_dict"]
    _check_state_dict(path, config, state_dict)
    return Checkpoint(config, vocab, state_dict, train, path)


def _check_state_dict(path: Path, config: ModelConfig, state_dict: dict) -> None:
    try:
        with torch.device("meta"):
            expected = ShowAttendTell(config).state_dict()
    except (ValueError, RuntimeError, OverflowError) as err:  # an unknown backbone, sizes torch cannot make
        raise CheckpointError(f"{path}: invalid config: {clip(str(err), 160)}") from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state_dict).__name__}, expected a dict of tensors")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(map(str, set(state_dict) - set(expected)))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: state_dict does not match config: missing {_few(missing)}, unexpected {_few(unexpected)}")
    for name, ref in expected.items():
        got = state_dict[name]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"{path}: tensor '{name}' has shape {shape}, config expects {tuple(ref.shape)}")


def _few(keys: list[str], n: int = 3) -> str:
    return "[]" if not keys else ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_reason(err: BaseException) -> str:
    """The most specific line of a (possibly multi-line) torch error, its first sentence where it goes on to
    advise (torch's zip reader does), ``clip``ped."""
    lines = [ln.strip().removeprefix("WeightsUnpickler error: ") for ln in str(err).splitlines() if ln.strip()]
    specific = [ln.split(" was not an allowed global")[0].split(". This is an internal")[0] for ln in lines
                if ln.startswith(("Unsupported", "Trying to load", "PytorchStreamReader"))]
    return clip((specific or lines or [type(err).__name__])[0], 160)


def is_truncated(err: BaseException) -> bool:
    """Whether torch's loader failed because the file ends early: pickle ran out of input, or the zip
    archive lacks its central directory (written last, so a cut file has none)."""
    text = str(err)
    return isinstance(err, EOFError) or any(sign in text for sign in TRUNCATION_SIGNS)
