"""Hostile names and files on the output side of per-shard results (issue 26 rows 1, 11-15): a non-UTF-8 member
name is a row, results never leave --out nor follow a link planted at their temporary file's place, --overwrite
replaces only results, and a FIFO, folder, link or look-alike at a result's place is refused at once in one line."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.results.parquet import read_results
from tests.conftest import one_line_error
from tests.sat_export.pipeline.test_hostile_shards import tar_of
from tests.sat_export.pipeline.test_ray_infer import ray_address  # noqa: F401
from tests.sat_export.pipeline.test_shards import infer, photo, write_parquet_shards



def common(tiny_ckpt) -> list:
    return ["--model", tiny_ckpt, "--backend", "torch", "--batch-size", "2"]


# row 1
@pytest.mark.parametrize("ray", [False, True])
def test_a_member_name_that_is_not_utf8_is_a_row_of_its_result_with_the_byte_escaped(tmp_path, tiny_ckpt, ray,
                                                                                      request):
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, i in (("café.jpg", 0), ("plain.jpg", 1)):  # é written as the one latin-1 byte 0xe9
            info = tarfile.TarInfo(name)
            data = photo(0, i)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert b"caf\xe9.jpg" in (tmp_path / "s.tar").read_bytes()
    out = f"{tmp_path}/out/"
    on_ray = ["--ray"] if ray else []
    if ray:
        request.getfixturevalue("ray_address")  # this process joins a local Ray
    args = [tmp_path / "s.tar", "--out", out, "--alphas", out, *on_ray, *common(tiny_ckpt)]
    assert "captioned 2, errors 0" in infer(*args)
    rows = list(read_results(out))
    assert [row["key"] for row in rows] == ["caf\\udce9", "plain"] and all(row.get("caption") for row in rows)
    assert "already done 2" in infer(*args)


# row 11
def test_shard_names_with_dotdot_put_their_results_inside_out(tmp_path, tiny_ckpt):
    for folder in ("in/a", "x"):
        (tmp_path / folder).mkdir(parents=True)
        tar_of(tmp_path / folder / "s.tar", [("k.jpg", photo(0, 1))])
    out = tmp_path / "in" / "out"
    infer(f"{tmp_path}/in/{{a,../x}}/s.tar", "--out", f"{out}/", *common(tiny_ckpt))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    assert written == ["in/out/__/x/s.parquet", "in/out/a/s.parquet"]
    assert [row["image"] for row in read_results(f"{out}/")] == ["../x/s.tar/k", "a/s.tar/k"]


def test_a_link_inside_out_where_a_results_folder_goes_is_refused(tmp_path, tiny_ckpt):
    (tmp_path / "in" / "a").mkdir(parents=True)
    tar_of(tmp_path / "in" / "a" / "s.tar", [("k.jpg", photo(0, 1))])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").symlink_to(tmp_path / "elsewhere")
    result = CliRunner().invoke(app, [str(tmp_path / "in"), "--out", f"{tmp_path}/out/", *map(str, common(tiny_ckpt))])
    one_line_error(result, f"{tmp_path}/out/a: a link or file where a folder of results goes")
    assert os.listdir(tmp_path / "elsewhere") == []


# row 12
def test_links_planted_at_temporary_files_places_are_never_followed(tmp_path, tiny_ckpt):
    tar_of(tmp_path / "s.tar", [("k.jpg", photo(0, 1))])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s.parquet.tmp").symlink_to(victim)  # the temporary file's old name
    infer(tmp_path / "s.tar", "--out", f"{out}/", "--alphas", f"{out}/", *common(tiny_ckpt))
    (tmp_path / "alphas" / "s.tar").mkdir(parents=True)
    (tmp_path / "alphas" / "s.tar" / "k.npz.tmp").symlink_to(victim)  # the alphas' and run record's old temp names
    (tmp_path / "c.jsonl.run.json.tmp").symlink_to(victim)
    infer(tmp_path / "s.tar", "--out", tmp_path / "c.jsonl", "--alphas", tmp_path / "alphas", *common(tiny_ckpt))
    assert victim.read_bytes() == b"precious"
    assert [row["key"] for row in read_results(f"{out}/")] == ["k"] and (tmp_path / "alphas/s.tar/k.npz").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


# row 13
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_in_the_input_folder_of_parquet_shards_never_replaces_an_input(tmp_path, tiny_ckpt, overwrite):
    write_parquet_shards(tmp_path / "pq", n_shards=1)
    before = (tmp_path / "pq" / "00000.parquet").read_bytes()
    result = CliRunner().invoke(app, [str(tmp_path / "pq"), "--out", f"{tmp_path}/pq/", *overwrite,
                                      *map(str, common(tiny_ckpt))])
    one_line_error(result, "pq/00000.parquet: an input shard is at its own result's place")
    assert (tmp_path / "pq" / "00000.parquet").read_bytes() == before


def test_overwrite_replaces_a_result_but_not_a_file_that_is_not_one(tmp_path, tiny_ckpt):
    write_parquet_shards(tmp_path / "pq", n_shards=2)
    out = f"{tmp_path}/out/"
    infer(tmp_path / "pq", "--out", out, *common(tiny_ckpt))
    assert "captioned 8, errors 2" in infer(tmp_path / "pq", "--out", out, "--overwrite", *common(tiny_ckpt))
    (tmp_path / "out" / "00001.parquet").write_bytes(b"my notes")
    result = CliRunner().invoke(app, [str(tmp_path / "pq"), "--out", out, "--overwrite", *map(str, common(tiny_ckpt))])
    one_line_error(result, "00001.parquet: not a sat-infer result")
    assert (tmp_path / "out" / "00001.parquet").read_bytes() == b"my notes"


# row 14
@pytest.mark.parametrize("kind", ["fifo", "folder", "link"])
def test_a_fifo_folder_or_link_at_a_results_place_is_refused_at_once(tmp_path, tiny_ckpt, kind):
    tar_of(tmp_path / "s.tar", [("k.jpg", photo(0, 1))])
    (tmp_path / "out").mkdir()
    place = tmp_path / "out" / "s.parquet"
    {"fifo": os.mkfifo, "folder": os.mkdir, "link": lambda p: p.symlink_to(tmp_path / "s.tar")}[kind](place)
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "s.tar"), "--out", f"{tmp_path}/out/",
           *map(str, common(tiny_ckpt))]
    for overwrite in ([], ["--overwrite"]):
        done = subprocess.run(cmd + overwrite, capture_output=True, text=True, timeout=60)  # a blocked open: timeout
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stdout + done.stderr
        assert lines[0].startswith(f"error: {place}: not a regular file (a FIFO, device, folder or link)")
    assert os.path.lexists(place) and not stat.S_ISREG(os.lstat(place).st_mode)  # left as it was


# row 15
@pytest.mark.parametrize("craft, why", [
    ("no_error_column", "no error column"),
    ("no_statistics", "no null counts in its column statistics"),
    ("settings_not_an_object", "its run record's 'settings' is not an object"),
])
def test_a_look_alike_at_a_results_place_is_not_a_sat_infer_result_in_one_line(tmp_path, tiny_ckpt, craft, why):
    tar_of(tmp_path / "s.tar", [("k.jpg", photo(0, 1))])
    out = f"{tmp_path}/out/"
    infer(tmp_path / "s.tar", "--out", out, *common(tiny_ckpt))
    place = tmp_path / "out" / "s.parquet"
    table = pq.read_table(place)
    record = table.schema.metadata
    if craft == "no_error_column":
        table = table.drop_columns(["error"]).replace_schema_metadata(record)
    if craft == "settings_not_an_object":
        text = record[b"sat_export"].decode().replace('"settings": {', '"settings": [{').replace('}, "source"',
                                                                                                 '}], "source"')
        table = table.replace_schema_metadata({b"sat_export": text})
    pq.write_table(table, place, write_statistics=craft != "no_statistics")
    before = place.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, [str(tmp_path / "s.tar"), "--out", out, *overwrite,
                                          *map(str, common(tiny_ckpt))])
        one_line_error(result, f"{place}: not a sat-infer result ({why}", "left as it is")
    assert place.read_bytes() == before
