"""The Backend interface every runtime implements.

A backend knows the graph contract (``encode``, ``step``) and nothing about decoding; the decode
loop in ``training.decode`` drives any of them. Heavy runtimes (onnxruntime, tensorrt) are
imported lazily inside their modules; a missing one raises ``BackendUnavailable`` with the
install command. Which class opens which model is decided in ``sat_export.registry``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from engines.contract import DECODER_STEP, ENCODER, GraphSpec
from training.config import ModelConfig
from training.decode import EncoderOutputs, StepOutputs
from training.vocab import Vocab


class Backend(ABC):
    """A loaded model on one runtime and device. Use as a context manager to release it."""

    name: str = "backend"
    stream: torch.cuda.Stream | None = None  # CUDA runtimes: the backend's own stream (``own_stream``)
    batch_profile: tuple[int, int, int] | None = None  # TensorRT: the engines' (min, opt, max) batch

    def __init__(self, config: ModelConfig, vocab: Vocab, device: torch.device | str = "cpu"):
        self.config = config
        self.vocab = vocab
        self.device = torch.device(device)

    @abstractmethod
    def encode(self, images: Tensor) -> EncoderOutputs:
        """``images (n_img, 3, H, W)`` float32 -> ``features, features_proj, h0, c0``."""

    @abstractmethod
    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        """One decoder step for the ``k`` rows (beams) of every image: ``tokens (n_img, k)``, ``h, c (n_img, k, dec_dim)``,
        ``features``, ``features_proj`` one per image -> ``logprobs, alpha, h_next, c_next``, each ``(n_img, k, ...)``."""

    def own_stream(self) -> None:
        """On CUDA: pin ``device`` to its index (``cuda`` -> ``cuda:N``, the current device) and give the backend
        its own non-default stream there (the legacy default stream adds device-wide synchronisations)."""
        if self.device.type == "cuda":
            index = torch.cuda.current_device() if self.device.index is None else self.device.index
            self.device = torch.device("cuda", index)
            with torch.cuda.device(index):
                self.stream = torch.cuda.Stream(index)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The caller's torch work (the decode loop) on this backend's device and stream; nothing to do on the CPU.

        Not required for correctness (``on_stream`` orders the backend's work after the caller's), only to keep
        the loop's small ops on the same stream as the runtime."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    @contextmanager
    def on_stream(self) -> Iterator[None]:
        """Runtime work on the backend's stream, after what the caller's stream queued and before what it queues
        next (``wait_stream`` both ways: no host synchronisation); nothing to do on the CPU."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def close(self) -> None:
        """Release runtime resources (sessions, engines, device buffers)."""

    def describe(self) -> str:
        """One line for logs and benchmark tables."""
        return f"{self.name} on {self.device}"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GraphBackend(Backend):
    """A backend running the contract's two graphs by name: ``encode`` and ``step`` are one ``run`` each."""

    @abstractmethod
    def run(self, spec: GraphSpec, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The outputs of graph ``spec`` for ``inputs``, in the contract's order."""

    def encode(self, images: Tensor) -> EncoderOutputs:
        return self.run(ENCODER, (images,))

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        return self.run(DECODER_STEP, (tokens, h, c, features, features_proj))
