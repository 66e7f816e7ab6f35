"""CPU facts are detected, and what follows from them (native bf16, 32-bit int8 dot products)."""
import torch

from training.machine import CpuInfo, cpu_info, usable_cores

FEATURES = dict(avx2=True, avx512=False, vnni=False, avx512_bf16=False, amx=False)


def test_cpu_info_agrees_with_torch_and_describes_itself():
    info = cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.features["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    assert info.model in info.describe() and info.capability in info.describe()
    assert usable_cores() >= 1


def test_avx2_alone_has_neither_native_bf16_nor_int8_dot_products():
    avx2 = CpuInfo("some x86", "AVX2", FEATURES)
    assert not avx2.native_bf16 and not avx2.int8_dot
    assert "no vnni, no native bf16" in avx2.describe()
    epyc = CpuInfo("AMD EPYC", "AVX512", {**FEATURES, "avx512": True, "vnni": True, "avx512_bf16": True})
    assert epyc.native_bf16 and epyc.int8_dot and "vnni, avx512_bf16" in epyc.describe()
    assert CpuInfo("x", "AVX512", {**FEATURES, "amx": True}).native_bf16
