"""TensorRT plan building: one ONNX graph in, one serialised engine out.

Written against the TensorRT 10/11 Python API: ``trt.Builder``, an explicit-batch network (the
only kind since TensorRT 10), ``OnnxParser``, one optimisation profile over the batch axis of every
input (min/opt/max) and the decoder step's beams axis (``BEAM_PROFILE``), a timing cache carried across builds, ``build_serialized_network``. fp16:
from TensorRT 10.12 networks are strongly typed (``BuilderFlag.FP16`` is deprecated there and gone in
11), so their fp16 engines are parsed from fp16 ONNX graphs; older TensorRT 10 parses fp32 graphs and
takes ``BuilderFlag.FP16``. Every call that reports failure by its return value is checked.
"""
from __future__ import annotations

from pathlib import Path

from engines.contract import BATCH, BEAMS, GraphSpec
from engines.errors import EngineError

DEFAULT_PROFILE = (1, 16, 64)
BEAM_PROFILE = (1, 1, 8)  # decoder rows per image: greedy (the default decoding) up to beam 8
STRONGLY_TYPED_FROM = (10, 12)  # TensorRT deprecates BuilderFlag.FP16 for strongly typed networks from here
NEW_CACHE_NOTE = "the timing cache was made on another GPU or TensorRT version: building with a new one"


def check_profile(profile: tuple[int, ...]) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch sizes with ``1 <= min <= opt <= max``."""
    if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]:
        raise ValueError(f"TensorRT batch profile must be min,opt,max with 1 <= min <= opt <= max, got {profile}")
    return tuple(int(b) for b in profile)


def strongly_typed_fp16(trt) -> bool:
    """TensorRT 10.12 and later build fp16 engines from fp16 graphs (strongly typed networks)."""
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return (major, minor) >= STRONGLY_TYPED_FROM


def build_plan(trt, onnx_path: Path, spec: GraphSpec, dims: dict[str, int], profile: tuple[int, int, int], *,
               fp16: bool = False, cache: bytes = b"") -> tuple[bytes, bytes | None, str | None]:
    """One serialised engine of ``onnx_path``, the updated timing cache and a note for the user.

    ``fp16``: an fp16 engine (a strongly typed network from TensorRT 10.12, whose graph must then be fp16
    already; ``BuilderFlag.FP16`` before). ``cache``: a serialised timing cache (``_timing_cache``). The cache
    returned is None where TensorRT has none to give. Raises ``EngineError`` naming the file.
    """
    profile = check_profile(profile)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = fp16 and strongly_typed_fp16(trt)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed
                                     else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    timing, note = _timing_cache(config, cache, onnx_path)  # kept alive until the build is done
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if not fp16:  # TF32 (on by default on Ampere and later) alone is ~1e-3 away from fp32: the gate is 1e-5
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    for t in spec.inputs:
        opt_profile.set_shape(t.name, *(t.shape(dims, {BATCH: batch, BEAMS: beams})
                                        for batch, beams in zip(profile, BEAM_PROFILE)))
    if config.add_optimization_profile(opt_profile) < 0:
        raise EngineError(f"{onnx_path}: TensorRT refused the batch profile {profile} (see its log above)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    updated = config.get_timing_cache()
    return bytes(serialized), None if updated is None else bytes(updated.serialize()), note


def _timing_cache(config, cache: bytes, onnx_path: Path):
    """The timing cache set on ``config`` and a note: ``cache``, unless TensorRT cannot read it
    (``create_timing_cache`` gives None or raises, as for a cache of another TensorRT version, which Polygraphy's
    loader guards too) or refuses it (``set_timing_cache`` False: made on another GPU); then a new, empty one."""
    if cache:
        try:
            timing = config.create_timing_cache(cache)
        except (RuntimeError, TypeError, ValueError):  # what pybind11 makes of a C++ exception
            timing = None
        if timing is not None and config.set_timing_cache(timing, False):  # ignore_mismatch=False
            return timing, None
    timing = config.create_timing_cache(b"")
    if timing is None or not config.set_timing_cache(timing, False):
        raise EngineError(f"{onnx_path}: TensorRT refused a new, empty timing cache")
    return timing, (NEW_CACHE_NOTE if cache else None)
