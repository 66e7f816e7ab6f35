"""sat-infer --ray on a real two-node Ray cluster on this machine: a head without CPUs and a second
node with 2, so every reader task and captioning actor runs on the second node. Same rows as one process;
a second run resumes the first."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engines.torch_eager import TorchBackend
from sat_export.pipeline.infer import plan, run
from sat_export.options import InferOptions
from sat_export.pipeline.ray_infer import run_ray
from tests.sat_export.pipeline.test_infer import read_rows, write_images

MB = 2**20


@pytest.fixture(scope="module")
def two_nodes():
    """``(cluster, id of the second node)``: Ray's own multi-node test cluster, as ``ray start`` twice would make."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 * MB})
    worker = cluster.add_node(num_cpus=2, object_store_memory=100 * MB)
    cluster.wait_for_nodes()
    yield cluster, worker.node_id
    cluster.shutdown()


def sat_infer(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sat_export.cli.infer", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_compare_two_node_cluster_vs_single_process_rows_with_actors_on_the_second_node(two_nodes, tmp_path,
                                                                                        tiny_ckpt):
    import ray

    cluster, worker_id = two_nodes
    names = write_images(tmp_path / "in", 12)
    with TorchBackend.from_checkpoint(tiny_ckpt) as backend:
        run(backend, plan([tmp_path / "in"], tmp_path / "one.jsonl"), InferOptions(batch_size=4))
    (tmp_path / "in" / "half.txt").write_text("".join(f"{n}\n" for n in names[:6]))
    common = ["--out", str(tmp_path / "c.jsonl"), "--model", str(tiny_ckpt), "--backend", "torch", "--batch-size",
              "4", "--ray", "--ray-address", cluster.address]
    first = sat_infer([str(tmp_path / "in" / "half.txt"), *common])  # a driver process joining the cluster
    assert "captioned 6, errors 0, already done 0" in first.stderr and "on 1 Ray node(s)" in first.stderr
    ray.init(address=cluster.address)  # this process as the second driver: the same keys, the first 6 resumed
    try:
        second = run_ray(tiny_ckpt, plan([tmp_path / "in"], tmp_path / "c.jsonl"), InferOptions(batch_size=4),
                         backend="torch")
    finally:
        ray.shutdown()
    assert (second.captioned, second.skipped) == (6, 6) and second.nodes == {worker_id}
    assert read_rows(tmp_path / "c.jsonl") == read_rows(tmp_path / "one.jsonl")
