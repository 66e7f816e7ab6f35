"""Static int8 quantisation of a bundle's encoder (QDQ, per-channel weights) with onnxruntime.

Calibration runs the user's own images through the model's preprocessing (``load_image`` with
the bundle's ``PreprocessConfig``), so activation ranges match what inference will see. The
decoder step stays fp32: it is a small share of the time and sensitive to rounding. So does the
encoder's head (``head_nodes``: the last convolution and everything after it), so the graph's
outputs are never rounded to 8 bits: on the bench's reference ResNet-101 quantising them alone
cost 10 % relative L2 on the features, and the head is about 1 % of the encoder's work.
"""
from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from sat_export.bundle import load_bundle
from sat_export.contract import ENCODER
from sat_export.errors import BundleError
from sat_export.export import graph_file
from sat_export.images import ImageDecodeError, load_image
from training.config import PreprocessConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
METHODS = ("minmax", "entropy", "percentile")


def calibration_files(source: str | Path | Sequence[str | Path], limit: int | None = None) -> list[Path]:
    """Image paths from a folder (recursively, by suffix) or an explicit list, sorted, at most ``limit``."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise BundleError(f"{folder}: calibration folder not found")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        files = [Path(p) for p in source]
    return files[:limit]


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader``: batches of preprocessed images as ``{"images": array}``."""

    def __init__(self, files: Sequence[Path], preprocess: PreprocessConfig, batch: int = 8):
        self.files, self.preprocess, self.batch = list(files), preprocess, batch
        self.skipped: list[str] = []
        batches = self._iter()
        first = next(batches, None)  # decode the first batch now: no readable image is an error up front
        self.empty = first is None
        self._batches = itertools.chain([first], batches) if first is not None else batches

    def _iter(self) -> Iterator[dict[str, np.ndarray]]:
        buf = []
        for path in self.files:
            try:
                buf.append(load_image(path, self.preprocess))
            except ImageDecodeError as err:
                self.skipped.append(f"{path}: {err}")
                continue
            if len(buf) == self.batch:
                yield {ENCODER.input_names[0]: np.stack(buf)}
                buf = []
        if buf:
            yield {ENCODER.input_names[0]: np.stack(buf)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_reader(files: Sequence[Path], source, preprocess: PreprocessConfig,
                       batch: int = 8) -> ImageCalibrationReader:
    """A reader over ``files``, or ``BundleError`` naming ``source`` when none of them decodes."""
    reader = ImageCalibrationReader(files, preprocess, batch)
    if reader.empty:
        raise BundleError(f"{source}: none of the {len(files)} calibration images could be read "
                          f"({reader.skipped[0]})")
    return reader


def quantize_encoder(bundle_dir: str | Path, calib_images: str | Path | Sequence[str | Path],
                     method: str = "minmax", limit: int | None = 256, out: str | Path | None = None) -> Path:
    """Write a static-QDQ int8 copy of the bundle's fp32 encoder; returns its path.

    Parameters
    ----------
    bundle_dir : a built bundle (its manifest gives the preprocessing).
    calib_images : a folder of images (searched recursively) or a list of image paths.
    method : calibration method, ``minmax``, ``entropy`` or ``percentile``.
    limit : use at most this many images (sorted by path) for calibration.
    out : output path; ``encoder.int8.onnx`` in the bundle by default.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    bundle = load_bundle(bundle_dir)
    encoder, _ = bundle.graph_paths("fp32")
    files = calibration_files(calib_images, limit)
    if not files:
        raise BundleError(f"{calib_images}: no images to calibrate the int8 encoder with")
    reader = calibration_reader(files, calib_images, bundle.config.preprocess)
    out = Path(out) if out else bundle.dir / graph_file(ENCODER, "int8")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "encoder.pre.onnx"
        quant_pre_process(str(encoder), str(prepared))
        name_nodes(prepared)
        quantize_prepared(prepared, out, reader, method)
    return out


def name_nodes(path: Path) -> onnx.ModelProto:
    """Name the nodes pre-processing left unnamed (so they can be excluded); saves and returns the model."""
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_pre_{i}"
    onnx.save(model, str(path))
    return model


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes with no convolution downstream: the last conv and the head after it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv: dict[int, bool] = {}  # id(node) -> a Conv is downstream of it (or it is one)
    for node in reversed(model.graph.node):  # the graph is topologically sorted
        below = [feeds_conv[id(c)] for out in node.output for c in consumers.get(out, [])]
        feeds_conv[id(node)] = node.op_type == "Conv" or any(below)
    return [n.name for n in model.graph.node
            if not any(feeds_conv[id(c)] for out in n.output for c in consumers.get(out, []))]


def quantize_prepared(prepared: Path, out: Path, reader, method: str, nodes_to_exclude: Sequence[str] = (),
                      ranges: Path | None = None) -> None:
    """Static QDQ quantisation of a pre-processed graph: per-channel int8 weights, uint8 activations.

    The head (``head_nodes``) and ``nodes_to_exclude`` stay fp32.

    uint8 activations with int8 weights is onnxruntime's choice for x86 CPUs with VNNI (their
    product is one VPDPBUSD); int8 activations measured 2x slower there. ``ranges``: a
    calibration cache file, written on the first call and reused (``reader`` unused) afterwards.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    cached = ranges is not None and ranges.is_file()
    exclude = list(dict.fromkeys([*nodes_to_exclude, *head_nodes(onnx.load(str(prepared)))]))
    try:
        quantize_static(str(prepared), str(out), None if cached else reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=calibrate,
                        calibration_cache_path=None if ranges is None else str(ranges))
    except ValueError as err:  # onnxruntime's histogram collector cannot bin a near-constant tensor
        raise BundleError(f"int8 calibration ({method}) failed: {err}; try another calibration method") from None
