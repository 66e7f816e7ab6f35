"""sat-infer end to end on the tiny checkpoint: every bad-file kind, alphas, resume after kill -9, CLI."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engines.torch_eager import TorchBackend
from sat_export.cli.infer import app
from sat_export.errors import OutputError
from sat_export.pipeline.infer import plan, run, run_settings
from sat_export.pipeline.reading import Loaded, batches, prefetch, read_item
from sat_export.options import InferOptions
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.outputs import lock_path, run_record_path
from training.config import PreprocessConfig
from training.decode import decode
from training.options import DecodeOptions

GOOD = {  # file name -> (mode, format): many formats and modes, 64 px
    "rgb.jpg": ("RGB", "JPEG"), "grey.jpg": ("L", "JPEG"), "cmyk.jpg": ("CMYK", "JPEG"),
    "rgba.png": ("RGBA", "PNG"), "palette.png": ("P", "PNG"), "grey_alpha.png": ("LA", "PNG"),
    "sixteen_bit.png": ("I;16", "PNG"), "float.tif": ("F", "TIFF"), "bilevel.bmp": ("1", "BMP"),
    "anim.gif": ("P", "GIF"), "lossy.webp": ("RGB", "WEBP"),
}
BAD = {  # file name -> its row's error (a regular expression)
    "empty.jpg": r"empty file \(0 bytes\)",
    "truncated.jpg": r"cannot decode image: .*[Tt]runcated",
    "text.png": r"cannot identify image file",
    "float_rgb.tif": r"cannot identify image file \(not an image or unsupported format\)",
    "bomb.png": r"image has 400x400 = 160000 pixels, over the limit of 40000",
    "locked.jpg": r"cannot read file: Permission denied",
    "folder.jpg": r"is a directory, not an image file",
    "pipe.jpg": r"not a regular file",  # reading a FIFO would block the run forever
}


def image(mode: str = "RGB", size: int = 64, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype("<u2") * 257)
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32) / 255)
    return Image.fromarray(rgb).convert(mode)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def float_rgb_tiff(size: int = 4) -> bytes:
    """A valid TIFF with 3 x float32 samples per pixel: a pixel layout Pillow has no mode for."""
    tags = [(256, 3, 1, size), (257, 3, 1, size), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, 0), (277, 3, 1, 3), (278, 3, 1, size), (279, 4, 1, size * size * 12), (339, 3, 3, 0)]
    extra = 8 + 2 + 12 * len(tags) + 4  # after the header and the one IFD
    offsets = {258: extra, 339: extra + 6, 273: extra + 12}
    ifd = b"".join(struct.pack("<HHI", tag, kind, n) + (struct.pack("<HH", value, 0) if n == 1 and kind == 3
                   else struct.pack("<I", offsets.get(tag, value))) for tag, kind, n, value in tags)
    return (b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0)
            + struct.pack("<6H", 32, 32, 32, 3, 3, 3) + bytes(size * size * 12))


def deny_reading(path: Path, monkeypatch) -> None:
    """chmod 000; as root (CI) permission bits do not apply, so the kernel's answer is simulated."""
    path.chmod(0)
    if os.geteuid() == 0:
        real = Path.open

        def open_(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)


