"""Per-shard results on a real S3 server (SeaweedFS) that is down when the run lists them and when it publishes
one: both are retried within --retry-for (issue 25), and the results equal an undisturbed run's."""
from __future__ import annotations

import threading

import pytest

from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.shard_results import plan_shards, run_shards
from tests.sat_export.pipeline.test_infer import backend  # noqa: F401
from tests.sat_export.pipeline.test_s3 import BUCKET, KEY, SECRET, killable_s3, result_rows  # noqa: F401
from tests.sat_export.pipeline.test_shards import write_image_tars

s3fs = pytest.importorskip("s3fs", reason="the [s3] extra (s3fs) is not installed")


def test_listing_and_publishing_results_are_retried_while_s3_is_down(killable_s3, tmp_path, backend,  # noqa: F811
                                                                       monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_ENDPOINT_URL", killable_s3.endpoint), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems by arguments, not by the AWS_* they read
    write_image_tars(tmp_path, n_shards=2, per_shard=6)  # on disk: only the results need the server
    out = f"s3://{BUCKET}/results/"

    def caption(on_rows=None):
        with plan_shards([tmp_path], out, overwrite=True, sources=SourceOptions(retry_for=60)) as work:
            return run_shards(backend, work, InferOptions(batch_size=3), on_rows)

    def down_for_a_while() -> threading.Timer:
        # s3fs tries each call 5 times itself, sleeping ~2 s in all: an outage shorter than that never reaches
        # our retries (on a loaded machine it sometimes did not), so the server stays down for 8 s
        killable_s3.kill()
        back = threading.Timer(8.0, killable_s3.start)
        back.start()
        return back

    caption()
    expected = result_rows(out)
    assert len(expected) == 12

    back = down_for_a_while()  # listing --out finds the server dead
    summary = caption()
    back.join()
    assert summary.retries >= 1 and summary.captioned == 12 and result_rows(out) == expected

    downs: list[threading.Timer] = []  # killed at the first rows: the first shard's upload finds it dead
    summary = caption(lambda n_rows: downs or downs.append(down_for_a_while()))
    downs[0].join()
    assert summary.retries >= 1 and summary.captioned == 12 and result_rows(out) == expected
