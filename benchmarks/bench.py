"""Measurement: every configuration on the same images and model, in one process.

Per configuration (``benchmarks.configs``), as nanoGPT's ``bench.py`` measures:

1. open it (TensorRT rows: build their engines for the run's batches first, ``configs.trt_profile``);
   the time and the resident memory it adds are recorded, and a failure becomes the row's status while
   the other rows go on;
2. accuracy pass: every bench image once (the prepared model's 500 held-out images), at the
   largest batch size; its captions are judged against PyTorch eager fp32's by the task rule
   (``training.faithful``: corpus BLEU-4 and CIDEr-D >= 99 % of eager's, paired-bootstrap
   intervals; the references are the images' human captions, or eager's own captions where there
   are none), exact-caption agreement beside it. It is also the first warm-up (lazy
   initialisation, ``torch.compile``). A row whose precision this CPU only emulates (bf16 without
   native bf16, several times slower than fp32) runs it on the timing images only, is timed in the
   first round only (its caption pass is its warm-up), and says so;
3. ``warmup`` untimed batches per batch size;
4. ``repeats`` rounds on the first ``timing_images`` images, interleaved: in each round every
   batch size runs once on every configuration (the order alternates between rounds), so drift
   in machine load is shared.

A batch is timed end to end, from preprocessed images to captions (``time.perf_counter``, after a
CUDA synchronise where there is one), split into encoder and decode loop. Image decoding and
preprocessing is the same for every configuration: it is done once, before timing, and its own
cost per image is reported beside the figures. Peak RSS is the process's high-water mark during
the batch (Linux ``VmHWM``, reset before each batch), so it includes every loaded configuration.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from benchmarks.ceilings import encoder_macs, gemm_rates
from benchmarks.configs import BASELINE, CONFIGS, BenchConfig, emulated, open_config, trt_profile
from benchmarks.options import BenchOptions
from benchmarks.prepare import BenchModel
from engines.base import Backend
from engines.errors import BackendUnavailable
from training.checkpoint import load_checkpoint
from training.config import PreprocessConfig
from training.console import make_console
from training.decode import Caption, decode
from training.errors import ImageDecodeError, first_line
from training.faithful import judge
from training.images import load_image
from training.machine import cpu_info, usable_cores
from training.metrics import caption_agreement
from training.options import DecodeOptions
from training.vocab import Vocab

PAUSE_S = 0.05  # between timed batches: lets the previous runtime's spinning threads go idle


@dataclass
class Timing:
    """One timed batch, in seconds, and the process's peak RSS during it (MB)."""

    total: float
    encoder: float
    decode: float
    peak_rss_mb: float


@dataclass
class Row:
    """One configuration: its status, setup cost, captions and timings per batch size."""

    config: BenchConfig
    status: str = "ok"
    backend: Backend | None = None
    description: str = ""
    batch_profile: tuple[int, int, int] | None = None  # TensorRT rows: the engines' (min, opt, max) batch
    setup_s: float | None = None
    first_batch_s: float | None = None
    load_rss_mb: float | None = None
    captions: list[list[int]] | None = None  # every image, or only the timing images (emulated rows)
    agreement: float | None = None
    accuracy: dict | None = None  # training.faithful.judge against the baseline, on every image
    timings: dict[int, list[Timing]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, status: str) -> None:
        self.status = status
        if self.backend is not None:
            self.backend.close()
            self.backend = None


@dataclass
class BenchResult:
    """Everything one run measured, with the context needed to read it."""

    rows: list[Row]
    options: BenchOptions
    model: BenchModel
    images: dict
    environment: dict
    seconds: float
    ceilings: dict = field(default_factory=dict)  # GEMM rates per precision, encoder MACs per image


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_images(paths: list[Path], preprocess: PreprocessConfig) -> tuple[torch.Tensor, list[Path], dict]:
    """Decode and preprocess the bench images once: ``(images, kept paths, info)``."""
    arrays, kept, skipped = [], [], []
    start = time.perf_counter()
    for path in paths:
        try:
            arrays.append(load_image(path, preprocess))
            kept.append(path)
        except ImageDecodeError as err:
            skipped.append(f"{path}: {err}")
    seconds = time.perf_counter() - start
    if not arrays:
        raise ValueError(f"none of the {len(paths)} bench images could be read ({skipped[:1]})")
    info = {"n": len(kept), "files": [str(p) for p in kept], "skipped": skipped,
            "decode_preprocess_ms_per_image": round(1000 * seconds / len(paths), 2),
            "size": [preprocess.crop, preprocess.crop]}
    return torch.from_numpy(np.stack(arrays)), kept, info


def _run_batch(backend: Backend, images: torch.Tensor, special_ids: dict, options: DecodeOptions,
               ) -> tuple[list[Caption], Timing]:
    cuda = backend.device.type == "cuda"
    _reset_peak()
    with backend.running():  # on CUDA, the decode loop's own ops on the backend's stream
        start = time.perf_counter()
        enc = backend.encode(images)
        if cuda:
            torch.cuda.synchronize(backend.device)
        mid = time.perf_counter()
        captions = decode(backend.step, enc, special_ids, options)
        if cuda:
            torch.cuda.synchronize(backend.device)
        end = time.perf_counter()
    return captions, Timing(end - start, mid - start, end - mid, _peak_mb())


def _batch(images: torch.Tensor, size: int, round_: int) -> torch.Tensor:
    """The ``size`` images of round ``round_``: consecutive, wrapping around the set."""
    index = (torch.arange(size) + round_ * size) % images.size(0)
    return images[index].contiguous()


