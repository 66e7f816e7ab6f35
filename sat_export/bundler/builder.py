"""``sat-export build``: checkpoint -> verified bundle, one step after another.

fp32 graphs are exported and held to the parity gate; the manifest (with the report) is written
before any failure is raised, so a failed build keeps its report. Optional steps then add an
fp16 pair, an int8 encoder and TensorRT engines, each registered in the manifest and each held to
the gate of its precision (every candidate, TensorRT engines too, judged against a float64
evaluation of the model beside eager fp32's own error).
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from engines.contract import DECODER_STEP, ENCODER
from sat_export.bundle.format import load_bundle, new_manifest, write_manifest
from sat_export.export.onnx import export_onnx
from sat_export.export.parity import Float64Oracle, ParityReport, print_report, raise_if_failed, verify, verify_onnx
from sat_export.options import BuildOptions
from training.checkpoint import load_checkpoint
from training.console import make_console
from training.model import ShowAttendTell
from training.vocab import Vocab


def build_bundle(ckpt_path: str | Path, out_dir: str | Path, options: BuildOptions = BuildOptions(),
                 console: Console | None = None) -> Path:
    """Export, verify and write a bundle for the checkpoint at ``ckpt_path``; returns ``out_dir``.

    Raises ``CheckpointError`` for an unreadable checkpoint, ``ParityError`` when an exported
    graph is out of tolerance (after writing the manifest with its report), ``BackendUnavailable``
    when ``--trt`` cannot run here.
    """
    console = console or make_console()
    if options.trt:  # fail in one line before minutes of export when TensorRT cannot run here
        from engines.trt import import_tensorrt

        import_tensorrt()
    ckpt = load_checkpoint(ckpt_path)
    model, out_dir = ckpt.build_model(), Path(out_dir)
    manifest = new_manifest(ckpt.config, ckpt.vocab, options.opset)
    for precision in ("fp32", "fp16") if options.fp16 else ("fp32",):
        paths = _export(model, out_dir, precision, options.opset, console)
        manifest["precisions"][precision] = {name: p.name for name, p in paths.items()}
        _gate(model, ckpt.vocab, out_dir, manifest, precision, options.verify, console)
    if options.int8_calib is not None:
        from sat_export.quantize.search import search_int8_encoder

        start = time.perf_counter()
        search = search_int8_encoder(out_dir, options.int8_calib, options.int8_method, options.int8_target,
                                     console=console, captions=options.int8_captions, beam=options.int8_beam)
        int8, manifest["int8"] = search.path, search.to_dict()
        console.print(f"quantised {int8.name} ({_mb(int8)}) in {time.perf_counter() - start:.1f} s", highlight=False)
        if not search.reached:
            console.print(f"[yellow]int8 target not reached[/]: on {search.n_held_back} held-back images the int8 "
                          f"encoder keeps {search.worst_ratio:.1%} of fp32's BLEU-4 or CIDEr-D "
                          f"(target {search.target:.0%}; identical captions {search.agreement:.1%}), "
                          f"with {len(search.excluded_groups)} groups "
                          "left in fp32; the encoder is kept, its record is the manifest's 'int8' entry",
                          highlight=False, soft_wrap=True)
        manifest["precisions"]["int8"] = {ENCODER.name: int8.name,  # and the fp32 step, not the last one exported
                                          DECODER_STEP.name: manifest["precisions"]["fp32"][DECODER_STEP.name]}
        _gate(model, ckpt.vocab, out_dir, manifest, "int8", options.verify, console)
    if options.trt:
        from sat_export.bundler.tensorrt import build_engines

        start = time.perf_counter()
        notes: list[str] = []
        manifest["tensorrt"] = build_engines(out_dir, fp16=options.fp16, profile=options.trt_profile, notes=notes)
        console.print(f"built TensorRT engines in {time.perf_counter() - start:.1f} s", highlight=False)
        for note in notes:
            console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)
        write_manifest(out_dir, manifest)  # the engines are opened through the bundle by the gate
        _gate(model, ckpt.vocab, out_dir, manifest, "tensorrt", options.verify, console)
    return out_dir


def _export(model: ShowAttendTell, out_dir: Path, precision: str, opset: int, console: Console) -> dict[str, Path]:
    start = time.perf_counter()
    paths = export_onnx(model, out_dir, precision, opset)
    sizes = ", ".join(f"{p.name} {_mb(p)}" for p in paths.values())
    console.print(f"exported {sizes} in {time.perf_counter() - start:.1f} s", highlight=False)
    return paths


def _gate(model: ShowAttendTell, vocab: Vocab, out_dir: Path, manifest: dict, graphs: str, enabled: bool,
          console: Console) -> None:
    """Parity of one set of graphs (a precision, or ``tensorrt``), recorded in the manifest (written now);
    raise if out of tolerance."""
    if not enabled:
        manifest["parity"][graphs] = {"precision": graphs, "skipped": "--no-verify", "passed": None}
        write_manifest(out_dir, manifest)
        return
    report = _tensorrt_parity(model, vocab, out_dir, manifest) if graphs == "tensorrt" else verify_onnx(
        model, vocab, *(out_dir / manifest["precisions"][graphs][g.name] for g in (ENCODER, DECODER_STEP)), graphs,
        graphs=(ENCODER,) if graphs == "int8" else (ENCODER, DECODER_STEP))
    manifest["parity"][graphs] = report.to_dict()
    write_manifest(out_dir, manifest)
    print_report(report, console)
    raise_if_failed(report, str(out_dir))


def _tensorrt_parity(model: ShowAttendTell, vocab: Vocab, out_dir: Path, manifest: dict) -> ParityReport:
    """The bundle's TensorRT engines and eager fp32 on the CPU, both judged against float64, at the engines'
    precision."""
    from engines.torch_eager import TorchBackend
    from sat_export.bundler.tensorrt import open_engines

    precision = manifest["tensorrt"]["precision"]
    with TorchBackend(model, vocab) as eager, open_engines(load_bundle(out_dir), "cuda", precision) as trt:
        return verify(eager, trt, precision, oracle=Float64Oracle(model, vocab))


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"

