"""Shared fixtures: a tiny, fast model and checkpoint built once per session; markers."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from benchmarks.services import free_port
from engines.ort import GPU_TRT_INSTALL
from engines.contract import DECODER_STEP, ENCODER
from sat_export.bundle.format import DIGEST_KEY, MANIFEST_FILE, _digest, _render, graph_file
from training.checkpoint import save_checkpoint
from training.config import ModelConfig, PreprocessConfig
from training.machine import CpuInfo
from training.model import ShowAttendTell
from training.vocab import Vocab

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right"]


def manifest_of(bundle: Path) -> dict:
    """A bundle's ``manifest.json`` as plain JSON (no checks: the test may have damaged it)."""
    return json.loads((bundle / MANIFEST_FILE).read_text())


def reseal(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` with a valid seal, as anyone who edits a bundle can (the seal is unkeyed), without
    re-hashing its files."""
    manifest[DIGEST_KEY] = _digest(manifest)
    (bundle / MANIFEST_FILE).write_bytes(_render(manifest))


def fake_cpu(**features: bool) -> CpuInfo:
    """"test cpu": torch's AVX2 level with AVX2 alone (no VNNI, no native bf16), ``features`` changed."""
    return CpuInfo("test cpu", "AVX2", {"avx2": True, "avx512": False, "vnni": False, "avx512_bf16": False,
                                        "amx": False, **features})


def tiny_config(**overrides) -> ModelConfig:
    """mobilenet_v3_small_s16 at 64 px, 4x4 grid, tiny decoder: milliseconds per call."""
    base = dict(vocab_size=4 + len(WORDS), backbone="mobilenet_v3_small_s16", enc_dim=48, grid=4,
                att_dim=16, dec_dim=32, emb_dim=16, preprocess=PreprocessConfig(resize=72, crop=64))
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ShowAttendTell:
    torch.manual_seed(seed)
    return ShowAttendTell(tiny_config(**overrides)).eval()


def fake_verdict(ratio: float, target: float = 0.9) -> dict:
    """A ``training.faithful.judge`` result whose two task metrics keep ``ratio`` of the reference's."""
    metric = {"reference": 1.0, "candidate": ratio, "difference": ratio - 1, "ci95": [ratio - 1.1, ratio - 0.9],
              "ratio": ratio, "kept": ratio >= target}
    return {"faithful": ratio >= target, "ratio_required": target, "images": 6, "agreement": ratio,
            "bleu4": metric, "cider_d": metric}


def bench_row(key, runtime, median, agreement, faithful, emulated=None):
    """A row of the bench JSON as ``report.document`` writes it (only what the verdict reads)."""
    accuracy = {"faithful": faithful, "images": 500, "bleu4": {"reference": 0.3}, "cider_d": {"reference": 1.2}}
    return {"key": key, "runtime": runtime, "device": "cpu", "agreement": agreement, "emulated": emulated,
            "accuracy": accuracy, "batches": {"32": {"latency_ms": {"median": median}, "decode_ms": 100}}}


@pytest.fixture(scope="session")
def vocab() -> Vocab:
    return Vocab.build([WORDS])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, vocab):
    """Path of a saved tiny checkpoint (random weights), shared by the session."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_model(), vocab, {"epoch": 0})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """A verified fp32 bundle of the tiny checkpoint, exported once per session (treat as read-only)."""
    from sat_export.bundler.builder import build_bundle

    return build_bundle(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def copy_instead_of_export(monkeypatch, tiny_bundle):
    """For build tests: every step after export runs for real, the export copies the tiny bundle's graphs."""
    import shutil

    import sat_export.bundler.builder

    def fake_export(model, out_dir, precision="fp32", opset=18):  # each precision under its own name, fp32 inside
        out_dir.mkdir(parents=True, exist_ok=True)
        return {spec.name: shutil.copy(tiny_bundle / spec.file, out_dir / graph_file(spec, precision))
                for spec in (ENCODER, DECODER_STEP)}

    monkeypatch.setattr(sat_export.bundler.builder, "export_onnx", fake_export)


@contextmanager
def http_server(folder: Path) -> Iterator[int]:
    """``python -m http.server`` serving ``folder`` on a free port of 127.0.0.1, listening when this yields
    its port; stopped by its pid."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on port {port} did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait()


def one_line_error(result, *names: str) -> str:
    """A CLI ``result`` refused as it should be: exit 1, one ``error:`` line naming each of ``names``, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(name in lines[0] for name in names), (names, result.output)
    return lines[0]


def has_openvino() -> bool:
    """OpenVINO and NNCF (the ``[openvino]`` extra) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def has_tensorrt() -> bool:
    """TensorRT's Python package (the ``[trt]`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="requires a CUDA GPU: torch.cuda.is_available() is False"))
        if "requires_trt" in item.keywords and not (torch.cuda.is_available() and has_tensorrt()):
            item.add_marker(pytest.mark.skip(reason=f"requires TensorRT and a CUDA GPU: {GPU_TRT_INSTALL} on a "
                                                    "machine with an NVIDIA GPU"))
        if "requires_openvino" in item.keywords and not has_openvino():
            item.add_marker(pytest.mark.skip(reason="requires OpenVINO and NNCF: pip install 'sat-export[openvino]'"))
