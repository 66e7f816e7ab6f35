"""``python -m benchmarks.defaults``: sat-infer's default settings vs the best hand-tuned setting of a grid, and
the stage report's overhead.

Per case (model x input: the demo model, decode-bound, and the prepared ResNet-101 reference model, encoder-bound
(``benchmarks.prepare``; a stand-in of its architecture where it is not cached); a folder of 1024x768 JPEGs and
the same images in tar shards), the real pipeline (``infer.run`` / ``shard_results.run_shards``) runs the default
(``InferOptions()`` and ``open_for_readers``'s threads) and every setting of the grid (batch size x reader threads
x inference threads), interleaved, best of ``--rounds``; then the default and the best other setting alternately,
``2 x rounds`` times each (medians). It prints the default's share of the best, the bottleneck the default run's
stage report names, and the report's overhead: the default run with and without stage timers
(``StageTimes(enabled=False)``), one after the other, as a ratio.

Example:  python -m benchmarks.defaults --rounds 2 --json defaults.json
"""
from __future__ import annotations

import io
import itertools
import json
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from rich.table import Table

from benchmarks.bench import collect_environment
from benchmarks.prepare import PREPARED, Int8Options, Recipe, default_cache, reference_model
from benchmarks.shards import write_folder, write_tars
from sat_export.bundler.builder import build_bundle
from sat_export.cli.common import console, new_app, user_errors
from sat_export.options import BuildOptions, InferOptions, default_threads, default_workers
from sat_export.pipeline.infer import open_for_readers, plan, run
from sat_export.pipeline.shard_results import plan_shards, run_shards
from sat_export.pipeline.stages import StageTimes
from training.checkpoint import save_checkpoint
from training.machine import cpu_info
from training.model import make_model
from training.shapes import captions, render, sample_scene
from training.vocab import Vocab

app = new_app()
MODELS = ("demo", "resnet101")
KINDS = ("folder", "shards")
STAND_IN = "ResNet-101 stand-in (seeded random weights; no prepared reference model cached)"


