"""Hostile shards (issue 26, the reading side): crafted tars, Parquet files, URLs and patterns become error rows or
one-line refusals, never a traceback, a hang, lost samples or memory that grows with what a shard claims. Where a
row is about memory, a fresh Python runs it and reports its peak resident memory beside a control's."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.infer import plan, run
from sat_export.pipeline.shards import find_shards, stream
from tests.conftest import one_line_error
from tests.sat_export.pipeline.test_infer import backend, read_rows  # noqa: F401
from tests.sat_export.pipeline.test_shards import add_member, photo

MiB = 2**20


def tar_of(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def caption(backend, paths, out: Path, sources: SourceOptions = SourceOptions(),  # noqa: F811
            **options) -> dict[str, dict]:
    with plan(paths, out, sources=sources) as work:
        run(backend, work, InferOptions(**{"batch_size": 4, **options}))
    return read_rows(out)


def fresh_python(code: str, *args, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh Python (it sets ``RESULT``, a dict); ``RESULT`` plus its peak resident memory in MB
    (``rss_mb``: the kernel's ``VmHWM``; ``ru_maxrss`` would count the pytest process it was forked from)."""
    tail = ("\nimport json, re\nstatus = open('/proc/self/status').read()"
            "\nRESULT['rss_mb'] = int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) / 1024"
            "\nprint(json.dumps(RESULT))\n")
    done = subprocess.run([sys.executable, "-c", code + tail, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[3])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CAPTION = """
import sys
from sat_export.options import InferOptions, SourceOptions
from sat_export.pipeline.infer import open_for_readers, plan, run
backend = open_for_readers(sys.argv[1], "torch", workers=2, threads=1)
with plan([sys.argv[2]], sys.argv[3]) as work:
    summary = run(backend, work, InferOptions(batch_size=4, read_ahead_bytes=int(sys.argv[4])))
RESULT = {"captioned": summary.captioned, "errors": summary.errors}
"""

READ = """
import sys
from sat_export.pipeline.shards import find_shards, stream
items = stream(find_shards([sys.argv[1]]))
RESULT = {"errors": [item.error for item in items if item.error]}
"""


# row 2
def test_parquet_image_columns_that_hold_neither_bytes_nor_text_are_refused_in_one_line(tmp_path,
                                                                                       backend):  # noqa: F811
    pq.write_table(pa.table({"image": [{"bytes": 1, "path": "a.jpg"}]}), tmp_path / "struct.parquet")
    result = CliRunner().invoke(app, [str(tmp_path / "struct.parquet"), "--out", str(tmp_path / "c.jsonl")])
    one_line_error(result, "struct.parquet: cannot tell which column holds the images")
    for name, values in {"a_list": [[1, 2]], "an_int": [1], "a_float": [1.5]}.items():
        pq.write_table(pa.table({"x": values, "jpg": [photo(0, 0)]}), tmp_path / f"{name}.parquet")
        result = CliRunner().invoke(app, [str(tmp_path / f"{name}.parquet"), "--out", str(tmp_path / "c.jsonl"),
                                          "--image-column", "x"])
        one_line_error(result, f"{name}.parquet: column 'x' is ", "not image bytes, paths or URLs")
    assert not (tmp_path / "c.jsonl").exists()
    (tmp_path / "two").mkdir()  # a later shard's: its error row, the others captioned
    pq.write_table(pa.table({"x": [photo(0, 1)]}), tmp_path / "two" / "a.parquet")
    pq.write_table(pa.table({"x": [7]}), tmp_path / "two" / "b.parquet")
    rows = caption(backend, [tmp_path / "two"], tmp_path / "two.jsonl", SourceOptions(image_column="x"))
    assert "caption" in rows["a.parquet/0"] and rows["b.parquet"]["error"].startswith("b.parquet: column 'x' is int64")


# rows 3 and 4, and what Parquet values may point at
@pytest.mark.parametrize("url", ["reference://x.tar", "dbfs://x.tar", "jupyter://x.tar", "zip://x.tar::file:///no.zip"])
def test_a_url_no_filesystem_can_be_built_for_is_one_line_and_nothing_is_written(tmp_path, url):
    result = CliRunner().invoke(app, [url, "--out", str(tmp_path / "c.jsonl")])
    one_line_error(result, f"{url}: cannot open this URL (")
    assert not (tmp_path / "c.jsonl").exists()


def test_parquet_values_are_read_only_beside_the_shard_or_from_stores_the_rest_of_the_shard_goes_on(tmp_path,
                                                                                                 backend):  # noqa: F811
    (tmp_path / "in" / "img").mkdir(parents=True)
    (tmp_path / "in" / "img" / "a.jpg").write_bytes(photo(0, 0))
    (tmp_path / "secret.jpg").write_bytes(photo(0, 1))
    values = {"ok": "img/a.jpg", "ftp": "ftp://127.0.0.1:1/a.jpg", "hdfs": "hdfs://x/a.jpg",
              "zip": "zip://a.jpg::file:///missing.zip", "github": "github://o:r@/a.jpg", "up": "../secret.jpg",
              "abs": str(tmp_path / "secret.jpg"), "file": f"file://{tmp_path}/secret.jpg", "ok2": "./img/a.jpg",
              "dbfs": "dbfs://x/a.jpg", "jupyter": "jupyter://x/a.jpg"}
    pq.write_table(pa.table({"key": list(values), "url": list(values.values())}), tmp_path / "in" / "s.parquet")
    rows = caption(backend, [tmp_path / "in" / "s.parquet"], tmp_path / "c.jsonl", SourceOptions(retry_for=0))
    refused = [key for key in values if "ok" not in key]
    assert len(rows) == 11 and all(rows[f"s.parquet/{key}"]["error_kind"] == "input" for key in refused)
    assert rows["s.parquet/ok"]["tokens"] == rows["s.parquet/ok2"]["tokens"]
    errors = {key: rows[f"s.parquet/{key}"].get("error", "") for key in values}
    for key in ("ftp", "hdfs", "github", "dbfs", "jupyter"):
        assert errors[key].startswith(f"{key}:// URLs are not read from a Parquet value")
    assert errors["zip"].startswith("a chained URL")
    assert errors["up"].startswith("a path that leaves the shard's folder")
    assert errors["abs"].startswith("an absolute path is not read") and errors["file"].startswith("file:// URLs")


# row 5
def test_a_truncated_tar_gz_and_a_tar_cut_inside_a_header_end_in_an_error_row(tmp_path, backend):  # noqa: F811
    members = [(f"{i:04d}.jpg", photo(0, i)) for i in range(20)]
    whole = tar_of(tmp_path / "whole.tar.gz", members, "w:gz").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    plain = tar_of(tmp_path / "plain.tar", members).read_bytes()
    header = tarfile.open(tmp_path / "plain.tar").getmember("0005.jpg").offset
    (tmp_path / "in" / "header.tar").write_bytes(plain[:header + 200])  # inside the sixth member's header
    (tmp_path / "in" / "block.tar").write_bytes(plain[:header])  # on a block boundary: no end-of-archive blocks
    rows = caption(backend, [tmp_path / "in"], tmp_path / "c.jsonl")
    for shard in ("cut.tar.gz", "header.tar", "block.tar"):
        captioned = [key for key, row in rows.items() if key.startswith(f"{shard}/") and "caption" in row]
        assert rows[shard]["error"].startswith(f"{shard}: truncated or corrupt tar, broken after ")
        assert rows[shard]["error_kind"] == "input" and 0 < len(captioned) < 20
    assert len([key for key in rows if key.startswith("header.tar/")]) == 5


# rows 6 and 7
def test_undecodable_and_large_samples_are_held_within_the_read_ahead_bytes(tmp_path, tiny_ckpt):
    """48 samples of 6 MiB that do not decode and 40 of 6 MiB that do (a JPEG and padding), in a 0.6 MB .tar.gz,
    against a control of as many tiny samples: peak memory grows by about the read-ahead, not the samples."""
    padded = photo(0, 0) + bytes(6 * MiB)  # decodes: Pillow stops at the JPEG's end
    members = [(f"{i:04d}.jpg", bytes(6 * MiB - i) if i % 2 or i >= 80 else padded) for i in range(88)]
    rss = {}
    for name, shard in (("hostile", members), ("control", [(n, b"x" if d[:2] != b"\xff\xd8" else photo(0, 0))
                                                          for n, d in members])):
        tar_of(tmp_path / f"{name}.tar.gz", shard, "w:gz")
        rss[name] = fresh_python(CAPTION, tiny_ckpt, tmp_path / f"{name}.tar.gz", tmp_path / f"{name}.jsonl", 16 * MiB)
    assert rss["hostile"]["errors"] == rss["control"]["errors"] == 48 and rss["hostile"]["captioned"] == 40
    # unbounded, it held every undecodable sample (288 MiB) waiting for good images, and 34 read ahead
    assert rss["hostile"]["rss_mb"] - rss["control"]["rss_mb"] < 120, rss


def test_a_sample_over_max_sample_bytes_is_an_error_row_saying_so(tmp_path, backend):  # noqa: F811
    tar_of(tmp_path / "s.tar", [("a.jpg", photo(0, 0)), ("b.jpg", photo(0, 1) + bytes(2 * MiB))])
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [photo(0, 0), photo(0, 1) + bytes(2 * MiB)]}),
                   tmp_path / "s.parquet")
    for shard in ("s.tar", "s.parquet"):
        rows = caption(backend, [tmp_path / shard], tmp_path / f"{shard}.jsonl", SourceOptions(max_sample_bytes=MiB))
        assert "caption" in rows[f"{shard}/a"]
        assert rows[f"{shard}/b"]["error"].endswith(f"over the limit of {MiB:,} bytes (--max-sample-bytes)")


