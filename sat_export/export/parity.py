"""The parity gate: any two backends on the same inputs, output by output (as Polygraphy's comparator).

A reference backend (PyTorch eager, for the build gate) and a candidate (onnxruntime on the
exported graphs, TensorRT engines, an int8 encoder) see the same random and image-like inputs (an
int8 encoder, whose activation ranges are calibrated on images, only image-like ones) at batch 1
and a larger batch; every output of both graphs of the contract gets its relative L2 error and max
absolute difference. With a float64 oracle (``Float64Oracle``, the build gate) both fp32
evaluations are measured against float64 and the candidate may be as far from it as ``TOLERANCES``
or ``REFERENCE_MULTIPLE`` times eager's own error, whichever is larger; without one, the candidate
is held to ``TOLERANCES`` against the reference. Greedy captions of a few images through the whole
decode loop must be identical to the reference's (fp32; for reduced precisions the agreement is
reported, not gated). One ✓/✗ line per output is printed; a failure raises ``ParityError`` stating
expected, actual, difference and tolerance. ``smoke`` runs one backend once and checks its outputs
against the contract (``sat-export check``).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from torch import Tensor

from engines.base import Backend
from engines.contract import DECODER_STEP, ENCODER, GraphSpec
from engines.errors import ShapeError
from engines.ort import OrtBackend
from engines.torch_eager import TorchBackend
from sat_export.errors import BundleError, ParityError
from sat_export.export.onnx import random_images, step_inputs
from training.decode import decode
from training.images import preprocess
from training.model import ShowAttendTell
from training.options import DecodeOptions
from training.vocab import Vocab

BATCHES = (1, 8)
N_CAPTIONS = 4
# Tolerances per precision of the candidate, against the float64 oracle (or the reference without one).
# One rule for every precision; fp16's and int8's are far above 2x eager fp32's error, so they decide there.
TOLERANCES = {
    "fp32": {"rel_l2": 1e-5, "alpha_max_abs": 1e-4},
    "fp16": {"rel_l2": 2e-2, "alpha_max_abs": 2e-2},
    "int8": {"rel_l2": 0.5, "alpha_max_abs": 0.5},
}
# Two fp32 evaluations of one function (eager, onnxruntime) round differently, each about as far from the
# exact result as the other, so they differ from each other by up to about twice the error of either: a
# candidate up to 2x eager's own error from float64 is as accurate as a second fp32 evaluation can be.
REFERENCE_MULTIPLE = 2.0


class Float64Oracle(Backend):
    """The model evaluated in float64 on the CPU (a double-precision copy, inputs cast to float64).

    What the gate measures both fp32 evaluations against; its outputs stay float64.
    """

    name = "torch-float64"

    def __init__(self, model: ShowAttendTell, vocab: Vocab):
        super().__init__(model.config, vocab)
        self.model = copy.deepcopy(model).cpu().double().eval()

    def encode(self, images: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return self.model.encode(images.cpu().double())

    def step(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return self.model.step(tokens.cpu(), *(t.cpu().double() for t in (h, c, features, features_proj)))


@dataclass(frozen=True)
class Float64Errors:
    """How far the candidate and the reference (eager fp32) are from the float64 evaluation of one output."""

    candidate_rel_l2: float
    reference_rel_l2: float
    candidate_max_abs: float
    reference_max_abs: float


@dataclass(frozen=True)
class OutputDiff:
    """One output of one graph on one input set: the candidate's errors against the reference (and the
    largest difference's location), against float64 when there was an oracle, and the verdict."""

    graph: str
    output: str
    inputs: str  # "random" or "image-like"
    batch: int
    rel_l2: float
    max_abs: float
    where: tuple[int, ...]
    expected: float
    actual: float
    ok: bool
    float64: Float64Errors | None = None

    @classmethod
    def from_record(cls, record: dict) -> OutputDiff:
        """An output of a manifest's parity record (``ParityReport.to_dict``; the location is not stored)."""
        f64 = record.get("float64")
        return cls(**{**record, "where": (), "float64": None if f64 is None else Float64Errors(**f64)})

    @property
    def judged(self) -> float:
        """The relative L2 error the verdict rests on: from float64 when measured, else from the reference."""
        return self.rel_l2 if self.float64 is None else self.float64.candidate_rel_l2


