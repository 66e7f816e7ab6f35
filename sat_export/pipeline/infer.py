"""Caption many images: a bounded reader pool feeding batches to a backend, rows streamed to JSONL.

``plan`` finds the inputs and what an earlier run of the same output already did (resume);
``run`` captions the rest. Images are decoded and preprocessed by a thread pool (Pillow
releases the GIL) at most ``prefetch`` items ahead of inference, so memory does not grow
with the folder. Each batch's alphas files are written first, then its rows are appended and
fsynced, so a killed run leaves only whole rows (plus at most one torn line, which the next
``plan`` cuts off) and every row's files exist. A plan holds ``out``'s lock (``outputs.OutputLock``)
until it is closed, so two runs never append to one file.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from engines.base import Backend
from sat_export.errors import OutputError
from sat_export.faults import INPUT, IO, Retrying
from sat_export.options import InferOptions, SourceOptions, default_threads, default_workers
from sat_export.pipeline.inputs import InputItem, discover
from sat_export.pipeline.outputs import OutputLock, check_output_paths, resume_output, row_line, whole_rows
from sat_export.pipeline.reading import Loaded, batches, prefetch, read_item
from sat_export.pipeline.shards import new_retrying, shard_inputs, stream
from sat_export.pipeline.stages import StageTimes, stage_report
from sat_export.registry import model_sha256, open_backend
from sat_export.reports.gallery import THUMB, overlay_folder, write_gallery, write_overlays
from sat_export.results.paths import sidecar_path
from training.decode import Caption, decode
from training.files import write_atomically
from training.options import DecodeOptions


@dataclass(frozen=True)
class Plan:
    """The items still to caption, how many rows (and error rows) the output already holds, and its lock.

    Close it (or use it as a context manager) once the run is over: that releases the lock.
    """

    out: Path
    todo: Iterable[InputItem]  # a list for files; a stream of samples (read as the run goes) for shards
    done: int
    done_errors: int
    lock: OutputLock | None = None
    retrying: Retrying | None = None  # the run's retries of its stores (shards), counted for the summary

    @property
    def total(self) -> int | None:
        """How many items are to do, where known before they are read."""
        return len(self.todo) if isinstance(self.todo, list) else None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Summary:
    """What a run did. ``images_per_s`` counts every row written (captions and errors); ``errors`` counts the
    error rows, ``io_errors`` and ``input_errors`` them by kind (``sat_export.faults``)."""

    captioned: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    retries: int = 0  # tries again after a transient failure of a store (``sat_export.faults.Retrying``)
    nodes: set[str] = field(default_factory=set)  # the Ray nodes whose actors captioned (``--ray``)
    io_errors: int = 0
    input_errors: int = 0
    failed_shards: list[str] = field(default_factory=list)  # shards that got no result (the run exits 1)
    report: dict | None = None  # where the time went (``stages.stage_report``)

    @property
    def images_per_s(self) -> float:
        return (self.captioned + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def line(self, out: str, precision: str) -> str:
        """The summary a run prints: rows by kind, retries, failed shards, time and rate."""
        on_nodes = f" on {len(self.nodes)} Ray node(s)" if self.nodes else ""
        return (f"{out}: captioned {self.captioned}, errors {self.errors}, already done {self.skipped} in "
                f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s), at {precision}{on_nodes}; error rows "
                f"io {self.io_errors}, input {self.input_errors}; retries {self.retries}; failed shards "
                f"{len(self.failed_shards)}")

    def failure(self) -> str | None:
        """Why the run must exit 1 though it ran to its end: the shards that got no result (at most 10 named)."""
        if not self.failed_shards:
            return None
        shown = ", ".join(self.failed_shards[:10]) + (" ..." if len(self.failed_shards) > 10 else "")
        return f"{len(self.failed_shards)} shard(s) got no result: {shown}; rerun the same command to redo them"

    def record(self) -> dict:
        """The counts, the rate and the stage report, for the run's report file."""
        return {"captioned": self.captioned, "errors": self.errors, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2),
                "retries": self.retries, "io_errors": self.io_errors,
                "input_errors": self.input_errors, "failed_shards": self.failed_shards, "nodes": sorted(self.nodes), "stages": self.report}

    def add(self, rows: list[dict]) -> None:
        """Count rows just written."""
        kinds = [row.get("error_kind", IO) for row in rows if "error" in row]
        self.errors += len(kinds)
        self.io_errors += kinds.count(IO)
        self.input_errors += kinds.count(INPUT)
        self.captioned += len(rows) - len(kinds)


def open_for_readers(model: str | Path | None, backend: str = "auto", workers: int | None = None,
                     threads: int | None = None, precision: str = "fp32") -> Backend:
    """``registry.open_backend`` with its inference threads set to ``threads``, else the cores the ``workers``
    readers leave (``options.default_threads``; ``workers`` None: ``default_workers()``, the pipeline's own)."""
    readers = default_workers() if workers is None else workers
    return open_backend(model, backend, threads=threads or default_threads(readers), precision=precision)


