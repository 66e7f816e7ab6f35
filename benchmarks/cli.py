"""``sat-bench``: latency and throughput of every configuration against PyTorch eager, in one process."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from benchmarks.options import BenchOptions
from sat_export.cli.common import console, new_app, user_errors
from sat_export.options import DEFAULT_TARGET, METHODS
from training.console import make_console

app = new_app(help="Benchmark every backend against PyTorch eager fp32.")


def bench_options(batch_sizes: str, **fields) -> BenchOptions:
    """``BenchOptions`` from the command line's comma-separated ``batch_sizes`` and ``fields``; bad values are
    typer usage errors (shared by ``sat-bench`` and ``benchmarks.gpu``)."""
    try:
        sizes = tuple(int(s) for s in batch_sizes.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 1,8,32, got {batch_sizes!r}") from None
    try:
        return BenchOptions(batch_sizes=sizes, **fields)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
@user_errors
def main(
    ckpt: Path = typer.Option(None, help="Checkpoint to measure (needs --images). Without it a reference model "
                              "with a trained backbone is prepared once and cached."),
    preset: str = typer.Option("small", help="Decoder preset of the prepared reference model."),
    backbone: str = typer.Option(None, help="Backbone of the prepared reference model.",
                                 show_default="resnet101; mobilenet_v3_small_s16 with --quick"),
    images: Path = typer.Option(None, help="Folder of images to caption.",
                                show_default="the reference model's held-out images"),
    refs: Path = typer.Option(None, help="Captions of --images (any format sat-train reads), to judge accuracy "
                              "by BLEU-4/CIDEr-D.", show_default="eager fp32's own captions are the references"),
    calib: Path = typer.Option(None, help="Calibration images of the int8 encoder.",
                                show_default="--images with --ckpt"),
    calib_method: str = typer.Option("mse", help=f"int8 calibration: {', '.join(METHODS)}."),
    int8_target: float = typer.Option(DEFAULT_TARGET, help="Share of fp32's BLEU-4 and CIDEr-D the int8 encoder "
                                      "must keep on its held-back calibration images."),
    batch_sizes: str = typer.Option(None, help="Comma-separated batch sizes.",
                                     show_default="1,8,32; --quick: 1,4"),
    beam: int = typer.Option(1, min=1, help="Beam size (1: greedy); the int8 encoders are judged with it too."),
    repeats: int = typer.Option(None, help="Timed rounds.", show_default="5; --quick: 2"),
    timing_images: int = typer.Option(BenchOptions.timing_images, help="Images the timed rounds draw from (the "
                                      "first ones); the accuracy pass captions them all."),
    configs: str = typer.Option("", help="Comma-separated configuration keys to run.", show_default="all"),
    json_path: Path = typer.Option(Path("sat-bench.json"), "--json", help="Where to write every measurement."),
    plot: Path = typer.Option(Path("sat-bench.png"), help="Where to write the PNG plot (needs matplotlib)."),
    cache: Path = typer.Option(None, help="Cache of prepared models and bundles.",
                               show_default="$SAT_BENCH_CACHE or ~/.cache/sat-export/bench"),
    quick: bool = typer.Option(False, "--quick", help="A smoke test: tiny model, few images, 2 rounds."),
):
    """Run every configuration on the same images and model; print a table, write JSON and a plot.

    Example:  sat-bench --json bench.json --plot bench.png
    """
    from benchmarks.bench import run_bench
    from benchmarks.prepare import QUICK_RECIPE, Int8Options, Recipe, default_cache, from_checkpoint, reference_model
    from benchmarks.report import document, print_table, write_json, write_plot
    from sat_export.quantize.ort import calibration_files

    if calib_method not in METHODS:
        raise typer.BadParameter(f"--calib-method must be one of {', '.join(METHODS)}, not {calib_method!r}")
    if ckpt is not None and images is None:
        raise typer.BadParameter("--ckpt needs --images DIR: the images to caption")
    start = time.perf_counter()
    cache = cache or default_cache()
    int8 = Int8Options(calib_method, int8_target, beam)  # the int8 encoder is judged with the run's decoding
    if ckpt is not None:
        model = from_checkpoint(ckpt, images, calib, int8, cache, console, refs)
    else:
        base = QUICK_RECIPE if quick else Recipe()
        recipe = replace(base, preset=preset, backbone=backbone or base.backbone)
        model = reference_model(recipe, int8, cache, console)
        if images is not None:
            model = replace(model, images=calibration_files(images), references=None,
                            info={**model.info, "images": str(images)})
    prepared = time.perf_counter() - start
    options = bench_options(batch_sizes or ("1,4" if quick else "1,8,32"), beam=beam,
                            repeats=repeats or (2 if quick else 5), timing_images=timing_images,
                            keys=tuple(k for k in configs.split(",") if k), quick=quick)
    result = run_bench(model, options, console)
    seconds = {"prepare": round(prepared, 1), "bench": result.seconds, "total": round(time.perf_counter() - start, 1)}
    doc = document(result, seconds)
    print_table(doc, make_console(stderr=False))
    write_json(doc, json_path)
    console.print(f"measurements written to {json_path}; {write_plot(doc, plot)}; "
                  f"{seconds['total']:.0f} s in all ({seconds['prepare']:.0f} s preparing)", highlight=False,
                  soft_wrap=True)


if __name__ == "__main__":
    app()
