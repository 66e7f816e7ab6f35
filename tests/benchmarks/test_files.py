"""The from-files bench: the pipeline on photos as they are, fully decoded and pre-shrunk, and the model alone."""
import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from benchmarks.files import app


def test_files_bench_measures_every_input_kind_and_compares_the_decodings(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(0)
    for i in range(4):  # 640x480 JPEGs: decoded at 1/2 for the tiny model (resize 72, draft margin 2)
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(tmp_path / f"{i}.jpg", quality=90)
    out = tmp_path / "files.json"
    result = CliRunner().invoke(app, [str(tmp_path), "--model", str(tiny_ckpt), "--backend", "torch", "--rounds",
                                      "2", "--batch-size", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["n"] == 4 and doc["preprocess"]["draft_margin"] == 2.0
    assert set(doc["images_per_s"]) == {"reduced", "full", "pre-shrunk", "decode-only", "model-only"}
    assert all(len(rates) == 2 and min(rates) > 0 for rates in doc["images_per_s"].values())
    assert 0 <= doc["reduced_vs_full_identical_captions"] <= 1 and doc["share_of_pre_shrunk"]["pre-shrunk"] == 1