def _guard(row: Row, what: str, fn):
    """Run ``fn``; any failure marks the row as failed (with what it was doing) and returns None."""
    try:
        return fn()
    except BackendUnavailable as err:
        row.fail(f"unavailable: {err}")
    except Exception as err:  # noqa: BLE001 - a failing configuration must not stop the others
        detail = f": {first_line(err)}" if str(err).strip() else ""
        row.fail(f"error while {what}: {type(err).__name__}{detail}")
    return None


def _open(row: Row, model: BenchModel, options: BenchOptions) -> None:
    if options.quick and not row.config.quick:
        row.status = "skipped: --quick (its setup takes minutes)"
        return
    before, start = rss_mb(), time.perf_counter()
    profile = trt_profile(options.batch_sizes)
    row.backend = _guard(row, "opening", lambda: open_config(row.config, model.ckpt, model.bundle, profile))
    if row.backend is not None:
        row.setup_s, row.load_rss_mb = time.perf_counter() - start, rss_mb() - before
        row.description, row.batch_profile = row.backend.describe(), row.backend.batch_profile


def _caption_all(row: Row, images: torch.Tensor, batch: int, special_ids: dict, options: DecodeOptions) -> None:
    tokens = []
    for i in range(0, images.size(0), batch):
        captions, timing = _run_batch(row.backend, images[i:i + batch], special_ids, options)
        row.first_batch_s = row.first_batch_s or timing.total
        tokens += [c.tokens for c in captions]
    row.captions = tokens


def _score(rows: list[Row], model: BenchModel, kept: list[Path], vocab: Vocab) -> None:
    """Each row against the baseline: the task rule on every image it captioned, and exact agreement."""
    base = next((r for r in rows if r.config is BASELINE and r.ok), None)
    if base is None:
        return
    words = [vocab.decode(t) for t in base.captions]
    refs = [model.references[p.name] for p in kept] if model.references else [[w] for w in words]
    for row in rows:
        if row.ok:
            n = len(row.captions)
            row.agreement = caption_agreement(base.captions[:n], row.captions)
            if n == len(base.captions):
                row.accuracy = judge(refs, words, [vocab.decode(t) for t in row.captions])


def run_bench(model: BenchModel, options: BenchOptions = BenchOptions(), console: Console | None = None,
              ) -> BenchResult:
    """Measure every configuration of ``CONFIGS`` (or ``options.keys``) on ``model``'s bench images."""
    console = console or make_console()
    start = time.perf_counter()
    environment = collect_environment()
    ckpt = load_checkpoint(model.ckpt)
    images, kept, image_info = load_images(model.images, ckpt.config.preprocess)
    timing = images[:options.timing_images]
    image_info.update(timing_images=timing.size(0), references="human" if model.references else "eager's captions")
    special_ids = ckpt.vocab.special_ids()
    ceilings = {"gemm_gmac_s": gemm_rates(512 if options.quick else 2048),
                "encoder_macs_per_image": encoder_macs(ckpt.build_model().eval(), images[0])}
    decode_options = DecodeOptions(beam=options.beam, max_len=options.max_len)
    rows = [Row(c) for c in CONFIGS if not options.keys or c.key in options.keys or c.baseline]
    for row in rows:
        _open(row, model, options)
        if row.ok:
            subset = timing if emulated(row.config) else images
            _guard(row, f"captioning the {subset.size(0)} bench images",
                   lambda: _caption_all(row, subset, max(options.batch_sizes), special_ids, decode_options))
        console.print(f"{row.config.label}: {row.status}" + (f" ({row.description}, first batch "
                      f"{row.first_batch_s:.2f} s)" if row.ok else ""), highlight=False, soft_wrap=True)
    _score(rows, model, kept, ckpt.vocab)
    live = [r for r in rows if r.ok]
    for row in live:
        for size in options.batch_sizes:
            for w in range(0 if emulated(row.config) else options.warmup):
                _guard(row, "warming up", lambda: _run_batch(row.backend, _batch(timing, size, w), special_ids,
                                                             decode_options))
    for round_ in range(options.repeats):
        for size in options.batch_sizes:
            batch = _batch(timing, size, round_)
            for row in live if round_ % 2 == 0 else live[::-1]:
                if row.ok and (round_ == 0 or not emulated(row.config)):
                    time.sleep(PAUSE_S)
                    out = _guard(row, "timing", lambda: _run_batch(row.backend, batch, special_ids, decode_options))
                    if out is not None:
                        row.timings.setdefault(size, []).append(out[1])
        console.print(f"round {round_ + 1}/{options.repeats} done", highlight=False)
    for row in rows:
        if row.backend is not None:
            row.backend.close()
            row.backend = None
    environment["loadavg_end"] = list(os.getloadavg())
    return BenchResult(rows, options, model, image_info, environment, round(time.perf_counter() - start, 2),
                       ceilings)


def collect_environment() -> dict:
    """Machine, library versions and thread settings, for the JSON."""
    import onnx
    import onnxruntime
    import torchvision

    cpu = cpu_info()
    return {
        "machine": {"cpu": cpu.model, "isa": cpu.describe(), "cpu_features": cpu.to_dict(),
                    "usable_cores": usable_cores(), "platform": platform.platform(),
                    "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "libraries": {"python": platform.python_version(), "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
                      "onnx": onnx.__version__, "numpy": np.__version__,
                      **{name: _installed(name) for name in ("openvino", "nncf")}},
        "threads": {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()},
        "git_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
    }


def _installed(package: str) -> str | None:
    """The installed version of an optional ``package`` (None when absent), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