def photos(n: int, size: tuple[int, int] = (1024, 768), seed: int = 0) -> list[bytes]:
    """``n`` distinct shapes pictures enlarged to ``size`` (a web photo's size), as JPEGs (q90)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(render(sample_scene(rng))[0]).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def caption(opened, kind: str, source: Path, out: Path, options: InferOptions, timed: bool = True) -> tuple:
    """One run into the fresh output ``out``: images/s and its stage report (None untimed)."""
    times = StageTimes(enabled=timed)
    if kind == "folder":
        with plan([source], out / "captions.jsonl") as work:
            summary = run(opened, work, options, times=times)
    else:
        with plan_shards([source], f"{out}/") as work:
            summary = run_shards(opened, work, options, times=times)
    return summary.images_per_s, summary.report if timed else None


def measure_case(model, kind: str, source: Path, scratch: Path, grid: dict, rounds: int) -> dict:
    """The default and every grid setting of one case, interleaved over ``rounds``; best images/s of each; then
    the default and the grid's best head to head.

    A setting is (batch size, readers, inference threads); the default's threads are those ``open_for_readers``
    chooses (``options.default_threads``). Each backend is opened once per round and warmed up by one untimed
    run before its settings are timed (a fresh session's first batches allocate)."""
    default = (InferOptions().batch_size, default_workers(), default_threads(default_workers()))
    settings = sorted(set(itertools.product(grid["batch_sizes"], grid["workers"], grid["threads"])) | {default})
    best: dict[tuple, float] = dict.fromkeys(settings, 0.0)
    overhead: list[float] = []
    report = None
    runs = itertools.count()
    for round_ in range(rounds):
        for threads in sorted({t for _, _, t in settings}, reverse=round_ % 2 == 1):
            with open_for_readers(model, "auto", threads=threads) as opened:
                caption(opened, kind, source, scratch / f"run{next(runs)}", InferOptions(default[0]), timed=False)
                for setting in (s for s in settings if s[2] == threads):
                    options = InferOptions(setting[0], workers=setting[1])
                    rate, rep = caption(opened, kind, source, scratch / f"run{next(runs)}", options)
                    best[setting] = max(best[setting], rate)
                    if setting == default:
                        report = rep
                        untimed, _ = caption(opened, kind, source, scratch / f"run{next(runs)}", options, timed=False)
                        overhead.append(rate / untimed)
        console.print(f"  round {round_ + 1}/{rounds}: default {best[default]:.1f} images/s, best of the grid "
                      f"{max(r for s, r in best.items() if s != default):.1f}", highlight=False)
    top = max((s for s in settings if s != default), key=best.get)  # the best hand-tuned setting
    head = head_to_head(model, kind, source, scratch / "head", (default, top), rounds)
    return {"default": {"setting": _named(default), "images_per_s": best[default]},
            "best": {"setting": _named(top), "images_per_s": best[top]},
            "head_to_head": head, "default_share_of_best": round(head[0] / head[1], 3),
            "grid": [{**_named(s), "images_per_s": round(r, 2)} for s, r in best.items()],
            "timed_over_untimed": [round(x, 3) for x in overhead],
            "default_bottleneck": report["bottleneck"] if report else None,
            "default_advice": report["advice"] if report else None}


def head_to_head(model, kind: str, source: Path, scratch: Path, pair: tuple, rounds: int) -> list[float]:
    """Median images/s of the default and the grid's best, run alternately ``2 * rounds`` times each on backends
    opened and warmed up once: the best of many noisy grid runs is biased upwards, a head-to-head is not."""
    rates: list[list[float]] = [[], []]
    with ExitStack() as stack:
        opened = {}
        for batch, _, threads in pair:
            if threads not in opened:
                opened[threads] = stack.enter_context(open_for_readers(model, "auto", threads=threads))
                caption(opened[threads], kind, source, scratch / f"warm{threads}", InferOptions(batch), timed=False)
        for i in range(2 * rounds):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                batch, workers, threads = pair[j]
                options = InferOptions(batch, workers=workers)
                rates[j].append(caption(opened[threads], kind, source, scratch / f"{i}-{j}", options)[0])
    return [round(statistics.median(r), 2) for r in rates]


def _named(setting: tuple) -> dict:
    return dict(zip(("batch_size", "workers", "threads"), setting))


def model_of(name: str, scratch: Path, prepare: bool) -> tuple[Path | None, str]:
    """The model of a case and what it is: None for the demo model; for ``resnet101`` the prepared reference
    model's checkpoint where it is cached (``prepare``: prepared first, with the bench's bundle), else a stand-in
    of its architecture (ResNet-101, ``small`` preset, seeded random weights: the same cost per image, captions as
    long as ``max_len``)."""
    if name == "demo":
        return None, "demo model"
    recipe = Recipe()
    root = default_cache() / f"reference-{recipe.key()}-{'bf16' if cpu_info().native_bf16 else 'fp32'}"
    if prepare:
        reference_model(recipe, Int8Options(), default_cache(), console)
    if (root / PREPARED).is_file():  # its checkpoint: sat-infer builds its fp32 bundle, not the bench's int8 ones
        return root / "model.pth", "prepared reference model"
    bundle = default_cache() / "defaults-resnet101-stand-in"
    if (bundle / "manifest.json").is_file():
        return bundle, STAND_IN
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab = Vocab.build([sorted({w for _ in range(256) for c in captions(sample_scene(rng)) for w in c.split()})])
    ckpt = save_checkpoint(scratch / "resnet101.pth", make_model(len(vocab), recipe.backbone, recipe.preset).eval(),
                           vocab)  # random weights: its LSTM state grows past the parity gate's float64 bounds
    return build_bundle(ckpt, bundle, BuildOptions(verify=False), console), STAND_IN


@app.command()
@user_errors
def main(
    images: int = typer.Option(32, min=4, help="Images per run of the ResNet-101 cases (distinct 1024x768 JPEGs)."),
    demo_images: int = typer.Option(256, min=4, help="Images per run of the demo model's cases (its runs are ~40x "
                                    "faster: as long a run as ResNet-101's)."),
    rounds: int = typer.Option(2, min=1, help="Interleaved rounds; the best of them is kept."),
    models: str = typer.Option(",".join(MODELS), help="Which models: demo, resnet101."),
    kinds: str = typer.Option(",".join(KINDS), help="Which inputs: folder, shards."),
    batch_sizes: str = typer.Option("8,32", help="Grid: batch sizes."),
    workers: str = typer.Option("1,2,3", help="Grid: reader threads."),
    threads: str = typer.Option("1,2", help="Grid: inference threads."),
    prepare: bool = typer.Option(False, help="Prepare the reference model if it is not cached (20-40 min on 2 "
                                 "cores); without it an uncached reference is replaced by a stand-in of its "
                                 "architecture."),
    json_path: Path = typer.Option(Path("defaults-bench.json"), "--json", help="Where to write the measurements."),
):
    """The default settings' images/s vs the best of a grid, per model and input; the stage report's overhead."""
    grid = {"batch_sizes": _ints(batch_sizes), "workers": _ints(workers), "threads": _ints(threads)}
    cases = {}
    with tempfile.TemporaryDirectory(prefix="sat-defaults-bench-") as tmp:
        root = Path(tmp)
        pool = photos(min(images, demo_images))
        for name in models.split(","):
            model, described = model_of(name, root, prepare)
            n = demo_images if name == "demo" else images
            write_folder(root / name / "folder", pool, n)
            write_tars(root / name / "shards", pool, n, max(1, n // 2))
            for kind in kinds.split(","):
                console.print(f"{name} on a {kind} of {n} images:", highlight=False)
                cases[f"{name}/{kind}"] = {"model": described, "images": n, **measure_case(
                    model, kind, root / name / kind, root / f"out-{name}-{kind}", grid, rounds)}
    doc = {"tool": "benchmarks.defaults", "rounds": rounds, "grid": grid, "cases": cases,
           **collect_environment()}
    print_table(doc)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"measurements written to {json_path}", highlight=False)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _setting(s: dict) -> str:
    return f"b{s['batch_size']} w{s['workers']} t{s['threads']}"


def print_table(doc: dict) -> None:
    table = Table(title=f"sat-infer defaults vs the grid's best (grid: best of {doc['rounds']}; images/s: medians of "
                        f"{2 * doc['rounds']} head-to-head runs): {doc['machine']['isa']}, "
                        f"{doc['machine']['usable_cores']} cores")
    for name in ("case", "default", "images/s", "best", "images/s ", "default/best", "bottleneck (default)",
                 "timed/untimed"):
        table.add_column(name, justify="left" if name in ("case", "default", "best") else "right")
    for key, case in doc["cases"].items():
        table.add_row(f"{key} ({case['images']})", _setting(case["default"]["setting"]),
                      f"{case['head_to_head'][0]:.1f}", _setting(case["best"]["setting"]),
                      f"{case['head_to_head'][1]:.1f}",
                      f"{case['default_share_of_best']:.2f}", str(case["default_bottleneck"]),
                      " ".join(f"{x:.3f}" for x in case["timed_over_untimed"]))
    console.print(table)


if __name__ == "__main__":
    app()
