"""sat-infer --ray survives a lost worker, on a real local 2-CPU Ray: an actor's worker killed -9 mid-run is
restarted and what it held tried again (every row once, exit 0); a poison shard, one that kills its actor on
every try, ends as one line naming it while the others are published, and the run exits 1 listing it."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.services import kill_busy_actor, ray_workers
from sat_export.cli.infer import app
from sat_export.options import InferOptions, RayOptions
from sat_export.pipeline.infer import run_settings
from sat_export.pipeline.ray_infer import _check_fits, run_shards_ray
from sat_export.pipeline.shard_results import plan_shards
from sat_export.results.parquet import read_results
from tests.sat_export.pipeline.test_infer import read_rows, write_images
from tests.sat_export.pipeline.test_shards import add_member, photo, write_image_tars
from training.errors import SatError

POISON = "poison"  # the name (without suffix) of the sample or file that kills whoever reads it


def die_on_poison() -> None:
    """Ray's worker setup hook for this module's job: a worker reading a sample or file named ``POISON`` dies at
    once (``os._exit``), as one killed by a crashing native decoder or the kernel's OOM killer would. The code
    under test is unchanged: the hook wraps its readers (a shard's, a folder's) in the worker processes only."""
    from sat_export.pipeline import infer, ray_infer

    for module in (infer, ray_infer):  # where reading.read_item is called: a shard's and a folder's readers
        module.read_item = poisoned(module.read_item)


def poisoned(read):
    def read_or_die(item, *args, **kwargs):
        if Path(item.key).stem == POISON:
            os._exit(1)
        return read(item, *args, **kwargs)

    return read_or_die


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module, whose job's workers run ``die_on_poison``; its address."""
    import ray
    import ray.data  # noqa: F401 - its console log handler then holds the real stderr, not a closed CliRunner's

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                       runtime_env={"worker_process_setup_hook": "tests.sat_export.pipeline.test_ray_faults.die_on_poison",
                                    "env_vars": {"PYTHONPATH": str(Path(__file__).parents[3])}})
    yield context.address_info["gcs_address"]
    ray.shutdown()


def run_killing_an_actor(cmd: list[str], started, actor: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; once ``started()`` says work has come back, kill -9 a busy ``actor``'s worker; the finished
    process and the pid killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not started() and proc.poll() is None:
        assert time.monotonic() < deadline, "sat-infer returned nothing in 4 minutes"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    pid = kill_busy_actor(actor)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), pid


def test_shards_on_ray_an_actor_killed_mid_shard_is_replaced_and_every_row_published_once(ray_address, tmp_path,
                                                                                          tiny_ckpt):
    """Also: 2 actors of 1 CPU on the 2-CPU cluster run (the actors read their own shards)."""
    (tmp_path / "tar").mkdir()
    keys = write_image_tars(tmp_path / "tar", n_shards=6, per_shard=30)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "tar"), "--out", f"{out}/", "--model",
           str(tiny_ckpt), "--backend", "torch", "--batch-size", "2", "--ray", "--ray-address", ray_address,
           "--ray-actors", "2"]
    done, pid = run_killing_an_actor(cmd, lambda: any(out.glob("*.parquet")), "ShardCaptioner")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and f"PID: {pid}" in done.stdout  # Ray's one line on it
    assert pid not in ray_workers("ShardCaptioner")
    images = [row["image"] for row in read_results(f"{out}/")]
    assert sorted(images) == sorted(keys), f"lost {len(set(keys) - set(images))}, duplicated " \
                                           f"{len(images) - len(set(images))}"
    assert "captioned 180, errors 0, already done 0" in done.stderr


def test_folders_on_ray_an_actor_killed_mid_run_is_replaced_and_every_row_written_once(ray_address, tmp_path,
                                                                                       tiny_ckpt):
    names = write_images(tmp_path / "in", 160)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "in"), "--out", str(out), "--model",
           str(tiny_ckpt), "--backend", "torch", "--batch-size", "2", "--ray", "--ray-address", ray_address]
    done, pid = run_killing_an_actor(cmd, lambda: out.exists() and out.stat().st_size > 0, "Captioner")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and f"PID: {pid}" in done.stdout
    assert sorted(read_rows(out)) == names  # read_rows refuses a key written twice


def test_a_poison_shard_fails_alone_in_one_line_and_the_run_exits_1_listing_it(ray_address, tmp_path, tiny_ckpt,
                                                                               capfd, caplog):
    (tmp_path / "tar").mkdir()
    keys = write_image_tars(tmp_path / "tar", n_shards=3, per_shard=6)
    with tarfile.open(tmp_path / "tar" / "00003.tar", "w") as tar:
        add_member(tar, "fine.jpg", photo(3, 0))
        add_member(tar, f"{POISON}.jpg", photo(3, 1))
    result = CliRunner().invoke(app, [str(tmp_path / "tar"), "--out", f"{tmp_path}/out/", "--model", str(tiny_ckpt),
                                      "--backend", "torch", "--batch-size", "2", "--ray", "--ray-actors", "2"])
    logged = capfd.readouterr()
    assert result.exit_code == 1, result.output
    assert "captioned 18, errors 0" in result.output
    assert "error: 1 shard(s) got no result: 00003.tar; rerun" in result.output
    assert "Traceback" not in result.output + logged.out + logged.err
    assert sorted(row["image"] for row in read_results(f"{tmp_path}/out/")) == sorted(keys)
    # the library's summary names it too, after its 3 tries (each one killing the actor)
    options = InferOptions(batch_size=2)
    with plan_shards([tmp_path / "tar"], f"{tmp_path}/out/", settings=run_settings(tiny_ckpt, options.decode)) as work:
        assert [shard.name for shard in work.todo] == ["00003.tar"]
        summary = run_shards_ray(tiny_ckpt, work, options, backend="torch")
    assert summary.failed_shards == ["00003.tar"] and summary.captioned == 0
    assert [r.getMessage().split(": ")[:2] for r in caplog.records] == [["00003.tar", "no result"]] * 2
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_on_shards_the_actors_may_take_every_cpu_on_folders_one_is_left_for_the_readers():
    cluster = {"CPU": 2.0}
    _check_fits(cluster, RayOptions(actors=2), readers=False)
    with pytest.raises(SatError, match=r"2 actor\(s\) x 1 CPU leave no CPU of the cluster's 2 to read images"):
        _check_fits(cluster, RayOptions(actors=2), readers=True)
    with pytest.raises(SatError, match=r"3 actor\(s\) x 1 CPU need more than the cluster's 2 CPU\(s\)"):
        _check_fits(cluster, RayOptions(actors=3), readers=False)


def test_a_file_that_kills_its_reader_on_every_try_stops_a_folder_run_in_one_line_keeping_its_rows(
        ray_address, tmp_path, tiny_ckpt, capfd):
    names = write_images(tmp_path / "in", 8)
    (tmp_path / "in" / f"{POISON}.png").write_bytes((tmp_path / "in" / names[0]).read_bytes())
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(app, [str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_ckpt),
                                      "--backend", "torch", "--batch-size", "1", "--ray"])
    logged = capfd.readouterr()
    assert result.exit_code == 1, result.output
    line = result.output.split("error: ", 1)[1].splitlines()[0]  # Ray's own "(raylet)" lines may follow
    assert line.startswith(f"captioning on Ray stopped ({out} keeps the rows written: rerun the same command to "
                           "resume): WorkerCrashedError: The worker died unexpectedly"), line
    assert "Traceback" not in result.output + logged.out + logged.err
    assert set(read_rows(out)) <= set(names)  # whole rows of good files only
