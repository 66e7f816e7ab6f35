"""sat-infer on shards laid out as img2dataset writes them (WebDataset tars, Parquet): the captions of the same
photos as files, one row per sample, resume after kill -9, damaged shards as error rows, columns refused up front."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.errors import InputError
from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.infer import plan, run
from sat_export.pipeline.patterns import Pattern
from sat_export.pipeline.shards import find_shards, is_shard_input
from sat_export.pipeline.tar_shards import split_member
from tests.conftest import http_server, one_line_error
from tests.sat_export.pipeline.test_infer import backend, encoded, image, kill_9_mid_run, read_rows  # noqa: F401

PER_SHARD = 5


def key_of(shard: int, i: int) -> str:
    """img2dataset's sample key: the shard number (5 digits) then the sample's index in it (4)."""
    return f"{shard:05d}{i:04d}"


def photo(shard: int, i: int) -> bytes:
    return encoded(image(size=48 + 8 * (i % 3), seed=100 * shard + i), "JPEG")


def meta(shard: int, i: int, status: str = "success") -> dict:
    return {"url": f"http://127.0.0.1/{key_of(shard, i)}.jpg", "caption": f"photo {i}", "key": key_of(shard, i),
            "status": status, "error_message": None if status == "success" else "404", "width": 48,
            "height": 48, "original_width": 48, "original_height": 48, "exif": None, "sha256": None}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uname, info.gname = len(data), 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, n_shards: int = 2, failed: int = PER_SHARD - 1) -> list[str]:
    """img2dataset's ``webdataset`` output: per shard ``NNNNN.tar`` (``<key>.jpg``, ``.json``, ``.txt`` per
    successful sample, members in sorted order as webdataset's TarWriter writes them), ``NNNNN.parquet``
    (every sample's metadata, no image) and ``NNNNN_stats.json``. Sample ``failed`` of each shard failed
    to download: it is in the metadata only. Returns the row keys of the samples in the tars."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                if i == failed:
                    continue
                members = {"jpg": photo(s, i), "json": json.dumps(meta(s, i), indent=4).encode(),
                           "txt": f"photo {i}".encode()}
                for ext in sorted(members):
                    add_member(tar, f"{key_of(s, i)}.{ext}", members[ext])
                keys.append(f"{s:05d}.tar/{key_of(s, i)}")
        pq.write_table(pa.Table.from_pylist([meta(s, i, "success" if i != failed else "failed_to_download")
                                             for i in range(PER_SHARD)]), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD - 1}))
    return keys


def write_parquet_shards(root: Path, n_shards: int = 2, failed: int = PER_SHARD - 1) -> list[str]:
    """img2dataset's ``parquet`` output: per shard ``NNNNN.parquet`` with the metadata columns then ``jpg``
    (binary; null for a failed download). Returns every sample's row key."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        rows = [{**meta(s, i, "success" if i != failed else "failed_to_download"),
                 "jpg": photo(s, i) if i != failed else None} for i in range(PER_SHARD)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:05d}.parquet")
        keys += [f"{s:05d}.parquet/{key_of(s, i)}" for i in range(PER_SHARD)]
    return keys


def write_photos(root: Path, n_shards: int = 2) -> None:
    """The same photos as files, named ``<key>.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        for i in range(PER_SHARD):
            (root / f"{key_of(s, i)}.jpg").write_bytes(photo(s, i))


