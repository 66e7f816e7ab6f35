"""``python -m benchmarks.gpu``: the PyTorch CUDA rows of the bench, prepared to run within 8 minutes.

On a machine with a GPU (and CUDA PyTorch), without preparing the trained reference model (its
trainer runs on the CPU): a reference-sized model (small preset, ResNet-101, 224 px, seeded
random weights) captions generated shapes images with PyTorch eager fp32 on the CPU (the
baseline of every ratio), eager fp32, fp16 autocast + channels-last and ``torch.compile`` on the
GPU; the table is printed and the JSON written, as ``sat-bench`` does. Random weights seldom emit
``<end>``, so every caption runs the full ``--max-len`` steps: the decode loop is timed at its
longest. Accuracy is judged against eager fp32's own captions (there is no trained model).

Example:  python -m benchmarks.gpu --json gpu-bench.json
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import typer

from benchmarks.bench import run_bench
from benchmarks.cli import bench_options
from benchmarks.prepare import BenchModel
from benchmarks.report import document, print_table, write_json
from sat_export.cli.common import console, new_app, user_errors
from training.checkpoint import save_checkpoint
from training.console import make_console
from training.data import load_captions
from training.model import make_model
from training.shapes import make_shapes
from training.vocab import Vocab

CUDA_ROWS = ("torch-cuda-fp32", "torch-cuda-fp16", "torch-cuda-compile")
app = new_app()


@app.command()
@user_errors
def main(
    images: int = typer.Option(64, min=1, help="Generated images to caption (and to time on)."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(5, min=1, help="Timed rounds."),
    max_len: int = typer.Option(20, min=1, help="Decoding steps per caption."),
    backbone: str = typer.Option("resnet101", help="Encoder backbone (the reference workload's is resnet101)."),
    json_path: Path = typer.Option(Path("gpu-bench.json"), "--json", help="Where to write every measurement."),
):
    """Time the PyTorch CUDA rows against eager fp32 on the CPU, on a reference-sized model."""
    if not torch.cuda.is_available():
        console.print("no CUDA GPU here (torch.cuda.is_available() is False): the CUDA rows will say so",
                      highlight=False)
    with tempfile.TemporaryDirectory(prefix="sat-gpu-bench-") as tmp:
        shapes = make_shapes(Path(tmp) / "shapes", images, seed=2, size=256)
        vocab = Vocab.build(c for item in load_captions(shapes) for c in item.captions)
        torch.manual_seed(0)
        ckpt = save_checkpoint(Path(tmp) / "model.pth", make_model(len(vocab), backbone, "small").eval(), vocab)
        files = sorted((shapes / "images").glob("*.jpg"))
        model = BenchModel(ckpt, None, files, None, {"source": "benchmarks.gpu: seeded random weights",
                                                     "images": f"{len(files)} generated shapes images"})
        options = bench_options(batch_sizes, max_len=max_len, repeats=repeats, timing_images=images, keys=CUDA_ROWS)
        result = run_bench(model, options, console)
    doc = document(result, {"bench": result.seconds})
    print_table(doc, make_console(stderr=False))
    write_json(doc, json_path)
    console.print(f"measurements written to {json_path}", highlight=False)


if __name__ == "__main__":
    app()
