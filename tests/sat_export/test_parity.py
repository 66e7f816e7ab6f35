"""The parity gate: reports, the ✓/✗ lines, ParityError messages, and a failing build keeping its report."""
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from engines.contract import DECODER_STEP, ENCODER
from sat_export.bundle import MANIFEST_FILE
from sat_export.cli.export import app
from sat_export.errors import ParityError
from sat_export.parity import print_report, raise_if_failed, synthetic_images, verify_onnx
from tests.conftest import tiny_model
from training.checkpoint import save_checkpoint


def test_compare_eager_vs_onnxruntime_manifest_report_within_fp32_tolerance(tiny_bundle):
    report = json.loads((tiny_bundle / MANIFEST_FILE).read_text())["parity"]["fp32"]
    assert report["passed"] and report["batches"] == [1, 8] and report["inputs"] == ["image-like", "random"]
    expected = {(g.name, n) for g in (ENCODER, DECODER_STEP) for n in g.output_names}
    assert {(o["graph"], o["output"]) for o in report["outputs"]} == expected
    assert all(o["rel_l2"] <= 1e-5 for o in report["outputs"])
    assert report["captions"]["identical"] == report["captions"]["images"] == 4


def test_graphs_of_another_model_fail_with_expected_actual_and_tolerance(tiny_bundle, vocab):
    other = tiny_model(seed=1)  # same config, different weights: far outside tolerance
    report = verify_onnx(other, vocab, tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file, batches=(2,),
                    n_captions=2)
    assert not report.passed
    with pytest.raises(ParityError) as err:
        raise_if_failed(report, "somewhere")
    msg = str(err.value)
    assert msg.startswith("somewhere: fp32 ") and "relative L2" in msg and "tolerance 1e-05" in msg
    assert "expected " in msg and "actual " in msg and "--no-verify" in msg


def test_print_report_writes_one_line_per_output_and_one_for_captions(tiny_bundle, vocab):
    report = verify_onnx(tiny_model(), vocab, tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file, batches=(1, 3),
                    n_captions=2)
    console = Console(record=True, width=200)
    print_report(report, console)
    lines = console.export_text().strip().splitlines()
    assert len(lines) == len(ENCODER.outputs) + len(DECODER_STEP.outputs) + 1
    assert all(ln.startswith("✓") for ln in lines), lines
    assert "greedy captions identical on 2/2" in lines[-1]


def test_synthetic_images_are_preprocessed_and_deterministic():
    model = tiny_model()
    a, b = synthetic_images(model, 3, seed=5), synthetic_images(model, 3, seed=5)
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert a.std() > 0.3 and not torch.equal(a[0], a[1])


def test_build_out_of_tolerance_exits_non_zero_and_keeps_the_report(tmp_path, vocab, copy_instead_of_export):
    ckpt = save_checkpoint(tmp_path / "other.pth", tiny_model(seed=1), vocab)  # graphs come from seed 0
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--ckpt", str(ckpt), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "✗" in result.output and "differs from PyTorch eager" in result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["parity"]["fp32"]["passed"] is False

    result = CliRunner().invoke(app, ["build", "--ckpt", str(ckpt), "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / MANIFEST_FILE).read_text())["parity"]["fp32"]["skipped"] == "--no-verify"


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated zip"])
def test_build_refuses_a_corrupt_checkpoint_in_one_line(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    result = CliRunner().invoke(app, ["build", "--ckpt", str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error:" in result.output and "bad.pth" in result.output
    assert not (tmp_path / "b").exists()


def test_build_refuses_a_code_pickling_checkpoint_in_one_line(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, evil)  # pickles a module: code, not just tensors
    result = CliRunner().invoke(app, ["build", "--ckpt", str(evil), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "refusing to load" in result.output and "evil.pth" in result.output
