"""A stand-in for the part of ``torch.cuda`` a backend touches when it opens on ``cuda:N`` (device context,
streams), for machines without a GPU. It follows torch's documented semantics: ``torch.cuda.device(i)`` makes
``i`` the current device inside the block, ``torch.cuda.Stream(i)`` is a stream on device ``i`` with a
``cuda_stream`` handle (never 0, the legacy default stream's)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class FakeStream:
    handles = iter(range(0x7000, 0x8000, 0x10))

    def __init__(self, device=None):
        self.device = FakeCuda.current if device is None else int(getattr(device, "index", device))
        self.cuda_stream = next(self.handles)
        self.waited: list[FakeStream] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited.append(other)


class FakeCuda:
    """``install(monkeypatch)``: torch.cuda as on a machine with ``count`` GPUs, current device 0."""

    current = 0

    @classmethod
    def install(cls, monkeypatch, count: int = 2) -> type[FakeCuda]:
        cls.current = 0
        legacy = FakeStream(0)
        legacy.cuda_stream = 0

        @contextmanager
        def device(index):
            index = getattr(index, "index", index)
            index = cls.current if index is None else int(index)  # torch.device("cpu"): no change
            if not 0 <= index < count:
                raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
            previous, cls.current = cls.current, index
            try:
                yield
            finally:
                cls.current = previous

        @contextmanager
        def stream(s):
            yield

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: cls.current)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: legacy)
        return cls
