"""Shards written by img2dataset itself, from photos on a local HTTP server: its ``webdataset`` and ``parquet``
outputs get the captions of its ``files`` output. img2dataset is heavy (opencv, albumentations...) and is not
in ``dev``: the test runs where ``$IMG2DATASET`` or ``PATH`` names its command, e.g. from a throwaway venv."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import http_server
from tests.sat_export.pipeline.test_infer import encoded, image, read_rows
from tests.sat_export.pipeline.test_shards import infer

IMG2DATASET = os.environ.get("IMG2DATASET") or shutil.which("img2dataset")
pytestmark = pytest.mark.skipif(not IMG2DATASET,
                                reason="img2dataset is not installed (set $IMG2DATASET to its command)")


@pytest.fixture
def photo_server(tmp_path):
    """12 photos and a CSV of their URLs (plus one that 404s) on a local HTTP server."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(12):
        (www / f"p{i}.jpg").write_bytes(encoded(image(size=48 + 8 * (i % 4), seed=i), "JPEG"))
    with http_server(www) as port:
        urls = [f"http://127.0.0.1:{port}/p{i}.jpg,photo {i}" for i in range(12)] + [
            f"http://127.0.0.1:{port}/gone.jpg,x"]
        (tmp_path / "urls.csv").write_text("url,caption\n" + "\n".join(urls) + "\n")
        yield tmp_path / "urls.csv"


def test_compare_img2dataset_webdataset_and_parquet_outputs_vs_its_files_output(photo_server, tmp_path, tiny_ckpt):
    captions = {}
    for fmt in ("files", "webdataset", "parquet"):
        subprocess.run([IMG2DATASET, "--url_list", str(photo_server), "--input_format", "csv", "--url_col", "url",
                        "--caption_col", "caption", "--output_format", fmt, "--output_folder", str(tmp_path / fmt),
                        "--processes_count", "1", "--thread_count", "4", "--resize_mode", "no",
                        "--number_sample_per_shard", "5"], check=True, capture_output=True, timeout=300)
        infer(tmp_path / fmt, "--out", tmp_path / f"{fmt}.jsonl", "--model", tiny_ckpt, "--backend", "torch")
        rows = read_rows(tmp_path / f"{fmt}.jsonl")
        captions[fmt] = {row.get("key") or PurePosixPath(name).stem: row for name, row in rows.items()}
    assert len(captions["files"]) == 12  # a folder of images (metadata Parquet beside): not shards
    for fmt in ("webdataset", "parquet"):
        good = {k: (r["caption"], r["tokens"], r["score"]) for k, r in captions[fmt].items() if "error" not in r}
        assert good == {k: (r["caption"], r["tokens"], r["score"]) for k, r in captions["files"].items()}
    failed = [r for r in captions["parquet"].values() if "error" in r]  # the 404: a row with a null jpg
    assert [r["error"] for r in failed] == ["sample has no image (column 'jpg' is empty)"]
    assert Path(tmp_path / "webdataset" / "00000.tar").is_file()
