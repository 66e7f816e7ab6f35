"""``python -m benchmarks.faults``: the fault drill. sat-infer runs (child processes, the default demo model) over
tar shards of synthetic pictures while real services fail under it, and the rows are counted.

Services, started here on 127.0.0.1 and stopped by pid (``benchmarks.services``): SeaweedFS (storage and S3
gateway as two processes), an HTTP store that accepts connections and never answers the first ones, a local Ray.
The faults, each set off when the run's first result is published (so a shard is open):

- ``s3 restarted``: the S3 server killed -9 and started again 2 s later (within ``--retry-for``);
- ``s3 down past budget``: the S3 server killed, the run (``--retry-for 3``) stops; S3 back, the run again;
- ``stalled store``: shards over HTTP from a server whose first 2 connections are accepted and never answered
  (``--connect-timeout 1 --read-timeout 1``);
- ``ray actor killed``: a busy captioning actor's worker killed -9 (``--ray --ray-actors 2``);
- ``driver killed``: sat-infer itself killed -9, results on S3; then the run again.

Per fault: samples expected, captioned, duplicated, lost, seconds added (wall time to the complete result minus
an undisturbed run of the same source), reruns needed, exit codes, and whether any run printed a traceback.

Example:  python -m benchmarks.faults --shards 4 --per-shard 24 --json faults.json
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.table import Table

from benchmarks.bench import collect_environment
from benchmarks.services import BUCKET, SeaweedFS, kill_busy_actor, stalling_server
from benchmarks.shards import key, photo_pool, write_tars
from sat_export.cli.common import console, new_app, user_errors
from sat_export.results.parquet import read_results
from training.console import make_console

FAULTS = ("s3 restarted", "s3 down past budget", "stalled store", "ray actor killed", "driver killed")
app = new_app()


class Drill:
    """The shards (on disk and in S3), the services and the runs' logs of one drill under ``root``."""

    def __init__(self, root: Path, n_shards: int, per_shard: int, batch_size: int):
        self.root, self.logs = root, []
        write_tars(root / "shards", photo_pool(16), n_shards * per_shard, per_shard)
        self.names = [f"{s:05d}.tar" for s in range(n_shards)]
        self.expected = {f"{s:05d}.tar/{key(s * per_shard + i)}" for s in range(n_shards) for i in range(per_shard)}
        self.common = ["--batch-size", str(batch_size)]
        self.s3 = SeaweedFS(root / "seaweedfs")
        self.s3.start()
        self.fs = self.s3.filesystem()
        self.fs.put(f"{root / 'shards'}/", f"{BUCKET}/shards/", recursive=True)
        self.storage = json.dumps({**self.s3.options, "default_block_size": 16 * 1024})  # many reads a shard

    def run(self, source: str, out: str, *extra: str, until: Callable[[], bool] | None = None,
            then: Callable[[subprocess.Popen], object] | None = None) -> tuple[int, float]:
        """``sat-infer source --out out extra`` to its end; once ``until()`` holds, ``then(process)`` (the fault)
        is done once while it runs. Its exit code and seconds; its output is kept for the traceback check."""
        log = self.root / f"run{len(self.logs)}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "sat_export.cli.infer", source, "--out", out, *self.common, *extra]
        start = time.perf_counter()
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
            while until is not None and proc.poll() is None and not until():
                time.sleep(0.05)
            if until is not None and proc.poll() is None:
                then(proc)
            proc.wait()
        return proc.returncode, time.perf_counter() - start

    def s3_source(self) -> list[str]:
        return [f"s3://{BUCKET}/shards/", "--storage-options", self.storage]

    def published(self, out: str) -> Callable[[], bool]:
        """Whether a result is at ``out`` (a local folder or an s3:// prefix) yet."""
        def on_s3() -> bool:
            try:
                return bool(self.fs.ls(out, refresh=True))
            except FileNotFoundError:
                return False

        return on_s3 if out.startswith("s3://") else lambda: any(Path(out).glob("*.parquet"))

    def row(self, fault: str, out: str, runs: list[tuple[int, float]], baseline: float, injected: bool,
            first_log: int) -> dict:
        """The fault's line: rows counted at ``out``, the runs' exit codes and seconds, tracebacks in their logs."""
        options = self.s3.options if out.startswith("s3://") else None
        images = [row["image"] for row in read_results(out, options) if "caption" in row]
        logs = "".join(log.read_text(errors="replace") for log in self.logs[first_log:])
        return {"fault": fault, "injected": injected, "expected": len(self.expected), "captioned": len(set(images)),
                "duplicated": len(images) - len(set(images)), "lost": len(self.expected - set(images)),
                "seconds": sum(s for _, s in runs), "baseline_seconds": baseline,
                "seconds_added": sum(s for _, s in runs) - baseline, "reruns": len(runs) - 1,
                "exit_codes": [rc for rc, _ in runs], "traceback": "Traceback" in logs}

    def close(self) -> None:
        self.s3.stop()


def s3_restarted(drill: Drill, baseline: float) -> dict:
    out, first, done = f"{drill.root}/a/", len(drill.logs), []
    source, *extra = drill.s3_source()

    def blip(_):
        drill.s3.kill()
        done.append(threading.Timer(2.0, drill.s3.start))
        done[0].start()

    runs = [drill.run(source, out, *extra, until=drill.published(out), then=blip)]
    if done:
        done[0].join()
    return drill.row("s3 restarted", out, runs, baseline, bool(done), first)


