"""What this machine can do: matrix-multiply rates per precision, and the encoder's work.

An encoder is a stack of convolutions that the runtimes lower to matrix multiplies, so the rate of
a large multiply in a precision says roughly how fast an encoder computing in it can go. The
bench measures those rates in the same run (a 2048-square multiply: fp32 and bf16 with PyTorch's
oneDNN/MKL, u8 x s8 with onnxruntime's ``MatMulInteger``, the MLAS kernel family behind its int8
convolutions), counts the encoder's multiply-accumulates, and reports each configuration's encoder
rate as a share of its precision's GEMM rate. It is a reference, not a hard ceiling: a
convolution kernel can beat a square GEMM (onnxruntime's fp32 convolutions reach ~115 % of it on
the bench machine). Their ratios say what a change of precision can buy on a machine: with native
bf16 dot products, int8 is about twice bf16, not four times.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from training.machine import cpu_info


def _rate(fn, macs: int, repeats: int) -> float:
    """GMAC/s of ``fn``: the best of ``repeats`` timed calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return float(f"{macs / best / 1e9:.3g}")  # 3 significant digits: a small, loaded multiply is not 0


def _int8_matmul(size: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 256, (size, size), dtype=np.uint8),
             "b": rng.integers(-128, 128, (size, size), dtype=np.int8)}
    return lambda: session.run(None, feeds)


def gemm_rates(size: int = 2048, repeats: int = 5) -> dict[str, float | None]:
    """GMAC/s of a ``size``-square matrix multiply per precision on the CPU.

    bf16 is None ("not native") where the CPU has no bf16 dot products: torch then emulates it,
    and the rate of an emulation is no ceiling.
    """
    macs = size ** 3
    a, b = torch.randn(size, size), torch.randn(size, size)
    rates: dict[str, float | None] = {"fp32": _rate(lambda: torch.mm(a, b), macs, repeats), "bf16": None}
    if cpu_info().native_bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        rates["bf16"] = _rate(lambda: torch.mm(a16, b16), macs, repeats)
    rates["int8"] = _rate(_int8_matmul(size), macs, repeats)
    return rates


def encoder_macs(model: nn.Module, image: torch.Tensor) -> int:
    """Multiply-accumulates of ``model.encode`` on one image (convolutions and linear layers)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.encode(image[None])
    finally:
        for hook in hooks:
            hook.remove()
    return total
