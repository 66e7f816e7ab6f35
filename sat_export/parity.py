"""The parity gate: any two backends on the same inputs, output by output (as Polygraphy's comparator).

A reference backend (PyTorch eager, for the build gate) and a candidate (onnxruntime on the
exported graphs, TensorRT engines, an int8 encoder) see the same random and image-like inputs (an
int8 encoder, whose activation ranges are calibrated on images, only image-like ones) at batch 1
and a larger batch; every output of both graphs of the contract gets its relative L2 error and max
absolute difference, checked against ``TOLERANCES``. Greedy captions of a few images through the
whole decode loop must be identical (fp32; for reduced precisions the agreement is reported, not
gated). One ✓/✗ line per output is printed; a failure raises ``ParityError`` stating expected,
actual, difference and tolerance. ``smoke`` runs one backend once and checks its outputs against
the contract (``sat-export check``).
"""
from __future__ import annotations

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
from sat_export.export import random_images, step_inputs
from training.decode import DecodeOptions, decode
from training.images import preprocess
from training.metrics import caption_agreement
from training.model import ShowAttendTell
from training.vocab import Vocab

BATCHES = (1, 8)
N_CAPTIONS = 4
# Tolerances per precision of the candidate, against the reference.
TOLERANCES = {
    "fp32": {"rel_l2": 1e-5, "alpha_max_abs": 1e-4},
    "fp16": {"rel_l2": 2e-2, "alpha_max_abs": 2e-2},
    "int8": {"rel_l2": 0.5, "alpha_max_abs": 0.5},
}


@dataclass(frozen=True)
class OutputDiff:
    """One output of one graph on one input set: errors and the largest difference's location."""

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
        """Per (graph, output): the failing diff if any, else the one with the largest relative L2."""
        worst: dict[tuple[str, str], OutputDiff] = {}
        for d in self.diffs:
            cur = worst.get((d.graph, d.output))
            if cur is None or (not d.ok, d.rel_l2) > (not cur.ok, cur.rel_l2):
                worst[(d.graph, d.output)] = d
        return list(worst.values())

    def to_dict(self) -> dict:
        """JSON-ready summary for the manifest: worst error per output, captions, verdict."""
        return {"precision": self.precision, "tolerances": self.tolerances, "passed": self.passed,
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


def compare(spec: GraphSpec, expected: tuple[Tensor, ...], actual: tuple[Tensor, ...], inputs: str, batch: int,
            tolerances: dict[str, float]) -> list[OutputDiff]:
    """Relative L2 and max abs difference of each output of ``spec`` (names from the contract)."""
    diffs = []
    for name, ref, got in zip(spec.output_names, expected, actual):
        ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
        if tuple(ref.shape) != tuple(got.shape):
            raise ParityError(f"{spec.name} output '{name}': shape {tuple(got.shape)}, eager gives {tuple(ref.shape)}")
        err = (got - ref).abs()
        where = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12))
        max_abs = float(err.max())
        ok = rel <= tolerances["rel_l2"] and (name != "alpha" or max_abs <= tolerances["alpha_max_abs"])
        diffs.append(OutputDiff(spec.name, name, inputs, batch, rel, max_abs, where, float(ref[where]),
                                float(got[where]), ok))
    return diffs


def verify(reference: Backend, candidate: Backend, precision: str = "fp32",
           graphs: tuple[GraphSpec, ...] = (ENCODER, DECODER_STEP), batches: tuple[int, ...] = BATCHES,
           n_captions: int = N_CAPTIONS, seed: int = 0) -> ParityReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output of ``graphs``.

    ``graphs`` limits the per-output comparison (an int8 encoder bundle reuses the fp32 decoder).
    Captions are gated only at fp32.
    """
    tol = TOLERANCES[precision]
    report = ParityReport(precision, tol, gate_captions=precision == "fp32")
    with torch.inference_mode():
        inputs = (("random", random_images), ("image-like", synthetic_images))
        for kind, make in inputs[1:] if precision == "int8" else inputs:  # int8 ranges fit images, not noise
            for batch in batches:
                images = make(reference, batch, seed)
                if ENCODER in graphs:
                    report.diffs += compare(ENCODER, reference.encode(images), candidate.encode(images), kind, batch,
                                            tol)
                if DECODER_STEP in graphs:
                    feeds = step_inputs(reference, images, seed)
                    args = tuple(feeds[n] for n in DECODER_STEP.input_names)
                    report.diffs += compare(DECODER_STEP, reference.step(*args), candidate.step(*args), kind, batch,
                                            tol)
        report.captions = caption_parity(reference, candidate, synthetic_images(reference, n_captions, seed + 1))
    return report


def verify_onnx(model: ShowAttendTell, vocab: Vocab, encoder: Path, decoder: Path, precision: str = "fp32",
                **options) -> ParityReport:
    """``verify`` with PyTorch eager ``model`` as the reference and onnxruntime on two ONNX files as the candidate."""
    with TorchBackend(model, vocab) as eager, OrtBackend(encoder, decoder, model.config, vocab) as ort:
        return verify(eager, ort, precision, **options)


def caption_parity(reference: Backend, candidate: Backend, images: Tensor, max_len: int = 20) -> dict:
    """Greedy captions of ``images`` by both backends: how many are identical, and the captions as text."""
    options, vocab = DecodeOptions(max_len=max_len), reference.vocab
    with torch.inference_mode():
        ref = decode(reference.step, reference.encode(images), vocab.special_ids(), options)
        cand = decode(candidate.step, candidate.encode(images), vocab.special_ids(), options)
    same = round(caption_agreement([c.tokens for c in ref], [c.tokens for c in cand]) * len(ref))
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
            tokens = torch.full((images.size(0),), backend.vocab.start, dtype=torch.long)
            out = backend.step(tokens, enc[2], enc[3], enc[0], enc[1])
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
        console.print(f"{mark} {report.precision} {d.graph:<12} {d.output:<13} rel L2 {d.rel_l2:.1e} "
                      f"(tol {report.tolerances['rel_l2']:.0e})  max |diff| {d.max_abs:.1e}", highlight=False)
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
            alpha = d.output == "alpha" and d.max_abs > report.tolerances["alpha_max_abs"]
            tol = (f"max |diff| tolerance {report.tolerances['alpha_max_abs']:.0e}" if alpha
                   else f"relative L2 tolerance {report.tolerances['rel_l2']:.0e}")
            raise ParityError(
                f"{where}: {report.precision} {d.graph} output '{d.output}' ({d.inputs} inputs, batch {d.batch}) "
                f"differs from PyTorch eager: relative L2 {d.rel_l2:.2e}, max |diff| {d.max_abs:.2e} at {list(d.where)} "
                f"(expected {d.expected:.6g}, actual {d.actual:.6g}); {tol}. "
                "The report is in the manifest; --no-verify skips this gate")
    cap = report.captions
    if report.gate_captions and cap and cap["identical"] != cap["images"]:
        i = next(i for i, (a, b) in enumerate(zip(cap["eager"], cap["onnx"])) if a != b)
        raise ParityError(f"{where}: greedy caption of image {i} differs: expected (eager) {cap['eager'][i]!r}, "
                          f"actual (onnx) {cap['onnx'][i]!r}; {cap['identical']}/{cap['images']} identical")