def write_image_tars(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """``NNNNN.tar`` shards of ``<key>.jpg`` members only (64 px); the row keys, in order."""
    keys = []
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                add_member(tar, f"{key_of(s, i)}.jpg", encoded(image(size=64, seed=i % 7), "JPEG"))
                keys.append(f"{s:05d}.tar/{key_of(s, i)}")
    return keys


def infer(*args) -> str:
    """``sat-infer`` with ``args`` in this process; its output (it must succeed)."""
    result = CliRunner().invoke(app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def caption_of(rows: dict[str, dict]) -> dict[str, tuple]:
    """Row key's sample key -> (caption, tokens, score)."""
    return {row.get("key") or Path(name).stem: (row["caption"], row["tokens"], row["score"])
            for name, row in rows.items() if "error" not in row}


def test_compare_img2dataset_webdataset_and_parquet_vs_the_same_photos_as_files(tmp_path, backend):  # noqa: F811
    write_photos(tmp_path / "files")
    run(backend, plan([tmp_path / "files"], tmp_path / "files.jsonl"), InferOptions(batch_size=3))
    expected = caption_of(read_rows(tmp_path / "files.jsonl"))
    wds_keys = write_webdataset(tmp_path / "wds")
    pq_keys = write_parquet_shards(tmp_path / "pq")
    for source, keys in ((tmp_path / "wds", wds_keys), (tmp_path / "pq", pq_keys)):
        out = tmp_path / f"{source.name}.jsonl"
        summary = run(backend, plan([source], out), InferOptions(batch_size=3))
        rows = read_rows(out)
        assert list(rows) == keys  # in shard order, one row per sample
        assert rows[keys[0]]["shard"] == keys[0].split("/")[0] and rows[keys[0]]["key"] == key_of(0, 0)
        got = caption_of(rows)
        assert got == {k: expected[k] for k in got}
        assert len(got) == 2 * (PER_SHARD - 1)
        assert summary.errors == (2 if source.name == "pq" else 0)
    failed = read_rows(tmp_path / "pq.jsonl")[f"00000.parquet/{key_of(0, PER_SHARD - 1)}"]
    assert failed["error"] == "sample has no image (column 'jpg' is empty)"
    again = run(backend, plan([tmp_path / "wds"], tmp_path / "wds.jsonl"), InferOptions())  # a rerun adds nothing
    assert (again.captioned, again.errors, again.skipped) == (0, 0, len(wds_keys))
    assert list(read_rows(tmp_path / "wds.jsonl")) == wds_keys


def test_brace_patterns_globs_and_image_columns_name_the_same_shards(tmp_path, backend):  # noqa: F811
    write_webdataset(tmp_path / "wds", n_shards=3)
    assert list(Pattern("s/{000..002}.tar").names()) == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert list(Pattern("{a,b}{1..2}").names()) == ["a1", "a2", "b1", "b2"]
    assert split_member("d/000001.seg.PNG") == ("d/000001", "seg.png")
    names = lambda raw: [s.name for s in find_shards([raw])]  # noqa: E731
    assert names(str(tmp_path / "wds" / "{00000..00001}.tar")) == ["00000.tar", "00001.tar"]
    assert names(str(tmp_path / "wds" / "*.tar")) == names(str(tmp_path / "wds")) == ["00000.tar", "00001.tar",
                                                                                      "00002.tar"]
    assert names(f"file://{tmp_path}/wds/00002.tar") == ["00002.tar"]
    with pytest.raises(InputError, match=r"\*.nothing: matches no .tar or .parquet shard"):
        find_shards([str(tmp_path / "*.nothing")])
    # a Hugging Face image struct, and a column of paths relative to the Parquet file
    (tmp_path / "hf" / "img").mkdir(parents=True)
    (tmp_path / "hf" / "img" / "p.jpg").write_bytes(photo(0, 0))
    pq.write_table(pa.table({"image": [{"bytes": photo(0, 0), "path": None}], "label": [1]}),
                   tmp_path / "hf" / "struct.parquet")
    pq.write_table(pa.table({"path": ["img/p.jpg"], "caption": ["x"]}), tmp_path / "hf" / "paths.parquet")
    run(backend, plan([str(tmp_path / "hf" / "*.parquet")], tmp_path / "hf.jsonl"), InferOptions())  # hf/: images
    rows = read_rows(tmp_path / "hf.jsonl")
    assert list(rows) == ["paths.parquet/0", "struct.parquet/0"]
    assert rows["paths.parquet/0"]["tokens"] == rows["struct.parquet/0"]["tokens"]


def test_damaged_shards_give_the_rows_they_held_then_an_error_row_naming_the_shard(tmp_path, backend):  # noqa: F811
    write_webdataset(tmp_path / "in", n_shards=2)
    with tarfile.open(tmp_path / "in" / "00001.tar") as tar:  # cut inside the third sample's photo
        cut = tar.getmember(f"{key_of(1, 2)}.jpg").offset_data + 100
    with open(tmp_path / "in" / "00001.tar", "r+b") as f:
        f.truncate(cut)
    (tmp_path / "in" / "00000.parquet").unlink()  # beside tars Parquet files are metadata: not read anyway
    pq_dir = tmp_path / "pq"
    write_parquet_shards(pq_dir, n_shards=1)
    (pq_dir / "00001.parquet").write_bytes(b"PAR1 not really")
    out = tmp_path / "c.jsonl"
    run(backend, plan([str(tmp_path / "in" / "{00000..00002}.tar")], out), InferOptions(batch_size=2))
    rows = read_rows(out)
    broken = [k for k in rows if k.startswith("00001.tar/")]
    assert broken == [f"00001.tar/{key_of(1, i)}" for i in range(2)] and all("caption" in rows[k] for k in broken)
    assert rows["00001.tar"]["error"].startswith(f"00001.tar: truncated or corrupt tar, broken after {key_of(1, 1)}")
    assert rows["00002.tar"]["error"] == "00002.tar: no such object"  # named by the pattern, not there
    run(backend, plan([pq_dir], tmp_path / "pq.jsonl"), InferOptions())
    rows = read_rows(tmp_path / "pq.jsonl")
    assert rows["00001.parquet"]["error"].startswith("00001.parquet: cannot read Parquet, broken at its start")
    assert len(rows) == PER_SHARD + 1
    sample = tarfile.open(tmp_path / "t.tar", "w")
    add_member(sample, "k.json", b"{}")
    sample.close()
    run(backend, plan([tmp_path / "t.tar"], tmp_path / "t.jsonl"), InferOptions())
    assert read_rows(tmp_path / "t.jsonl")["t.tar/k"]["error"] == "sample has no image member (members: json)"


def test_cli_a_missing_or_ambiguous_image_column_is_refused_before_anything_runs(tmp_path):
    write_parquet_shards(tmp_path / "pq", n_shards=1)
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(app, [str(tmp_path / "pq"), "--out", str(out), "--image-column", "png"])
    assert "url, caption, key, status" in one_line_error(result, "00000.parquet: has no column 'png'")
    pq.write_table(pa.table({"a": [b"x"], "b": [b"y"]}), tmp_path / "two.parquet")
    result = CliRunner().invoke(app, [str(tmp_path / "two.parquet"), "--out", str(out)])
    one_line_error(result, "two.parquet: cannot tell which column holds the images (columns: a, b)", "--image-column")
    result = CliRunner().invoke(app, [str(tmp_path / "pq"), "--out", str(out), "--storage-options", "[1]"])
    one_line_error(result, "--storage-options must be a JSON object")
    assert not out.exists()


def test_kill_9_mid_shard_then_rerun_gives_exactly_one_row_per_sample(tmp_path, tiny_ckpt):
    keys = write_image_tars(tmp_path, n_shards=2, per_shard=150)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "{00000..00001}.tar"), "--out", str(out),
           "--model", str(tiny_ckpt), "--backend", "torch", "--batch-size", "4"]
    n_before = kill_9_mid_run(cmd, out, 20, len(keys))
    result = CliRunner().invoke(app, cmd[3:])
    assert result.exit_code == 0, result.output
    assert f"already done {n_before}" in result.output
    rows = read_rows(out)
    assert sorted(rows) == sorted(keys) and all("caption" in row for row in rows.values())


