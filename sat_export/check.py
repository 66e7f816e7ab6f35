"""``sat-export check``: a bundle verified end to end, as any backend would load it and more.

The manifest's schema, seal and every file's checksum (``load_bundle``), each graph's inputs and
outputs against the contract (``check_graph_io``), a smoke inference of every precision
(``parity.smoke``), and TensorRT engines against this machine's TensorRT and GPU where they exist.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.contract import DECODER_STEP, ENCODER
from engines.errors import BackendUnavailable
from engines.ort import OrtBackend
from sat_export.bundle import Bundle, load_bundle
from sat_export.export import check_graph_io
from sat_export.parity import smoke


def check_bundle(bundle_dir: str | Path, batch: int = 2) -> dict:
    """Load the bundle, check each graph's I/O, run a smoke inference; returns a summary.

    The summary lists the files checked, the precisions run and the parity verdicts stored in the
    manifest. TensorRT engines are checked for their GPU and TensorRT version only where TensorRT
    is available.
    """
    bundle = load_bundle(bundle_dir)
    dims = bundle.config.dims()
    crop = bundle.config.preprocess.crop
    images = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    for precision in bundle.precisions:
        encoder, decoder = bundle.graph_paths(precision)
        for spec, path in ((ENCODER, encoder), (DECODER_STEP, decoder)):
            check_graph_io(path, spec, dims)
        with OrtBackend(encoder, decoder, bundle.config, bundle.vocab) as ort:
            smoke(ort, images, {ENCODER.name: encoder, DECODER_STEP.name: decoder})
    summary = {"bundle": str(bundle_dir), "files": sorted(bundle.manifest["files"]), "precisions": bundle.precisions,
               "parity": {p: r.get("passed") for p, r in bundle.manifest["parity"].items()}}
    if bundle.manifest.get("tensorrt"):
        summary["tensorrt"] = _check_engines(bundle)
    return summary


def _check_engines(bundle: Bundle) -> str:
    from sat_export.tensorrt import check_engines

    try:
        check_engines(bundle)
    except BackendUnavailable as err:
        return f"not checked: {err}"
    return "compatible with this GPU and TensorRT"
