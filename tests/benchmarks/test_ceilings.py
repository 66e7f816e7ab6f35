"""Machine rates: the encoder's MAC count and the estimate the verdict derives from GEMM rates."""
import torch
from torch import nn

import benchmarks.ceilings
from benchmarks.ceilings import encoder_macs, gemm_rates
from benchmarks.report import verdict
from tests.conftest import bench_row, fake_cpu
from training.machine import cpu_info


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)
        self.unused = nn.Linear(4, 1000)  # a decoder layer: not part of encode

    def encode(self, images):
        x = self.dw(self.conv(images))
        return self.head(x.mean(dim=(2, 3)))


def test_encoder_macs_counts_convolutions_and_linear_layers_that_encode_runs():
    macs = encoder_macs(_Encoder(), torch.randn(3, 10, 10))
    assert macs == 8 * 10 * 10 * 3 * 9 + 8 * 10 * 10 * 9 + 4 * 8


def test_gemm_rates_are_measured_for_every_precision_bf16_only_where_native(monkeypatch):
    rates = gemm_rates(size=128, repeats=1)
    assert set(rates) == {"fp32", "bf16", "int8"}
    assert rates["fp32"] > 0 and rates["int8"] > 0
    assert (rates["bf16"] is not None) == cpu_info().native_bf16
    no_bf16 = fake_cpu()
    monkeypatch.setattr(benchmarks.ceilings, "cpu_info", lambda: no_bf16)
    assert gemm_rates(size=64, repeats=1)["bf16"] is None  # "not native", not an emulation's rate


def test_verdict_estimates_int8_at_the_int8_gemm_rate_with_the_torch_decode_loop():
    rows = [bench_row("torch-fp32", "torch", 1000, 1.0, True)]
    # 1e9 MACs per image x 32 at 64 GMAC/s = 500 ms, + 100 ms of decode loop: 1000 / 600
    v = verdict(rows, 32, {"gemm_gmac_s": {"fp32": 10, "int8": 64}, "encoder_macs_per_image": 10 ** 9})
    assert v["int8_at_gemm_rate_vs_best_torch"] == 1.67 and v["int8_at_gemm_rate_vs_eager"] == 1.67
