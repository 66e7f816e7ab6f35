"""``sat-infer SHARDS --out DIR/``: one Parquet result per input shard, published whole, resumed by shard.

Where the rows of a shard go and what they hold is ``sat_export.results.parquet``'s. Here a shard's
rows are written, a row group at a time, to a temporary file (beside the result on a local disk,
in the system's temporary folder for an object store) and published when the shard is done:
``os.replace`` on a disk, one upload on an object store (an object appears whole or not at all). A
run killed mid-shard leaves no result for it (at most a hidden ``.NAME.<random>.tmp``, removed when it is
redone), so the rerun redoes
that shard whole and nothing is duplicated.

``plan_shards`` skips a shard whose result records the same settings (model, decoding), source
(name, size, etag) and alphas choice; a result made with other settings is refused, as a JSONL
output is, unless ``--overwrite``; a changed source shard is redone, and with ``--retry-errors`` one whose
result holds ``io`` error rows. A local output folder is locked for the run (``outputs.OutputLock`` on
``DIR.lock``); an object store has no lock: give concurrent runs different prefixes.

Results stay under ``--out`` and replace only results: a result's name is confined (``results.parquet.
result_name``), never written through a link inside the folder, its temporary file is created fresh
(``outputs.fresh_temp``), and a file at its place that is not a sat-infer result (an input shard, a FIFO, a
folder, a link) is refused before any work, ``--overwrite`` included. Listing and publishing on a store are
retried as reading is (``faults.Retrying``).
"""
from __future__ import annotations

import glob
import os
import posixpath
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Backend
from sat_export.errors import OutputError
from sat_export.faults import Retrying
from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.infer import Plan, Summary, caption_stream, inference_threads
from sat_export.pipeline.outputs import OutputLock, refuse_other_settings
from sat_export.pipeline.shards import Shard, new_retrying, samples, shard_inputs
from sat_export.pipeline.stages import StageTimes, stage_report
from sat_export.pipeline.stores import filesystem, is_url, protocols
from sat_export.results.parquet import OUT_HINT, columns_of, read_info, result_name, result_schema
from training.files import fresh_temp

ROW_GROUP = 4096  # rows buffered before they are written to the temporary file


def is_results_out(out: str | Path) -> bool:
    """``--out`` names per-shard results: it ends with ``/``, is a folder, or is a URL not ending in ``.jsonl``."""
    text = str(out)
    return text.endswith("/") or os.path.isdir(text) or (is_url(text) and not text.endswith(".jsonl"))


def is_local(fs) -> bool:
    return "file" in protocols(fs)


def source_record(shard: Shard) -> dict:
    return {"shard": shard.name, "size": shard.size, "etag": shard.etag}


@dataclass(frozen=True)
class ShardPlan(Plan):
    """A ``Plan`` whose ``todo`` holds the shards to (re)do and ``out`` the output prefix's URL; ``done``
    counts the rows of the results kept."""

    fs: Any = None
    dest: str = ""  # the prefix's path on ``fs``
    settings: dict = field(default_factory=dict)
    sources: SourceOptions = SourceOptions()
    alphas: bool = False

    @property
    def total(self) -> None:
        return None  # samples are counted as their shards are read

    def result_path(self, shard: Shard) -> str:
        return posixpath.join(self.dest, result_name(shard.name))


