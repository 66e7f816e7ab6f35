"""``python -m benchmarks.shards``: sat-infer on shards vs the same images as files, files written, memory.

The images are synthetic shapes (``training.shapes``, 128 px JPEGs, the demo model's world), a pool of
distinct pictures cycled through the samples. Two measurements:

- ``compare``: the same ``--compare`` images captioned in one process with one opened backend, in
  interleaved rounds, three ways: a folder of files (JSONL rows, ``--alphas`` one ``.npz`` per image),
  WebDataset tar shards and Parquet shards (per-shard Parquet results, alphas inside). Reported:
  images/s (median of the rounds, and each as a share of the folder's in the same round) and the files
  each output holds per 10,000 images.
- ``large``: ``--n`` samples in tar shards captioned by ``sat-infer SHARDS --out DIR/ --alphas DIR/`` in
  a child process whose resident memory is sampled every 0.2 s: its peak, and its median over the
  first and the last fifth of the run (flat memory: about equal).

Example:  python -m benchmarks.shards --n 100000 --compare 5000 --json shards-bench.json
"""
from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer
from PIL import Image
from rich.table import Table

from benchmarks.bench import collect_environment
from sat_export.cli.common import console, new_app, user_errors
from sat_export.options import InferOptions, default_workers
from sat_export.pipeline.infer import open_for_readers, plan, run
from sat_export.pipeline.shard_results import plan_shards, run_shards
from training.console import make_console
from training.shapes import render, sample_scene

KINDS = ("folder", "webdataset", "parquet")
app = new_app()


