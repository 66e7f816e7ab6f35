"""The fault drill, reduced (3 shards of 24 samples): on real SeaweedFS, an HTTP store that stalls and a local Ray,
every fault set off mid-run costs no row and duplicates none, never prints a traceback, and needs a rerun only where
the run was meant to stop (S3 down past --retry-for, the driver killed)."""
from __future__ import annotations

import pytest

from benchmarks.faults import FAULTS, run_drill
from benchmarks.services import ServiceUnavailable

RERUNS = {"s3 restarted": 0, "s3 down past budget": 1, "stalled store": 0, "ray actor killed": 0,
          "driver killed": 1}


def test_reduced_drill_every_fault_loses_and_duplicates_no_row_and_prints_no_traceback(tmp_path):
    pytest.importorskip("s3fs", reason="the [s3] extra (s3fs) is not installed")
    pytest.importorskip("ray.data", reason="the [ray] extra is not installed")
    try:
        rows = run_drill(tmp_path, n_shards=3, per_shard=24, batch_size=4)
    except ServiceUnavailable as err:
        pytest.skip(str(err))
    assert [row["fault"] for row in rows] == list(FAULTS)
    for row in rows:
        assert row["injected"], f"{row['fault']}: the fault did not land mid-run"
        assert (row["expected"], row["captioned"], row["duplicated"], row["lost"]) == (72, 72, 0, 0), row
        assert not row["traceback"], row
        assert row["reruns"] == RERUNS[row["fault"]], row
        assert row["exit_codes"][-1] == 0, row
