"""What ``sat-bench`` measures, as a frozen dataclass that imports no runtime: its ``--help`` reads these defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; ``keys`` limits the configurations (empty: all)."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    beam: int = 1
    max_len: int = 20
    warmup: int = 1
    repeats: int = 5
    timing_images: int = 64  # the first images of the set; the accuracy pass captions them all
    keys: tuple[str, ...] = ()
    quick: bool = False

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.timing_images < 1:
            raise ValueError(f"timing_images must be at least 1, got {self.timing_images}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        from benchmarks.configs import CONFIGS  # here: it imports the runtimes, and --help reads these defaults

        known = {c.key for c in CONFIGS}
        if set(self.keys) - known:
            raise ValueError(f"unknown configurations {sorted(set(self.keys) - known)}; choose from {', '.join(known)}")
