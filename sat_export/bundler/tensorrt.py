"""A bundle's TensorRT engines (``encoder.plan``, ``decoder_step.plan``): built, recorded, checked.

Plans are built from the bundle's ONNX graphs by ``engines.trt_build`` (fp32 graphs, or from
TensorRT 10.12 the fp16 ones for fp16 engines), with a timing cache kept in the bundle (one made on
another GPU is replaced, not fatal). An engine is only valid for the TensorRT version and GPU that built
it, so both are recorded in the manifest and checked before an engine is opened (``open_engines``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.contract import DECODER_STEP, ENCODER
from engines.trt import TensorRTBackend, import_tensorrt
from engines.trt_build import DEFAULT_PROFILE, build_plan, check_profile, strongly_typed_fp16
from sat_export.bundle.format import TIMING_CACHE, Bundle, graph_file, load_bundle, read_manifest, write_manifest
from sat_export.errors import BundleError


def build_engines(bundle_dir, fp16: bool = False, profile: tuple[int, int, int] = DEFAULT_PROFILE,
                  notes: list[str] | None = None) -> dict:
    """Build both engines into the bundle folder; returns the manifest's ``tensorrt`` section.

    ``notes`` receives what the user should know (a timing cache from another GPU was replaced).
    Raises ``BackendUnavailable`` (one line) where TensorRT or a CUDA GPU is missing.
    """
    trt = import_tensorrt()
    profile = check_profile(profile)
    bundle = load_bundle(bundle_dir)
    source = "fp16" if fp16 and strongly_typed_fp16(trt) else "fp32"
    if source not in bundle.precisions:
        raise BundleError(f"{bundle.dir}: TensorRT {trt.__version__} builds fp16 engines from fp16 ONNX graphs; "
                          "build with --fp16 --trt")
    cache_path = bundle.dir / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    files = {}
    for spec, onnx_path in zip((ENCODER, DECODER_STEP), bundle.graph_paths(source)):
        plan, cache, note = build_plan(trt, onnx_path, spec, bundle.config.dims(), profile, fp16=fp16,
                                       cache=cache or b"")
        if note and notes is not None:
            notes.append(f"{cache_path}: {note}")
        path = bundle.dir / graph_file(spec, suffix=".plan")
        path.write_bytes(plan)
        files[spec.name] = path.name
    if cache is None:  # TensorRT gave none back: a stale one must not be kept
        cache_path.unlink(missing_ok=True)
    else:
        cache_path.write_bytes(cache)
    device = torch.cuda.current_device()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "precision": "fp16" if fp16 else "fp32", "onnx": source,
            "profile": dict(zip(("min", "opt", "max"), profile)), "files": files,
            "timing_cache": None if cache is None else TIMING_CACHE}


def engines_for(bundle_dir, precision: str, profile: tuple[int, int, int]) -> None:
    """Make the bundle's TensorRT engines ``precision`` (fp32 or fp16) engines for batch ``profile``, built by this
    TensorRT on this GPU: kept when they are, else built now and recorded in the manifest (no parity gate: the
    caller judges them, as ``sat-bench`` does). Raises as ``build_engines``."""
    trt = import_tensorrt()
    manifest = read_manifest(bundle_dir)
    want = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(torch.cuda.current_device()),
            "precision": precision, "profile": dict(zip(("min", "opt", "max"), check_profile(profile)))}
    have = manifest.get("tensorrt") or {}
    if any(have.get(key) != value for key, value in want.items()):
        manifest["tensorrt"] = build_engines(bundle_dir, precision == "fp16", profile)
        write_manifest(bundle_dir, manifest)


def check_engine_compatible(plan: Path, built_with: dict, trt_version: str, gpu_name: str) -> None:
    """Refuse an engine built by another TensorRT version or on another GPU model."""
    if built_with.get("tensorrt") != trt_version:
        raise BundleError(f"{plan}: engine built with TensorRT {built_with.get('tensorrt')}, this is "
                          f"TensorRT {trt_version}; rebuild it with `sat-export build --trt`")
    if built_with.get("gpu") != gpu_name:
        raise BundleError(f"{plan}: engine built on {built_with.get('gpu')}, this GPU is {gpu_name}; "
                          "rebuild it with `sat-export build --trt` on this machine")


def check_engines(bundle: Bundle, device: torch.device | str | None = None) -> tuple[Path, Path]:
    """The bundle's ``(encoder.plan, decoder_step.plan)``, refused if built by another TensorRT or by
    another GPU model than ``device`` (default: the current CUDA device)."""
    trt = import_tensorrt()
    encoder, decoder, built_with = bundle.engine_paths()
    gpu = torch.cuda.get_device_name(device)
    for plan in (encoder, decoder):
        check_engine_compatible(plan, built_with, trt.__version__, gpu)
    return encoder, decoder


def open_engines(bundle: Bundle, device: torch.device | str = "cuda", precision: str = "fp32") -> TensorRTBackend:
    """The bundle's engines on ``device``, checked first: TensorRT version, GPU model, and ``precision``, which must
    be the one they were built with (``fp32`` or ``fp16``), so a run that asks for fp32 never runs fp16 engines."""
    device = torch.device(device)
    encoder, decoder = check_engines(bundle, device)  # says what is missing before looking at engines
    built = bundle.manifest["tensorrt"]["precision"]
    if precision != built:
        raise BundleError(f"{bundle.dir}: its TensorRT engines are {built}, not {precision}; ask for {built} "
                          f"(--precision {built}) or rebuild them with "
                          f"`sat-export build{' --fp16' if precision == 'fp16' else ''} --trt`")
    return TensorRTBackend(encoder, decoder, bundle.config, bundle.vocab, device, built)
