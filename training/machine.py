"""What this machine offers the runtimes: the cores this process may use and the CPU's instruction sets.

Detected once, here, and never assumed: machines of one project differ (an AMD EPYC with AVX-512
VNNI + BF16, another with AVX2 only). What depends on it:

- bf16: autocast is fast only with native bf16 dot products (AVX-512 BF16 or AMX); elsewhere it is
  emulated and several times slower than fp32, so training and the bench fall back to fp32.
- int8: with VNNI (or AMX) a u8 x s8 dot product accumulates in 32 bits; without it onnxruntime's
  AVX2 kernels use ``VPMADDUBSW``, whose 16-bit pair sums can saturate, so quantisation for such a
  CPU uses 7-bit weights (``reduce_range``).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

# torch.cpu's feature probes (cpuinfo-based, on every OS), or'ed with Linux's flags (``avx_vnni``: AVX2-VNNI).
_PROBES = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "vnni": "_is_vnni_supported",
           "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
_LINUX_FLAGS = {"avx2": ("avx2",), "avx512": ("avx512f",), "vnni": ("avx512_vnni", "avx_vnni"),
                "avx512_bf16": ("avx512_bf16",), "amx": ("amx_tile",)}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, torch's kernel level (``AVX512``, ``AVX2``...) and the features that matter."""

    model: str
    capability: str
    features: dict[str, bool]

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware: bf16 autocast is faster than fp32 only then."""
        return self.features["avx512_bf16"] or self.features["amx"]

    @property
    def int8_dot(self) -> bool:
        """u8 x s8 dot products accumulating in 32 bits (VNNI or AMX): int8 without saturation."""
        return self.features["vnni"] or self.features["amx"]

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``AMD EPYC (AVX512; vnni, avx512_bf16)``."""
        have = [name for name in ("vnni", "avx512_bf16", "amx") if self.features[name]]
        return f"{self.model} ({self.capability}; {', '.join(have) or 'no vnni, no native bf16'})"

    def to_dict(self) -> dict:
        return {"model": self.model, "capability": self.capability, "features": self.features,
                "native_bf16": self.native_bf16, "int8_dot": self.int8_dot}


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU, from torch's feature probes and, on Linux, ``/proc/cpuinfo``."""
    import torch  # here, not at the top: ``usable_cores`` is read by --help, which must not wait for torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    features = {}
    for name, probe in _PROBES.items():
        fn = getattr(torch.cpu, probe, None)
        features[name] = bool(fn is not None and fn()) or any(f in flags for f in _LINUX_FLAGS[name])
    return CpuInfo(model, torch.backends.cpu.get_cpu_capability(), features)
