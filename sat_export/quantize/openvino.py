"""NNCF int8 encoder for the OpenVINO backend, judged by the task rule of the ONNX Runtime int8 search.

The bundle's fp32 encoder, read by OpenVINO, is quantised by NNCF post-training quantisation
(``nncf.quantize``, default preset: symmetric int8, fast bias correction) on the calibration images
through the model's preprocessing, one image a sample. The images are split as ``quantize_search``
splits them (``split_held_back``) and the held-back half judges the result as it judges its int8
encoder (``HeldBack``: ``training.faithful.judge`` against the fp32 graphs' captions, human captions
as references where the calibration set has them). The IR (``encoder.openvino-int8.xml`` + ``.bin``)
is registered in the manifest under ``openvino_int8`` with that verdict, so it is checksummed like
every file; the encoder is kept whatever the verdict, which the record states.

Measured on the bench's reference ResNet-101 (48 calibration + 48 held-back images): BLEU-4 98.2 %
and CIDEr-D 100.8 % of fp32's, 81 % identical captions; features within 2-4 % (relative L2) of fp32
on most images, but the few whose activations exceed the calibrated ranges are clipped (4 of 64
bench images at 0.27-0.79).
The head stays quantised: NNCF rounds the inputs of layers with weights, never a graph output, and
leaving the head in fp32 (``quantize.head_nodes`` as an ignored scope) changed nothing measurable.
Range estimators HISTOGRAM and MINMAX kept 50-56 % of the captions, and NNCF's accuracy-aware
``quantize_with_accuracy_control`` took 475 s without raising agreement: neither is used.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from engines.contract import ENCODER
from engines.errors import BackendUnavailable
from engines.openvino import OpenVinoBackend, import_openvino
from sat_export.bundle.format import graph_file, load_bundle, write_manifest
from sat_export.options import DEFAULT_TARGET
from sat_export.quantize.search import split_calibration, verdict_line
from training.console import make_console

OPENVINO_INT8 = "openvino-int8"  # the encoder's precision tag in its file name


def import_nncf():
    """``nncf``, or ``BackendUnavailable`` with the install command."""
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("NNCF is not installed: pip install 'sat-export[openvino]'") from None
    return nncf


def quantize_openvino_encoder(bundle_dir: str | Path, calib_images: str | Path | Sequence[str | Path],
                              target: float = DEFAULT_TARGET, limit: int | None = 256,
                              captions: str | Path | None = None, console: Console | None = None,
                              beam: int = 1) -> dict:
    """Quantise the bundle's encoder with NNCF, judge it on held-back images, register it; returns its record.

    Parameters
    ----------
    bundle_dir : a built bundle with fp32 graphs (its manifest gives the preprocessing).
    calib_images : a folder of images (searched recursively) or a list of image paths.
    target : each task metric (BLEU-4, CIDEr-D) should reach this share of fp32's; the verdict says
        whether it did (the encoder is kept either way, as the onnxruntime int8 search keeps its best).
    limit : use at most this many images (sorted by path), held-back ones included.
    captions : the calibration images' captions file (see ``quantize_search.calibration_references``).
    beam : the beam the bundle will be decoded with (1: greedy); the held-back images are captioned with it.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    ov, nncf = import_openvino(), import_nncf()
    console = console or make_console()
    start = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    reader, held, _ = split_calibration(bundle, calib_images, limit, captions, target, beam)
    samples = list(iter(reader.get_next, None))  # NNCF reads them more than once
    model = ov.Core().read_model(str(held.encoder))
    quantised = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    xml = graph_file(ENCODER, OPENVINO_INT8, ".xml")
    ov.save_model(quantised, str(bundle.dir / xml), compress_to_fp16=False)
    verdict, rel = held.score(bundle.dir / xml, OpenVinoBackend)
    record = {"encoder": xml, "method": "nncf.quantize (default preset)",
              "openvino": ov.__version__, "nncf": nncf.__version__, "target": target, "n_calib": len(samples),
              "n_held_back": len(held.captions), "beam": beam,
              "references": "human captions" if held.human else "fp32 captions",
              "verdict": verdict, "feature_rel_l2": rel, "reached": verdict["faithful"],
              "seconds": round(time.perf_counter() - start, 1)}
    write_manifest(bundle.dir, {**bundle.manifest, "openvino_int8": record})
    console.print(f"NNCF int8 encoder {xml} ({record['seconds']:.0f} s): {verdict_line(verdict)} on "
                  f"{verdict['images']} held-back images against {record['references']}; features rel L2 vs the "
                  f"fp32 graph {rel:.3f}",
                  highlight=False, soft_wrap=True)
    return record