def plan_shards(paths: Iterable[str | Path], out: str, overwrite: bool = False, settings: dict | None = None,
                sources: SourceOptions = SourceOptions(), alphas: bool = False,
                retry_errors: bool = False) -> ShardPlan:
    """List the shards of ``paths`` and the results already at ``out``; lock a local ``out``. With
    ``retry_errors``, a shard whose result holds ``io`` error rows is redone whole.

    Raises
    ------
    InputError
        An input is not shards (``shards.shard_inputs``), or two shards would share a result.
    OutputError
        A file at a result's place is not a sat-infer result (an input shard, a FIFO, a folder, a link), or was
        made with other ``settings``; a result's folder inside ``out`` is a link.
    """
    retrying = new_retrying(sources)
    shards = shard_inputs(paths, sources, retrying)
    if shards is None:
        raise OutputError(f"{out}: per-shard results need shard inputs (.tar, .parquet, a folder or URL of them); "
                          "for images, --out names a .jsonl file")
    settings = settings or {}
    fs, dest = filesystem(str(out), sources)
    by_result: dict[str, Shard] = {}
    for shard in shards:
        seen = by_result.setdefault(result_name(shard.name), shard)
        if seen is not shard:
            raise OutputError(f"shards {seen.name} and {shard.name} would share the result "
                              f"{result_name(shard.name)}; caption them in separate runs")
    lock = None
    if is_local(fs):
        try:
            os.makedirs(dest, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{out}: cannot create the output folder ({err.strerror})") from None
        lock = OutputLock(Path(dest))
    try:
        existing = retrying.call(partial(_listing, fs, dest), fs.unstrip_protocol(dest))
        todo, done, done_errors = [], 0, 0
        for shard in shards:
            path = posixpath.join(dest, result_name(shard.name))
            if is_local(fs):
                check_result_place(dest, path)
            if path not in existing:
                todo.append(shard)
                continue
            if _is_input(shard, fs, path):
                raise OutputError(f"{shard.url}: an input shard is at its own result's place; choose another --out")
            info = retrying.call(partial(read_info, fs, path, retry_errors), fs.unstrip_protocol(path))
            if overwrite:
                todo.append(shard)  # a result (read_info says so), replaced
                continue
            refuse_other_settings(fs.unstrip_protocol(path), info.record["settings"], settings)
            if (info.record.get("source") != source_record(shard) or info.record.get("alphas") != alphas
                    or retry_errors and info.io_errors):
                todo.append(shard)  # the shard changed, alphas are now wanted (or not), or io errors are retried
                continue
            done, done_errors = done + info.rows, done_errors + info.errors
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return ShardPlan(str(out), todo, done, done_errors, lock, retrying, fs, dest, settings, sources, alphas)


def _is_input(shard: Shard, fs, path: str) -> bool:
    """Whether the result ``path`` on ``fs`` is the input ``shard`` itself: the same URL, or on a disk the same file."""
    if shard.url == fs.unstrip_protocol(path):
        return True
    if not (is_local(fs) and is_local(shard.fs)):
        return False
    try:
        return os.path.samefile(shard.path, path)
    except OSError:
        return False


def _listing(fs, dest: str) -> set[str]:
    """The files under ``dest`` on ``fs``, listed afresh."""
    fs.invalidate_cache(dest)
    return set(fs.find(dest)) if fs.exists(dest) else set()


def check_result_place(dest: str, path: str) -> None:
    """Refuse (``OutputError``, at once: nothing is opened) a local result ``path`` under ``dest`` whose place holds
    anything but a regular file (a FIFO, a device, a folder, a link) or whose folders inside ``dest`` are links or
    files: a result is never written through a link nor out of ``dest``."""
    here = dest
    for part in posixpath.relpath(path, dest).split("/"):
        here = posixpath.join(here, part)
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return
        if here == path and not stat.S_ISREG(mode):
            raise OutputError(f"{here}: not a regular file (a FIFO, device, folder or link) at a result's place"
                              f"{OUT_HINT}")
        if here != path and not stat.S_ISDIR(mode):
            raise OutputError(f"{here}: a link or file where a folder of results goes; results are never written "
                              f"through links{OUT_HINT}")


class ResultWriter:
    """One shard's rows, written a row group at a time to a fresh temporary file and published whole; publishing
    on a store is retried (``retrying``)."""

    def __init__(self, fs, path: str, schema, retrying: Retrying, dest: str):
        import pyarrow.parquet as pq

        self.fs, self.path, self.schema, self.retrying = fs, path, schema, retrying
        self.alphas = "alphas" in schema.names
        if is_local(fs):
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            check_result_place(dest, path)  # a link planted since the plan
            prefix = f".{posixpath.basename(path)}."
            for stale in glob.glob(glob.escape(posixpath.join(posixpath.dirname(path), prefix)) + "*.tmp"):
                os.unlink(stale)  # a killed run's (the folder is locked): removed, a link never followed
            self.file, self.tmp = fresh_temp(posixpath.dirname(path), prefix)
        else:
            self.file, self.tmp = fresh_temp(tempfile.gettempdir(), "sat-infer-")
        try:
            self.writer = pq.ParquetWriter(self.file, schema)
        except BaseException:
            self.file.close()
            os.unlink(self.tmp)
            raise
        self.rows: list[dict] = []
        self.attention: list[np.ndarray | None] = []

    def add(self, pairs: list[tuple[dict, np.ndarray | None]]) -> None:
        """Rows and their ``(T, grid, grid)`` alphas (None for an error row), as ``infer.caption_rows`` gives them."""
        for row, alphas in pairs:
            self.rows.append(row)
            self.attention.append(alphas)
        if len(self.rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            columns = columns_of(self.rows, self.attention if self.alphas else None)
            self.writer.write_table(pa.Table.from_pydict(columns, self.schema))
            self.rows, self.attention = [], []

    def publish(self) -> None:
        """Close the file and make it the shard's result: a rename on a disk, one upload on an object store."""
        self._flush()
        self._close()
        if is_local(self.fs):
            os.replace(self.tmp, self.path)
        else:
            url = self.fs.unstrip_protocol(self.path)
            self.retrying.call(partial(self.fs.put_file, self.tmp, self.path), url)
            os.unlink(self.tmp)

    def _close(self) -> None:
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        try:
            if not self.file.closed:
                self.writer.close()
        finally:
            self.file.close()
            if os.path.lexists(self.tmp):
                os.unlink(self.tmp)


def shard_batches(backend: Backend, pool: Executor, shard: Shard, options: InferOptions,
                  sources: SourceOptions = SourceOptions(), retrying: Retrying | None = None,
                  times: StageTimes | None = None) -> Iterator[list[tuple[dict, np.ndarray | None]]]:
    """Caption one shard: its samples read by ``pool`` (bounded read-ahead), per batch ``caption_rows``'s pairs;
    stages timed in ``times``."""
    items = samples(shard, sources, retrying)
    return caption_stream(backend, pool, items, options, None, times or StageTimes(enabled=False))


def publish(plan: ShardPlan, shard: Shard, batches_of_pairs: Iterable[list[tuple[dict, np.ndarray | None]]],
            summary: Summary, on_rows: Callable[[int], None] | None = None, times: StageTimes | None = None) -> None:
    """Write a shard's rows into its result and publish it once they are all in (timed as ``write`` in
    ``times``); a failure leaves no result."""
    times = times or StageTimes(enabled=False)
    path = plan.result_path(shard)
    record = {"settings": plan.settings, "source": source_record(shard), "alphas": plan.alphas}
    try:
        writer = ResultWriter(plan.fs, path, result_schema(plan.alphas, record),
                              plan.retrying or new_retrying(plan.sources), plan.dest)
        try:
            for pairs in batches_of_pairs:
                with times.timed("write"):
                    writer.add(pairs)
                summary.add([row for row, _ in pairs])
                if on_rows is not None:
                    on_rows(len(pairs))
            with times.timed("write"):
                writer.publish()
        except BaseException:
            writer.discard()
            raise
    except OSError as err:
        raise OutputError(f"{plan.fs.unstrip_protocol(path)}: cannot write the result ({err.strerror or err}); "
                          "rerun the same command to redo this shard") from None


def run_shards(backend: Backend, plan: ShardPlan, options: InferOptions = InferOptions(),
               on_rows: Callable[[int], None] | None = None, times: StageTimes | None = None) -> Summary:
    """Caption ``plan.todo``'s shards with ``backend``, publishing each one's result when it is done;
    ``summary.report`` says where the time went (``times``: the stage timer, a new one by default)."""
    summary = Summary(skipped=plan.done)
    times = times or StageTimes()
    start = time.perf_counter()
    pool = ThreadPoolExecutor(options.workers, thread_name_prefix="sat-reader")
    try:
        for shard in plan.todo:
            publish(plan, shard, shard_batches(backend, pool, shard, options, plan.sources, plan.retrying, times),
                    summary, on_rows, times)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        summary.seconds = time.perf_counter() - start
        summary.retries = plan.retrying.retries if plan.retrying is not None else 0
        summary.report = stage_report(times, summary.seconds, options.workers, inference_threads(backend))
    return summary