@dataclass
class ParityReport:
    """Every compared output, greedy-caption agreement and the tolerances they were held to."""

    precision: str
    tolerances: dict[str, float]
    diffs: list[OutputDiff] = field(default_factory=list)
    captions: dict = field(default_factory=dict)
    gate_captions: bool = True

    @property
    def passed(self) -> bool:
        captions_ok = not self.gate_captions or self.captions.get("identical") == self.captions.get("images")
        return all(d.ok for d in self.diffs) and captions_ok

    def worst(self) -> list[OutputDiff]:
        """Per (graph, output): the failing diff if any, else the one with the largest judged relative L2."""
        worst: dict[tuple[str, str], OutputDiff] = {}
        for d in self.diffs:
            cur = worst.get((d.graph, d.output))
            if cur is None or (not d.ok, d.judged) > (not cur.ok, cur.judged):
                worst[(d.graph, d.output)] = d
        return list(worst.values())

    def to_dict(self) -> dict:
        """JSON-ready summary for the manifest: worst error per output, captions, verdict."""
        float64 = any(d.float64 is not None for d in self.diffs)
        return {"precision": self.precision, "tolerances": self.tolerances, "passed": self.passed,
                "judged_against": "float64" if float64 else "reference",
                **({"reference_multiple": REFERENCE_MULTIPLE} if float64 else {}),
                "batches": sorted({d.batch for d in self.diffs}), "inputs": sorted({d.inputs for d in self.diffs}),
                "outputs": [{k: v for k, v in asdict(d).items() if k != "where"} for d in self.worst()],
                "captions": self.captions, "captions_gated": self.gate_captions}


def synthetic_images(model: ShowAttendTell | Backend, n_img: int, seed: int = 0) -> Tensor:
    """Image-like inputs: coloured shapes on a gradient, through the model's own preprocessing."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_img):
        w, h = (int(v) for v in rng.integers(160, 400, size=2))
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 128, 3)
        img = Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, w - x0)), y0 + int(rng.integers(20, h - y0)))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(preprocess(img, model.config.preprocess))
    return torch.from_numpy(np.stack(out))


def allowed(tolerance: float, reference_error: float | None) -> float:
    """The error a candidate may have: ``tolerance``, or ``REFERENCE_MULTIPLE`` x the reference's own error
    against float64 when that is known and larger."""
    return tolerance if reference_error is None else max(tolerance, REFERENCE_MULTIPLE * reference_error)


def compare(spec: GraphSpec, expected: tuple[Tensor, ...], actual: tuple[Tensor, ...], inputs: str, batch: int,
            tolerances: dict[str, float], float64: tuple[Tensor, ...] | None = None) -> list[OutputDiff]:
    """Relative L2 and max abs difference of each output of ``spec`` (names from the contract).

    Without ``float64`` each output of ``actual`` is held to ``tolerances`` against ``expected``. With
    the float64 evaluation's outputs it is held to ``allowed(tolerance, expected's error)``, both errors
    measured against float64 (max |diff| is held only for ``alpha``).
    """
    diffs = []
    exact_outputs = (None,) * len(spec.output_names) if float64 is None else float64
    for name, ref, got, exact in zip(spec.output_names, expected, actual, exact_outputs):
        ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
        if tuple(ref.shape) != tuple(got.shape):
            raise ParityError(f"{spec.name} output '{name}': shape {tuple(got.shape)}, eager gives {tuple(ref.shape)}")
        rel, err = _errors(ref, got)
        where = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        errors, ref_errors, f64 = (rel, float(err.max())), (None, None), None
        if exact is not None:
            exact = exact.detach().double().cpu()
            (c_rel, c_err), (r_rel, r_err) = _errors(exact, got), _errors(exact, ref)
            f64 = Float64Errors(c_rel, r_rel, float(c_err.max()), float(r_err.max()))
            errors, ref_errors = (c_rel, f64.candidate_max_abs), (r_rel, f64.reference_max_abs)
        keys = ("rel_l2", "alpha_max_abs") if name == "alpha" else ("rel_l2",)
        ok = all(e <= allowed(tolerances[key], r) for key, e, r in zip(keys, errors, ref_errors))
        diffs.append(OutputDiff(spec.name, name, inputs, batch, rel, float(err.max()), where, float(ref[where]),
                                float(got[where]), ok, f64))
    return diffs


def relative_l2(ref: Tensor, got: Tensor) -> float:
    """Relative L2 error of ``got`` against ``ref`` (same shape), computed in float64."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12))


