"""Where a run's time goes: the seconds each stage of the pipeline was busy, the report made of them, and the
bottleneck named with what to change.

Stages: ``read`` (bytes from a file, or a shard's samples from its stream), ``decode_image`` (decode,
resize, crop, normalise), ``encode`` (the encoder graph), ``decode_loop`` (the step graph and the search
around it) and ``write`` (rows, alphas and overlay files, results). The readers (``--workers`` threads) do
``read`` for files and ``decode_image``; the model's thread does the rest, including reading shards, and
``wait``s when the next image is not decoded yet. A stage's share is its busy seconds over the wall time
of the threads that run it, so each share is in [0, 1].

Timing costs two ``perf_counter`` calls and a lock per stage per image or batch: cheap enough to be always
on (``python -m benchmarks.defaults`` measures it). On CUDA, ``encode`` and ``decode_loop`` time the host's
side of asynchronous work.
"""
from __future__ import annotations

import json
import posixpath
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

from sat_export.faults import RetryPolicy, Retrying
from sat_export.options import SourceOptions
from sat_export.pipeline.stores import filesystem, is_url
from training.errors import SatError, first_line
from training.files import write_atomically
from training.machine import cpu_info

READER_STAGES = ("read", "decode_image")
MODEL_STAGES = ("encode", "decode_loop")
_END = object()
STAGES = READER_STAGES + MODEL_STAGES + ("write",)
BUSY = 0.85  # a pool busy this share of the run has no time to spare
WAITED = 0.15  # the model's thread idle this share of the run was held back by what feeds it


class StageTimes:
    """Busy seconds per stage, summed over threads; ``read`` split by thread kind (reader pool or model's thread).

    ``enabled=False`` times nothing (the overhead benchmark's control).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.source = 0.0  # ``read`` on the model's thread (shard streams), within ``input``
        self.input = 0.0  # the model's thread waiting for its next batch of decoded images (includes ``source``)
        self.fill: float | None = None  # of which the wait for the first batch: the pipeline filling up
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.seconds[stage] += seconds

    def timed(self, stage: str):
        """A context manager adding its block's wall time to ``stage``."""
        return self._timed(stage) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def source_items(self, items: Iterable) -> Iterator:
        """``items``, the time spent producing each one counted as ``read`` on the model's thread."""
        return self._iterate(items, True)

    def inputs(self, loaded: Iterable) -> Iterator:
        """``loaded`` (batches), the time spent waiting for each one counted as the model's ``input`` wait, the
        first one's also as ``fill``."""
        return self._iterate(loaded, False)

    def _iterate(self, items: Iterable, source: bool) -> Iterator:
        if not self.enabled:
            yield from items
            return
        it = iter(items)
        while True:
            start = time.perf_counter()
            item = next(it, _END)
            seconds = time.perf_counter() - start
            if source:
                self.source += seconds
                self.add("read", seconds)
            else:
                self.input += seconds
                self.fill = seconds if self.fill is None else self.fill
            if item is _END:
                return
            yield item


