"""The parity gate: reports, the ✓/✗ lines, ParityError messages, a failing build keeping its report, and
`check` reporting the stored verdicts."""

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from engines.base import Backend
from engines.contract import DECODER_STEP, ENCODER
from engines.ort import OrtBackend
from engines.torch_eager import TorchBackend
from sat_export.cli.export import app
from sat_export.errors import ParityError
from sat_export.export.onnx import export_onnx
from sat_export.export.parity import Float64Oracle, print_report, raise_if_failed, synthetic_images, verify, verify_onnx
from tests.conftest import manifest_of, tiny_model
from training.checkpoint import save_checkpoint


def test_compare_eager_vs_onnxruntime_manifest_report_within_fp32_tolerance(tiny_bundle):
    report = manifest_of(tiny_bundle)["parity"]["fp32"]
    assert report["passed"] and report["batches"] == [1, 8] and report["inputs"] == ["image-like", "random"]
    assert report["judged_against"] == "float64" and report["reference_multiple"] == 2.0
    expected = {(g.name, n) for g in (ENCODER, DECODER_STEP) for n in g.output_names}
    assert {(o["graph"], o["output"]) for o in report["outputs"]} == expected
    assert all(o["rel_l2"] <= 1e-5 for o in report["outputs"])
    for o in report["outputs"]:  # both fp32 evaluations, measured against float64
        f64 = o["float64"]
        assert 0 < f64["candidate_rel_l2"] <= 1e-5 and 0 < f64["reference_rel_l2"] <= 1e-5, o
        assert f64["candidate_max_abs"] > 0 and f64["reference_max_abs"] > 0
    assert report["captions"]["identical"] == report["captions"]["images"] == 4


def test_graphs_of_another_model_fail_with_expected_actual_and_tolerance(tiny_bundle, vocab):
    other = tiny_model(seed=1)  # same config, different weights: far outside tolerance
    report = verify_onnx(other, vocab, tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file, batches=(2,),
                    n_captions=2)
    assert not report.passed
    with pytest.raises(ParityError) as err:
        raise_if_failed(report, "somewhere")
    msg = str(err.value)
    assert msg.startswith("somewhere: fp32 ") and "further from a float64 evaluation than allowed" in msg
    assert "relative L2" in msg and "tolerance 1e-05 or 2x eager's" in msg and "PyTorch eager fp32's" in msg
    assert "expected " in msg and "actual " in msg and "--no-verify" in msg


