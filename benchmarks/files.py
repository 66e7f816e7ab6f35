"""``python -m benchmarks.files PHOTOS``: sat-infer's images/s from files, beside the model's own rate.

On real photos decoding can cost more than the model: a 12 MP JPEG holds ~700x the pixels the demo
model looks at. This runs the real pipeline (``sat_export.pipeline.infer.plan`` + ``run``, reader threads and
all) on a folder of photos, in interleaved rounds, three ways:

- ``reduced``: the photos as they are, large JPEGs decoded at reduced size (the default);
- ``full``: the same photos, every pixel decoded (``sat-infer --full-decode``);
- ``pre-shrunk``: the same pictures shrunk beforehand (short side at the model's resize, JPEG q90),
  what the model sees anyway: the rate decoding could at best reach;

and the two halves alone: ``decode-only`` (the reader threads reading, decoding at reduced size and
preprocessing the photos, no model: the most ``reduced`` could reach with these readers) and
``model-only`` (encode + greedy decode of preprocessed images, no files). Each rate is also given as
a share of the pre-shrunk rate of the same round, and the captions of ``reduced`` and ``full`` are
compared.

Example:  python -m benchmarks.files photos/ --model best.pth --json files.json
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchmarks.bench import collect_environment
from sat_export.cli.common import console, new_app, user_errors
from sat_export.pipeline.infer import open_for_readers, plan, run
from sat_export.pipeline.reading import prefetch, read_item
from sat_export.options import InferOptions, default_workers
from sat_export.pipeline.inputs import discover
from sat_export.reports.evaluate import read_predictions
from training.console import make_console
from training.decode import decode
from training.images import load_image, load_rgb
from training.metrics import caption_agreement
from training.options import DecodeOptions

VARIANTS = ("reduced", "full", "pre-shrunk")
app = new_app()


def shrink(files: list[tuple[Path, str]], root: Path, short_side: int) -> None:
    """Each ``(path, key)`` as ``root/key``: short side ``short_side`` (Lanczos), upright, JPEG q90."""
    for path, key in files:
        image = load_rgb(path)
        scale = short_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        image.resize(size, Image.Resampling.LANCZOS).save((root / key).with_suffix(".jpg"), quality=90)


def model_rate(backend, images: torch.Tensor, batch_size: int, options: DecodeOptions) -> float:
    """Images/s of encode + greedy decode alone, on already preprocessed ``images``."""
    start = time.perf_counter()
    for i in range(0, images.size(0), batch_size):
        batch = images[i:i + batch_size]
        decode(backend.step, backend.encode(batch), backend.vocab.special_ids(), options)
    return images.size(0) / (time.perf_counter() - start)


def decode_rate(items: list, preprocess, workers: int) -> float:
    """Images/s of the reader threads alone: read, decode (at reduced size) and preprocess every item."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in prefetch(pool, lambda item: read_item(item, preprocess), items, 2 * workers):
            pass
    return len(items) / (time.perf_counter() - start)


def captions(out: Path) -> dict[str, str]:
    return {pred.image: pred.caption or "" for pred in read_predictions(out)}


@app.command()
@user_errors
def main(
    photos: Path = typer.Argument(..., help="Folder of photos (JPEG, PNG, HEIC...)."),
    model: str = typer.Option(None, help="Checkpoint or bundle.", show_default="the embedded demo model"),
    backend: str = typer.Option("auto", help="auto, torch, onnxruntime or tensorrt."),
    batch_size: int = typer.Option(16, min=1),
    workers: int = typer.Option(default_workers(), min=1, help="Reader threads, as sat-infer --workers."),
    rounds: int = typer.Option(3, min=1, help="Interleaved rounds; medians are reported."),
    json_path: Path = typer.Option(Path("files-bench.json"), "--json", help="Where to write the measurements."),
):
    """Caption a folder of photos as they are, fully decoded and pre-shrunk; report images/s and ratios."""
    items = [item for item in discover([photos]) if item.error is None]
    rates: dict[str, list[float]] = {v: [] for v in (*VARIANTS, "decode-only", "model-only")}
    with tempfile.TemporaryDirectory(prefix="sat-files-bench-") as tmp, \
            open_for_readers(model, backend, workers) as opened:
        preprocess = opened.config.preprocess
        small = Path(tmp) / "pre-shrunk"
        shrink([(item.path, item.key) for item in items], small, preprocess.resize)
        folders = {"reduced": photos, "full": photos, "pre-shrunk": small}
        images = torch.from_numpy(np.stack([load_image(p, preprocess) for p in sorted(small.rglob("*.jpg"))]))
        options = DecodeOptions()
        for round_ in range(rounds):
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                out = Path(tmp) / f"{variant}.jsonl"
                with plan([folders[variant]], out, overwrite=True) as work:
                    summary = run(opened, work, InferOptions(batch_size, options, workers,
                                                             full_decode=variant == "full"))
                rates[variant].append(summary.images_per_s)
            rates["decode-only"].append(decode_rate(items, preprocess, workers))
            rates["model-only"].append(model_rate(opened, images, batch_size, options))
            console.print(f"round {round_ + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                          + " images/s", highlight=False)
        reduced, full = captions(Path(tmp) / "reduced.jsonl"), captions(Path(tmp) / "full.jsonl")
        described = opened.describe()
    doc = {"tool": "benchmarks.files", "photos": str(photos), "n": len(items), "backend": described,
           "preprocess": {"resize": preprocess.resize, "crop": preprocess.crop,
                          "draft_margin": preprocess.draft_margin},
           "batch_size": batch_size, "workers": workers, "rounds": rounds, "images_per_s": rates,
           "median_images_per_s": {k: statistics.median(v) for k, v in rates.items()},
           "share_of_pre_shrunk": {k: statistics.median(a / b for a, b in zip(v, rates["pre-shrunk"]))
                                   for k, v in rates.items()},
           "reduced_vs_full_identical_captions": caption_agreement([full[k] for k in sorted(full)],
                                                                   [reduced[k] for k in sorted(full)]),
           **collect_environment()}
    print_table(doc, make_console(stderr=False))
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"measurements written to {json_path}", highlight=False)


def print_table(doc: dict, out: Console) -> None:
    table = Table(title=f"sat-infer from files: {doc['n']} photos, {doc['backend']}, {doc['machine']['isa']}, "
                        f"{doc['machine']['usable_cores']} cores, {doc['workers']} readers")
    for name in ("input", "images/s (median)", "share of pre-shrunk"):
        table.add_column(name, justify="left" if name == "input" else "right")
    for key, rate in doc["median_images_per_s"].items():
        table.add_row(key, f"{rate:.1f}", f"{doc['share_of_pre_shrunk'][key]:.3f}")
    out.print(table)
    out.print(f"captions identical, reduced vs full decoding: {doc['reduced_vs_full_identical_captions']:.1%}",
              highlight=False)


if __name__ == "__main__":
    app()
