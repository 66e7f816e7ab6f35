"""``sat-export check``: a bundle verified end to end, as any backend would load it and more.

The manifest's schema, seal and every file's checksum (``load_bundle``), each graph's inputs and
outputs against the contract (``check_graph_io``), a smoke inference of every precision
(``parity.smoke``), and TensorRT engines against this machine's TensorRT and GPU where they exist.
The parity verdicts ``build`` stored are reported per precision (``stored_gates``); ``check
--strict`` refuses a bundle whose gate failed or was skipped (``require_passed_gates``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.contract import DECODER_STEP, ENCODER
from engines.errors import BackendUnavailable
from engines.ort import OrtBackend
from sat_export.bundle.format import Bundle, load_bundle
from sat_export.errors import ParityError
from sat_export.export.onnx import check_graph_io
from sat_export.export.parity import OutputDiff, failure_reason, smoke


def check_bundle(bundle_dir: str | Path, batch: int = 2) -> dict:
    """Load the bundle, check each graph's I/O, run a smoke inference; returns a summary.

    The summary lists the files checked, the precisions run and the parity verdicts stored in the
    manifest (``stored_gates``). TensorRT engines are checked for their GPU and TensorRT version only
    where TensorRT is available.
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
               "parity": stored_gates(bundle.manifest)}
    if bundle.manifest.get("tensorrt"):
        summary["tensorrt"] = _check_engines(bundle)
    return summary


def stored_gates(manifest: dict) -> dict[str, dict]:
    """The parity gate ``build`` stored for each precision (and ``tensorrt``) of ``manifest``.

    Returns ``{name: {"passed": True | False | None, "verdict": one line}}``; ``passed`` is None when
    the gate was skipped (``--no-verify``) or left no record.
    """
    names = [*manifest["precisions"], *(["tensorrt"] if manifest.get("tensorrt") else [])]
    gates = {}
    for name in names + [n for n in manifest["parity"] if n not in names]:
        record = manifest["parity"].get(name)
        if record is None:
            gates[name] = {"passed": None, "verdict": "no parity record in the manifest"}
        elif record.get("skipped"):
            gates[name] = {"passed": None, "verdict": f"skipped ({record['skipped']})"}
        else:
            gates[name] = {"passed": bool(record["passed"]),
                           "verdict": "passed" if record["passed"] else f"failed: {_failure(record)}"}
    return gates


def require_passed_gates(bundle_dir: str | Path, gates: dict[str, dict]) -> None:
    """``ParityError`` in one line naming every gate of ``stored_gates`` that did not pass (``check --strict``)."""
    bad = [f"{name} {gate['verdict']}" for name, gate in gates.items() if not gate["passed"]]
    if bad:
        raise ParityError(f"{bundle_dir}: parity gate not passed (--strict): {'; '.join(bad)}")


def _failure(record: dict) -> str:
    """The first failing output of a stored report and why it failed, else the captions."""
    for out in record["outputs"]:
        if not out["ok"]:
            d = OutputDiff.from_record(out)
            return f"{d.graph} '{d.output}' {failure_reason(d, record['tolerances'])}"
    cap = record["captions"]
    return f"greedy captions identical on {cap['identical']}/{cap['images']} images"


def _check_engines(bundle: Bundle) -> str:
    from sat_export.bundler.tensorrt import check_engines

    try:
        check_engines(bundle)
    except BackendUnavailable as err:
        return f"not checked: {err}"
    return "compatible with this GPU and TensorRT"
