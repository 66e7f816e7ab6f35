"""sat-infer against hostile and careless input: every output path kind, every list kind, names that are not
UTF-8 or hold control characters, two runs on one output, a full disk. Refusals are one line, exit 1, and
leave every file that is not the run's own output as it was."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from sat_export.cli.infer import app
from sat_export.errors import OutputError
from sat_export.pipeline.reading import read_item
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.outputs import ROW_START, OutputLock, lock_path, resume_output, row_line, run_record_path
from sat_export.reports.gallery import overlay_name
from sat_export.results.paths import sidecar_path
from tests.conftest import one_line_error, tiny_config
from tests.sat_export.pipeline.test_infer import deny_reading, encoded, image, read_rows, write_images

ROW = {"image": "a.png", "caption": "a red circle", "tokens": [4, 5, 7], "score": -1.5}
SETTINGS = {"model_sha256": "0" * 64, "beam": 1}


def files(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, or what else it is (links are not followed)."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder, name)
            kind = ("link -> " + os.readlink(path) if path.is_symlink() else "fifo" if path.is_fifo()
                    else "dir" if path.is_dir() else None)
            out[str(path.relative_to(root))] = kind or path.read_bytes()
    return out


def infer(tmp_path: Path, ckpt: Path, *args: str):
    return CliRunner().invoke(app, [str(tmp_path / "in"), "--model", str(ckpt), "--backend", "torch", *args])


def make_out(tmp_path: Path, kind: str) -> Path:
    """``--out`` of the given kind, made under ``tmp_path``."""
    out = tmp_path / "c.jsonl"
    if kind == "folder":
        out.mkdir()
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "broken link":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "under a file":
        (tmp_path / "notes.txt").write_text("mine\n")
        out = tmp_path / "notes.txt" / "c.jsonl"
    else:
        out.write_bytes({"one-line settings.json": b'{"lr": 0.1, "epochs": 3}', "text": b"line one\nline two",
                         "jpeg": encoded(image(), "JPEG"), "rows without a run record": row_line(ROW)}[kind])
    return out


OUT_KINDS = {"folder": "is a folder", "fifo": "not a regular file", "broken link": "a symlink to nothing",
             "under a file": "notes.txt is a file, not a folder", "one-line settings.json": "not a sat-infer output",
             "text": "not a sat-infer output", "jpeg": "not a sat-infer output",
             "rows without a run record": "no c.jsonl.run.json says which run made them"}


@pytest.mark.parametrize("kind", OUT_KINDS)
def test_an_out_of_every_wrong_kind_is_refused_in_one_line_and_nothing_changes(tmp_path, tiny_ckpt, kind):
    write_images(tmp_path / "in", 2)
    out = make_out(tmp_path, kind)
    before = files(tmp_path)
    ours = kind == "rows without a run record"  # --overwrite starts it over; not so a file that is not ours
    for overwrite in ([], ["--overwrite"])[:1 if ours else 2]:
        one_line_error(infer(tmp_path, tiny_ckpt, "--out", str(out), *overwrite), str(out), OUT_KINDS[kind])
        after = files(tmp_path)
        after.pop(str(lock_path(out).relative_to(tmp_path)), None)  # the run's own lock file may exist
        assert after == before and not run_record_path(out).exists()


@pytest.mark.parametrize("option", ["--alphas", "--overlays"])
@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_alphas_or_overlays_that_cannot_be_folders_are_refused_before_any_work(tmp_path, tiny_ckpt, option, kind):
    write_images(tmp_path / "in", 2)
    (tmp_path / "taken").write_text("mine\n")
    folder = tmp_path / "taken" if kind == "a file" else tmp_path / "taken" / "sub"
    before = files(tmp_path)
    line = one_line_error(infer(tmp_path, tiny_ckpt, "--out", str(tmp_path / "c.jsonl"), option, str(folder)))
    assert "taken" in line and "is a file, not a folder" in line
    assert files(tmp_path) == before  # no output, no run record, no lock


rows = st.fixed_dictionaries({"image": st.text(max_size=8)}, optional={
    "caption": st.text(max_size=8), "tokens": st.lists(st.integers(0, 9), max_size=3), "error": st.text(max_size=8)})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
lines = st.one_of(rows.map(row_line), json_values.map(lambda v: json.dumps(v).encode() + b"\n"), st.binary(max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.lists(lines, min_size=1, max_size=4).map(b"".join).filter(bool), cut=st.integers(0, 50),
       record=st.booleans(), overwrite=st.booleans())
def test_resume_validates_before_it_touches(tmp_path_factory, content, cut, record, overwrite):
    """Refused: the file is byte-for-byte as it was. Accepted: every complete line is a row, only a torn
    row's beginning was cut off, and the rows are what it reports."""
    out = tmp_path_factory.mktemp("out") / "c.jsonl"
    content = content[:max(1, len(content) - cut)]
    out.write_bytes(content)
    if record:
        run_record_path(out).write_text(json.dumps(SETTINGS))
    try:
        done = resume_output(out, overwrite, SETTINGS)
    except OutputError as err:
        assert out.read_bytes() == content and str(out) in str(err) and "\n" not in str(err)
        return
    complete = content[:content.rfind(b"\n") + 1]
    assert (record or overwrite) and out.read_bytes() == (b"" if overwrite else complete)
    assert ROW_START.startswith(content[len(complete):][:len(ROW_START)])
    parsed = [json.loads(line) for line in complete.splitlines()]
    assert all(isinstance(r["image"], str) and ("error" in r or "tokens" in r) for r in parsed)
    assert done == ({} if overwrite else {r["image"]: "error" in r for r in parsed})