@pytest.fixture
def mixed_folder(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "in"
    (root / "nested").mkdir(parents=True)
    for i, (name, (mode, fmt)) in enumerate(GOOD.items()):
        (root / ("nested" if i % 2 else "") / name).write_bytes(encoded(image(mode, seed=i), fmt))
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(encoded(image(), "JPEG")[:300])
    (root / "text.png").write_text("not an image at all")
    (root / "float_rgb.tif").write_bytes(float_rgb_tiff())
    (root / "bomb.png").write_bytes(encoded(image(size=400), "PNG"))
    (root / "locked.jpg").write_bytes(encoded(image(), "JPEG"))
    deny_reading(root / "locked.jpg", monkeypatch)
    (root / "folder.jpg").mkdir()
    os.mkfifo(root / "pipe.jpg")
    (root / "readme.md").write_text("not listed: not named like an image")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As ``sat-infer`` runs beside its readers on 2 cores (``open_for_readers`` sets it); the session's comes back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend(tiny_ckpt):
    with TorchBackend.from_checkpoint(tiny_ckpt) as engine:
        yield engine


def read_rows(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_key = {row["image"]: row for row in rows}
    assert len(by_key) == len(rows), "a key appears twice"
    return by_key


def test_mixed_folder_gives_one_row_per_file_and_an_error_row_per_bad_file(mixed_folder, tmp_path, backend):
    out = tmp_path / "captions.jsonl"
    summary = run(backend, plan([mixed_folder], out), InferOptions(batch_size=4, max_pixels=200 * 200))
    rows = read_rows(out)
    good_keys = {("nested/" if i % 2 else "") + name for i, name in enumerate(GOOD)}
    assert set(rows) == good_keys | set(BAD)
    assert (summary.captioned, summary.errors) == (len(GOOD), len(BAD))
    for name, pattern in BAD.items():
        assert re.match(pattern, rows[name]["error"]), rows[name]
        assert "caption" not in rows[name]
        # could not be read (may succeed later, --retry-errors) vs the bytes are bad (never retried)
        assert rows[name]["error_kind"] == ("io" if name == "locked.jpg" else "input"), rows[name]
    for key in good_keys:
        row = rows[key]
        assert "error" not in row and isinstance(row["score"], float) and row["score"] <= 0
        assert row["caption"] == " ".join(backend.vocab.decode(row["tokens"]))


def test_caption_matches_the_decode_loop_on_the_same_pixels(tmp_path, backend):
    (tmp_path / "in").mkdir()
    image(seed=3).save(tmp_path / "in" / "a.png")
    run(backend, plan([tmp_path / "in"], tmp_path / "c.jsonl"), InferOptions(decode=DecodeOptions(beam=3)))
    pixels = read_item(InputItem(tmp_path / "in" / "a.png", "a.png"), backend.config.preprocess).pixels
    enc = backend.encode(torch.from_numpy(pixels[None]))  # (1, 3, 64, 64)
    expected = decode(backend.step, enc, backend.vocab.special_ids(), DecodeOptions(beam=3))[0]
    assert read_rows(tmp_path / "c.jsonl")["a.png"]["tokens"] == expected.tokens


def test_alphas_mirror_the_input_tree_with_unicode_and_spaces(tmp_path, backend):
    src = tmp_path / "ïn pùt" / "sub dir ✓"
    src.mkdir(parents=True)
    image().save(src / "café au lait.png")
    out = tmp_path / "out" / "c.jsonl"
    options = InferOptions(decode=DecodeOptions(max_len=7), alphas_dir=tmp_path / "out" / "alphas")
    run(backend, plan([tmp_path / "ïn pùt"], out), options)
    row = read_rows(out)["sub dir ✓/café au lait.png"]
    assert row["alphas"] == "alphas/sub dir ✓/café au lait.png.npz"
    with np.load(out.parent / row["alphas"]) as npz:
        grid = backend.config.grid
        assert npz["alphas"].shape == (len(row["tokens"]), grid, grid) and npz["alphas"].dtype == np.float16
        assert npz["tokens"].tolist() == row["tokens"]
        np.testing.assert_allclose(npz["alphas"].astype(np.float32).sum(axis=(1, 2)), 1.0, atol=1e-2)


def test_overlays_write_one_png_per_word_and_a_gallery_that_links_them(tmp_path, backend):
    (tmp_path / "in" / "ü dir").mkdir(parents=True)
    image(seed=1).save(tmp_path / "in" / "ü dir" / "a b.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nope")
    out, overlays = tmp_path / "c.jsonl", tmp_path / "overlays"
    run(backend, plan([tmp_path / "in"], out), InferOptions(decode=DecodeOptions(max_len=4), overlays_dir=overlays))
    row = read_rows(out)["ü dir/a b.png"]
    words = [backend.vocab.itos[t] for t in row["tokens"]]
    folder = overlays / "ü dir" / "a b.png"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:02d}_{w}.png" for i, w in enumerate(words)] + ["image.jpg"]
    page = (overlays / "index.html").read_text(encoding="utf-8")
    links = re.findall(r"<img src='([^']+)'", page)
    assert len(links) == 1 + len(words) and all((overlays / unquote(link)).is_file() for link in links)
    assert "broken.jpg" in page and "Error rows (1)" in page


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img {i:04d}.png").write_bytes(encoded(image(size=64, seed=i % 7), "PNG"))
    return [f"img {i:04d}.png" for i in range(n)]


def test_resume_after_a_torn_write_ends_with_exactly_one_row_per_file(tmp_path, backend):
    names = write_images(tmp_path / "in", 30)
    out = tmp_path / "c.jsonl"
    run(backend, plan([tmp_path / "in"], out), InferOptions(batch_size=8))
    complete = read_rows(out)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:11]) + lines[11][:25])  # killed while writing row 12
    with plan([tmp_path / "in"], out) as work:
        assert (len(work.todo), work.done) == (19, 11)
        summary = run(backend, work, InferOptions(batch_size=8))
    assert (summary.captioned, summary.skipped) == (19, 11)
    assert read_rows(out) == complete and len(complete) == len(names)
    assert plan([tmp_path / "in"], out, overwrite=True).todo[0].key == names[0]


