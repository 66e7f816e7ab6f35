"""The prepared GPU bench: its CUDA rows, and the JSON it writes (on a CPU machine: rows that say why not)."""
import json

import torch
from typer.testing import CliRunner

from benchmarks.gpu import CUDA_ROWS, app


def test_gpu_bench_times_the_cuda_rows_against_eager_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["--images", "3", "--batch-sizes", "1,3", "--repeats", "1", "--max-len", "4",
                                      "--backbone", "mobilenet_v3_small_s16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["torch-fp32", *CUDA_ROWS] and rows["torch-fp32"]["status"] == "ok"
    for key in CUDA_ROWS:
        if torch.cuda.is_available():
            assert rows[key]["status"] == "ok" and rows[key]["batches"]["3"]["speedup_vs_eager"] > 0
        else:
            assert rows[key]["status"] == "unavailable: no CUDA GPU on this machine"
