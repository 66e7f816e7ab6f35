"""Shards read through a store that fails: a connection dropped mid-shard is retried and the shard read on from
where it broke (the samples of an undisturbed read, none lost, none twice); a store that accepts and never
answers times out; past the budget the run stops in one line; remote images that stall or drip cost their row."""
from __future__ import annotations

import errno
import gzip
import io
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from typer.testing import CliRunner

from benchmarks.services import stalling_server
from sat_export.cli.infer import app
from sat_export.faults import RetryPolicy, Retrying, StorageUnavailable
from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.infer import plan, run
from sat_export.pipeline.shard_samples import Shard
from sat_export.pipeline.shards import samples
from tests.conftest import one_line_error
from tests.sat_export.pipeline.test_infer import backend, read_rows  # noqa: F401
from tests.sat_export.pipeline.test_shards import add_member, infer, photo, write_image_tars

pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp (installed with the [s3] extra)")


class FlakyFS(LocalFileSystem):
    """Local files whose connection "drops" (``ConnectionResetError``; or ``error()`` is raised) when a read reaches
    one of ``fail_at`` (byte offsets, each failing once); records the offsets files were sought to."""

    def __init__(self, fail_at: list[int], error=lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset "
                                                                              "by peer (test)")):
        super().__init__(skip_instance_cache=True)
        self.fail_at, self.error = sorted(fail_at), error
        self.failures, self.seeks = 0, []

    def _open(self, path, mode="rb", **kwargs):
        return _FlakyFile(super()._open(path, mode, **kwargs), self)


class _FlakyFile:
    def __init__(self, f, fs: FlakyFS):
        self.f, self.fs = f, fs

    def read(self, n: int = -1) -> bytes:
        start = self.f.tell()
        end = start + n if n is not None and n >= 0 else float("inf")
        hit = next((offset for offset in self.fs.fail_at if start <= offset < end), None)
        if hit is not None:
            self.fs.fail_at.remove(hit)
            self.fs.failures += 1
            raise self.fs.error()
        return self.f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.fs.seeks.append(offset)
        return self.f.seek(offset, whence)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def no_wait() -> Retrying:
    return Retrying(RetryPolicy(retry_for=60), sleep=lambda seconds: None)


def read_all(shard: Shard, sources: SourceOptions = SourceOptions(), retrying: Retrying | None = None) -> list:
    return [(item.key, item.data, item.error) for item in samples(shard, sources, retrying or no_wait())]