def photo_pool(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct shapes pictures as 128 px JPEGs (q90)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(render(sample_scene(rng))[0]).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def key(i: int) -> str:
    return f"{i:09d}"


def write_folder(root: Path, pool: list[bytes], n: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{key(i)}.jpg").write_bytes(pool[i % len(pool)])


def write_tars(root: Path, pool: list[bytes], n: int, shard_size: int) -> None:
    """img2dataset's layout: ``NNNNN.tar`` holding ``<key>.jpg`` and ``<key>.txt`` per sample."""
    root.mkdir(parents=True)
    for s, start in enumerate(range(0, n, shard_size)):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + shard_size)):
                for ext, data in (("jpg", pool[i % len(pool)]), ("txt", b"shapes")):
                    info = tarfile.TarInfo(f"{key(i)}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_parquets(root: Path, pool: list[bytes], n: int, shard_size: int) -> None:
    """img2dataset's layout: ``NNNNN.parquet`` with ``key`` and the image bytes in ``jpg``."""
    root.mkdir(parents=True)
    for s, start in enumerate(range(0, n, shard_size)):
        ids = range(start, min(n, start + shard_size))
        pq.write_table(pa.table({"key": [key(i) for i in ids], "jpg": [pool[i % len(pool)] for i in ids]}),
                       root / f"{s:05d}.parquet")


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def caption_once(opened, kind: str, source: Path, out_root: Path, options: InferOptions) -> tuple[float, int]:
    """One run of ``kind`` into a fresh output under ``out_root``: images/s and the files written."""
    out = out_root / kind
    out.mkdir(parents=True)
    if kind == "folder":
        with plan([source], out / "captions.jsonl") as work:
            summary = run(opened, work, InferOptions(options.batch_size, workers=options.workers,
                                                     alphas_dir=out / "alphas"))
    else:
        with plan_shards([source], f"{out}/", alphas=True) as work:
            summary = run_shards(opened, work, options)
    return summary.images_per_s, count_files(out) + (1 if kind != "folder" else 0)  # + DIR.lock beside it


def large_run(source: Path, out: str, batch_size: int, workers: int, total: int) -> dict:
    """``sat-infer`` on ``source`` in a child process, its resident memory sampled every 0.2 s."""
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(source), "--out", out, "--alphas", out,
           "--batch-size", str(batch_size), "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    peak = 0
    while proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text() if Path(f"/proc/{proc.pid}").exists() else ""
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" in fields:
            samples.append((time.perf_counter() - start, int(fields["VmRSS"].split()[0]) * 1024))
            peak = max(peak, int(fields["VmHWM"].split()[0]) * 1024)
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"sat-infer failed: {proc.stderr.read()[-500:]}")
    rss = [r for _, r in samples]
    fifth = max(1, len(rss) // 5)
    return {"samples": total, "seconds": seconds, "images_per_s": total / seconds, "peak_rss_mb": peak / 2**20,
            "rss_first_fifth_mb": statistics.median(rss[:fifth]) / 2**20,
            "rss_last_fifth_mb": statistics.median(rss[-fifth:]) / 2**20, "rss_trace": samples[::5]}


@app.command()
@user_errors
def main(
    n: int = typer.Option(100_000, min=1, help="Samples in the large run (memory)."),
    compare: int = typer.Option(5_000, min=1, help="Images in the folder vs shards comparison."),
    shard_size: int = typer.Option(1_000, min=1, help="Samples per shard."),
    pool: int = typer.Option(256, min=1, help="Distinct pictures, cycled through the samples."),
    batch_size: int = typer.Option(32, min=1, help="Images per model call, as sat-infer --batch-size."),
    workers: int = typer.Option(default_workers(), min=1, help="Reader threads, as sat-infer --workers."),
    rounds: int = typer.Option(3, min=1, help="Interleaved rounds of the comparison; medians are reported."),
    json_path: Path = typer.Option(Path("shards-bench.json"), "--json", help="Where to write the measurements."),
):
    """Images/s from shards vs the same images as files, files written per 10,000 images, memory of a large run."""
    pictures = photo_pool(pool)
    options = InferOptions(batch_size, workers=workers)
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    files: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="sat-shards-bench-") as tmp:
        root = Path(tmp)
        write_folder(root / "in" / "folder", pictures, compare)
        write_tars(root / "in" / "webdataset", pictures, compare, shard_size)
        write_parquets(root / "in" / "parquet", pictures, compare, shard_size)
        with open_for_readers(None, "auto", workers) as opened:
            described = opened.describe()
            for round_ in range(rounds):
                for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
                    rate, files[kind] = caption_once(opened, kind, root / "in" / kind, root / f"out{round_}", options)
                    rates[kind].append(rate)
                console.print(f"round {round_ + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
                              + " images/s", highlight=False)
        write_tars(root / "large", pictures, n, shard_size)
        large = large_run(root / "large", f"{root}/large-out/", batch_size, workers, n)
    doc = {"tool": "benchmarks.shards", "compare_images": compare, "shard_size": shard_size, "pool": pool,
           "backend": described, "batch_size": batch_size, "workers": workers, "rounds": rounds,
           "images_per_s": rates, "median_images_per_s": {k: statistics.median(v) for k, v in rates.items()},
           "share_of_folder": {k: statistics.median(a / b for a, b in zip(v, rates["folder"]))
                               for k, v in rates.items()},
           "files_per_10000": {k: v * 10_000 / compare for k, v in files.items()}, "large": large,
           **collect_environment()}
    print_table(doc)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"measurements written to {json_path}", highlight=False)


def print_table(doc: dict) -> None:
    out = make_console(stderr=False)
    table = Table(title=f"sat-infer, {doc['compare_images']} images as files vs shards of {doc['shard_size']}: "
                        f"{doc['backend']}, {doc['machine']['cpu']}, {doc['machine']['usable_cores']} cores")
    for name in ("input", "images/s (median)", "share of folder", "files per 10,000 images"):
        table.add_column(name, justify="left" if name == "input" else "right")
    for kind in KINDS:
        table.add_row(kind, f"{doc['median_images_per_s'][kind]:.1f}", f"{doc['share_of_folder'][kind]:.2f}",
                      f"{doc['files_per_10000'][kind]:.0f}")
    out.print(table)
    large = doc["large"]
    out.print(f"large run: {large['samples']} samples in {large['seconds']:.0f} s ({large['images_per_s']:.1f} "
              f"images/s), peak RSS {large['peak_rss_mb']:.0f} MB, median RSS first fifth "
              f"{large['rss_first_fifth_mb']:.0f} MB, last fifth {large['rss_last_fifth_mb']:.0f} MB", highlight=False)


if __name__ == "__main__":
    app()
