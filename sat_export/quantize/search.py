"""Accuracy-aware int8 encoder: static QDQ quantisation that backs off where the captions change.

1. The calibration images are split: every ``HOLD_BACK``-th one is held back to judge the result.
2. Activation ranges are calibrated once on the rest (``mse`` by default; ``minmax``,
   ``percentile``, ``entropy``) and cached, so every later quantisation of the search reuses them.
3. The whole encoder is quantised (QDQ, per-channel int8 weights, uint8 activations: the
   VNNI-friendly choice on x86), and the held-back images are captioned with it and the fp32
   decoder step, with the decoding the bundle will be run with (greedy, or beam ``beam``: int8 error
   that greedy captions hide can change beam captions, issue 28). It is judged by the task
   (``training.faithful``): its corpus BLEU-4 and CIDEr-D must each be at least ``target`` (0.99)
   times the fp32 bundle's on the held-back images. The references are the human captions of the calibration set where it has a captions file
   (``calibration_references``), else the fp32 captions themselves (one reference each: stricter,
   as any changed word then costs). Exact-caption agreement is recorded beside it.
4. While the encoder is not faithful, the node groups (a backbone block such as ``backbone.6.3``, a
   head such as ``attention.enc_att``), ranked once by the error each adds (relative L2 against fp32
   at its output minus at its input, on held-back images), are excluded from quantisation one at a
   time, worst first, and the encoder is quantised and judged again after each.

Half the calibration images are held back (``HOLD_BACK`` 2): a corpus metric over n images moves by
about 1/sqrt(n) of its per-image spread, and the 1 % margin of the rule needs on the order of a
hundred images or more before the judgement is steadier than the rounding it judges (the verdict
carries the paired-bootstrap interval, which says how steady it was). The ranges are fitted on the
other half, which matters far less: mse calibration on 64 images gave the same ranges as on 128.

The result records the groups and nodes left in fp32 and the verdict; ``sat-export build`` stores it
in the manifest under ``int8``.
"""
from __future__ import annotations

import ast
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console

from engines.base import Backend
from engines.contract import ENCODER
from engines.ort import OrtBackend
from sat_export.bundle.format import Bundle, graph_file, load_bundle
from sat_export.errors import BundleError
from sat_export.export.parity import relative_l2
from sat_export.options import DEFAULT_TARGET, METHODS
from sat_export.quantize.ort import (ImageCalibrationReader, calibration_files, calibration_reader, head_nodes,
                                     name_nodes, quantize_prepared, reduced_range, session_with_outputs)
from training.console import make_console
from training.data import load_captions
from training.decode import decode
from training.errors import DatasetError, ImageDecodeError
from training.faithful import judge
from training.images import load_image
from training.options import DecodeOptions

HOLD_BACK = 2  # every 2nd calibration image is held back to judge the int8 encoder
MAX_EXCLUDED = 8  # groups; the search stops there even below the target (each step re-quantises)
WEIGHT_OPS = {"Conv", "MatMul", "Gemm"}  # a group starts at a layer with weights
N_ERROR_IMAGES = 8  # held-back images used to rank groups by error (intermediate tensors are large)


@dataclass(frozen=True)
class SearchStep:
    """One quantisation of the search: the group newly excluded (None: all quantised) and its verdict.

    ``feature_rel_l2``: relative L2 of the int8 graph's grid features against the fp32 graph's,
    on the held-back images (not against eager, and not on the parity gate's synthetic inputs).
    """

    excluded: str | None
    faithful: bool
    bleu4_ratio: float
    cider_d_ratio: float
    agreement: float
    feature_rel_l2: float

    @property
    def worst_ratio(self) -> float:
        return min(self.bleu4_ratio, self.cider_d_ratio)


@dataclass
class Int8Search:
    """What the search produced: the int8 encoder, what stayed fp32, and the verdict reached."""

    path: Path
    method: str
    target: float
    n_calib: int
    n_held_back: int
    references: str  # where the held-back references came from
    beam: int  # the held-back images were captioned with this beam (1: greedy)
    verdict: dict  # training.faithful.judge of the kept encoder
    reduce_range: bool  # 7-bit weights: the CPU that quantised had no VNNI (see training.machine)
    excluded_groups: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    head_nodes: list[str] = field(default_factory=list)  # always fp32 (``quantize.head_nodes``)
    steps: list[SearchStep] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reached(self) -> bool:
        return self.verdict["faithful"]

    @property
    def agreement(self) -> float:
        return self.verdict["agreement"]

    @property
    def worst_ratio(self) -> float:
        """The lower of the two task metrics' shares of fp32's."""
        return min(self.verdict["bleu4"]["ratio"], self.verdict["cider_d"]["ratio"])

    def to_dict(self) -> dict:
        """JSON-ready record for the manifest."""
        d = asdict(self)
        d["path"] = self.path.name
        return {**d, "reached": self.reached, "agreement": self.agreement}


