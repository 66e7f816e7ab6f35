"""TensorRT engines (``encoder.plan``, ``decoder_step.plan``) built from a bundle's ONNX graphs.

Written against the TensorRT 10/11 Python API: ``trt.Builder``, an explicit-batch network
(the only kind since TensorRT 10), ``OnnxParser``, one optimisation profile over the batch axis
of every input (min/opt/max), a timing cache reused across builds, ``build_serialized_network``.
fp16: TensorRT 11 networks are strongly typed, so its fp16 engines are parsed from the fp16
ONNX graphs; TensorRT 10 parses the fp32 graphs and takes ``BuilderFlag.FP16``. An engine is
only valid for the TensorRT version and GPU that built it, so both are recorded and checked.
"""
from __future__ import annotations

import torch

from engines.trt import check_engine_compatible, import_tensorrt
from sat_export.bundle import Bundle, load_bundle
from sat_export.contract import DECODER_STEP, ENCODER, GraphSpec
from sat_export.errors import BundleError
from sat_export.export import graph_file

DEFAULT_PROFILE = (1, 16, 64)
TIMING_CACHE = "timing.cache"


def check_profile(profile: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch sizes with ``1 <= min <= opt <= max``."""
    if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]:
        raise ValueError(f"TensorRT batch profile must be min,opt,max with 1 <= min <= opt <= max, got {profile}")
    return tuple(int(b) for b in profile)


def build_engines(bundle_dir, fp16: bool = False, profile: tuple[int, int, int] = DEFAULT_PROFILE) -> dict:
    """Build both engines into the bundle folder; returns the manifest's ``tensorrt`` section.

    Raises ``BackendUnavailable`` (one line) where TensorRT or a CUDA GPU is missing.
    """
    trt = import_tensorrt()
    profile = check_profile(profile)
    bundle = load_bundle(bundle_dir)
    strongly_typed = fp16 and int(trt.__version__.split(".")[0]) >= 11
    source = "fp16" if strongly_typed else "fp32"
    if source not in bundle.precisions:
        raise BundleError(f"{bundle.dir}: TensorRT {trt.__version__} builds fp16 engines from fp16 ONNX graphs; "
                          "build with --fp16 --trt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = bundle.dir / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    files = {}
    for spec, onnx_path in zip((ENCODER, DECODER_STEP), bundle.graph_paths(source)):
        plan, cache = _build(trt, builder, logger, onnx_path, spec, bundle.config.dims(), profile,
                             fp16_flag=fp16 and not strongly_typed, strongly_typed=strongly_typed, cache=cache)
        path = bundle.dir / graph_file(spec, suffix=".plan")
        path.write_bytes(plan)
        files[spec.name] = path.name
    cache_path.write_bytes(cache)
    device = torch.cuda.current_device()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "precision": "fp16" if fp16 else "fp32", "onnx": source,
            "profile": dict(zip(("min", "opt", "max"), profile)), "files": files, "timing_cache": TIMING_CACHE}


def _build(trt, builder, logger, onnx_path, spec: GraphSpec, dims: dict[str, int], profile: tuple[int, int, int], *,
           fp16_flag: bool, strongly_typed: bool, cache: bytes) -> tuple[bytes, bytes]:
    """One serialised engine and the updated timing cache."""
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(typed) if strongly_typed and typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_timing_cache(config.create_timing_cache(cache), False)  # ignore_mismatch=False
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for t in spec.inputs:
        opt_profile.set_shape(t.name, *(t.shape(dims, batch) for batch in profile))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def check_engines(bundle: Bundle) -> None:
    """Refuse engines built by another TensorRT version or on another GPU model."""
    trt = import_tensorrt()
    encoder, decoder, built_with = bundle.engine_paths()
    gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    for plan in (encoder, decoder):
        check_engine_compatible(plan, built_with, trt.__version__, gpu)
