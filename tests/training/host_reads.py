"""Count where a torch program makes the host wait for the device (on CUDA: a device-to-host copy and a sync).

``HostReads`` is a ``TorchFunctionMode`` that records, in order, every call that needs a tensor's value on the
host: ``bool()``/``int()``/``float()`` of a tensor, ``item``, ``tolist``, ``numpy``, ``cpu``, ``nonzero``,
``masked_select``, and indexing with a boolean mask (its result's size is the mask's count). It runs on the CPU,
where these calls cost nothing, and counts what they would cost on a GPU. ``mark(label)`` records a boundary (a
decoder step), so reads can be attributed to what came before them.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

READS = {Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.item, Tensor.tolist,
         Tensor.numpy, Tensor.cpu, Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__}


def _boolean_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """``events``: the name of every host read, and every ``mark``'s label, in order."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def mark(self, label: str) -> None:
        self.events.append(label)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS or func in INDEXING and _boolean_mask(args[1]):
            self.events.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def per_mark(self, label: str) -> list[int]:
        """Host reads between one ``label`` mark and the next (the last: up to the end)."""
        counts: list[int] = []
        for event in self.events:
            if event == label:
                counts.append(0)
            elif counts:
                counts[-1] += 1
        return counts
