"""``python -m benchmarks.gpu``: every GPU row of the bench in one command, prepared to finish within 10 minutes.

On a machine with a CUDA GPU (and the ``[gpu]`` extra installed by its one command, ``[trt]`` for TensorRT),
without preparing the trained reference model (its trainer runs on the CPU): a reference-sized model
(small preset, ResNet-101, 224 px, seeded random weights) and its bundle (fp32 and fp16 graphs; the parity
gate is left to ``sat-export build``) caption generated shapes images with PyTorch eager fp32 on the CPU (the
baseline of every ratio) and on the GPU with PyTorch eager fp32, fp16 autocast + channels-last and
``torch.compile``, onnxruntime's CUDA provider and TensorRT fp16, greedy and with beam 3, at batch 1, 8, 32
and 64. The TensorRT row builds its engines when it opens, for the batch profile of its run (greedy: max 64
rows, beam 3: 192), so no call is split and a failed build is that row's error, not the bench's. Both tables are printed and both documents written
to one JSON file. Random weights seldom emit ``<end>``, so every caption runs the full ``--max-len`` steps:
the decode loop is timed at its longest. Accuracy is judged against eager fp32's own captions (there is no
trained model). Without a GPU it says so and measures nothing.

Example:  python -m benchmarks.gpu --json gpu-bench.json
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import typer

from benchmarks.bench import run_bench
from benchmarks.cli import bench_options
from benchmarks.prepare import BenchModel
from benchmarks.report import document, print_table
from sat_export.bundler.builder import build_bundle
from sat_export.cli.common import console, new_app, user_errors
from sat_export.options import BuildOptions
from training.checkpoint import save_checkpoint
from training.console import make_console
from training.data import load_captions
from training.errors import SatError
from training.model import make_model
from training.shapes import make_shapes
from training.vocab import Vocab

GPU_ROWS = ("torch-cuda-fp32", "torch-cuda-fp16", "torch-cuda-compile", "ort-cuda", "trt-fp16")
BEAMS = (1, 3)
app = new_app()


def require_gpu() -> str:
    """The GPU's name, or a ``SatError`` saying that there is none (nothing to measure here)."""
    if not torch.cuda.is_available():
        raise SatError("no CUDA GPU here (torch.cuda.is_available() is False): benchmarks.gpu measures the GPU "
                       "rows only, so nothing was run; on a CPU machine use sat-bench")
    return torch.cuda.get_device_name()


def prepare(tmp: Path, images: int, backbone: str) -> BenchModel:
    """Generated images, a seeded reference-sized checkpoint and its bundle (fp32 and fp16 graphs; TensorRT engines
    come with their row)."""
    shapes = make_shapes(tmp / "shapes", images, seed=2, size=256)
    vocab = Vocab.build(c for item in load_captions(shapes) for c in item.captions)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "model.pth", make_model(len(vocab), backbone, "small").eval(), vocab)
    bundle = build_bundle(ckpt, tmp / "bundle", BuildOptions(fp16=True, verify=False), console)
    files = sorted((shapes / "images").glob("*.jpg"))
    return BenchModel(ckpt, bundle, files, None, {"source": "benchmarks.gpu: seeded random weights",
                                                  "images": f"{len(files)} generated shapes images"})


@app.command()
@user_errors
def main(
    images: int = typer.Option(64, min=1, help="Generated images to caption (and to time on)."),
    batch_sizes: str = typer.Option("1,8,32,64", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds."),
    max_len: int = typer.Option(20, min=1, help="Decoding steps per caption."),
    backbone: str = typer.Option("resnet101", help="Encoder backbone (the reference workload's is resnet101)."),
    json_path: Path = typer.Option(Path("gpu-bench.json"), "--json", help="Where to write every measurement."),
):
    """Time every GPU row, greedy and beam 3, against eager fp32 on the CPU, on a reference-sized model."""
    gpu = require_gpu()
    console.print(f"measuring on {gpu}", highlight=False)
    docs = {}
    with tempfile.TemporaryDirectory(prefix="sat-gpu-bench-") as tmp:
        model = prepare(Path(tmp), images, backbone)
        for beam in BEAMS:
            options = bench_options(batch_sizes, beam=beam, max_len=max_len, repeats=repeats, timing_images=images,
                                    keys=GPU_ROWS)
            result = run_bench(model, options, console)
            docs[f"beam_{beam}"] = document(result, {"bench": result.seconds})
            print_table(docs[f"beam_{beam}"], make_console(stderr=False))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"tool": "benchmarks.gpu", "gpu": gpu, "runs": docs}, indent=1) + "\n")
    console.print(f"measurements written to {json_path}", highlight=False)


if __name__ == "__main__":
    app()
