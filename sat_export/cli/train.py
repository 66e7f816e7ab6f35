"""``sat-train``: make the synthetic shapes set, train (or resume), evaluate, rebuild the demo model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from sat_export.cli.common import console, new_app, user_errors
from sat_export.errors import UsageError
from training.config import PRESETS
from training.options import TrainConfig

app = new_app(
    help="Train Show-Attend-Tell captioners.\n\n"
    "Example:  sat-train make-shapes data/shapes --n 2000 && sat-train train data/shapes --out runs/shapes",
    no_args_is_help=True,
)

DEFAULTS = TrainConfig(data="")


@app.callback()
def main() -> None:
    """Train Show-Attend-Tell captioners."""


@app.command("make-shapes")
@user_errors
def make_shapes_cmd(
    out: Path = typer.Argument(..., help="Folder to write images/, captions.txt and boxes.json into."),
    n: int = typer.Option(2000, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Image i depends only on (seed, i)."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
):
    """Generate the synthetic shapes captioning set (4 references per image, object boxes).

    Example:  sat-train make-shapes data/shapes --n 5000 --seed 1
    """
    from training.shapes import make_shapes

    try:
        make_shapes(out, n, seed, size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    console.print(escape(f"wrote {n} images, {out / 'captions.txt'} and {out / 'boxes.json'}"), highlight=False)


@app.command("train")
@user_errors
def train_cmd(
    data: Optional[Path] = typer.Argument(None, help="captions.txt, Flickr8k.token.txt, dataset_*.json or a folder."),
    out: Path = typer.Option(Path(DEFAULTS.out), help="Folder for best.pth, last.pth and history.jsonl."),
    images: Optional[Path] = typer.Option(None, help="Image folder (default: Images/ or images/ next to DATA)."),
    fmt: str = typer.Option(DEFAULTS.format, "--format", help="auto, csv, token or karpathy."),
    resume: Optional[Path] = typer.Option(None, help="Continue exactly from a run's last.pth (other options ignored)."),
    preset: str = typer.Option(DEFAULTS.preset, help=f"Decoder size: {', '.join(PRESETS)}."),
    backbone: str = typer.Option(DEFAULTS.backbone, help="Encoder backbone (see training.backbones)."),
    grid: int = typer.Option(DEFAULTS.grid, help="Attention grid side (n_pix = grid*grid)."),
    resize: int = typer.Option(DEFAULTS.resize, help="Resize the short side (with --resize-mode squash: both "
                               "sides) to this many pixels."),
    crop: int = typer.Option(DEFAULTS.crop, help="Centre crop side in pixels."),
    resize_mode: str = typer.Option(DEFAULTS.resize_mode, help="shorter_side (keep the aspect ratio), squash (whole "
                                    "image to resize x resize, as sgrvinod's tutorial) or torchvision (Resize + "
                                    "CenterCrop exactly)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start the backbone from ImageNet weights."),
    pretrained_weights: Optional[Path] = typer.Option(None, help="Local torchvision .pth for the backbone."),
    finetune_encoder: bool = typer.Option(False, "--finetune-encoder", help="Train the backbone end to end."),
    cache: bool = typer.Option(DEFAULTS.cache, help="With a frozen encoder, train from cached grid features."),
    cache_dir: Path = typer.Option(Path(DEFAULTS.cache_dir), help="Where cached features live."),
    epochs: int = typer.Option(DEFAULTS.epochs, help="Passes over the training images, at most (see --patience)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, help="Captions per optimiser step."),
    lr: float = typer.Option(DEFAULTS.lr, help="AdamW learning rate of the decoder."),
    encoder_lr: float = typer.Option(DEFAULTS.encoder_lr, help="Learning rate of the backbone with --finetune-encoder."),
    alpha_c: float = typer.Option(DEFAULTS.alpha_c, help="Weight of the doubly stochastic attention loss."),
    box_loss: float = typer.Option(DEFAULTS.box_loss, help="Weight of attention supervision: -log attention mass inside the "
                                   "box of each boxed word (needs boxes.json, e.g. from make-shapes)."),
    boxes: Optional[Path] = typer.Option(None, help="boxes.json for --box-loss (default: next to DATA)."),
    dropout: float = typer.Option(DEFAULTS.dropout, help="Dropout before the decoder's output layer."),
    grad_clip: float = typer.Option(DEFAULTS.grad_clip, help="Clip the gradient norm to this."),
    amp: bool = typer.Option(False, "--amp", help="bfloat16 autocast on CPU."),
    min_freq: int = typer.Option(DEFAULTS.min_freq, help="Words seen fewer times become <unk>."),
    val_frac: float = typer.Option(DEFAULTS.val_frac, help="Share of images for validation (formats without splits)."),
    test_frac: float = typer.Option(DEFAULTS.test_frac, help="Share of images held out for testing (formats without splits)."),
    patience: int = typer.Option(DEFAULTS.patience, help="Stop after this many epochs without a better val BLEU-4."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed of the initial weights and of the batch order."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps (resume later)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: one per core; 1 on busy cores)."),
):
    """Train a captioner; best.pth (by val BLEU-4) and last.pth land in --out.

    Example:  sat-train train data/flickr8k/captions.txt --backbone resnet50 --pretrained --preset medium --amp

    Example (resume):  sat-train train --resume runs/train/last.pth
    """
    from training.train import resume as resume_run
    from training.train import train

    if resume is not None:
        record = resume_run(resume, max_steps, console)
    else:
        if data is None:
            raise UsageError("give DATA (a captions file or folder), or --resume CKPT")
        try:
            cfg = TrainConfig(
                data=str(data), out=str(out), images=str(images) if images else None, format=fmt, backbone=backbone,
                preset=preset, grid=grid, resize=resize, crop=crop, resize_mode=resize_mode, dropout=dropout,
                pretrained=pretrained, pretrained_weights=str(pretrained_weights) if pretrained_weights else None,
                finetune_encoder=finetune_encoder, cache=cache, cache_dir=str(cache_dir), epochs=epochs,
                batch_size=batch_size, lr=lr, encoder_lr=encoder_lr, grad_clip=grad_clip, alpha_c=alpha_c,
                box_loss=box_loss, boxes=str(boxes) if boxes else None, amp=amp, min_freq=min_freq,
                val_frac=val_frac, test_frac=test_frac, patience=patience, seed=seed, max_steps=max_steps,
                threads=threads)
        except ValueError as err:
            raise UsageError(str(err)) from None
        record = train(cfg, console)
    typer.echo(json.dumps(record, indent=1))


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    ckpt: Path = typer.Option(..., help="Checkpoint to evaluate."),
    data: Path = typer.Option(..., help="Captions file or folder (as for `train`)."),
    images: Optional[Path] = typer.Option(None, help="Image folder (default: next to DATA)."),
    split: str = typer.Option("all", help="all, train, val or test."),
    boxes: Optional[Path] = typer.Option(None, help="boxes.json for grounding (default: next to DATA)."),
    beam: int = typer.Option(1, help="1 = greedy."),
    max_len: int = typer.Option(32, help="At most this many decoding steps."),
):
    """Caption held-out images; print corpus BLEU-1..4 and attention grounding.

    Example:  sat-train evaluate --ckpt runs/demo/best.pth --data runs/demo/shapes-test
    """
    from training.evaluate import evaluate

    typer.echo(json.dumps(evaluate(ckpt, data, images, split=split, boxes=boxes, beam=beam, max_len=max_len), indent=1))


@app.command("demo")
@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Working folder: shapes sets, checkpoints, evaluation.json."),
    asset: Optional[Path] = typer.Option(None, help="Where to copy the best checkpoint (default: the packaged one)."),
):
    """Rebuild the shipped demo model from scratch (about 25 minutes on 2 CPU cores).

    Example:  sat-train demo --out runs/demo
    """
    from sat_export.assets import demo_checkpoint_path
    from training.evaluate import demo

    report = demo(out, asset or demo_checkpoint_path(must_exist=False), console=console)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    app()
