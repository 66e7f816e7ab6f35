"""TensorRT plan building: one ONNX graph in, one serialised engine out.

Written against the TensorRT 10/11 Python API: ``trt.Builder``, an explicit-batch network (the
only kind since TensorRT 10), ``OnnxParser``, one optimisation profile over the batch axis of every
input (min/opt/max), a timing cache carried across builds, ``build_serialized_network``. fp16:
TensorRT 11 networks are strongly typed (no precision flags), so their fp16 engines are parsed from
fp16 ONNX graphs; TensorRT 10 parses fp32 graphs and takes ``BuilderFlag.FP16``.
"""
from __future__ import annotations

from pathlib import Path

from engines.contract import GraphSpec
from engines.errors import EngineError

DEFAULT_PROFILE = (1, 16, 64)


def check_profile(profile: tuple[int, ...]) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch sizes with ``1 <= min <= opt <= max``."""
    if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]:
        raise ValueError(f"TensorRT batch profile must be min,opt,max with 1 <= min <= opt <= max, got {profile}")
    return tuple(int(b) for b in profile)


def strongly_typed_fp16(trt) -> bool:
    """TensorRT 11 and later build fp16 engines only from fp16 graphs (strongly typed networks)."""
    return int(trt.__version__.split(".")[0]) >= 11


def build_plan(trt, onnx_path: Path, spec: GraphSpec, dims: dict[str, int], profile: tuple[int, int, int], *,
               fp16: bool = False, cache: bytes = b"") -> tuple[bytes, bytes]:
    """One serialised engine of ``onnx_path`` and the updated timing cache.

    ``fp16``: an fp16 engine (a strongly typed network on TensorRT 11, whose graph must then be
    fp16 already; ``BuilderFlag.FP16`` on TensorRT 10). Raises ``EngineError`` naming the file.
    """
    profile = check_profile(profile)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strongly_typed = fp16 and strongly_typed_fp16(trt)
    network = builder.create_network(1 << int(typed) if strongly_typed and typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_timing_cache(config.create_timing_cache(cache), False)  # ignore_mismatch=False
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if not fp16:  # TF32 (on by default on Ampere and later) alone is ~1e-3 away from fp32: the gate is 1e-5
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    for t in spec.inputs:
        opt_profile.set_shape(t.name, *(t.shape(dims, batch) for batch in profile))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())
