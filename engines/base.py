"""The Backend interface every runtime implements.

A backend knows the graph contract (``encode``, ``step``) and nothing about decoding; the decode
loop in ``training.decode`` drives any of them. Heavy runtimes (onnxruntime, tensorrt) are
imported lazily inside their modules; a missing one raises ``BackendUnavailable`` with the
install command. Which class opens which model is decided in ``sat_export.registry``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from training.config import ModelConfig
from training.decode import EncoderOutputs, StepOutputs
from training.vocab import Vocab


class Backend(ABC):
    """A loaded model on one runtime and device. Use as a context manager to release it."""

    name: str = "backend"

    def __init__(self, config: ModelConfig, vocab: Vocab, device: torch.device | str = "cpu"):
        self.config = config
        self.vocab = vocab
        self.device = torch.device(device)

    @abstractmethod
    def encode(self, images: Tensor) -> EncoderOutputs:
        """``images (n_img, 3, H, W)`` float32 -> ``features, features_proj, h0, c0``."""

    @abstractmethod
    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        """One decoder step for every row -> ``logprobs, alpha, h_next, c_next``."""

    def close(self) -> None:
        """Release runtime resources (sessions, engines, device buffers)."""

    def describe(self) -> str:
        """One line for logs and benchmark tables."""
        return f"{self.name} on {self.device}"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
