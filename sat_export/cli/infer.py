"""``sat-infer``: caption images (folders, lists, files) or shards into JSONL or per-shard Parquet, resumably."""
from __future__ import annotations

import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from sat_export.cli.common import console, new_app, user_errors
from sat_export.errors import UsageError
from sat_export.options import BACKEND_NAMES, InferOptions, RayOptions, SourceOptions
from sat_export.text import printable
from training.errors import SatError
from training.options import DecodeOptions

app = new_app()
DEFAULTS, RAY_DEFAULTS, SOURCE_DEFAULTS = InferOptions(), RayOptions(), SourceOptions()


class ImagesPerSecond(ProgressColumn):
    """The progress bar's rate column."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} images/s", style="progress.data.speed")


@app.command()
@user_errors
def main(
    paths: list[str] = typer.Argument(..., help="Folders (recursive), .txt/.lst files listing images, or images; "
                                      "or shards: WebDataset .tar / Parquet files, folders of them, {00..99} patterns, "
                                      "globs, fsspec URLs (s3://bucket/prefix/)."),
    out: str = typer.Option("captions.jsonl", "--out", "-o",
                            help="JSONL output; or, for shards, a folder or URL prefix ending in / for one Parquet "
                            "result per shard. Rerunning resumes it."),
    image_column: str = typer.Option(None, help="The Parquet column (or tar member extension) holding the images.",
                                     show_default="found by itself where unambiguous"),
    storage_options: str = typer.Option(None, help="fsspec storage options as JSON, e.g. "
                                        "'{\"endpoint_url\": \"http://127.0.0.1:8333\"}'.",
                                        show_default="credentials from the standard variables (AWS_*...)"),
    retry_for: float = typer.Option(SOURCE_DEFAULTS.retry_for, min=0, help="Seconds a failing store (connection "
                                    "refused or reset, timeout, 5xx, throttling) is retried, per incident, before the "
                                    "run stops (0: never retry); a shard goes on where it broke."),
    connect_timeout: float = typer.Option(SOURCE_DEFAULTS.connect_timeout, min=0.001,
                                          help="Seconds to connect to a store or image host."),
    read_timeout: float = typer.Option(SOURCE_DEFAULTS.read_timeout, min=0.001,
                                       help="Seconds a store may stay silent mid-request (a remote image: connect + "
                                       "read timeout in all)."),
    max_sample_bytes: int = typer.Option(SOURCE_DEFAULTS.max_sample_bytes, min=1,
                                         help="Larger shard samples and remote images are error rows, never read."),
    model: str = typer.Option(None, help="Checkpoint (.pth) or bundle folder.",
                                show_default="the embedded demo model"),
    backend: str = typer.Option("auto", help=f"One of {', '.join(BACKEND_NAMES)}."),
    precision: str = typer.Option("fp32", help="The encoder's precision: fp32; onnxruntime: fp16 or int8 (graphs "
                                  "of the bundle); openvino: bf16 (CPUs with native bf16) or int8 (an NNCF encoder)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, min=1, help="Images per model call."),
    beam: int = typer.Option(DEFAULTS.decode.beam, min=1, help="Beam width (1 is greedy)."),
    max_len: int = typer.Option(DEFAULTS.decode.max_len, min=1, help="Most words per caption."),
    workers: int = typer.Option(DEFAULTS.workers, min=1, help="Threads decoding images ahead of the model."),
    max_pixels: int = typer.Option(DEFAULTS.max_pixels, min=1, help="Larger images are error rows (decompression bombs)."),
    threads: int = typer.Option(None, min=1, help="Inference threads.",
                                 show_default="the cores left by --workers, at least 1"),
    alphas: Path = typer.Option(None, readable=False,
                                help="Write each image's attention (T, grid, grid) to DIR/<image>.npz; with "
                                "per-shard results, pass the --out folder: the attention goes inside each result."),
    overlays: Path = typer.Option(None, readable=False,
                                  help="Write one attention overlay PNG per word and DIR/index.html."),
    full_decode: bool = typer.Option(DEFAULTS.full_decode, help="Decode every pixel of large JPEGs (slower; by "
                                     "default they are decoded at the reduced size the model's preprocessing allows)."),
    strict: bool = typer.Option(False, help="Exit 1 when any file could not be captioned."),
    overwrite: bool = typer.Option(False, help="Start over instead of resuming --out."),
    retry_errors: bool = typer.Option(False, help="Caption again the files whose error rows are of kind io (could "
                                      "not be read: network, permission, missing); per-shard results holding such "
                                      "rows are redone whole. input errors (bad bytes) are never retried."),
    report: str = typer.Option(None, help="Where the run's stage report goes (JSON: where the time went).",
                               show_default="OUT.report.json, or OUT/_report.json for per-shard results"),
    ray: bool = typer.Option(False, "--ray", help="Caption on a Ray cluster (extra: ray); only this process writes."),
    ray_address: str = typer.Option(None, help="Cluster to join: auto or HOST:PORT (default: $RAY_ADDRESS or local)."),
    ray_actors: int = typer.Option(RAY_DEFAULTS.actors, min=1, help="Captioning actors, each loading the model once."),
    ray_cpus_per_actor: float = typer.Option(RAY_DEFAULTS.cpus_per_actor, min=0.01,
                                             help="CPUs per actor; its inference threads too."),
    ray_gpus_per_actor: float = typer.Option(RAY_DEFAULTS.gpus_per_actor, min=0,
                                             help="GPUs per actor (fractions share one)."),
):
    """Caption every image under PATHS into one JSON row per file, written batch by batch.

    Bad files become rows with an "error" and never stop the run. Rerunning resumes.

    Exit code 0 when every file and shard got its row (error rows included); 1 when the run was refused or
    stopped (one line), a shard got no result, or --strict and a file could not be captioned; 2 for a bad
    command line.

    Example:  sat-infer examples/images --out captions.jsonl --alphas alphas --overlays overlays

    bf16 encoder on OpenVINO (CPUs with native bf16):  sat-infer photos --backend openvino --precision bf16

    On a Ray cluster:  sat-infer /shared/photos --out /shared/captions.jsonl --ray --ray-address auto --ray-actors 8

    Shards, one Parquet result each:  sat-infer 's3://bucket/shards/{00000..00999}.tar' --out s3://bucket/captions/
    """
    from sat_export.pipeline.infer import Summary, open_for_readers, plan, run, run_settings
    from sat_export.pipeline.ray_infer import run_ray, run_shards_ray
    from sat_export.pipeline.shard_results import is_results_out, plan_shards, run_shards
    from sat_export.pipeline.shards import is_shard_input
    from sat_export.pipeline.stages import report_lines, report_path, save_report

    sources = SourceOptions(image_column, parse_storage_options(storage_options), retry_for, connect_timeout,
                            read_timeout, max_sample_bytes)
    shards = any(map(is_shard_input, paths))
    sharded = shards and is_results_out(out)  # else plan refuses a folder as --out
    if ray and shards and not sharded:
        raise UsageError("--ray captions shards into per-shard results: pass --out DIR/ (a folder or URL prefix)")
    if sharded and (overlays or alphas and Path(alphas).resolve() != Path(out).resolve()):
        raise UsageError("per-shard results keep the attention inside each result: pass --alphas with the same "
                         "folder as --out, and no --overlays")
    options = InferOptions(batch_size, DecodeOptions(beam, max_len), workers, max_pixels,
                           None if sharded else alphas, overlays, full_decode)
    settings = run_settings(model, options.decode, options.full_decode, precision)
    opened_plan = (plan_shards(paths, out, overwrite, settings, sources, alphas is not None, retry_errors)
                   if sharded
                   else plan(paths, out, overwrite, settings, (alphas, overlays), sources, retry_errors))
    with opened_plan as work:  # out locked
        if work.todo:
            opening = nullcontext() if ray else open_for_readers(model, backend, workers, threads, precision)
            with opening as opened, Progress(
                    TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
                task = progress.add_task("captioning", total=work.total)
                advance = partial(progress.advance, task)
                if ray:
                    cluster = RayOptions(ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor)
                    summary = (run_shards_ray if sharded else run_ray)(model, work, options, cluster, backend, threads,
                                                                       on_rows=advance, precision=precision)
                else:
                    summary = (run_shards if sharded else run)(opened, work, options, on_rows=advance)
        else:
            summary = Summary(skipped=work.done, retries=work.retrying.retries if work.retrying else 0)
    console.print(printable(summary.line(out, settings["precision"])), highlight=False, markup=False, soft_wrap=True)
    if summary.report is not None:
        for line in report_lines(summary.report):
            console.print(printable(line), highlight=False, markup=False, soft_wrap=True)
        warning = save_report({"out": out, "settings": settings, **summary.record()},
                              report or report_path(out, sharded), sources)
        if warning:
            console.print(printable(f"warning: {warning}"), highlight=False, markup=False, soft_wrap=True)
    if summary.failure():
        raise SatError(summary.failure())
    errors = summary.errors + work.done_errors
    if strict and errors:
        raise SatError(f"{errors} file(s) could not be captioned (--strict): see the rows with \"error\" in {out}")


def parse_storage_options(text: str | None) -> dict:
    """``--storage-options``: a JSON object, or ``UsageError`` in one line."""
    if text is None:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--storage-options is not JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return parsed


if __name__ == "__main__":
    app()
