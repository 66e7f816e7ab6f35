"""``python -m benchmarks.memory``: does ``sat-infer``'s memory stay flat over a big folder?

Writes ``--n`` small JPEGs to a temporary folder, captions them in this process with the real
pipeline (``sat_export.pipeline.infer.plan`` + ``run``), and samples the resident set size every 50 ms
and after every ``--every`` rows. Prints start / peak / end RSS and RSS against rows done, and
writes all of it to JSON. Flat means the RSS after the first thousand rows is the RSS at the
end: the reader pool is bounded, rows go straight to disk, nothing is kept per image.

Example:  python -m benchmarks.memory --n 10000 --json memory.json
"""
from __future__ import annotations

import io
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from benchmarks.bench import collect_environment, rss_mb
from sat_export.cli.common import console, new_app, user_errors
from sat_export.pipeline.infer import open_for_readers, plan, run
from sat_export.options import InferOptions
from training.options import DecodeOptions

app = new_app()


def write_images(folder: Path, n: int, size: int, distinct: int = 64) -> None:
    """``n`` JPEGs of ``size`` px in 10 subfolders, cycling through ``distinct`` smooth random pictures."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(distinct):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        sub = folder / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:06d}.jpg").write_bytes(blobs[i % distinct])


class RssSampler:
    """A daemon thread recording ``(seconds, rss_mb)`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@app.command()
@user_errors
def main(
    n: int = typer.Option(10_000, min=1, help="Images to generate and caption."),
    size: int = typer.Option(64, min=8, help="Side of the generated images, pixels."),
    model: str = typer.Option(None, help="Checkpoint or bundle.", show_default="the embedded demo model"),
    backend: str = typer.Option("auto", help="auto, torch, onnxruntime or tensorrt."),
    batch_size: int = typer.Option(32, min=1),
    workers: int = typer.Option(2, min=1),
    alphas: bool = typer.Option(False, help="Also write an alphas .npz per image."),
    every: int = typer.Option(1000, min=1, help="Record RSS after every this many rows."),
    json_out: Path = typer.Option(Path("memory.json"), "--json", help="Where to write the measurements."),
):
    """Caption N generated images and report start / peak / end resident memory."""
    with tempfile.TemporaryDirectory(prefix="sat-memory-") as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "captions.jsonl"
        write_images(folder, n, size)
        options = InferOptions(batch_size, DecodeOptions(), workers, alphas_dir=Path(tmp) / "alphas" if alphas else None)
        with open_for_readers(model, backend, workers) as opened:
            work = plan([folder], out)
            by_rows, done = [], 0

            def on_rows(k: int) -> None:
                nonlocal done
                done += k
                if done // every > len(by_rows) - 1:
                    by_rows.append((done, round(rss_mb(), 1)))

            start = rss_mb()
            by_rows.append((0, round(start, 1)))
            with RssSampler() as sampler:
                summary = run(opened, work, options, on_rows)
            end = rss_mb()
            described = opened.describe()
    peak = max(mb for _, mb in sampler.samples)
    result = {
        "images": n, "size": size, "backend": described, "batch_size": batch_size, "workers": workers,
        "alphas": alphas, "captioned": summary.captioned, "errors": summary.errors,
        "seconds": round(summary.seconds, 2), "images_per_s": round(summary.images_per_s, 1),
        "rss_mb": {"start": round(start, 1), "peak": round(peak, 1), "end": round(end, 1)},
        "rss_mb_by_rows": by_rows, "samples": [(round(t, 2), round(mb, 1)) for t, mb in sampler.samples],
        "environment": collect_environment(),
    }
    json_out.write_text(json.dumps(result, indent=1))
    console.print(f"{n} images ({size} px) on {described}: {summary.images_per_s:.1f} images/s\n"
                  f"RSS MB start {start:.1f}, peak {peak:.1f}, end {end:.1f}; by rows: "
                  + ", ".join(f"{k}: {mb}" for k, mb in by_rows) + f"\nwrote {json_out}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