def test_print_report_writes_one_line_per_output_and_one_for_captions(tiny_bundle, vocab):
    report = verify_onnx(tiny_model(), vocab, tiny_bundle / ENCODER.file, tiny_bundle / DECODER_STEP.file, batches=(1, 3),
                    n_captions=2)
    console = Console(record=True, width=200)
    print_report(report, console)
    lines = console.export_text().strip().splitlines()
    assert len(lines) == len(ENCODER.outputs) + len(DECODER_STEP.outputs) + 1
    assert all(ln.startswith("✓") for ln in lines), lines
    assert all("rel L2 from float64" in ln and "(eager " in ln and "from eager" in ln for ln in lines[:-1]), lines
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
    assert "✗" in result.output and "further from a float64 evaluation" in result.output
    manifest = manifest_of(out)
    assert manifest["parity"]["fp32"]["passed"] is False
    _check_reports(out, "✗ fp32 parity gate: failed: encoder 'features' is further from a float64 evaluation")

    result = CliRunner().invoke(app, ["build", "--ckpt", str(ckpt), "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert manifest_of(out)["parity"]["fp32"]["skipped"] == "--no-verify"
    _check_reports(out, "~ fp32 parity gate: skipped (--no-verify)")


def _check_reports(bundle, line):
    """`check` prints ``line`` and exits 0 (files and smoke inference pass); `check --strict` exits 1 in one line."""
    result = CliRunner().invoke(app, ["check", str(bundle)])
    assert result.exit_code == 0 and line in result.output and "files verified" in result.output, result.output
    result = CliRunner().invoke(app, ["check", str(bundle), "--strict"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = result.output[result.output.index("error:"):].replace("\n", "")
    assert "parity gate not passed (--strict): fp32 " in error and line.split(": ", 1)[1] in error


def test_check_strict_passes_a_bundle_whose_gate_passed(tiny_bundle):
    result = CliRunner().invoke(app, ["check", str(tiny_bundle), "--strict"])
    assert result.exit_code == 0, result.output
    assert "✓ fp32 parity gate: passed" in result.output and "2 files verified" in result.output


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


def ill_conditioned_model():
    """The tiny model with its attention logits scaled up 1e4: the softmax is ill-conditioned there, so eager
    fp32's ``alpha`` is about 4e-5 from float64 (relative L2), beyond the 1e-5 tolerance."""
    model = tiny_model()
    with torch.no_grad():
        model.attention.full_att.weight.mul_(1e4)
    return model


class Perturbed(Backend):
    """``backend``'s outputs as float32, each element off by about ``rel`` relative (0: just rounded)."""

    name = "perturbed"

    def __init__(self, backend, rel):
        super().__init__(backend.config, backend.vocab)
        self.backend, self.rel = backend, rel

    def encode(self, images):
        return self._perturb(self.backend.encode(images))

    def step(self, *inputs):
        return self._perturb(self.backend.step(*inputs))

    def _perturb(self, outputs):
        gen = torch.Generator().manual_seed(0)
        return tuple((t * (1 + self.rel * torch.randn(t.shape, generator=gen, dtype=t.dtype))).float() for t in outputs)


@pytest.fixture(scope="module")
def ill_conditioned_graphs(tmp_path_factory):
    paths = export_onnx(ill_conditioned_model(), tmp_path_factory.mktemp("ill"))
    return paths[ENCODER.name], paths[DECODER_STEP.name]


def test_compare_onnxruntime_vs_float64_passes_where_eager_itself_is_far_from_float64(ill_conditioned_graphs,
                                                                                        vocab):
    report = verify_onnx(ill_conditioned_model(), vocab, *ill_conditioned_graphs)
    alpha = [d for d in report.diffs if d.output == "alpha"]
    assert min(d.float64.reference_rel_l2 for d in alpha) > 1e-5  # eager's own rounding is out of tolerance
    assert min(d.rel_l2 for d in alpha) > 1e-5  # so onnxruntime vs eager would fail a plain 1e-5 gate
    assert report.passed, [d for d in report.diffs if not d.ok]
    assert all(d.float64.candidate_rel_l2 <= 2 * d.float64.reference_rel_l2 for d in alpha)


def test_compare_perturbed_onnxruntime_vs_float64_fails(ill_conditioned_graphs, vocab):
    model = ill_conditioned_model()
    with (TorchBackend(model, vocab) as eager,
          OrtBackend(*ill_conditioned_graphs, model.config, vocab) as ort):
        report = verify(eager, Perturbed(ort, 1e-3), oracle=Float64Oracle(model, vocab), batches=(2,), n_captions=2)
    assert not report.passed and not any(d.ok for d in report.diffs if d.output in ("features", "alpha", "h_next"))
    with pytest.raises(ParityError, match="further from a float64 evaluation than allowed"):
        raise_if_failed(report, "ill")


def test_compare_candidate_closer_to_float64_than_eager_passes_the_float64_gate_only(vocab):
    model = ill_conditioned_model()
    with TorchBackend(model, vocab) as eager:
        rounded = Perturbed(Float64Oracle(model, vocab), 0.0)  # as close to float64 as float32 gets
        plain = verify(eager, rounded, batches=(2,), n_captions=2)
        judged = verify(eager, rounded, oracle=Float64Oracle(model, vocab), batches=(2,), n_captions=2)
    assert not plain.passed  # held to eager, the most accurate float32 candidate fails on eager's rounding
    assert judged.passed
    assert all(d.float64.candidate_rel_l2 < d.float64.reference_rel_l2 for d in judged.diffs if d.output == "alpha")
    record = judged.to_dict()
    assert record["judged_against"] == "float64"
    assert all(set(o["float64"]) == {"candidate_rel_l2", "reference_rel_l2", "candidate_max_abs", "reference_max_abs"}
               for o in record["outputs"])