def inference_threads(backend: Backend) -> int:
    """The encoder's threads: the backend's own count (onnxruntime, OpenVINO), else torch's."""
    return getattr(backend, "threads", None) or torch.get_num_threads()


def run_settings(model: str | Path | None, decode: DecodeOptions, full_decode: bool = False,
                 precision: str = "fp32") -> dict:
    """What the rows of a run depend on: the model's identity (``registry.model_sha256``; the demo
    model by default), how images are decoded, the decoding options and the precision, which is the one
    that runs (``registry.open_backend`` opens nothing else).

    ``image_decoding`` is ``reduced`` (large JPEGs at reduced size, as the model's preprocessing
    allows) or ``full``; run records written before it existed (full decoding) do not match either,
    so their rows are not resumed together with rows of another decoding. Records written before the
    precision was always recorded left fp32 out (``outputs.UNRECORDED``).
    """
    return {"model_sha256": model_sha256(model), "image_decoding": "full" if full_decode else "reduced",
            "beam": decode.beam, "max_len": decode.max_len, "length_penalty": decode.length_penalty,
            "precision": precision}


def plan(paths: Iterable[str | Path], out: str | Path, overwrite: bool = False, settings: dict | None = None,
         folders: Iterable[Path | None] = (), sources: SourceOptions = SourceOptions(),
         retry_errors: bool = False) -> Plan:
    """Discover the inputs, lock ``out`` and prepare it (``outputs.resume_output``: validated, then a
    torn line cut, or emptied with ``overwrite``). The plan holds the lock until it is closed.

    Shard inputs (``shards.shard_inputs``, read as ``sources`` says) are listed, not read: ``todo``
    streams their samples, skipping those ``out`` already has a row for, and ``done`` counts its rows.

    With ``settings`` (``run_settings``), an ``out`` whose rows were made with other settings is
    refused rather than resumed, and the settings are recorded beside it. ``folders`` (alphas,
    overlays) are checked up front with ``out``, before anything is read or written. With ``retry_errors``,
    the items of ``io`` error rows are captioned again (``outputs.resume_output``).

    Raises ``InputError`` for a missing input or a key clash; ``OutputError`` for an output of the
    wrong kind, not sat-infer JSONL, made with other settings, or locked by another run.
    """
    out = Path(out)
    check_output_paths(out, folders)
    retrying = new_retrying(sources)
    shards = shard_inputs(paths, sources, retrying)
    items = discover(paths) if shards is None else []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out.parent}: cannot create the output folder ({err.strerror})") from None
    lock = OutputLock(out)
    try:
        done = resume_output(out, overwrite, settings, retry_errors)
    except BaseException:
        lock.release()
        raise
    if shards is not None:
        todo = (item for item in stream(shards, sources, retrying) if item.key not in done)
        return Plan(out, todo, len(done), sum(done.values()), lock, retrying)
    todo = [item for item in items if item.key not in done]
    done_errors = sum(done[item.key] for item in items if item.key in done)
    return Plan(out, todo, len(items) - len(todo), done_errors, lock, retrying)


def run(backend: Backend, plan: Plan, options: InferOptions = InferOptions(),
        on_rows: Callable[[int], None] | None = None, times: StageTimes | None = None) -> Summary:
    """Caption ``plan.todo`` with ``backend``, appending one row per item to ``plan.out``.

    ``on_rows(n)`` is called after each batch's ``n`` rows are on disk (progress bars).
    Unreadable or undecodable files become error rows; backend failures propagate.
    ``summary.report`` says where the time went (``times``: the stage timer, a new one by default).
    """
    summary = Summary(skipped=plan.done)
    times = times or StageTimes()
    start = time.perf_counter()
    pool = ThreadPoolExecutor(options.workers, thread_name_prefix="sat-reader")
    try:
        with appending(plan, summary) as append:
            for rows in caption_stream(backend, pool, plan.todo, options, plan.out.parent, times):
                with times.timed("write"):
                    append(rows)
                if on_rows is not None:
                    on_rows(len(rows))
            if options.overlays_dir is not None:
                write_gallery(plan.out, options.overlays_dir, backend.vocab)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - start
        summary.retries = plan.retrying.retries if plan.retrying is not None else 0
        summary.report = stage_report(times, summary.seconds, options.workers, inference_threads(backend))
    return summary


def caption_stream(backend: Backend, pool: Executor, items: Iterable[InputItem], options: InferOptions,
                   out_dir: Path | None, times: StageTimes) -> Iterator[list]:
    """``items`` read by ``pool`` (bounded read-ahead), per batch: with ``out_dir``, ``caption_batch``'s rows
    (side files written there); else ``caption_rows``'s ``(row, alphas)`` pairs. Stages timed in ``times``."""
    thumb = THUMB if options.overlays_dir is not None else None
    reader = partial(read_item, cfg=backend.config.preprocess, max_pixels=options.max_pixels, thumbnail=thumb,
                     full_decode=options.full_decode, times=times)
    loaded = prefetch(pool, reader, times.source_items(items), options.prefetch, options.read_ahead_bytes)
    for batch in times.inputs(batches(loaded, options.batch_size)):
        if out_dir is None:
            yield caption_rows(backend, batch, options.decode, times)
        else:
            yield caption_batch(backend, batch, options, out_dir, times)


