"""The options of sat-export's commands and the names they accept, as frozen dataclasses that import no
runtime (torch, onnxruntime, Ray...): the command-line tools build ``--help`` from these defaults at once.

Each is used by the part it names: ``InferOptions`` and ``RayOptions`` by ``pipeline``, ``BuildOptions`` by
``build``, the calibration methods and int8 target by ``quantize``, the backend names by ``registry``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engines.contract import DEFAULT_OPSET
from engines.trt_build import DEFAULT_PROFILE
from sat_export.faults import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_RETRY_FOR
from training.images import DEFAULT_MAX_PIXELS
from training.machine import usable_cores
from training.options import FAITHFUL_RATIO, DecodeOptions

BACKEND_NAMES = ("auto", "torch", "onnxruntime", "tensorrt", "openvino")
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
METHODS = ("minmax", "entropy", "percentile", "mse")  # int8 calibration methods (``quantize.ort``)
DEFAULT_TARGET = FAITHFUL_RATIO  # each task metric of the int8 encoder >= this share of fp32's
MiB = 2**20
DEFAULT_MAX_SAMPLE_BYTES = 64 * MiB  # one shard sample's or remote image's encoded bytes (``--max-sample-bytes``)
DEFAULT_READ_AHEAD_BYTES = 256 * MiB  # encoded bytes read ahead of inference, all items together


def default_workers() -> int:
    """Reader threads: half the cores, at least 2 (the model's threads get the rest, at least 1).

    Measured on 2 cores: threads overlap decoding with inference (Pillow releases the GIL while it
    decodes and resizes) and beat a process pool, which cost 1.7x the CPU in page faults; 2 readers
    and 1 inference thread is the best split there. On 16 cores (reasoned, not measured): a reader
    decodes ~50 12 MP JPEGs/s at reduced size, the 224-px ResNet-101 needs ~77 ms of CPU per image
    and the demo model ~1.5 ms, so half the cores keep the readers ahead of any model heavier than
    the demo and leave it 8 threads.
    """
    return max(2, usable_cores() // 2)


def default_threads(workers: int) -> int:
    """Inference threads beside ``workers`` reader threads: the cores they leave, at least 1.

    Torch's and ONNX Runtime's thread pools meet at a barrier many times a caption, so one descheduled thread
    stalls them all: measured on 2 cores shared with other jobs (``python -m benchmarks.defaults``,
    docs/benchmarks.md), 2 inference threads cut the demo model from 139-264 to 35-100 images/s, and ResNet-101 gained nothing from them; the default reached 0.93-1.12 of the grid's best.
    """
    return max(1, usable_cores() - workers)


@dataclass(frozen=True)
class InferOptions:
    """How to caption: batch size, decoding, reader threads, limits and what to write besides rows."""

    batch_size: int = 16
    decode: DecodeOptions = DecodeOptions()
    workers: int = field(default_factory=default_workers)
    max_pixels: int = DEFAULT_MAX_PIXELS
    alphas_dir: Path | None = None
    overlays_dir: Path | None = None
    full_decode: bool = False  # decode every pixel of large JPEGs (PreprocessConfig.draft_margin is the default)
    read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES  # besides ``prefetch`` items (one item always goes ahead)

    def __post_init__(self):
        for name in ("batch_size", "workers", "max_pixels", "read_ahead_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def prefetch(self) -> int:
        """Items decoded ahead of inference: two batches keep the model busy, and bound memory."""
        return 2 * self.batch_size + self.workers


@dataclass(frozen=True)
class SourceOptions:
    """Where shards keep their images: the Parquet column (or tar member extension; None: found by itself)
    and fsspec's storage options for URLs (credentials, ``endpoint_url``...; default: the standard variables);
    how long a store's failure is retried (``retry_for`` seconds per incident, 0: never) and waited for (connect
    and read timeouts, seconds); the most encoded bytes one sample or remote image may have."""

    image_column: str | None = None
    storage_options: dict = field(default_factory=dict)
    retry_for: float = DEFAULT_RETRY_FOR
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES

    def __post_init__(self):
        if self.retry_for < 0:
            raise ValueError(f"retry_for must not be negative, got {self.retry_for}")
        for name in ("connect_timeout", "read_timeout", "max_sample_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class RayOptions:
    """Which cluster (None: ``RAY_ADDRESS``, else a new local Ray) and the captioning actor pool; how many times a
    shard or batch is tried when its actor is lost (killed, out of memory, its node gone) before it fails."""

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    attempts: int = 3

    def __post_init__(self):
        if self.actors < 1:
            raise ValueError(f"actors must be at least 1, got {self.actors}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must not be negative, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class BuildOptions:
    """What to build besides the fp32 pair; ``verify=False`` records the parity gate as skipped."""

    opset: int = DEFAULT_OPSET
    fp16: bool = False
    int8_calib: Path | None = None
    trt: bool = False
    trt_profile: tuple[int, int, int] = DEFAULT_PROFILE
    verify: bool = True
    int8_method: str = "mse"  # calibration: one of quantize.METHODS
    int8_target: float = DEFAULT_TARGET  # share of fp32's BLEU-4 and CIDEr-D the int8 encoder must keep
    int8_captions: Path | None = None  # the calibration images' captions (default: found beside them)
    int8_beam: int = 1  # the int8 encoder is judged on captions decoded with this beam (the one it will run with)
