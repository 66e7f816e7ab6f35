"""Input discovery (folders, lists, files -> unique keys) and resume state of a JSONL output."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sat_export.errors import InputError, OutputError
from sat_export.pipeline.inputs import discover
from sat_export.pipeline.outputs import resume_output
from sat_export.results.paths import sidecar_path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def keys(items) -> list[str]:
    return [item.key for item in items]


def test_folder_is_walked_recursively_in_sorted_order_keeping_only_image_names(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tif", "notes.txt", ".DS_Store", "sub/e.json"]:
        touch(tmp_path / "in" / name)
    (tmp_path / "in" / "folder.jpg").mkdir()  # named like an image: kept, the reader makes it an error row
    items = discover([tmp_path / "in"])
    assert keys(items) == ["a.JPG", "b.png", "folder.jpg", "sub/c.webp", "sub/deeper/d.tif"]
    assert items[3].path == tmp_path / "in" / "sub" / "c.webp" and items[3].error is None


def test_list_file_entries_are_relative_to_its_folder_and_keyed_as_written(tmp_path):
    touch(tmp_path / "lists" / "shots" / "a.png")
    touch(tmp_path / "elsewhere.jpg")
    (tmp_path / "lists" / "todo.txt").write_text(
        "# my images\n\nshots/a.png\n  ../elsewhere.jpg  \nmissing.jpg\n", encoding="utf-8")
    items = discover([tmp_path / "lists" / "todo.txt"])
    assert keys(items) == ["shots/a.png", "../elsewhere.jpg", "missing.jpg"]
    assert items[1].path.resolve() == (tmp_path / "elsewhere.jpg").resolve()


def test_files_are_keyed_as_given_and_unicode_and_spaces_survive(tmp_path, monkeypatch):
    touch(tmp_path / "ünï cødé" / "photo 1 ✓.jpg")
    monkeypatch.chdir(tmp_path)
    items = discover(["./ünï cødé/photo 1 ✓.jpg", tmp_path / "ünï cødé"])
    assert keys(items) == ["ünï cødé/photo 1 ✓.jpg", "photo 1 ✓.jpg"]


def test_same_key_from_two_files_is_refused_but_the_same_file_twice_is_one_item(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "b" / "x.jpg")
    assert keys(discover([tmp_path / "a", tmp_path / "a"])) == ["x.jpg"]
    with pytest.raises(InputError, match="same key 'x.jpg'"):
        discover([tmp_path / "a", tmp_path / "b"])


def test_missing_input_and_unreadable_list_are_refused(tmp_path):
    with pytest.raises(InputError, match="nope: no such file or folder"):
        discover([tmp_path / "nope"])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="bad.txt: holds NUL bytes"):
        discover([tmp_path / "bad.txt"])
    os.mkfifo(tmp_path / "fifo.lst")  # reading it would block forever
    with pytest.raises(InputError, match="fifo.lst: not a regular file"):
        discover([tmp_path / "fifo.lst"])


def test_a_list_keeps_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, as `find . > list.txt` writes it
    touch(tmp_path / name)
    (tmp_path / "todo.txt").write_bytes(b"caf\xe9.png\n")
    [item] = discover([tmp_path / "todo.txt"])
    assert item.key == name and item.path.is_file()


def test_a_folder_that_cannot_be_listed_becomes_an_error_item(tmp_path, monkeypatch):
    touch(tmp_path / "in" / "ok.png")
    locked = tmp_path / "in" / "locked"
    touch(locked / "hidden.png")
    real_scandir = os.scandir

    def scandir(path="."):  # root ignores permission bits, so the kernel's answer is simulated
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = discover([tmp_path / "in"])
    assert [(i.key, i.error) for i in items] == [("ok.png", None), ("locked", "cannot list folder: Permission denied")]


@pytest.mark.parametrize("key, expected", [
    ("a.jpg", "a.jpg.npz"), ("sub dir/ü.png", "sub dir/ü.png.npz"),
    ("/abs/x.jpg", "abs/x.jpg.npz"), ("../up/x.jpg", "__/up/x.jpg.npz"),
])
def test_sidecar_mirrors_the_key_and_never_leaves_its_root(tmp_path, key, expected):
    assert sidecar_path(key, tmp_path, ".npz") == tmp_path / expected


def write_rows(path: Path, rows: list[dict], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)


def test_resume_cuts_a_torn_last_line_and_reports_done_keys(tmp_path):
    out = tmp_path / "c.jsonl"
    rows = [{"image": "a.jpg", "caption": "a", "tokens": [4]}, {"image": "b.jpg", "error": "empty file (0 bytes)"}]
    write_rows(out, rows, tail=b'{"image": "c.jpg", "capt')
    assert resume_output(out) == {"a.jpg": False, "b.jpg": True}
    assert out.read_bytes().endswith(b'(0 bytes)"}\n') and len(out.read_text().splitlines()) == 2


def test_resume_with_overwrite_or_no_file_starts_empty(tmp_path):
    out = tmp_path / "c.jsonl"
    assert resume_output(out) == {} and out.read_bytes() == b""
    write_rows(out, [{"image": "a.jpg", "caption": "a", "tokens": [4]}])
    assert resume_output(out, overwrite=True) == {} and out.read_bytes() == b""


@pytest.mark.parametrize("content, what", [
    (b'{"image": "a.jpg", "error": "x"}\nnot json\n{"image": "b.jpg", "error": "x"}\n', "line 2 is not a sat-infer row"),
    (b'{"image": "a.jpg"}\n', "line 1 is not a sat-infer row"),  # neither a caption nor an error
    (b'{"lr": 0.1, "epochs": 3}', "its last line is not a sat-infer row"),  # one line, no final newline
    (b'{"image": "a.jpg", "error": "x"}\nmy notes', "its last line is not a sat-infer row"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\x01\x02", "line 1 is not a sat-infer row"),  # a JPEG
])
def test_resume_refuses_a_file_that_is_not_sat_infer_output_and_leaves_it_as_it_was(tmp_path, content, what):
    out = tmp_path / "c.jsonl"
    out.write_bytes(content)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"{what}: not a sat-infer output, left as it is"):
            resume_output(out, overwrite)
        assert out.read_bytes() == content
