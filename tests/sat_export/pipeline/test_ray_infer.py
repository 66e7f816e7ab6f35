"""sat-infer --ray on a local 2-CPU Ray: the single-process rows and alphas, bad files, resume after SIGKILL."""
from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engines.torch_eager import TorchBackend
from sat_export.cli.infer import app
from sat_export.pipeline.infer import plan, run
from sat_export.options import InferOptions
from sat_export.pipeline.ray_infer import check_reachable, run_ray
from sat_export.options import RayOptions
from tests.sat_export.pipeline.test_infer import (assert_one_captioned_row_per_image, encoded, image, kill_9_mid_run,
                                                  read_rows, write_images)
from training.errors import SatError


def assert_actor_reports(report: dict, workers: int) -> None:
    """One stage report per actor (one actor here), its shares in [0, 1], the model's stages timed."""
    from tests.sat_export.pipeline.test_stages import assert_shares

    assert len(report["actors"]) == 1 and report["bottleneck"]
    actor = report["actors"][0]
    assert_shares(actor)
    assert actor["workers"] == workers and actor["stages"]["encode"]["seconds"] > 0


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module; the address other drivers join it by."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def small_folder(tmp_path) -> Path:
    """8 images in two folders, and 4 files that must become error rows."""
    root = tmp_path / "in"
    write_images(root / "sub", 4)
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(encoded(image(seed=10 + i), "JPEG"))
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(encoded(image(), "JPEG")[:300])
    (root / "text.png").write_text("not an image")
    (root / "folder.png").mkdir()
    return root


def test_compare_ray_vs_single_process_rows_and_alphas_with_bad_files(ray_address, small_folder, tmp_path, tiny_ckpt):
    options = InferOptions(batch_size=3, alphas_dir=tmp_path / "one" / "alphas")
    with TorchBackend.from_checkpoint(tiny_ckpt) as engine:
        one = run(engine, plan([small_folder], tmp_path / "one" / "c.jsonl"), options)
    options = InferOptions(batch_size=3, alphas_dir=tmp_path / "ray" / "alphas")
    on_rows = []
    on_ray = run_ray(tiny_ckpt, plan([small_folder], tmp_path / "ray" / "c.jsonl"), options, backend="torch",
                     on_rows=on_rows.append)
    assert (on_ray.captioned, on_ray.errors) == (one.captioned, one.errors) == (8, 4) and sum(on_rows) == 12
    assert_actor_reports(on_ray.report, workers=0)
    expected, got = read_rows(tmp_path / "one" / "c.jsonl"), read_rows(tmp_path / "ray" / "c.jsonl")
    assert got == expected  # alphas paths are relative to each output's folder, so they are equal too
    for row in expected.values():
        if "error" in row:
            continue
        with np.load(tmp_path / "one" / row["alphas"]) as a, np.load(tmp_path / "ray" / row["alphas"]) as b:
            assert a["alphas"].shape[0] == len(row["tokens"])
            np.testing.assert_array_equal(a["alphas"], b["alphas"])
            np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_kill_9_of_the_driver_then_rerun_gives_exactly_one_row_per_image(ray_address, tmp_path, tiny_ckpt):
    names = write_images(tmp_path / "in", 120)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "in"), "--out", str(out),
           "--model", str(tiny_ckpt), "--backend", "torch", "--batch-size", "2", "--alphas", str(tmp_path / "alphas"),
           "--ray", "--ray-address", ray_address]
    n_before = kill_9_mid_run(cmd, out, 6, len(names))
    done = CliRunner().invoke(app, cmd[3:])  # this process's driver, on the same Ray
    assert done.exit_code == 0, done.output
    assert f"already done {n_before}" in done.output
    assert_one_captioned_row_per_image(out, names)


def test_without_ray_the_cli_says_in_one_line_how_to_install_it(monkeypatch, small_folder, tmp_path, tiny_ckpt):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    result = CliRunner().invoke(app, [str(small_folder), "--out", str(tmp_path / "c.jsonl"), "--model", str(tiny_ckpt),
                                      "--ray"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--ray needs Ray Data" in result.output and "pip install 'sat-export[ray]'" in result.output


def test_options_and_overlays_are_refused_up_front(tmp_path, small_folder):
    with pytest.raises(ValueError, match="actors must be at least 1"):
        RayOptions(actors=0)
    with pytest.raises(SatError, match="--overlays is not supported with --ray"):
        run_ray(None, plan([small_folder], tmp_path / "c.jsonl"), InferOptions(overlays_dir=tmp_path / "o"))


def test_an_actor_pool_that_leaves_no_cpu_for_the_readers_is_refused_instead_of_hanging(ray_address, tmp_path,
                                                                                         small_folder, tiny_ckpt):
    work = plan([small_folder], tmp_path / "c.jsonl")
    with pytest.raises(SatError, match=r"2 actor\(s\) x 1 CPU leave no CPU of the cluster's 2 to read images"):
        run_ray(tiny_ckpt, work, ray_options=RayOptions(actors=2), backend="torch")
    with pytest.raises(SatError, match=r"1 actor\(s\) x 0.5 GPU need more than the cluster's 0 GPU"):
        run_ray(tiny_ckpt, work, ray_options=RayOptions(gpus_per_actor=0.5), backend="torch")


def test_an_address_nothing_answers_on_is_refused_instead_of_retrying_forever():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(SatError, match=f"cannot reach the Ray cluster at {re.escape(address)}"):
            check_reachable(address)
    check_reachable("auto")  # left to ray.init
    check_reachable(None)


def test_compare_ray_vs_single_process_per_shard_results_with_a_damaged_shard(ray_address, tmp_path, tiny_ckpt):
    from sat_export.pipeline.ray_infer import run_shards_ray
    from sat_export.pipeline.shard_results import plan_shards, run_shards
    from sat_export.results.parquet import load_alphas, read_results
    from tests.sat_export.pipeline.test_shards import write_webdataset

    write_webdataset(tmp_path / "wds", n_shards=3)
    tar = tmp_path / "wds" / "00002.tar"
    tar.write_bytes(tar.read_bytes()[:2000])  # truncated inside its first photo
    options = InferOptions(batch_size=3)
    with TorchBackend.from_checkpoint(tiny_ckpt) as engine, \
            plan_shards([tmp_path / "wds"], f"{tmp_path}/one/", alphas=True) as work:
        run_shards(engine, work, options)
    with plan_shards([tmp_path / "wds"], f"{tmp_path}/ray/", alphas=True) as work:
        summary = run_shards_ray(tiny_ckpt, work, options, backend="torch")
    assert (summary.captioned, summary.errors) == (8, 1) and len(summary.nodes) == 1
    assert_actor_reports(summary.report, workers=options.workers)
    one, on_ray = list(read_results(f"{tmp_path}/one/")), list(read_results(f"{tmp_path}/ray/"))
    assert [r["image"] for r in one] == [r["image"] for r in on_ray] and one[-1]["image"] == "00002.tar"
    for a, b in zip(one, on_ray):
        assert a.keys() == b.keys() and all(a.get(k) == b.get(k) for k in ("key", "tokens", "score", "error"))
        if "alphas" in a:
            np.testing.assert_array_equal(load_alphas(a["alphas"]), load_alphas(b["alphas"]))
