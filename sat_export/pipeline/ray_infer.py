"""``sat-infer --ray``: the same rows as ``sat_export.pipeline.infer.run``, computed on a Ray cluster.

The driver plans as the single-machine path does (``infer.plan``: inputs, resume) and turns
the files still to caption into a Ray Dataset. Decoding and preprocessing run as CPU tasks
(``read_batch``, ``reading.read_item`` on each file); captioning runs in a pool of actors
(``Captioner``), each opening the model once. Finished rows stream back to the driver, which
alone writes: each batch's alphas files first, then its rows, appended, flushed and fsynced,
so a killed driver leaves whole rows and a rerun resumes. Rows arrive in completion order.

Inputs, and the model unless it is the embedded demo model, are read by the workers: on a
cluster they must be at the same absolute path on every node (shared storage). The output
and alphas folder are written by the driver only.

Shards (``run_shards_ray``) go one task per shard to a pool of ``ShardCaptioner`` actors, each
reading and captioning whole shards as ``shard_results.run_shards`` does; the driver publishes
each shard's result as it comes back, so the rows are the single process's.

A lost actor (its worker killed, out of memory, its node gone) is restarted by Ray (``max_restarts``) and
what it held is tried again on it, up to ``RayOptions.attempts`` tries in all (``max_task_retries``; Ray Data's
for a folder's batches). Rows reach the driver only from a try that finished, so a retried batch is written
once and a retried shard published once. A shard that fails every try is left without a result
(``Summary.failed_shards``, one line each in the log) while the others go on. Errors of the cluster reach the
user as one line (``cluster_error``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engines.errors import BackendUnavailable
from sat_export.bundle.format import Bundle
from sat_export.faults import unwrap
from sat_export.options import InferOptions, RayOptions, SourceOptions
from sat_export.pipeline.infer import Plan, Summary, appending, caption_rows, open_for_readers, save_alphas
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.reading import Loaded, read_item
from sat_export.pipeline.shard_results import ShardPlan, publish, shard_batches
from sat_export.pipeline.shards import Shard, new_retrying
from sat_export.pipeline.stages import ActorClock, ActorReports, StageTimes
from sat_export.registry import model_config, open_backend, resolve_model
from training.config import ModelConfig, PreprocessConfig
from training.errors import SatError, first_line
from training.options import DecodeOptions

log = logging.getLogger(__name__)


def import_ray():
    """The ``ray`` module with Ray Data, or ``BackendUnavailable`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - ray without the [data] extra lacks its dependencies
    except ImportError as err:
        raise BackendUnavailable(f"--ray needs Ray Data ({err}): pip install 'sat-export[ray]' "
                                 "(or pip install 'ray[data]>=2.9')") from None
    return ray


def driver_config(model: str | Path | None, backend: str) -> ModelConfig:
    """Check the model on the driver, before any worker starts, and return its config.

    A checkpoint for a bundle backend has its bundle built here, once, into this machine's
    cache (``sat_export.bundler.cache``), where actors on this machine then find it.
    """
    resolved = resolve_model(model, backend)
    return resolved.config if isinstance(resolved, Bundle) else model_config(resolved)


def read_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, max_pixels: int,
               full_decode: bool = False) -> dict[str, np.ndarray]:
    """CPU task: read, decode and preprocess each file of ``batch`` (columns ``path``, ``key``, ``error``,
    ``error_kind``).

    Adds ``pixels (n, 3, crop, crop)`` float32 (zeros for a bad file) and sets ``error`` ("" when none)
    and ``error_kind``.
    """
    loaded = [read_item(InputItem(Path(path), key, error or None, error_kind=kind), cfg, max_pixels,
                        full_decode=full_decode)
              for path, key, error, kind in zip(batch["path"], batch["key"], batch["error"], batch["error_kind"])]
    blank = np.zeros((3, cfg.crop, cfg.crop), np.float32)
    return {"path": batch["path"], "key": batch["key"],
            "pixels": np.stack([entry.pixels if entry.pixels is not None else blank for entry in loaded]),
            "error": np.array([entry.error or "" for entry in loaded], dtype=object),
            "error_kind": np.array([entry.error_kind for entry in loaded], dtype=object)}


class Captioner:
    """Actor: opens the model once, then captions ``read_batch`` outputs into JSON rows.

    Returns columns ``row`` (the row as JSON, without ``alphas``), ``alphas`` (the row's
    ``(T, grid, grid)`` attention as float16 bytes; empty for error rows or when not kept) and
    ``node`` (the Ray node the actor runs on).
    """

    def __init__(self, model: str | None, backend: str, threads: int, decode: DecodeOptions, keep_alphas: bool,
                 precision: str = "fp32"):
        import ray

        self.backend = open_for_readers(model, backend, workers=0, threads=threads, precision=precision)
        self.decode, self.keep_alphas, self.threads = decode, keep_alphas, threads
        self.node = ray.get_runtime_context().get_node_id()
        self.times = StageTimes()
        self.clock = ActorClock(self.times, ray.get_runtime_context().get_actor_id())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.clock.start()
        loaded = [Loaded(InputItem(Path(path), key), None if error else pixels, error or None, error_kind=kind)
                  for path, key, pixels, error, kind in zip(batch["path"], batch["key"], batch["pixels"],
                                                            batch["error"], batch["error_kind"])]
        pairs = caption_rows(self.backend, loaded, self.decode, self.times)
        report = json.dumps(self.clock.report(0, self.threads))  # on the batch's first row only
        return {"row": np.array([json.dumps(row, ensure_ascii=False) for row, _ in pairs], dtype=object),
                "alphas": np.array([alphas.astype(np.float16).tobytes() if alphas is not None and self.keep_alphas
                                    else b"" for _, alphas in pairs], dtype=object),
                "node": np.array([self.node] * len(pairs), dtype=object),
                "report": np.array([report] + [""] * (len(pairs) - 1), dtype=object)}


def run_ray(model: str | Path | None, plan: Plan, options: InferOptions = InferOptions(),
            ray_options: RayOptions = RayOptions(), backend: str = "auto", threads: int | None = None,
            on_rows: Callable[[int], None] | None = None, precision: str = "fp32") -> Summary:
    """Caption ``plan.todo`` on Ray, appending one row per item to ``plan.out`` as rows arrive.

    Joins the running Ray if ``ray.is_initialized()``, else ``ray.init(ray_options.address)``
    (and shuts down what it started). Each actor gets ``threads`` inference threads
    (default: its CPUs, at least 1) and opens ``backend`` at ``precision`` (``registry.open_backend``).
    ``options.workers`` is unused: Ray schedules the readers.
    ``on_rows(n)`` is called after each batch's ``n`` rows are on disk.

    Raises
    ------
    BackendUnavailable
        Ray Data is not installed.
    SatError
        The model cannot be read, ``options`` asks for overlays, the cluster cannot be joined, the actor
        pool would leave it (its resources at the start) no CPU to read images with, or a batch failed
        ``ray_options.attempts`` times (``cluster_error``: one line; the rows written so far are kept).
    """
    if options.overlays_dir is not None:
        raise SatError("--overlays is not supported with --ray: caption with --alphas, then draw the "
                       "overlays with `sat-eval --html` or without --ray for the images you want")
    ray = import_ray()
    config = driver_config(model, backend)
    summary = Summary(skipped=plan.done)
    if not plan.todo:
        return summary
    start = time.perf_counter()
    reports = ActorReports()
    try:
        with joined(ray, ray_options):
            rows = _caption_dataset(ray, plan, model, backend, config, options, ray_options, threads, precision)
            with appending(plan, summary) as append:
                for batch in _finished(rows, plan.out):
                    written = _finish_rows(batch, config.grid, options.alphas_dir, plan.out.parent)
                    append(written)
                    summary.nodes.update(batch["node"])
                    reports.update(json.loads(report) for report in batch["report"] if report)
                    if on_rows is not None:
                        on_rows(len(written))
    finally:
        summary.seconds = time.perf_counter() - start
        summary.report = reports.merged()
    return summary


def cluster_error(err: Exception, what: str) -> SatError:
    """``err`` from Ray as one line: the ``SatError`` a task raised as it is (a store past its budget, a
    result that cannot be written), else ``what``, the error's class and its message's first line."""
    cause = unwrap(err)
    if isinstance(cause, SatError):
        return cause
    return SatError(f"{what}: {type(cause).__name__}: {first_line(cause)}")


@contextmanager
def joined(ray, ray_options: RayOptions, readers: bool = True) -> Iterator[None]:
    """The running Ray if ``ray.is_initialized()``, else ``ray.init(ray_options.address)`` shut down on exit;
    an actor pool the cluster cannot hold (with a CPU left for reader tasks where there are ``readers``) is
    refused (``_check_fits``)."""
    started = not ray.is_initialized()
    if started:
        address = ray_options.address or os.environ.get("RAY_ADDRESS")  # what ray.init will join
        check_reachable(address)
        try:
            ray.init(address=ray_options.address)
        except ConnectionError as err:
            raise SatError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    try:
        _check_fits(ray.cluster_resources(), ray_options, readers)
        yield
    finally:
        if started:
            ray.shutdown()


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) nothing answers on: ``ray.init`` would retry forever.

    ``None``, ``auto`` and ``local`` are left to ``ray.init``, which fails fast for them.
    """
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise SatError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); is it running? "
                       "(`ray status` on its head node)") from None


def _check_fits(resources: dict[str, float], ray_options: RayOptions, readers: bool = True) -> None:
    """Refuse an actor pool the cluster cannot hold (with a CPU left for reader tasks, where there are
    ``readers``: a folder's files are decoded by tasks, a shard by its actor): it would hang."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need_cpus = ray_options.actors * ray_options.cpus_per_actor
    if need_cpus > cpus - readers:  # one CPU kept for the reader tasks
        short = (f"leave no CPU of the cluster's {cpus:g} to read images" if readers
                 else f"need more than the cluster's {cpus:g} CPU(s)")
        raise SatError(f"{ray_options.actors} actor(s) x {ray_options.cpus_per_actor:g} CPU {short}: lower "
                       "--ray-actors or --ray-cpus-per-actor")
    if ray_options.actors * ray_options.gpus_per_actor > gpus:
        raise SatError(f"{ray_options.actors} actor(s) x {ray_options.gpus_per_actor:g} GPU need more than the "
                       f"cluster's {gpus:g} GPU(s): lower --ray-actors or --ray-gpus-per-actor")


def _caption_dataset(ray, plan: Plan, model: str | Path | None, backend: str, config: ModelConfig,
                     options: InferOptions, ray_options: RayOptions, threads: int | None, precision: str):
    """The lazy Dataset: files -> ``read_batch`` CPU tasks -> ``Captioner`` actor pool -> rows."""
    files = ray.data.from_items([{"path": os.path.abspath(item.path), "key": item.key, "error": item.error or "",
                                  "error_kind": item.error_kind} for item in plan.todo])
    actor_args = dict(model=None if model is None else os.path.abspath(model), backend=backend,
                      threads=threads or max(1, int(ray_options.cpus_per_actor)), decode=options.decode,
                      keep_alphas=options.alphas_dir is not None, precision=precision)
    # A reader task or an actor's batch whose worker died is tried again (a lost actor restarted: Ray Data's
    # max_restarts=-1), ray_options.attempts tries in all: Ray Data's default is no bound, so a file that kills its
    # reader every time would stall the run forever. Ray 2.60 has no named parameter for these: they go as remote
    # args, whose deprecation warning is kept off the user's terminal.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        # memory: a reader holds one decoded RGB image of up to max_pixels (at most 1 GiB asked); asking for it
        # (actors ask for none) also keeps Ray from fusing reading into the actors, where it would not overlap
        # inference
        pixels = files.map_batches(read_batch, batch_size=options.batch_size, num_cpus=1,
                                   memory=min(3 * options.max_pixels, 2**30), max_retries=ray_options.attempts - 1,
                                   fn_kwargs={"cfg": config.preprocess, "max_pixels": options.max_pixels,
                                              "full_decode": options.full_decode})
        return pixels.map_batches(Captioner, batch_size=options.batch_size, fn_constructor_kwargs=actor_args,
                                  compute=ray.data.ActorPoolStrategy(size=ray_options.actors),
                                  num_cpus=ray_options.cpus_per_actor, num_gpus=ray_options.gpus_per_actor or None,
                                  max_task_retries=ray_options.attempts - 1)


def _finished(rows, out: Path) -> Iterator[dict[str, np.ndarray]]:
    """The Dataset's batches as they finish; a failure of Ray or of its tasks as one line (``cluster_error``).

    Ray Data prints a failed task's error with a stack trace on its console; that goes to its log file only
    (``<session>/logs/ray-data``), the line here says it on the terminal.
    """
    console = [handler for handler in logging.getLogger("ray.data").handlers
               if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    for handler in console:
        handler.addFilter(_below_error)
    try:
        batches = iter(rows.iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - the cluster's and its tasks' errors, as one line
                raise cluster_error(err, f"captioning on Ray stopped ({out} keeps the rows written: rerun the same "
                                         "command to resume)") from None
            yield batch
    finally:
        for handler in console:
            handler.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _finish_rows(batch: dict[str, np.ndarray], grid: int, alphas_dir: Path | None, out_dir: Path) -> list[dict]:
    """The driver's part of a batch: parse its rows and write their alphas files (before the rows)."""
    rows = [json.loads(row) for row in batch["row"]]
    if alphas_dir is not None:
        for row, raw in zip(rows, batch["alphas"]):
            if "error" not in row:
                alphas = np.frombuffer(raw, np.float16).reshape(len(row["tokens"]), grid, grid)  # (T, grid, grid)
                save_alphas(row, alphas, alphas_dir, out_dir)
    return rows


class ShardCaptioner:
    """A Ray actor (``--ray``): opens the model once, then captions whole shards with its own reader threads."""

    def __init__(self, model: str | None, backend: str, threads: int, options: InferOptions,
                 sources: SourceOptions = SourceOptions(), precision: str = "fp32", keep_alphas: bool = False):
        import ray

        self.backend = open_backend(model, backend, threads=threads, precision=precision)
        self.pool = ThreadPoolExecutor(options.workers, thread_name_prefix="sat-reader")
        self.options, self.sources, self.keep_alphas, self.threads = options, sources, keep_alphas, threads
        self.node = ray.get_runtime_context().get_node_id()
        self.times = StageTimes()
        self.clock = ActorClock(self.times, ray.get_runtime_context().get_actor_id())

    def caption(self, shard: Shard) -> tuple[list[list[tuple[dict, np.ndarray | None]]], str, int, dict]:
        """The shard's batches of ``(row, alphas)`` pairs (alphas float16 as results keep them, or None
        unless kept), this actor's node, how many times its store was retried and its stage report so far."""
        self.clock.start()
        retrying = new_retrying(self.sources)
        batches = [[(row, alphas.astype(np.float16) if alphas is not None and self.keep_alphas else None)
                    for row, alphas in pairs]
                   for pairs in shard_batches(self.backend, self.pool, shard, self.options, self.sources, retrying,
                                              times=self.times)]
        return batches, self.node, retrying.retries, self.clock.report(self.options.workers, self.threads)


def run_shards_ray(model: str | Path | None, plan: ShardPlan, options: InferOptions = InferOptions(),
                   ray_options: RayOptions = RayOptions(), backend: str = "auto", threads: int | None = None,
                   on_rows: Callable[[int], None] | None = None, precision: str = "fp32") -> Summary:
    """``run_shards`` on Ray: one task per shard on a pool of ``ShardCaptioner`` actors (``options.workers``
    reader threads and ``threads`` inference threads each, default its CPUs), results published by this
    process as shards finish. Shards are read by the actors: on a cluster, give URLs or shared paths.

    A shard whose actor is lost is tried again on it once Ray has restarted it, up to ``ray_options.attempts``
    tries; a shard that fails them all, or whose captioning raised, is left without a result and named in
    ``Summary.failed_shards``. A ``SatError`` of an actor (a store failing past its budget) stops the run, as
    it stops ``run_shards``.
    """
    ray = import_ray()
    driver_config(model, backend)
    summary = Summary(skipped=plan.done)
    start = time.perf_counter()
    reports = ActorReports()
    try:
        with joined(ray, ray_options, readers=False):
            actor = ray.remote(ShardCaptioner).options(num_cpus=ray_options.cpus_per_actor,
                                                      num_gpus=ray_options.gpus_per_actor or None,
                                                      max_restarts=ray_options.attempts * len(plan.todo),
                                                      max_task_retries=ray_options.attempts - 1)
            args = (None if model is None else os.path.abspath(model), backend,
                    threads or max(1, int(ray_options.cpus_per_actor)), options, plan.sources, precision,
                    plan.alphas)
            actors = [actor.remote(*args) for _ in range(ray_options.actors)]
            _caption_shards(ray, actors, plan, summary, reports, on_rows)
    finally:
        summary.seconds = time.perf_counter() - start
        summary.report = reports.merged()
    return summary


def _caption_shards(ray, actors: list, plan: ShardPlan, summary: Summary, reports: ActorReports,
                    on_rows: Callable[[int], None] | None) -> None:
    """Keep each actor captioning one shard of ``plan.todo`` at a time; publish each shard as its try finishes;
    a shard whose tries all failed is named in ``summary.failed_shards`` and the others go on."""
    todo, free, running = deque(plan.todo), list(actors), {}
    while todo or running:
        while todo and free:
            shard, actor = todo.popleft(), free.pop()
            running[actor.caption.remote(shard)] = (shard, actor)
        [ref], _ = ray.wait(list(running), num_returns=1)
        shard, actor = running.pop(ref)
        free.append(actor)
        try:
            batches, node, retries, report = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a lost actor past its tries, or the shard's own error
            cause = unwrap(err)
            if isinstance(cause, SatError):
                raise cause from None
            summary.failed_shards.append(shard.name)
            log.warning("%s: no result: %s: %s", shard.name, type(cause).__name__, first_line(cause))
            continue
        publish(plan, shard, batches, summary, on_rows)
        summary.nodes.add(node)
        summary.retries += retries
        reports.update([report])