def _errors(ref: Tensor, got: Tensor) -> tuple[float, Tensor]:
    """``relative_l2`` of ``got`` against ``ref`` (float64, same shape) and the elementwise ``|got - ref|``."""
    return relative_l2(ref, got), (got - ref).abs()


def verify(reference: Backend, candidate: Backend, precision: str = "fp32",
           graphs: tuple[GraphSpec, ...] = (ENCODER, DECODER_STEP), batches: tuple[int, ...] = BATCHES,
           n_captions: int = N_CAPTIONS, seed: int = 0, oracle: Backend | None = None) -> ParityReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output of ``graphs``.

    ``graphs`` limits the per-output comparison (an int8 encoder bundle reuses the fp32 decoder).
    With ``oracle`` (a ``Float64Oracle``) both are measured against it too, and the verdict rests on
    those errors (see ``compare``). Captions are compared with the reference's, gated only at fp32.
    """
    tol = TOLERANCES[precision]
    report = ParityReport(precision, tol, gate_captions=precision == "fp32")
    with torch.inference_mode():
        inputs = (("random", random_images), ("image-like", synthetic_images))
        for kind, make in inputs[1:] if precision == "int8" else inputs:  # int8 ranges fit images, not noise
            for batch in batches:
                images = make(reference, batch, seed)
                encoded = reference.encode(images)
                if ENCODER in graphs:
                    report.diffs += compare(ENCODER, encoded, candidate.encode(images), kind, batch,
                                            tol, None if oracle is None else oracle.encode(images))
                if DECODER_STEP in graphs:
                    feeds = step_inputs(reference, images, seed, encoded)
                    args = tuple(feeds[n] for n in DECODER_STEP.input_names)
                    report.diffs += compare(DECODER_STEP, reference.step(*args), candidate.step(*args), kind, batch,
                                            tol, None if oracle is None else oracle.step(*args))
        report.captions = caption_parity(reference, candidate, synthetic_images(reference, n_captions, seed + 1))
    return report


def verify_onnx(model: ShowAttendTell, vocab: Vocab, encoder: Path, decoder: Path, precision: str = "fp32",
                **options) -> ParityReport:
    """``verify`` with PyTorch eager ``model`` as the reference, onnxruntime on two ONNX files as the candidate,
    both judged against ``model`` in float64."""
    with TorchBackend(model, vocab) as eager, OrtBackend(encoder, decoder, model.config, vocab) as ort:
        return verify(eager, ort, precision, oracle=Float64Oracle(model, vocab), **options)


def caption_parity(reference: Backend, candidate: Backend, images: Tensor, max_len: int = 20) -> dict:
    """Greedy captions of ``images`` by both backends: how many are identical, and the captions as text."""
    options, vocab = DecodeOptions(max_len=max_len), reference.vocab
    with torch.inference_mode():
        ref = decode(reference.step, reference.encode(images), vocab.special_ids(), options)
        cand = decode(candidate.step, candidate.encode(images), vocab.special_ids(), options)
    same = sum(a.tokens == b.tokens for a, b in zip(ref, cand))
    return {"images": len(ref), "identical": same, "eager": [" ".join(vocab.decode(c.tokens)) for c in ref],
            "onnx": [" ".join(vocab.decode(c.tokens)) for c in cand]}


def smoke(backend: Backend, images: Tensor, files: dict[str, Path]) -> None:
    """Encode ``images`` and run one decoder step from ``<start>``, checking every output.

    ``files`` maps graph names to the files ``backend`` runs. Raises ``BundleError`` naming the
    file whose outputs break the graph contract or hold NaN or Inf.
    """
    dims = backend.config.dims()
    try:
        with torch.inference_mode():
            enc = backend.encode(images)
            ENCODER.check_outputs(dict(zip(ENCODER.output_names, enc)), dims)
            tokens = torch.full((images.size(0), 1), backend.vocab.start, dtype=torch.long)
            out = backend.step(tokens, enc[2].unsqueeze(1), enc[3].unsqueeze(1), enc[0], enc[1])
            DECODER_STEP.check_outputs(dict(zip(DECODER_STEP.output_names, out)), dims)
    except ShapeError as err:
        raise BundleError(f"{files[ENCODER.name].parent}: smoke inference: {err}") from None
    for spec, tensors in ((ENCODER, enc), (DECODER_STEP, out)):
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise BundleError(f"{files[spec.name]}: smoke inference produced NaN or Inf")


def print_report(report: ParityReport, console: Console) -> None:
    """One ✓/✗ line per output (its worst case), then one for greedy captions."""
    for d in report.worst():
        mark = "[green]✓[/]" if d.ok else "[red]✗[/]"
        if d.float64 is None:
            errors = (f"rel L2 {d.rel_l2:.1e} (tol {report.tolerances['rel_l2']:.0e})  max |diff| {d.max_abs:.1e}")
        else:
            f = d.float64
            errors = (f"rel L2 from float64 {f.candidate_rel_l2:.1e} (eager {f.reference_rel_l2:.1e}, allowed "
                      f"{allowed(report.tolerances['rel_l2'], f.reference_rel_l2):.1e})  max |diff| "
                      f"{f.candidate_max_abs:.1e} (eager {f.reference_max_abs:.1e})  from eager: rel L2 {d.rel_l2:.1e}")
        console.print(f"{mark} {report.precision} {d.graph:<12} {d.output:<13} {errors}", highlight=False)
    cap = report.captions
    if cap:
        ok = cap["identical"] == cap["images"]
        mark = "[green]✓[/]" if ok else ("[red]✗[/]" if report.gate_captions else "[yellow]~[/]")
        console.print(f"{mark} {report.precision} greedy captions identical on {cap['identical']}/{cap['images']} images"
                      + ("" if report.gate_captions else " (reported, not gated)"), highlight=False)


def raise_if_failed(report: ParityReport, where: str) -> None:
    """``ParityError`` for the worst failing output (or the first differing caption)."""
    for d in report.worst():
        if not d.ok:
            raise ParityError(f"{where}: {report.precision} {d.graph} output '{d.output}' ({d.inputs} inputs, batch "
                              f"{d.batch}) {failure_reason(d, report.tolerances)}; max |diff| from eager "
                              f"{d.max_abs:.2e} at {list(d.where)} (expected {d.expected:.6g}, actual {d.actual:.6g}). "
                              "The report is in the manifest; --no-verify skips this gate")
    cap = report.captions
    if report.gate_captions and cap and cap["identical"] != cap["images"]:
        i = next(i for i, (a, b) in enumerate(zip(cap["eager"], cap["onnx"])) if a != b)
        raise ParityError(f"{where}: greedy caption of image {i} differs: expected (eager) {cap['eager'][i]!r}, "
                          f"actual (onnx) {cap['onnx'][i]!r}; {cap['identical']}/{cap['images']} identical")


def failure_reason(d: OutputDiff, tolerances: dict[str, float]) -> str:
    """Which error of a failing output is out of bounds, and the bound."""
    if d.float64 is None:
        alpha = d.output == "alpha" and d.max_abs > tolerances["alpha_max_abs"]
        tol = (f"max |diff| tolerance {tolerances['alpha_max_abs']:.0e}" if alpha
               else f"relative L2 tolerance {tolerances['rel_l2']:.0e}")
        return f"differs from PyTorch eager: relative L2 {d.rel_l2:.2e}; {tol}"
    f = d.float64
    metric, got, ref, tol = ("relative L2", f.candidate_rel_l2, f.reference_rel_l2, tolerances["rel_l2"])
    if got <= allowed(tol, ref):  # then alpha's max |diff| is what failed
        metric, got, ref, tol = ("max |diff|", f.candidate_max_abs, f.reference_max_abs, tolerances["alpha_max_abs"])
    return (f"is further from a float64 evaluation than allowed: {metric} {got:.2e}, PyTorch eager fp32's {ref:.2e}; "
            f"allowed {allowed(tol, ref):.2e} (tolerance {tol:.0e} or {REFERENCE_MULTIPLE:g}x eager's)")