def test_images_and_shards_in_one_run_are_refused(tmp_path):
    write_webdataset(tmp_path / "wds", n_shards=1)
    write_photos(tmp_path / "files", n_shards=1)
    with pytest.raises(InputError, match="images and shards cannot be captioned in one run"):
        plan([tmp_path / "wds", tmp_path / "files"], tmp_path / "c.jsonl", sources=SourceOptions())


def test_img2dataset_files_output_is_an_image_folder_not_shards(tmp_path):
    """Its ``files`` output: ``00000/<key>.jpg`` with metadata ``00000.parquet`` at the top."""
    write_photos(tmp_path / "files" / "00000", n_shards=1)
    pq.write_table(pa.Table.from_pylist([meta(0, i) for i in range(PER_SHARD)]), tmp_path / "files" / "00000.parquet")
    assert not is_shard_input(tmp_path / "files") and is_shard_input(tmp_path / "files" / "00000.parquet")
    assert [item.key for item in plan([tmp_path / "files"], tmp_path / "c.jsonl").todo] == [
        f"00000/{key_of(0, i)}.jpg" for i in range(PER_SHARD)]


def test_compare_shards_over_http_vs_from_disk(tmp_path, tiny_ckpt):
    pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp (installed with the [s3] extra)")
    keys = write_webdataset(tmp_path / "wds", n_shards=2)
    common = ["--model", tiny_ckpt, "--backend", "torch"]
    infer(tmp_path / "wds", "--out", tmp_path / "disk.jsonl", *common)
    with http_server(tmp_path / "wds") as port:
        infer(f"http://127.0.0.1:{port}/{{00000..00001}}.tar", "--out", tmp_path / "http.jsonl", *common)
    assert read_rows(tmp_path / "http.jsonl") == read_rows(tmp_path / "disk.jsonl") and len(keys) == 8
