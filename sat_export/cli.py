"""``sat-export``: inspect checkpoints, build and check bundles, import foreign checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from sat_export.console import console, user_errors
from training.checkpoint import load_checkpoint

app = typer.Typer(
    help="Export Show-Attend-Tell checkpoints to ONNX / TensorRT bundles.\n\n"
    "Example:  sat-export info runs/demo/best.pth",
    no_args_is_help=True, add_completion=False,
)


@app.callback()
def main() -> None:
    """Export Show-Attend-Tell checkpoints to ONNX / TensorRT bundles."""


@app.command()
@user_errors
def info(ckpt: Path = typer.Argument(..., help="Checkpoint (.pth) to describe.")):
    """Validate a checkpoint and print its config, vocabulary size and training record.

    Example:  sat-export info small.pth
    """
    ck = load_checkpoint(ckpt)
    n_params = sum(t.numel() for t in ck.state_dict.values() if t.is_floating_point())
    summary = {"file": str(ckpt), "params": n_params, "vocab_size": len(ck.vocab),
               "config": ck.config.to_dict(), "train": {k: v for k, v in ck.train.items() if not isinstance(v, dict)}}
    console.print_json(json.dumps(summary, default=str))