def s3_down_past_budget(drill: Drill, baseline: float) -> dict:
    out, first = f"{drill.root}/b/", len(drill.logs)
    source, *extra = drill.s3_source()
    runs = [drill.run(source, out, *extra, "--retry-for", "3", until=drill.published(out),
                      then=lambda _: drill.s3.kill())]
    drill.s3.start()
    runs.append(drill.run(source, out, *extra))
    return drill.row("s3 down past budget", out, runs, baseline, runs[0][0] == 1, first)


def stalled_store(drill: Drill) -> dict:
    timeouts = ["--connect-timeout", "1", "--read-timeout", "1"]
    pattern = f"{{{drill.names[0][:5]}..{drill.names[-1][:5]}}}.tar"
    with stalling_server(drill.root / "shards") as calm:
        _, baseline = drill.run(f"{calm.url}/{pattern}", f"{drill.root}/c0/", *timeouts)
    first = len(drill.logs)
    with stalling_server(drill.root / "shards", stalls=2) as server:
        runs = [drill.run(f"{server.url}/{pattern}", f"{drill.root}/c/", *timeouts)]
        injected = server.stalls == 0
    return drill.row("stalled store", f"{drill.root}/c/", runs, baseline, injected, first)


def ray_actor_killed(drill: Drill) -> dict:
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        cluster = ["--ray", "--ray-address", context.address_info["gcs_address"], "--ray-actors", "2"]
        source = str(drill.root / "shards")
        _, baseline = drill.run(source, f"{drill.root}/d0/", *cluster)
        out, first, killed = f"{drill.root}/d/", len(drill.logs), []
        runs = [drill.run(source, out, *cluster, until=drill.published(out),
                          then=lambda _: killed.append(kill_busy_actor("ShardCaptioner")))]
    finally:
        ray.shutdown()
    return drill.row("ray actor killed", out, runs, baseline, bool(killed), first)


def driver_killed(drill: Drill, baseline: float) -> dict:
    out, first = f"s3://{BUCKET}/e/", len(drill.logs)
    source, *extra = drill.s3_source()
    runs = [drill.run(source, out, *extra, until=drill.published(out), then=lambda proc: proc.kill())]
    injected = runs[0][0] == -9 and len(drill.fs.ls(out, refresh=True)) < len(drill.names)  # killed mid-run
    runs.append(drill.run(source, out, *extra))
    return drill.row("driver killed", out, runs, baseline, injected, first)


def run_drill(root: Path, n_shards: int = 4, per_shard: int = 32, batch_size: int = 4,
              faults: tuple[str, ...] = FAULTS) -> list[dict]:
    """Each of ``faults`` on its own output; one row each (``Drill.row``). A shard should hold more samples than
    a run reads ahead (``InferOptions.prefetch``: 2 batches and a sample per reader), so that faults set off
    when the first result is published find the next shard open."""
    drill = Drill(root, n_shards, per_shard, batch_size)
    try:
        source, *extra = drill.s3_source()
        _, s3_baseline = drill.run(source, f"{root}/s3-calm/", *extra)
        steps = {"s3 restarted": lambda: s3_restarted(drill, s3_baseline),
                 "s3 down past budget": lambda: s3_down_past_budget(drill, s3_baseline),
                 "stalled store": lambda: stalled_store(drill), "ray actor killed": lambda: ray_actor_killed(drill),
                 "driver killed": lambda: driver_killed(drill, s3_baseline)}
        return [steps[fault]() for fault in faults]
    finally:
        drill.close()


@app.command()
@user_errors
def main(
    shards: int = typer.Option(4, min=2, help="Tar shards in the drill."),
    per_shard: int = typer.Option(32, min=2, help="Samples per shard (more than 2 batches and a few)."),
    batch_size: int = typer.Option(4, min=1, help="Images per model call, as sat-infer --batch-size."),
    json_path: Path = typer.Option(Path("faults.json"), "--json", help="Where to write the rows."),
):
    """Break real services under sat-infer and count lost and duplicated rows."""
    with tempfile.TemporaryDirectory(prefix="sat-fault-drill-") as tmp:
        rows = run_drill(Path(tmp), shards, per_shard, batch_size)
    doc = {"tool": "benchmarks.faults", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "shards": shards, "per_shard": per_shard, "batch_size": batch_size, "rows": rows, **collect_environment()}
    print_table(doc)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"rows written to {json_path}", highlight=False)


def print_table(doc: dict) -> None:
    table = Table(title=f"fault drill, {doc['shards']} shards x {doc['per_shard']} samples, demo model: "
                        f"{doc['machine']['cpu']}, {doc['machine']['usable_cores']} cores")
    for name in ("fault", "expected", "captioned", "duplicated", "lost", "seconds added", "reruns", "exit codes",
                 "traceback"):
        table.add_column(name, justify="left" if name == "fault" else "right")
    for row in doc["rows"]:
        table.add_row(row["fault"] + ("" if row["injected"] else " (not injected)"), str(row["expected"]),
                      str(row["captioned"]), str(row["duplicated"]), str(row["lost"]), f"{row['seconds_added']:+.1f}",
                      str(row["reruns"]), ", ".join(map(str, row["exit_codes"])), "yes" if row["traceback"] else "no")
    make_console(stderr=False).print(table)


if __name__ == "__main__":
    app()
