"""PyTorch eager: the reference backend, plus the CPU options a user would try first.

``channels_last`` and ``autocast`` (bf16 on CPU, fp16 on CUDA) change only the encoder, where
the time goes; ``compile`` wraps ``encode`` in ``torch.compile``. Outputs are always float32, and what
runs in fp32 is IEEE fp32, not TF32 (``ieee_fp32``).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor

from engines.base import Backend, EncoderOutputs, StepOutputs
from engines.errors import BackendUnavailable
from training.checkpoint import load_checkpoint
from training.model import ShowAttendTell
from training.vocab import Vocab


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """No TF32 inside the block for fp32 convolutions (cuDNN) and matmuls (cuBLAS): torch allows it by default for
    cuDNN convolutions. Set with torch's legacy flags, restored after: they keep torch's two APIs consistent (one
    ``fp32_precision`` set by hand makes ``torch.backends.cudnn.allow_tf32``, which inductor reads, raise)."""
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    before = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = False
    try:
        yield
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


def fp32_math(device: torch.device) -> AbstractContextManager:
    """``ieee_fp32`` on a CUDA device (TF32 is a GPU matter; toggling the flags costs ~20 us a call on the CPU)."""
    return ieee_fp32() if device.type == "cuda" else nullcontext()


class TorchBackend(Backend):
    """A ``ShowAttendTell`` in eval mode, called directly."""

    name = "torch"

    def __init__(self, model: ShowAttendTell, vocab: Vocab, device: torch.device | str = "cpu", *,
                 channels_last: bool = False, autocast: torch.dtype | None = None, compile: bool = False):
        super().__init__(model.config, vocab, device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: CUDA requested but torch.cuda.is_available() is False")
        self.model = model.eval().to(self.device)
        self.channels_last, self.autocast = channels_last, autocast
        if channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        self._encode = torch.compile(self.model.encode) if compile else self.model.encode
        self.options = [o for o, on in (("channels_last", channels_last), (f"autocast={autocast}", autocast),
                                        ("compile", compile)) if on]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu", **options) -> TorchBackend:
        ckpt = load_checkpoint(path)
        return cls(ckpt.build_model(), ckpt.vocab, device, **options)

    def encode(self, images: Tensor) -> EncoderOutputs:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), fp32_math(self.device), torch.autocast(
                self.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self._encode(images)
        return tuple(x.float().contiguous() for x in out)

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> StepOutputs:
        with torch.inference_mode(), fp32_math(self.device):
            return self.model.step(tokens, h, c, features, features_proj)

    def describe(self) -> str:
        return " ".join([super().describe(), *self.options])