@contextmanager
def appending(plan: Plan, summary: Summary) -> Iterator[Callable[[list[dict]], None]]:
    """``append(rows)``: rows onto ``plan.out``, on disk when it returns, counted in ``summary``.

    An ``OSError`` in the block (a full disk, while writing rows or their alphas and overlay files)
    becomes one ``OutputError`` line naming the file and the rows kept; rerunning resumes. The file
    is unbuffered, so closing it after a failed write does not fail again.
    """
    try:
        with plan.out.open("ab", buffering=0) as sink:
            def append(rows: list[dict]) -> None:
                append_rows(sink, rows)
                summary.add(rows)

            yield append
    except OSError as err:
        kept = whole_rows(plan.out)  # what is on disk: a batch may have been written in part
        raise OutputError(f"{err.filename or plan.out}: cannot write ({err.strerror or err}); {plan.out} keeps "
                          f"its {kept} whole rows: make room and rerun the same command to resume") from None


def caption_batch(backend: Backend, batch: list[Loaded], options: InferOptions, out_dir: Path,
                  times: StageTimes | None = None) -> list[dict]:
    """``caption_rows``, with each image's alphas file and overlays written (timed as ``write``) before its row
    is returned."""
    times = times or StageTimes(enabled=False)
    rows = []
    pairs = caption_rows(backend, batch, options.decode, times)
    with times.timed("write"):
        for entry, (row, alphas) in zip(batch, pairs):
            if alphas is not None and options.alphas_dir is not None:
                save_alphas(row, alphas, options.alphas_dir, out_dir)
            if alphas is not None and options.overlays_dir is not None:
                write_overlays(overlay_folder(row["image"], options.overlays_dir), entry.thumbnail, alphas,
                               [backend.vocab.itos[t] for t in row["tokens"]], backend.config.preprocess)
            rows.append(row)
    return rows


def caption_rows(backend: Backend, batch: list[Loaded], options: DecodeOptions,
                 times: StageTimes | None = None) -> list[tuple[dict, np.ndarray | None]]:
    """Encode and decode the batch's images (timed as ``encode`` and ``decode_loop`` in ``times``): per entry,
    in order, its row and its alphas.

    Returns
    -------
    list of (row, alphas)
        ``alphas`` is ``(T, grid, grid)`` float32 for the row's T tokens, or None for an error row.
    """
    times = times or StageTimes(enabled=False)
    good = [entry for entry in batch if entry.pixels is not None]
    captions: Iterator[Caption] = iter(())
    if good:
        with backend.running():  # on CUDA, the decode loop's own ops on the backend's stream
            with times.timed("encode"):
                pixels = np.stack([entry.pixels for entry in good])  # (n_img, 3, H, W)
                images = torch.from_numpy(pixels).to(backend.device)
                encoded = backend.encode(images)
            with times.timed("decode_loop"):
                captions = iter(decode(backend.step, encoded, backend.vocab.special_ids(), options))
    grid = backend.config.grid
    out: list[tuple[dict, np.ndarray | None]] = []
    for entry in batch:
        if entry.pixels is None:
            out.append(({**row_start(entry.item), "error": entry.error, "error_kind": entry.error_kind}, None))
            continue
        caption = next(captions)
        row = {**row_start(entry.item), "caption": " ".join(backend.vocab.decode(caption.tokens)),
               "tokens": caption.tokens, "score": round(caption.score, 4)}
        out.append((row, caption.alphas.reshape(len(caption.tokens), grid, grid)))  # (T, grid, grid)
    return out


def row_start(item: InputItem) -> dict:
    """A row's identity: ``image`` (its key), and for a shard's sample its ``shard`` and ``key`` there."""
    return {"image": item.key} if item.shard is None else {"image": item.key, "shard": item.shard, "key": item.sample}


def save_alphas(row: dict, alphas: np.ndarray, alphas_dir: Path, out_dir: Path) -> None:
    """Write ``row``'s alphas file under ``alphas_dir`` and set ``row["alphas"]`` to it, relative to ``out_dir``."""
    npz = write_alphas(sidecar_path(row["image"], alphas_dir, ".npz"), alphas, row["tokens"])
    row["alphas"] = Path(os.path.relpath(npz, out_dir)).as_posix()


def append_rows(sink: BinaryIO, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines (``outputs.row_line``) to the unbuffered ``sink``, fsynced: on disk when this returns."""
    data = memoryview(b"".join(row_line(row) for row in rows))
    while data:  # an unbuffered write may write part; the next one raises (ENOSPC) or goes on
        data = data[sink.write(data):]
    os.fsync(sink.fileno())


def write_alphas(path: Path, alphas: np.ndarray, tokens: list[int]) -> Path:
    """Atomically (``outputs.write_atomically``) write ``alphas (T, grid, grid)`` as float16 and ``tokens (T,)`` as
    int32 to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, partial(np.savez, alphas=alphas.astype(np.float16),
                                          tokens=np.asarray(tokens, dtype=np.int32)))