class TimedFile:
    """A binary file counting the seconds spent opening it (``opened_in``) and in its ``read``/``readinto``/``seek``
    (Pillow reads while it decodes): one reader's ``read`` time for one item."""

    def __init__(self, f, opened_in: float = 0.0):
        self._f, self.seconds = f, opened_in

    def _timed(self, method, *args):
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def read(self, *args):
        return self._timed(self._f.read, *args)

    def readinto(self, buffer):
        return self._timed(self._f.readinto, buffer)

    def seek(self, *args):
        return self._timed(self._f.seek, *args)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self) -> TimedFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class ActorClock:
    """A Ray actor's wall time, from the start of its first call to the end of its last; the gaps between
    calls count as waiting for input (``StageTimes.input``)."""

    def __init__(self, times: StageTimes, actor: str):
        self.times, self.actor = times, actor
        self.first: float | None = None
        self.last_end: float | None = None

    def start(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif self.last_end is not None:
            self.times.input += now - self.last_end

    def report(self, workers: int, threads: int | None) -> dict:
        """The actor's report so far (``stage_report``), ending its current call."""
        self.last_end = time.perf_counter()
        wall = self.last_end - (self.first or self.last_end)
        return {"actor": self.actor, **stage_report(self.times, wall, workers, threads)}


class ActorReports:
    """The driver's view of its actors' reports: each actor's latest (its reports are cumulative)."""

    def __init__(self):
        self.latest: dict[str, dict] = {}

    def update(self, reports: Iterable[dict]) -> None:
        for report in reports:
            seen = self.latest.get(report["actor"])
            if seen is None or report["wall_s"] >= seen["wall_s"]:
                self.latest[report["actor"]] = report

    def merged(self) -> dict | None:
        """One record: each actor's report, and the bottleneck of the busiest model; None before any report."""
        if not self.latest:
            return None
        reports = list(self.latest.values())
        busiest = max(reports, key=lambda rep: rep["model"]["busy"])
        return {"actors": reports, "bottleneck": busiest["bottleneck"], "advice": busiest["advice"]}


def stage_report(times: StageTimes, wall: float, workers: int, threads: int | None) -> dict:
    """The run's stage record: per stage its threads, busy seconds and share; the readers' and the model
    thread's busy and waiting shares; the bottleneck and what to change.

    ``workers``: reader threads (0 where another process reads, as on Ray); ``threads``: inference threads.
    """
    wall = max(wall, 1e-9)
    source = times.source
    pool_read = times.seconds["read"] - source
    streamed = source > pool_read  # shards: read on the model's thread; files: by the readers

    def share(seconds: float, n: int) -> float:
        return round(min(1.0, max(0.0, seconds / (wall * n))), 4) if n else 0.0

    stages = {"read": {"thread": "model" if streamed else "readers", "threads": 1 if streamed else workers,
                       "seconds": times.seconds["read"],
                       "busy": share(source, 1) if streamed else share(pool_read, workers)}}
    stages["decode_image"] = {"thread": "readers", "threads": workers, "seconds": times.seconds["decode_image"],
                              "busy": share(times.seconds["decode_image"], workers)}
    for stage in MODEL_STAGES + ("write",):
        stages[stage] = {"thread": "model", "threads": 1, "seconds": times.seconds[stage],
                         "busy": share(times.seconds[stage], 1)}
    readers_busy = share(pool_read + times.seconds["decode_image"], workers)
    waited = share(times.input - source - (times.fill or 0.0), 1)
    model_busy = share(times.seconds["encode"] + times.seconds["decode_loop"], 1)
    report = {"wall_s": round(wall, 4), "workers": workers, "threads": threads,
              "stages": {name: {**s, "seconds": round(s["seconds"], 4)} for name, s in stages.items()},
              "readers": {"busy": readers_busy, "idle": round(1 - readers_busy, 4) if workers else 0.0},
              "model": {"busy": model_busy, "idle": round(1 - model_busy, 4), "waited_for_images": waited,
                        "first_batch_s": round(times.fill or 0.0, 4)}}
    report["bottleneck"], report["advice"] = bottleneck(report)
    return report


def bottleneck(report: dict) -> tuple[str, str]:
    """The stage that held the run back and one sentence on what to change."""
    stages, readers, model = report["stages"], report["readers"], report["model"]
    r, m, w = _pct(readers["busy"]), _pct(model["busy"]), _pct(model["waited_for_images"])
    if model["first_batch_s"] > report["wall_s"] / 2:
        return "too short", (f"the first batch took {model['first_batch_s']:.2f} s of {report['wall_s']:.2f} s: "
                             "the run was mostly the pipeline filling up, too short to name a bottleneck")
    if model["waited_for_images"] >= WAITED and not report["workers"]:
        return "readers", (f"the actor waited {w} for images: Ray's read tasks are the limit: leave them more "
                           "CPUs (fewer --ray-actors or --ray-cpus-per-actor)")
    if model["waited_for_images"] >= WAITED:
        if readers["busy"] >= BUSY:
            return "readers", (f"readers busy {r}, model idle {_pct(model['idle'])}: raise --workers (now "
                               f"{report['workers']}) or lower --max-pixels (larger images become error rows)")
        return "cores", (f"model waited {w} for images while readers were busy only {r}: the cores are shared "
                         f"(other processes, or --threads {report['threads']} plus --workers {report['workers']} "
                         "over the cores): lower --threads")
    if stages["read"]["thread"] == "model" and stages["read"]["busy"] >= WAITED:
        return "read", (f"reading the shards took {_pct(stages['read']['busy'])} of the model's thread (a "
                        "shard's samples are read on it): the store or disk the shards are on is the limit "
                        "(read from a closer or faster one)")
    if stages["write"]["busy"] >= WAITED and stages["write"]["busy"] >= model["busy"] / 2:
        return "write", (f"writing took {_pct(stages['write']['busy'])}: a faster disk, or leave out "
                         "--alphas/--overlays")
    if stages["encode"]["busy"] >= stages["decode_loop"]["busy"]:
        return "encode", (f"encoder busy {_pct(stages['encode']['busy'])}, readers busy {r}: the model is the limit: "
                          "a faster backend or --precision, or more --threads (now "
                          f"{report['threads']}) if the readers are idle")
    return "decode_loop", (f"decode loop busy {_pct(stages['decode_loop']['busy'])} (model {m}), readers busy {r}: "
                           "the model is the limit: a larger --batch-size shares each step among more images; "
                           "--beam 1 is the cheapest search")


def report_lines(report: dict) -> list[str]:
    """Two or three lines for the end of a run: shares per stage, then the bottleneck and its advice."""
    if "actors" in report:
        lines = [f"actor {i}: " + _shares(rep) for i, rep in enumerate(report["actors"])]
    else:
        lines = [_shares(report)]
    return [*lines, f"bottleneck: {report['bottleneck']}: {report['advice']}"]


def _shares(report: dict) -> str:
    stages = report["stages"]
    busy = ", ".join(f"{name.replace('_', ' ')} {_pct(stages[name]['busy'])}" for name in STAGES
                     if stages[name]["threads"])
    return (f"busy: {busy} (readers {report['workers']}, inference threads {report['threads']}); "
            f"model waited {_pct(report['model']['waited_for_images'])} for images")


def _pct(share: float) -> str:
    return f"{100 * share:.0f} %"


def report_path(out: str, sharded: bool) -> str:
    """A run's report beside its results, never taken for one: ``OUT.report.json`` beside a JSONL output,
    ``OUT/_report.json`` in a folder of per-shard results (which are ``.parquet``)."""
    return posixpath.join(out.rstrip("/"), "_report.json") if sharded else f"{out}.report.json"


def save_report(record: dict, path: str, sources: SourceOptions = SourceOptions()) -> str | None:
    """Write ``record`` with the machine's CPU as JSON to ``path``: a local file written whole
    (``training.files.write_atomically``: a link at its place is replaced, not followed), or one upload to a URL,
    retried as the run's other store calls. The report is not a result: a failure is returned as a warning line
    (None when written) and never fails the run."""
    data = (json.dumps({**record, "cpu": cpu_info().describe()}, indent=1) + "\n").encode()
    try:
        if is_url(path):
            fs, dest = filesystem(path, sources)
            Retrying(RetryPolicy(retry_for=sources.retry_for)).call(partial(fs.pipe_file, dest, data), path)
        else:
            write_atomically(Path(path), lambda f: f.write(data))
    except (OSError, SatError) as err:
        return f"{path}: the run's report was not written ({getattr(err, 'strerror', None) or first_line(err)})"
    return None