def split_held_back(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``(calibration, held_back)``: every ``HOLD_BACK``-th file is held back (at least one of each)."""
    if len(files) < 2:
        raise BundleError(f"accuracy-aware int8 needs at least 2 calibration images, got {len(files)}")
    held = [f for i, f in enumerate(files) if i % HOLD_BACK == HOLD_BACK - 1] or [files[-1]]
    return [f for f in files if f not in held], held


def node_groups(exported: onnx.ModelProto, prepared: onnx.ModelProto) -> dict[str, list[str]]:
    """Group -> node names of ``prepared``, from the module scopes the exporter recorded in ``exported``.

    A node the pre-processing created (no match by name) joins the group of its input's producer;
    a group without weights (an activation, a pooling) joins the group it reads from, so that an
    exclusion always takes a layer together with what follows it.
    """
    scopes = {n.name: _module_group(n) for n in exported.graph.node}
    producer: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for node in prepared.graph.node:
        group = scopes.get(node.name) or next((producer[i] for i in node.input if i in producer), "graph")
        if node.op_type not in WEIGHT_OPS and group not in groups:
            group = next((producer[i] for i in node.input if i in producer), group)
        groups.setdefault(group, []).append(node.name)
        producer.update({o: group for o in node.output})
    return groups


def _module_group(node: onnx.NodeProto) -> str | None:
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes if isinstance(s, str) and s.startswith("model.")]
    if not modules:
        return None
    parts = max(modules, key=len).split(".")[1:]  # drop the export wrapper's "model"
    if parts[0] != "backbone":
        return ".".join(parts[:2])  # a head: attention.enc_att, init_h, ...
    depth = next((i for i, p in enumerate(parts[1:3], 1) if not p.isdigit()), min(3, len(parts)))
    return ".".join(parts[:depth])  # a numbered block: backbone.6.3 (ResNet), backbone.4 (MobileNet)


def calibration_references(calib_images: str | Path | Sequence[str | Path],
                           captions: str | Path | None = None) -> tuple[dict[Path, list[list[str]]], str] | None:
    """Human captions of the calibration images, by resolved image path, and where they came from.

    ``captions`` is a captions file (any format ``training.data`` reads); by default one is looked
    for in the calibration folder and its parent (``sat-train make-shapes`` writes ``images/`` beside
    ``captions.txt``). None when there is none.
    """
    if captions is None:
        if not isinstance(calib_images, (str, Path)):
            return None
        folder = Path(calib_images)
        for candidate in (folder, folder.parent):
            try:
                items = load_captions(candidate, images=folder, val_frac=0.0, test_frac=0.0)
                return {it.path.resolve(): it.captions for it in items}, str(candidate)
            except DatasetError:
                continue
        return None
    items = load_captions(captions, val_frac=0.0, test_frac=0.0)
    return {it.path.resolve(): it.captions for it in items}, str(captions)


def split_calibration(bundle: Bundle, calib_images: str | Path | Sequence[str | Path], limit: int | None,
                      captions: str | Path | None, target: float, beam: int = 1,
                      ) -> tuple[ImageCalibrationReader, HeldBack, str]:
    """The calibration images to fit ranges on (``split_held_back``; read one a batch, as histograms need
    equal batches), the held-back rest that judges the result (captioned with ``beam``), and where its
    references came from."""
    calib, held_files = split_held_back(calibration_files(calib_images, limit))
    reader = calibration_reader(calib, calib_images, bundle.config.preprocess, batch=1)
    found = calibration_references(calib_images, captions)
    held = HeldBack(bundle, held_files, found[0] if found else None, ratio=target, beam=beam)
    source = f"human captions ({found[1]})" if held.human else "the fp32 captions (no captions file for every image)"
    return reader, held, source


class HeldBack:
    """The held-back images, their fp32 encoder outputs and captions (computed once, greedy or with ``beam``),
    and their references (human captions where ``references`` has them for every image, else the fp32 captions).

    ``score`` judges an int8 encoder against them: the task rule (``training.faithful.judge``) and
    the grid features' relative L2 error as the parity report measures it (``parity.relative_l2``).
    """

    def __init__(self, bundle: Bundle, files: Sequence[Path], references: dict[Path, list[list[str]]] | None = None,
                 max_len: int = 20, ratio: float = DEFAULT_TARGET, beam: int = 1):
        images, kept = [], []
        for path in files:
            try:
                images.append(load_image(path, bundle.config.preprocess))
                kept.append(Path(path).resolve())
            except ImageDecodeError:
                continue
        if not images:
            raise BundleError(f"none of the {len(files)} held-back calibration images could be read")
        self.bundle, self.images, self.ratio = bundle, torch.from_numpy(np.stack(images)), ratio
        self.options = DecodeOptions(beam=beam, max_len=max_len)
        self.encoder, self.decoder = bundle.graph_paths("fp32")
        self.outputs, self.captions = self.run(self.encoder)
        self.human = references is not None and all(p in references for p in kept)
        self.references = [references[p] for p in kept] if self.human else [[c] for c in self.captions]

    def run(self, encoder: Path, runtime: type[Backend] = OrtBackend,
            ) -> tuple[tuple[torch.Tensor, ...], list[list[str]]]:
        """Encoder outputs and captions (words, ``self.options``' decoding) of the held-back images
        with ``encoder`` on ``runtime``
        (a backend opened from an encoder and the fp32 decoder step: ``OrtBackend``, ``OpenVinoBackend``)."""
        with runtime(encoder, self.decoder, self.bundle.config, self.bundle.vocab) as backend:
            enc = backend.encode(self.images)
            captions = decode(backend.step, enc, self.bundle.vocab.special_ids(), self.options)
        return enc, [self.bundle.vocab.decode(c.tokens) for c in captions]

    def score(self, encoder: Path, runtime: type[Backend] = OrtBackend) -> tuple[dict, float]:
        """``(task-rule verdict against fp32, relative L2 of the grid features)`` of an int8 encoder
        on ``runtime``."""
        outputs, captions = self.run(encoder, runtime)
        features = ENCODER.output_names.index("features")
        return judge(self.references, self.captions, captions, self.ratio), relative_l2(self.outputs[features],
                                                                                      outputs[features])


def group_errors(prepared: Path, quantised: Path, groups: dict[str, list[str]], images: torch.Tensor) -> dict[str, float]:
    """Error each group adds: rel. L2 (int8 vs fp32) at its output minus the largest at its inputs.

    A group whose output tensor the quantiser folded away (a removed activation) is not scored.
    """
    fp32, int8 = onnx.load(str(prepared)), onnx.load(str(quantised))
    group_of = {n: g for g, nodes in groups.items() for n in nodes}
    nodes = {n.name: n for n in fp32.graph.node}
    producer = {o: group_of[n.name] for n in fp32.graph.node if n.name in group_of for o in n.output}
    present = {o for n in int8.graph.node for o in n.output}
    seen = _dequantized_names(int8)  # the value downstream nodes read in the int8 graph
    outputs = {g: nodes[names[-1]].output[0] for g, names in groups.items()}
    outputs = {g: t for g, t in outputs.items() if seen.get(t, t) in present}
    feeds = {ENCODER.input_names[0]: images.numpy()}
    names = list(outputs.values())
    ref = session_with_outputs(fp32, names).run(names, feeds)
    quantised_names = [seen.get(t, t) for t in names]
    got = session_with_outputs(int8, quantised_names).run(quantised_names, feeds)
    err = {g: float(np.linalg.norm(q - f) / max(np.linalg.norm(f), 1e-12)) for g, f, q in zip(outputs, ref, got)}
    errors = {}
    for g in err:
        inputs = {producer[i] for n in groups[g] for i in nodes[n].input if i in producer} - {g}
        errors[g] = err[g] - max((err.get(p, 0.0) for p in inputs), default=0.0)
    return errors


def _dequantized_names(model: onnx.ModelProto) -> dict[str, str]:
    """Float tensor -> output of the DequantizeLinear that follows its QuantizeLinear."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    result = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            dq = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            if dq:
                result[node.input[0]] = dq[0].output[0]
    return result


def search_int8_encoder(bundle_dir: str | Path, calib_images: str | Path | Sequence[str | Path],
                        method: str = "mse", target: float = DEFAULT_TARGET, limit: int | None = 256,
                        out: str | Path | None = None, max_excluded: int = MAX_EXCLUDED,
                        console: Console | None = None, captions: str | Path | None = None,
                        beam: int = 1) -> Int8Search:
    """Quantise the bundle's encoder, excluding sensitive groups until it is faithful on the held-back images.

    Parameters
    ----------
    bundle_dir : a built bundle with fp32 graphs (its manifest gives the preprocessing).
    calib_images : a folder of images (searched recursively) or a list of image paths.
    method : calibration method, one of ``quantize.METHODS`` (default ``mse``).
    target : each task metric (BLEU-4, CIDEr-D) must reach this share of fp32's, in (0, 1].
    limit : use at most this many images (sorted by path), held-back ones included.
    out : output path; ``encoder.int8.onnx`` in the bundle by default.
    captions : the calibration images' captions file (see ``calibration_references``).
    beam : the beam the bundle will be decoded with (1: greedy); the held-back images are captioned with it.

    The search stops once faithful, or after ``max_excluded`` groups; it then keeps the first
    faithful quantisation, else the one whose worse task metric came closest (``Int8Search.reached``).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    console = console or make_console()
    start = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    reader, held, source = split_calibration(bundle, calib_images, limit, captions, target, beam)
    reduce_range = reduced_range()
    out = Path(out) if out else bundle.dir / graph_file(ENCODER, "int8")
    with tempfile.TemporaryDirectory() as tmp:
        prepared, ranges = Path(tmp) / "encoder.pre.onnx", Path(tmp) / "ranges.json"
        quant_pre_process(str(held.encoder), str(prepared))
        named = name_nodes(prepared)
        head = head_nodes(named)
        groups = {g: kept for g, nodes in node_groups(onnx.load(str(held.encoder)), named).items()
                  if (kept := [n for n in nodes if n not in head])}  # the head is fp32 anyway
        excluded: list[str] = []
        steps: list[SearchStep] = []
        verdicts: list[dict] = []
        ranking: list[str] = []
        while True:
            quantize_prepared(prepared, out, reader, method, [n for g in excluded for n in groups[g]], ranges,
                              reduce_range)
            verdict, rel = held.score(out)
            verdicts.append(verdict)
            steps.append(SearchStep(excluded[-1] if excluded else None, verdict["faithful"],
                                    verdict["bleu4"]["ratio"], verdict["cider_d"]["ratio"], verdict["agreement"], rel))
            decoding = "greedy" if beam == 1 else f"beam {beam}"
            console.print(f"int8 ({method}, {decoding}) {'all quantised' if not excluded else 'fp32: ' + ', '.join(excluded)}: "
                          f"{verdict_line(verdict)} on {verdict['images']} held-back images against {source}; "
                          f"features rel L2 vs the fp32 graph {rel:.3f}", highlight=False, soft_wrap=True)
            if verdict["faithful"]:
                break
            if not ranking:
                errors = group_errors(prepared, out, groups, held.images[:N_ERROR_IMAGES])
                ranking = sorted(errors, key=errors.__getitem__, reverse=True)
            if len(excluded) >= min(max_excluded, len(ranking)):
                break
            excluded.append(ranking[len(excluded)])
        best = max(range(len(steps)), key=lambda i: (steps[i].faithful, steps[i].worst_ratio, -i))
        if best != len(steps) - 1:  # the last step was not the best: quantise the best again
            excluded = excluded[:best]
            quantize_prepared(prepared, out, reader, method, [n for g in excluded for n in groups[g]], ranges,
                              reduce_range)
    return Int8Search(out, method, target, len(reader.files), len(held.captions), source, beam, verdicts[best],
                      reduce_range,
                      excluded, [n for g in excluded for n in groups[g]], head, steps,
                      round(time.perf_counter() - start, 2))


def verdict_line(verdict: dict) -> str:
    """``faithful: BLEU-4 0.331 vs 0.330 (100.3 %, 95 % CI of the difference -0.004..0.006), CIDEr-D ...``."""
    parts = [f"{name} {m['candidate']:.3f} vs {m['reference']:.3f} ({m['ratio']:.1%}, 95 % CI of the difference "
             f"{m['ci95'][0]:+.3f}..{m['ci95'][1]:+.3f})" for name, m in (("BLEU-4", verdict["bleu4"]),
                                                                         ("CIDEr-D", verdict["cider_d"]))]
    return (f"{'faithful' if verdict['faithful'] else 'NOT faithful'}: {', '.join(parts)}; "
            f"identical captions {verdict['agreement']:.1%}")