def test_resuming_with_another_model_or_decoding_is_refused_and_changes_nothing(tmp_path, backend, tiny_ckpt,
                                                                                 tiny_bundle):
    write_images(tmp_path / "in", 3)
    out = tmp_path / "c.jsonl"
    greedy = run_settings(tiny_ckpt, DecodeOptions())
    run(backend, plan([tmp_path / "in"], out, settings=greedy), InferOptions())
    before = out.read_bytes()
    with pytest.raises(OutputError, match="beam 1 -> 3.*--overwrite"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions(beam=3)))
    with pytest.raises(OutputError, match="model_sha256"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_bundle, DecodeOptions()))
    with pytest.raises(OutputError, match="precision 'fp32' -> 'bf16'"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions(), precision="bf16"))
    assert out.read_bytes() == before
    assert plan([tmp_path / "in"], out, settings=greedy).done == 3  # same settings: resumed
    assert len(plan([tmp_path / "in"], out, True, run_settings(tiny_ckpt, DecodeOptions(beam=3))).todo) == 3
    assert json.loads(run_record_path(out).read_text())["beam"] == 3


def test_rows_made_at_another_precision_are_not_resumed_at_fp32(tmp_path, backend, tiny_ckpt):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "c.jsonl"
    run(backend, plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions(), precision="int8")),
        InferOptions())
    with pytest.raises(OutputError, match="precision 'int8' -> 'fp32'"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions()))
    assert plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions(), precision="int8")).done == 2


def test_every_run_record_names_its_precision_and_an_older_one_without_it_was_fp32(tmp_path, backend, tiny_ckpt):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "c.jsonl"
    fp32 = run_settings(tiny_ckpt, DecodeOptions())
    run(backend, plan([tmp_path / "in"], out, settings=fp32), InferOptions())
    record = json.loads(run_record_path(out).read_text())
    assert record["precision"] == "fp32"
    del record["precision"]  # as records were written before every one named its precision
    run_record_path(out).write_text(json.dumps(record))
    with pytest.raises(OutputError, match="precision 'fp32' -> 'fp16'"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions(), precision="fp16"))
    assert plan([tmp_path / "in"], out, settings=fp32).done == 2


