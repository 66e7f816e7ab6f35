"""A stand-in for the TensorRT 10 Python API that ``engines.trt`` and ``engines.trt_build`` call, for
machines without TensorRT. Each call returns what NVIDIA documents for it (TensorRT
``python/docstrings/infer/pyCoreDoc.h`` and ``include/NvInferRuntime.h``, v10.0 to v10.16; Polygraphy's
``backend/trt/runner.py`` checks the same return values):

- ``IExecutionContext.set_input_shape``: False for a shape outside the optimisation profile (nothing set);
- ``set_tensor_address``: False for a name that is not an I/O tensor of the engine; "the pointer must have at
  least 256-byte alignment": the stand-in refuses (False) a pointer that is not;
- ``get_tensor_shape``: -1 in an output's dims until every input shape is set;
- ``execute_async_v3(stream)``: False when an input shape or a tensor address is missing;
- ``ICudaEngine.get_tensor_profile_shape(name, 0)``: ``[min, opt, max]`` shapes;
- ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)``: False for a cache made on another device;
  ``create_timing_cache(data)``: the ``ITimingCache*`` of ``createTimingCache`` (``pyCore.cpp``), None where
  TensorRT cannot read the data (a cache of another TensorRT version); Polygraphy's loader also guards it
  raising, so the stand-in can do either (``stale_cache``);
  ``get_timing_cache()``: may be None; ``add_optimization_profile``: the profile's index, -1 if invalid;
  ``Builder.create_network(flags)``: ``1 << STRONGLY_TYPED`` makes a strongly typed network;
  ``build_serialized_network``: None when the build fails.

Engines compute for real, with a torch function over the tensors at the bound addresses, so the buffers must
be host memory here (``on_host``); a plan file holds the name of the graph it stands for and, when built by
the stand-in, the batch profile it was built with (``encoder:1,16,64``).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import types
from pathlib import Path

import torch

from engines.contract import BATCH, BEAMS, DECODER_STEP, ENCODER
from engines.trt_build import BEAM_PROFILE

FOREIGN_CACHE = b"timing cache from another GPU"
STALE_CACHE = b"timing cache from another TensorRT version"
ALIGNMENT = 256
_DTYPES = {torch.float32: "DataType.FLOAT", torch.int64: "DataType.INT64"}


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.launches = engine, {}, {}, []

    def set_input_shape(self, name, shape):
        if name not in self.engine.spec.input_names:
            return False
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(low) or not all(lo <= n <= hi for lo, n, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.names or ptr % ALIGNMENT:
            return False
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        spec = self.engine.spec
        if set(self.shapes) != set(spec.input_names):
            return (-1,)
        sizes = spec.input_sizes(self.shapes[n] for n in spec.input_names)
        return next(t for t in spec.outputs if t.name == name).shape(self.engine.dims, sizes)

    def execute_async_v3(self, stream_handle):
        if self.engine.fail_launch or set(self.shapes) != set(self.engine.spec.input_names) \
                or set(self.addresses) != self.engine.names:
            return False
        inputs = [_read(self.addresses[t.name], self.shapes[t.name], t.dtype) for t in self.engine.spec.inputs]
        with torch.inference_mode():
            outputs = self.engine.fn(*inputs)
        for t, out in zip(self.engine.spec.outputs, outputs):
            out = out.float().contiguous()
            ctypes.memmove(self.addresses[t.name], out.data_ptr(), out.numel() * out.element_size())
        self.launches.append((stream_handle, inputs[0].size(0)))
        return True


def _read(ptr: int, shape: tuple, dtype: str) -> torch.Tensor:
    dtype = getattr(torch, dtype)
    n = int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(bytearray((ctypes.c_char * n).from_address(ptr)), dtype=dtype).view(shape).clone()


class _Engine:
    def __init__(self, spec, fn, dims, profile, fail_launch, device):
        self.spec, self.fn, self.dims, self.profile, self.fail_launch = spec, fn, dims, profile, fail_launch
        self.names = set(spec.input_names) | set(spec.output_names)
        self.num_io_tensors = len(self.names)
        self.device = device  # the current CUDA device when it was deserialised
        self.contexts = []

    def get_tensor_name(self, i):
        return [*self.spec.input_names, *self.spec.output_names][i]

    def get_tensor_dtype(self, name):
        spec = next(t for t in (*self.spec.inputs, *self.spec.outputs) if t.name == name)
        return _DTYPES[getattr(torch, spec.dtype)]

    def get_tensor_profile_shape(self, name, profile_index):
        spec = next(t for t in self.spec.inputs if t.name == name)
        return [spec.shape(self.dims, {BATCH: b, BEAMS: k}) for b, k in zip(self.profile, BEAM_PROFILE)]

    def create_execution_context(self):
        self.contexts.append(_Context(self))
        return self.contexts[-1]


def tensorrt(version: str, model=None, dims=None, profile=(1, 2, 4), fail_launch=False, timing_cache="kept",
             stale_cache="none", fail_build=False):
    """A ``tensorrt`` module: engines run ``model`` (``encode``/``step``) within the batch ``profile`` (or the one
    their plan was built with); ``timing_cache``: what ``get_timing_cache()`` gives after a build ("kept", or
    "none"); ``stale_cache``: what ``create_timing_cache(STALE_CACHE)`` does ("none": returns None, "raise");
    ``fail_build``: every build fails."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # as an installed module has one
    trt.__version__ = version
    trt.engines = []  # every engine deserialised, for the test to look at
    trt.builds = []  # (network flags, builder flags set, timing cache given, profile, shapes by input) per build

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            name, _, built = data.decode(errors="replace").partition(":")
            graph = {ENCODER.name: (ENCODER, model and model.encode), DECODER_STEP.name: (DECODER_STEP, model and
                                                                                       model.step)}.get(name)
            if graph is None:
                return None
            batches = tuple(map(int, built.split(","))) if built else profile
            trt.engines.append(_Engine(*graph, dims, batches, fail_launch, torch.cuda.current_device()))
            return trt.engines[-1]

    class _Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timings"

    class _Config:
        def __init__(self):
            self.flags, self.cache, self.profile = set(), None, None

        def create_timing_cache(self, data):
            if bytes(data) == STALE_CACHE:
                if stale_cache == "raise":
                    raise RuntimeError("stand-in: cannot read the serialized timing cache")
                return None
            return _Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data == FOREIGN_CACHE and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache if timing_cache == "kept" else None

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profile, self.shapes = profile.batches, profile.shapes
            return 0

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return types.SimpleNamespace(flags=flags, graph=None)

        def create_builder_config(self):
            return _Config()

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(batches=None, shapes={})

            def set_shape(name, *shapes):  # min, opt, max
                profile.batches, profile.shapes[name] = tuple(s[0] for s in shapes), shapes
            profile.set_shape = set_shape
            return profile

        def build_serialized_network(self, network, config):
            trt.builds.append((network.flags, set(config.flags), config.cache and config.cache.data, config.profile,
                               config.shapes))
            if fail_build:
                return None
            return f"{network.graph}:{','.join(map(str, config.profile))}".encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.graph = Path(path).name.split(".")[0]  # encoder.fp16.onnx -> encoder
            return True

    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32")
    return trt


def on_host(backend):
    """Keep the backend's CUDA stream, device index and engines, but its buffers in host memory, where the
    stand-in engines read and write them."""
    backend.device = torch.device("cpu")
    for engine in backend._engines.values():
        engine.device = backend.device
    return backend
