"""``sat-export``: inspect checkpoints, build and check bundles, import foreign checkpoints."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import typer
from rich.markup import escape

from sat_export.cli.common import console, new_app, user_errors
from sat_export.options import METHODS, BuildOptions
from sat_export.text import printable

DEFAULTS = BuildOptions()
SHOWN_ITEMS, SHOWN_DEPTH, SHOWN_CHARS = 8, 3, 120  # what `info` prints of the training record, at most

app = new_app(
    help="Export Show-Attend-Tell checkpoints to ONNX / TensorRT bundles.\n\n"
    "Example:  sat-export info runs/demo/best.pth",
    no_args_is_help=True,
)


@app.callback()
def main() -> None:
    """Export Show-Attend-Tell checkpoints to ONNX / TensorRT bundles."""


@app.command()
@user_errors
def info(ckpt: Path = typer.Argument(..., readable=False, help="Checkpoint (.pth) to describe.")):
    """Validate a checkpoint and print its config, vocabulary size and training record (its first items).

    Example:  sat-export info small.pth
    """
    from training.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    n_params = sum(t.numel() for t in ck.state_dict.values() if t.is_floating_point())
    train = {k: v for k, v in ck.train.items() if not isinstance(v, dict)}  # not the config and resume state
    summary = {"file": str(ckpt), "params": n_params, "vocab_size": len(ck.vocab),
               "config": ck.config.to_dict(), "train": shown(train)}
    console.print_json(json.dumps(summary))


def shown(value, depth: int = SHOWN_DEPTH):
    """``value`` cut for printing: ``SHOWN_ITEMS`` items per list or dict, ``SHOWN_DEPTH`` levels, ``SHOWN_CHARS``
    per string; what is cut is counted, never walked (a checkpoint's record can be any size or depth)."""
    import torch

    if isinstance(value, str):
        return value if len(value) <= SHOWN_CHARS else f"{value[:SHOWN_CHARS]}... ({len(value)} characters)"
    if isinstance(value, int | float) or value is None:  # weights_only unpickles ints of at most 255 bytes
        return value
    if isinstance(value, dict | list | tuple):
        if depth == 0:
            return f"<{type(value).__name__} of {len(value)}>"
        if isinstance(value, dict):
            return {str(k)[:SHOWN_CHARS]: shown(v, depth - 1) for k, v in islice(value.items(), SHOWN_ITEMS)} | (
                {"...": f"{len(value) - SHOWN_ITEMS} more"} if len(value) > SHOWN_ITEMS else {})
        more = [f"... {len(value) - SHOWN_ITEMS} more"] if len(value) > SHOWN_ITEMS else []
        return [shown(v, depth - 1) for v in value[:SHOWN_ITEMS]] + more
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    return f"<{type(value).__name__}>"


@app.command()
@user_errors
def build(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint (.pth) to export."),
    out: Path = typer.Option(Path("bundle"), "--out", help="Bundle folder to write."),
    opset: int = typer.Option(DEFAULTS.opset, "--opset", help="ONNX opset of both graphs."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an fp16 ONNX pair (float32 I/O), with its own parity report."),
    int8_encoder: bool = typer.Option(False, "--int8-encoder", help="Also write a static int8 (QDQ) encoder; needs --calib."),
    calib: Path | None = typer.Option(None, "--calib", help="Folder of your images to calibrate --int8-encoder on."),
    calib_method: str = typer.Option(DEFAULTS.int8_method, "--calib-method",
                                     help=f"int8 calibration: {', '.join(METHODS)}."),
    int8_target: float = typer.Option(DEFAULTS.int8_target, "--int8-target", help="Share of fp32's BLEU-4 and "
                                      "CIDEr-D the int8 encoder must keep on held-back calibration images; sensitive "
                                      "layers stay fp32 until it does."),
    calib_captions: Path | None = typer.Option(None, "--calib-captions", help="Captions of the calibration images "
                                               "(any format sat-train reads).", show_default="one found in --calib or "
                                               "its parent; else fp32's own captions are the references"),
    int8_beam: int = typer.Option(DEFAULTS.int8_beam, "--int8-beam", min=1, help="The beam you will caption with "
                                  "(sat-infer --beam): the int8 encoder is judged on captions decoded with it."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs the [trt] extra and a GPU)."),
    trt_profile: str = typer.Option(",".join(map(str, DEFAULTS.trt_profile)), "--trt-profile",
                                    help="TensorRT min,opt,max batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Parity gate against PyTorch eager."),
):
    """Export a checkpoint to a verified bundle: encoder.onnx, decoder_step.onnx, manifest.json.

    Example:  sat-export build --ckpt small.pth --out small_bundle --fp16
    """
    from engines.trt_build import check_profile
    from sat_export.bundler.builder import build_bundle

    if int8_encoder != (calib is not None):
        raise typer.BadParameter("--int8-encoder and --calib DIR go together")
    if calib_method not in METHODS or not 0 < int8_target <= 1:
        raise typer.BadParameter(f"--calib-method must be one of {', '.join(METHODS)}; --int8-target in (0, 1]")
    try:
        profile = tuple(int(b) for b in trt_profile.split(","))
        options = BuildOptions(opset, fp16, calib, trt, check_profile(profile), verify, calib_method, int8_target,
                               calib_captions, int8_beam)
    except ValueError as err:
        raise typer.BadParameter(f"--trt-profile: {err}") from None
    build_bundle(ckpt, out, options, console)
    console.print("[green]✓[/] " + escape(f"wrote {out} (check it with `sat-export check {out}`)"), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def check(
    bundle: Path = typer.Argument(..., readable=False, help="Bundle folder written by `sat-export build`."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a stored parity gate failed or was skipped."),
):
    """Verify a bundle: seal and checksums (integrity, not authenticity), manifest schema, graph I/O against
    the contract, a smoke inference, and the parity verdict stored per precision.

    Example:  sat-export check small_bundle --strict
    """
    from sat_export.bundler.check import check_bundle, require_passed_gates

    summary = check_bundle(bundle)
    for name, gate in summary["parity"].items():
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]~[/]"}[gate["passed"]]
        console.print(f"{mark} " + escape(printable(f"{name} parity gate: {gate['verdict']}")), highlight=False,
                      soft_wrap=True)
    trt = f"; TensorRT engines {summary['tensorrt']}" if "tensorrt" in summary else ""
    console.print("[green]✓[/] " + escape(printable(
        f"{bundle}: {len(summary['files'])} files verified (integrity, not authenticity: the seal shows nothing "
        f"changed since it was written, not who wrote it), smoke inference passed for "
        f"{', '.join(summary['precisions'])}{trt}")), highlight=False, soft_wrap=True)
    if strict:
        require_passed_gates(bundle, summary["parity"])


@app.command("import")
@user_errors
def import_(
    src: Path = typer.Argument(..., help="Foreign checkpoint: the seed's state_dict or sgrvinod's BEST_checkpoint_*.pth.tar."),
    out: Path = typer.Option(..., "--out", help="sat-export checkpoint (.pth) to write."),
    captions: Path | None = typer.Option(None, "--captions", help="Seed layout: captions file its vocabulary was built from."),
    freq_threshold: int | None = typer.Option(None, "--freq-threshold", help="Seed layout: word frequency threshold (default: inferred)."),
    wordmap: Path | None = typer.Option(None, "--wordmap", help="sgrvinod layout: its WORDMAP_*.json."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="sgrvinod layout: allow unpickling (runs code from the file)."),
):
    """Convert a foreign checkpoint into this project's format (layout chosen by --captions or --wordmap).

    Examples:  sat-export import resnet101-small.pth --captions Flickr8k.token.txt --out seed.pth
               sat-export import BEST_checkpoint_coco.pth.tar --wordmap WORDMAP_coco.json --trust-pickle --out coco.pth
    """
    from sat_export.bundler.importers import import_seed, import_sgrvinod

    if (captions is None) == (wordmap is None):
        raise typer.BadParameter("give --captions (seed layout) or --wordmap (sgrvinod layout), not both or neither")
    if captions is not None:
        path = import_seed(src, captions, out, freq_threshold)
    else:
        path = import_sgrvinod(src, wordmap, out, trust_pickle)
    console.print("[green]✓[/] " + escape(f"wrote {path} (inspect it with `sat-export info {path}`)"), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