@pytest.mark.requires_openvino
def test_cli_openvino_backend_writes_the_rows_onnxruntime_writes(tmp_path, tiny_bundle):
    write_images(tmp_path / "in", 5)
    rows = {}
    for backend in ("onnxruntime", "openvino"):  # batches of 2, 2 and 1: both of OpenVINO's compiled models
        out = tmp_path / f"{backend}.jsonl"
        result = CliRunner().invoke(app, [str(tmp_path / "in"), "--model", str(tiny_bundle), "--backend", backend,
                                          "--batch-size", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows[backend] = read_rows(out)
    assert len(rows["openvino"]) == 5 and rows["openvino"].keys() == rows["onnxruntime"].keys()
    for key, row in rows["onnxruntime"].items():
        assert rows["openvino"][key] == {**row, "score": pytest.approx(row["score"], abs=1e-4)}


def test_an_output_refused_as_not_ours_gets_no_run_record(tmp_path, tiny_ckpt):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")
    with pytest.raises(OutputError, match="line 1 is not a sat-infer row"):
        plan([tmp_path / "in"], out, settings=run_settings(tiny_ckpt, DecodeOptions()))
    assert out.read_text() == "my own notes\n" and not run_record_path(out).exists()


def test_prefetch_keeps_at_most_depth_items_ahead_of_the_consumer():
    pulled = []
    lead = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        for n_consumed, value in enumerate(prefetch(pool, lambda x: x * 2, source(), depth=5), 1):
            lead.append(len(pulled) - n_consumed)
            assert value == 2 * (n_consumed - 1)
    assert max(lead) == 5 and n_consumed == 100


def test_batches_hold_batch_size_good_images_and_keep_bad_ones_in_order():
    entries = [Loaded(InputItem(Path(str(i)), str(i)), None if i % 3 == 0 else np.zeros(1), None) for i in range(10)]
    groups = list(batches(entries, 2))
    assert [[e.item.key for e in g] for g in groups] == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9"]]


def test_options_are_checked_up_front():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        InferOptions(batch_size=0)


def test_cli_summary_and_strict_exit_code(mixed_folder, tmp_path, tiny_ckpt):
    out = tmp_path / "c.jsonl"
    args = [str(mixed_folder), "--out", str(out), "--model", str(tiny_ckpt), "--backend", "torch",
            "--max-pixels", "40000", "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"captioned {len(GOOD)}, errors {len(BAD)}, already done 0" in result.output
    assert "images/s), at fp32" in result.output  # the precision that ran
    result = CliRunner().invoke(app, [*args, "--strict"])  # nothing left to do, the errors are still there
    assert result.exit_code == 1 and f"{len(BAD)} file(s) could not be captioned" in result.output
    assert len(read_rows(out)) == len(GOOD) + len(BAD)
    result = CliRunner().invoke(app, [*args, "--beam", "2"])  # other decoding: refused, in one line
    assert result.exit_code == 1 and "beam 1 -> 2" in result.output and "Traceback" not in result.output
    assert len(read_rows(out)) == len(GOOD) + len(BAD)


def test_cli_input_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, [str(tmp_path / "missing"), "--out", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 1 and "missing: no such file or folder" in result.output
    assert "Traceback" not in result.output


def kill_9_mid_run(cmd: list[str], out: Path, min_rows: int, n_images: int) -> int:
    """Start ``cmd``, SIGKILL it once ``out`` holds ``min_rows`` lines; how many lines it left."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_bytes().count(b"\n") < min_rows) and proc.poll() is None:
        assert time.monotonic() < deadline, "sat-infer wrote nothing in 2 minutes"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and min_rows <= n_before < n_images, "the kill did not land mid-run"
    return n_before


def assert_one_captioned_row_per_image(out: Path, names: list[str]) -> None:
    """``out`` holds one caption row per image of ``names``, each with its alphas file."""
    rows = read_rows(out)
    assert sorted(rows) == names
    for row in rows.values():
        assert "error" not in row and row["tokens"] and (out.parent / row["alphas"]).is_file()


def test_kill_9_mid_run_then_rerun_gives_exactly_one_valid_row_per_image(tmp_path, tiny_ckpt):
    names = write_images(tmp_path / "in", 300)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "in"), "--out", str(out),
           "--model", str(tiny_ckpt), "--backend", "torch", "--batch-size", "4",
           "--alphas", str(tmp_path / "alphas")]
    n_before = kill_9_mid_run(cmd, out, 20, len(names))
    killed = int(lock_path(out).read_text())  # the lock file still names the killed run; its lock died with it
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"already done {n_before}" in done.stderr
    assert_one_captioned_row_per_image(out, names)


def test_a_heic_photo_is_captioned_with_the_extra_and_is_an_error_row_naming_it_without(tmp_path, tiny_ckpt):
    pillow_heif = pytest.importorskip("pillow_heif", reason="the [heic] extra (pillow-heif) is not installed")
    pillow_heif.register_heif_opener()
    (tmp_path / "in").mkdir()
    image(size=96).save(tmp_path / "in" / "phone.heic", format="HEIF")
    common = ["--model", str(tiny_ckpt), "--backend", "torch"]
    done = CliRunner().invoke(app, [str(tmp_path / "in"), "--out", str(tmp_path / "with.jsonl"), *common])
    assert done.exit_code == 0, done.output
    assert read_rows(tmp_path / "with.jsonl")["phone.heic"]["tokens"]
    script = ("import sys; sys.modules['pillow_heif'] = None\n"  # a machine without the extra
              "from sat_export.cli.infer import app; app()")
    cmd = [sys.executable, "-c", script, str(tmp_path / "in"), "--out", str(tmp_path / "without.jsonl"), *common]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_rows(tmp_path / "without.jsonl")["phone.heic"]["error"] == (
        "HEIC/HEIF image: reading it needs the [heic] extra (pip install 'sat-export[heic]')")


@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_a_decoders_long_message_becomes_one_error_line_cut_at_a_word(tmp_path, monkeypatch, error):
    """A decoder plugin may raise anything with any message: the row quotes its first line, clipped and marked."""
    path = tmp_path / "odd.png"
    path.write_bytes(encoded(image(), "PNG"))
    message = "plugin failed: " + "very long reason " * 40 + "\ntraceback line the row must not carry"

    def fail(*args, **kwargs):
        raise error(message)

    monkeypatch.setattr("training.images.Image.open", fail)
    loaded = read_item(InputItem(path, "odd.png"), PreprocessConfig())
    assert loaded.pixels is None and "\n" not in loaded.error and "traceback" not in loaded.error
    prefix = "cannot decode image: " if error is ValueError else "cannot decode image: RuntimeError: "
    kept = loaded.error.removeprefix(prefix).removesuffix(" ...")
    assert loaded.error.endswith(" ...") and message.startswith(kept + " ") and len(loaded.error) < 260, loaded.error