def test_a_parquet_decompression_bomb_is_not_read(tmp_path):
    """48 distinct values of 8 MiB of zeros, zstd: 14 KB on disk, one 384 MiB page that pyarrow would decode whole."""
    values = [i.to_bytes(4, "big") + bytes(8 * MiB) for i in range(48)]
    pq.write_table(pa.table({"key": [str(i) for i in range(48)], "jpg": values}), tmp_path / "bomb.parquet",
                   compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    del values
    got = fresh_python(READ, tmp_path / "bomb.parquet")
    assert len(got["errors"]) == 48 and got["rss_mb"] < 400  # read, the page alone is 384 MiB
    assert got["errors"][0].startswith("row group 0 is not read: its column 'jpg' inflates 402,65")


# row 8
def sparse_member(name: str, real_size: int) -> bytes:
    """A GNU sparse member (type ``S``) claiming ``real_size`` bytes with 512 on disk, as tarfile cannot write one."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[482] = 0  # no extended sparse headers
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + b"\xff" * 512


def test_sparse_members_claiming_gigabytes_are_refused_before_a_byte_is_allocated(tmp_path):
    with tarfile.open(tmp_path / "ok.tar", "w") as tar:
        add_member(tar, "a.jpg", photo(0, 0))
    ok = (tmp_path / "ok.tar").read_bytes()[:512 + 512 * ((len(photo(0, 0)) + 511) // 512)]  # less its end blocks
    crafted = ok + sparse_member("b.jpg", 3 * 2**29) + sparse_member("c.jpg", 50 * 10**9) + bytes(1024)
    (tmp_path / "sparse.tar").write_bytes(crafted)
    got = fresh_python(READ, tmp_path / "sparse.tar")
    assert got["errors"] == [f"the sample's image is {size:,} bytes, over the limit of 67,108,864 bytes "
                             "(--max-sample-bytes)" for size in (3 * 2**29, 50 * 10**9)]
    assert got["rss_mb"] < 400


# row 9
def test_a_billion_wide_brace_pattern_costs_what_exists(tmp_path):
    for i in (3, 12):
        tar_of(tmp_path / f"{i}.tar", [("a.jpg", photo(0, i))])
    code = """
import sys, time
from sat_export.pipeline.shards import find_shards
start = time.monotonic()
RESULT = {"names": [[s.name for s in find_shards([p])] for p in sys.argv[1:]], "seconds": time.monotonic() - start}
"""
    got = fresh_python(code, tmp_path / "{0..999999}.tar", tmp_path / "{0..999999999}.tar", timeout=60)
    assert got["names"] == [["12.tar", "3.tar"], ["12.tar", "3.tar"]] and got["rss_mb"] < 400
    assert got["seconds"] < 20  # each costs one listing (expanded, the first took 68 s and 830 MB)


# row 10
def test_repeated_sample_keys_each_get_one_row_their_own_alphas_and_are_resumed(tmp_path, backend):  # noqa: F811
    (tmp_path / "in").mkdir()
    tar_of(tmp_path / "in" / "s.tar", [("k.jpg", photo(0, 0)), ("k.jpg", photo(0, 1)), ("j.jpg", photo(0, 2)),
                                       ("k.jpg", photo(0, 3))])
    pq.write_table(pa.table({"key": ["a", "a", None, "2", "a~2"], "jpg": [photo(1, i) for i in range(5)]}),
                   tmp_path / "pq.parquet")
    pq.write_table(pa.table({"key": [b"caf\xc3\xa9", b"\xff\xd8"], "jpg": [photo(2, 0), photo(2, 1)]}),
                   tmp_path / "bin.parquet")
    out, alphas = tmp_path / "c.jsonl", tmp_path / "alphas"
    expected = {"s.tar/k", "s.tar/k~2", "s.tar/j", "s.tar/k~3"}
    rows = caption(backend, [tmp_path / "in" / "s.tar"], out, alphas_dir=alphas)
    assert set(rows) == expected and len({row["alphas"] for row in rows.values()}) == 4
    assert all((tmp_path / row["alphas"]).is_file() for row in rows.values())
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")  # a run that stopped after two rows
    assert set(caption(backend, [tmp_path / "in" / "s.tar"], out, alphas_dir=alphas)) == expected
    rows = caption(backend, [tmp_path / "pq.parquet"], tmp_path / "pq.jsonl")
    assert list(rows) == ["pq.parquet/a", "pq.parquet/a~2", "pq.parquet/2", "pq.parquet/2~2", "pq.parquet/a~2~2"]
    rows = caption(backend, [tmp_path / "bin.parquet"], tmp_path / "bin.jsonl")
    assert list(rows) == ["bin.parquet/café", "bin.parquet/\udcff\udcd8"]


# row 14
def test_a_fifo_named_like_a_shard_or_in_a_shard_folder_is_an_error_row_at_once(tmp_path):
    (tmp_path / "in").mkdir()
    tar_of(tmp_path / "in" / "00000.tar", [("a.jpg", photo(0, 0))])
    os.mkfifo(tmp_path / "in" / "00001.tar")
    os.mkfifo(tmp_path / "alone.tar")
    for source, shard in ((tmp_path / "in", "00001.tar"), (tmp_path / "alone.tar", "alone.tar")):
        got = fresh_python(READ, source, timeout=60)  # a blocked open would time out here
        assert got["errors"] == [f"{shard}: not a regular file (a FIFO, device or folder)"]


# row 18
def test_a_corrupt_parquet_row_group_costs_its_rows_only(tmp_path, backend):  # noqa: F811
    table = pa.table({"key": [f"k{i:03d}" for i in range(100)], "jpg": [photo(3, i % 7) for i in range(100)]})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=40, compression="none")
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata
    data = bytearray((tmp_path / "s.parquet").read_bytes())
    page = meta.row_group(1).column(1).data_page_offset
    data[page:page + 16] = b"\xff" * 16
    (tmp_path / "s.parquet").write_bytes(data)
    rows = caption(backend, [tmp_path / "s.parquet"], tmp_path / "c.jsonl")
    assert list(rows) == [f"s.parquet/k{i:03d}" for i in range(100)]
    broken = [i for i in range(100) if "error" in rows[f"s.parquet/k{i:03d}"]]
    assert broken == list(range(40, 80))
    assert rows["s.parquet/k040"]["error"].startswith("row group 1 cannot be read")


# row 19, and tars in subfolders only
def test_nested_descending_and_globbed_brace_patterns_name_the_right_shards(tmp_path):
    for name in ("xa", "xb", "xc", "00000", "00001", "a1", "a2", "b1", "c1"):
        tar_of(tmp_path / f"{name}.tar", [("k.jpg", photo(0, 0))])
    names = lambda pattern: [s.name for s in find_shards([str(tmp_path / pattern)])]  # noqa: E731
    assert names("x{a,{b,c}}.tar") == ["xa.tar", "xb.tar", "xc.tar"]
    assert names("{00001..00000}.tar") == ["00001.tar", "00000.tar"]
    assert names("{a,b}*.tar") == ["a1.tar", "a2.tar", "b1.tar"]
    with pytest.raises(Exception, match="matches no .tar or .parquet shard"):
        find_shards([str(tmp_path / "{d,e}*.tar")])
    (tmp_path / "deep" / "part1").mkdir(parents=True)
    tar_of(tmp_path / "deep" / "part1" / "00000.tar", [("k.jpg", photo(0, 0))])
    assert [s.name for s in find_shards([tmp_path / "deep"])] == ["part1/00000.tar"]
    assert [item.key for item in stream(find_shards([tmp_path / "deep"]))] == ["part1/00000.tar/k"]


def test_tars_only_in_subfolders_are_shards_not_an_empty_image_folder(tmp_path, backend):  # noqa: F811
    (tmp_path / "in" / "part1").mkdir(parents=True)
    tar_of(tmp_path / "in" / "part1" / "00000.tar", [("k.jpg", photo(0, 0))])
    rows = caption(backend, [tmp_path / "in"], tmp_path / "c.jsonl")
    assert list(rows) == ["part1/00000.tar/k"] and "caption" in rows["part1/00000.tar/k"]


def test_every_hostile_shard_in_one_run_never_prints_a_traceback(tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    tar_of(tmp_path / "in" / "good.tar", [("a.jpg", photo(0, 0))])
    (tmp_path / "in" / "random.tar").write_bytes(os.urandom(5000))
    (tmp_path / "in" / "gz.tar.gz").write_bytes(gzip.compress(b"not a tar at all" * 100)[:-20])
    (tmp_path / "in" / "empty.tar").write_bytes(b"")
    start = time.monotonic()
    result = CliRunner().invoke(app, [str(tmp_path / "in"), "--out", str(tmp_path / "c.jsonl"), "--model",
                                      str(tiny_ckpt), "--backend", "torch"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = read_rows(tmp_path / "c.jsonl")
    assert "caption" in rows["good.tar/a"] and all(rows[s]["error"] for s in ("random.tar", "gz.tar.gz", "empty.tar"))
    assert time.monotonic() - start < 60