def tar_bytes(n: int, compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            add_member(tar, f"{i:05d}.jpg", photo(0, i))
            add_member(tar, f"{i:05d}.txt", b"caption %d" % i)
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_compare_a_tar_read_through_dropped_connections_vs_an_undisturbed_read(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    path.write_bytes(tar_bytes(40, compress=suffix != ".tar"))
    expected = read_all(Shard(LocalFileSystem(), str(path), path.name))
    size = path.stat().st_size
    fs = FlakyFS([size * k // 7 for k in range(1, 7)])  # six drops, spread over the shard
    retrying = no_wait()
    got = read_all(Shard(fs, str(path), path.name), retrying=retrying)
    assert got == expected and len(got) == 40 and all(error is None for _, _, error in got)  # none lost or twice
    assert fs.failures == 6 and retrying.retries == 6
    if suffix == ".tar":  # reopened at the next sample's byte (a ranged read), not read again from the start
        assert fs.seeks and all(offset % 512 == 0 and offset > 0 for offset in fs.seeks)
    else:
        assert not fs.seeks


def test_compare_a_parquet_shard_read_through_dropped_connections_vs_an_undisturbed_read(tmp_path):
    path = tmp_path / "s.parquet"
    table = pa.table({"key": [f"k{i:03d}" for i in range(90)], "jpg": [photo(1, i) for i in range(90)]})
    pq.write_table(table, path, row_group_size=20)  # five row groups
    expected = read_all(Shard(LocalFileSystem(), str(path), path.name))
    size = path.stat().st_size
    fs = FlakyFS([size // 3, size // 2, 2 * size // 3])
    got = read_all(Shard(fs, str(path), path.name))
    assert got == expected and [key for key, _, _ in got] == [f"s.parquet/k{i:03d}" for i in range(90)]
    assert fs.failures == 3


def test_a_permanent_error_is_not_retried_and_a_store_down_past_the_budget_stops_in_one_line(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(10, compress=False))
    retrying = no_wait()
    denied = FlakyFS([path.stat().st_size // 2], lambda: PermissionError(errno.EACCES, "Access Denied (test)"))
    got = read_all(Shard(denied, str(path), "s.tar"), retrying=retrying)
    assert retrying.retries == 0 and got[-1][0] == "s.tar" and "cannot read tar, broken after" in got[-1][2]
    clock = [0.0]
    always_down = FlakyFS(list(range(2000, 10**6)))

    def sleep(seconds):
        clock[0] += seconds

    with pytest.raises(StorageUnavailable) as caught:
        read_all(Shard(always_down, str(path), "s.tar"), retrying=Retrying(RetryPolicy(retry_for=30), sleep,
                                                                            lambda: clock[0]))
    message = str(caught.value)
    assert message.startswith(f"file://{path}: ") and "Connection reset by peer" in message and "\n" not in message
    assert clock[0] <= 30


TIMEOUTS = ["--connect-timeout", "1", "--read-timeout", "1"]


def test_a_store_that_accepts_and_stalls_times_out_and_the_run_goes_on_when_it_answers(tmp_path, tiny_ckpt):
    (tmp_path / "wds").mkdir()
    keys = write_image_tars(tmp_path / "wds", n_shards=2, per_shard=6)
    common = ["--model", tiny_ckpt, "--backend", "torch"]
    infer(tmp_path / "wds", "--out", tmp_path / "disk.jsonl", *common)
    with stalling_server(tmp_path / "wds", stalls=2) as server:
        start = time.monotonic()
        output = infer(f"{server.url}/{{00000..00001}}.tar", "--out", tmp_path / "http.jsonl", *common, *TIMEOUTS,
                       "--retry-for", "60")
        assert time.monotonic() - start < 40
    assert read_rows(tmp_path / "http.jsonl") == read_rows(tmp_path / "disk.jsonl") and len(keys) == 12
    assert "captioned 12, errors 0" in output


def test_a_store_that_never_answers_stops_the_run_in_one_line_past_the_budget(tmp_path, tiny_ckpt):
    (tmp_path / "wds").mkdir()
    write_image_tars(tmp_path / "wds", n_shards=1, per_shard=3)
    with stalling_server(tmp_path / "wds", stalls=10**6) as server:
        start = time.monotonic()
        result = CliRunner().invoke(app, [f"{server.url}/00000.tar", "--out", str(tmp_path / "c.jsonl"), "--model",
                                          str(tiny_ckpt), *TIMEOUTS, "--retry-for", "3"])
        elapsed = time.monotonic() - start
    line = one_line_error(result, f"{server.url}/00000.tar", "still failing after", "rerun the same command")
    assert "Timeout" in line or "timed out" in line.lower()
    assert elapsed < 30


def test_remote_images_that_stall_or_drip_cost_their_row_and_the_shard_goes_on(tmp_path, backend):  # noqa: F811
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jpg").write_bytes(photo(0, 0))
    with stalling_server(tmp_path / "web") as server:
        urls = [f"{server.url}/a.jpg", f"{server.url}/stall/b.jpg", f"{server.url}/drip/c.jpg", f"{server.url}/a.jpg"]
        pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
        sources = SourceOptions(retry_for=2, connect_timeout=1, read_timeout=1)
        start = time.monotonic()
        with plan([tmp_path / "urls.parquet"], tmp_path / "c.jsonl", sources=sources) as work:
            summary = run(backend, work, InferOptions(batch_size=2))
        elapsed = time.monotonic() - start
    rows = read_rows(tmp_path / "c.jsonl")
    assert [rows[f"urls.parquet/{i}"].get("caption") is not None for i in range(4)] == [True, False, False, True]
    for i in (1, 2):
        assert rows[f"urls.parquet/{i}"]["error_kind"] == "io"
        assert "still failing after" in rows[f"urls.parquet/{i}"]["error"]
    assert summary.retries >= 2 and elapsed < 30