def make_list(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "todo.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink loop":
        path.symlink_to(path)
    elif kind == "NUL bytes":
        path.write_bytes(b"in/img 0000.png\n\0\n")
    return path


@pytest.mark.parametrize("kind, message", [("fifo", "not a regular file"), ("NUL bytes", "holds NUL bytes"),
                                           ("symlink loop", "cannot read the list of images"),
                                           ("unreadable", "cannot read the list of images (Permission denied)")])
def test_a_list_of_every_wrong_kind_is_refused_in_one_line(tmp_path, tiny_ckpt, monkeypatch, kind, message):
    write_images(tmp_path / "in", 1)
    listed = make_list(tmp_path, kind)
    if kind == "unreadable":
        listed.write_text("in/img 0000.png\n")
        deny_reading(listed, monkeypatch)
    result = CliRunner().invoke(app, [str(listed), "--out", str(tmp_path / "c.jsonl"), "--model", str(tiny_ckpt)])
    one_line_error(result, str(listed), message)


def test_an_unreadable_file_on_the_command_line_becomes_an_error_row(tmp_path, tiny_ckpt, monkeypatch):
    write_images(tmp_path / "in", 1)
    locked = tmp_path / "in" / "img 0000.png"
    deny_reading(locked, monkeypatch)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked)  # what click asks, as non-root
    out = tmp_path / "c.jsonl"
    result = CliRunner().invoke(app, [str(locked), "--out", str(out), "--model", str(tiny_ckpt), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert read_rows(out)[str(locked)]["error"] == "cannot read file: Permission denied"


def test_a_name_that_is_not_utf8_is_captioned_with_its_alphas_and_resumed(tmp_path, tiny_ckpt):
    raw = b"caf\xe9 \xff.png"  # Latin-1 and a byte no encoding decodes
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / os.fsdecode(raw)).write_bytes(encoded(image(), "PNG"))
    out = tmp_path / "c.jsonl"
    args = ["--out", str(out), "--alphas", str(tmp_path / "alphas")]
    assert infer(tmp_path, tiny_ckpt, *args).exit_code == 0
    text = out.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    assert "\\udce9" in text and "\\udcff" in text
    [row] = read_rows(out).values()
    assert os.fsencode(row["image"]) == raw and "caption" in row
    assert (tmp_path / row["alphas"]).is_file() and os.fsencode(row["alphas"]).endswith(raw + b".npz")
    result = infer(tmp_path, tiny_ckpt, *args)
    assert result.exit_code == 0 and "captioned 0, errors 0, already done 1" in result.output
    assert len(read_rows(out)) == 1


def test_names_from_files_are_echoed_with_control_characters_escaped(tmp_path, tiny_ckpt):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x\x1b[2J\nALL CHECKS PASSED.png").write_bytes(b"x")
    result = CliRunner().invoke(app, [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.jsonl"),
                                      "--model", str(tiny_ckpt)])
    line = one_line_error(result, "same key", "x\\x1b[2J\\nALL CHECKS PASSED.png")
    assert "\x1b" not in line


def test_a_nan_float_tiff_is_an_error_row(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(path)
    loaded = read_item(InputItem(path, "nan.tif"), tiny_config().preprocess)
    assert loaded.pixels is None and loaded.error == "image has NaN or infinite pixel values"


def test_side_file_names_stay_within_the_name_limit():
    assert len(overlay_name(3, "w" * 5_000_000).encode()) <= 255
    long_key = "sub/" + "é" * 127 + ".png"  # 259 bytes with .npz
    a, b = sidecar_path(long_key, Path("/r"), ".npz"), sidecar_path(long_key[:-5] + "x.png", Path("/r"), ".npz")
    assert len(os.fsencode(a.name)) <= 251 and a.parent == Path("/r/sub") and a != b


def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(tmp_path, tiny_ckpt):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "c.jsonl"
    holder = OutputLock(out)
    try:
        one_line_error(infer(tmp_path, tiny_ckpt, "--out", str(out)), f"another sat-infer run (pid {os.getpid()})")
    finally:
        holder.release()
    assert not out.exists() and infer(tmp_path, tiny_ckpt, "--out", str(out)).exit_code == 0


def cli(tmp_path: Path, ckpt: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "in"), "--out", str(out), "--model", str(ckpt),
            "--backend", "torch", "--batch-size", "4"]


def test_two_concurrent_runs_on_one_out_end_with_one_row_per_image(tmp_path, tiny_ckpt):
    names = write_images(tmp_path / "in", 120)
    out = tmp_path / "c.jsonl"
    procs = [subprocess.Popen(cli(tmp_path, tiny_ckpt, out), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    for code, stderr in results:  # the later one is refused, or resumes a finished file
        assert (code, stderr.count("\n")) == (1, 1) and "another sat-infer run (pid" in stderr or code == 0, stderr
    assert sorted(read_rows(out)) == names


def test_a_full_disk_stops_in_one_line_keeping_whole_rows_and_the_rerun_completes(tmp_path, tiny_ckpt):
    names = write_images(tmp_path / "in", 40)
    out = tmp_path / "c.jsonl"

    def small_disk():  # files may not grow past 3000 bytes: writes fail as on a full disk (EFBIG, not a signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    full = subprocess.run(cli(tmp_path, tiny_ckpt, out), stderr=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=small_disk)
    assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
    assert f"{out}: cannot write (File too large); {out} keeps its" in full.stderr and "rerun" in full.stderr
    assert out.stat().st_size == 3000 and not out.read_bytes().endswith(b"\n")  # a torn row at the limit
    on_disk = out.read_bytes().count(b"\n")  # the message counts the rows the file holds, not those the run sent
    assert f"keeps its {on_disk} whole rows" in full.stderr, (on_disk, full.stderr)
    rerun = subprocess.run(cli(tmp_path, tiny_ckpt, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(read_rows(out)) == names
