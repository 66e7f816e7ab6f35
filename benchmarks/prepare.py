"""The model and images a bench run measures: the user's checkpoint, or a prepared reference model.

Caption agreement only means something on a model whose captions mean something, and int8
error depends on the activation statistics of a *trained* backbone. Without ``--ckpt`` the bench
therefore prepares a reference model whose backbone was itself trained: a synthetic shapes set
(``training.shapes``) is generated and a Show-Attend-Tell model is trained on it with
``training.train``: end to end from random initialisation at a low resolution (where a step is
cheap), then, after re-estimating the backbone's batch-norm statistics at the benchmark's
resolution, the decoder on the frozen backbone's cached features at that resolution. Its BLEU-4
on held-out images is reported beside every agreement, so a collapsed model shows.

Everything is reproducible from the ``Recipe`` (seeded data and training) and cached under
``<cache>/reference-<hash of the recipe>-<bf16|fp32>/``: training runs under bf16 autocast where
the CPU has native bf16 and in fp32 elsewhere (emulated bf16 is several times slower than fp32),
and the two give different weights, so the cache key says which. ``prepared.json`` is written
last, so an interrupted preparation is redone. Bundles (fp32 and fp16 graphs and the accuracy-aware int8
encoder) are built with ``sat-export build``'s library and cached beside the checkpoint they come from
(the ``trt-fp16`` row adds its TensorRT engines when it opens, ``benchmarks.configs.open_config``); where OpenVINO and NNCF are installed, the NNCF int8
encoder of the ``ov-int8`` row is added to them (``sat_export.quantize.openvino``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console

from sat_export.bundle.format import read_manifest, sha256
from sat_export.errors import ParityError
from sat_export.quantize.ort import calibration_files
from sat_export.options import DEFAULT_TARGET
from training.checkpoint import save_checkpoint
from training.errors import SatError
from training.machine import cpu_info

CACHE_VERSION = 2  # bump when preparation changes the reference model it produces (2: 500 test images)
# Bump when the bench bundle's build changes (5: fp16 graphs, TensorRT engines built by their row; 6: bundle format 2).
BUNDLE_VERSION = 6
PREPARED = "prepared.json"
BUILT = "bench-built.json"  # written beside the manifest once the bench bundle is complete


def default_cache() -> Path:
    """``$SAT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/sat-export/bench`` (``~/.cache/...``)."""
    if os.environ.get("SAT_BENCH_CACHE"):
        return Path(os.environ["SAT_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sat-export" / "bench"


@dataclass(frozen=True)
class Int8Options:
    """How the int8 encoder of a bench bundle is calibrated and how close to fp32 it must stay."""

    method: str = "mse"
    target: float = DEFAULT_TARGET
    beam: int = 1  # the int8 encoders are judged on captions decoded with this beam (the bench's --beam)


@dataclass(frozen=True)
class Recipe:
    """How the reference model is made: data sizes, model, the two training phases, int8."""

    backbone: str = "resnet101"
    preset: str = "small"
    image_size: int = 128  # side of the generated shapes images
    n_train: int = 768
    n_calib: int = 256  # half of them held back by the int8 search, to judge it
    n_test: int = 500  # the bench images (accuracy; timing on the first 64); held out from the others
    grid: int = 14
    # (resize, crop, epochs, fine-tune the backbone): end to end at low resolution, where a step is
    # cheap, then the decoder on the frozen backbone's cached features at the benchmark's resolution.
    phases: tuple[tuple[int, int, int, bool], ...] = ((110, 96, 3, True), (256, 224, 5, False))
    batch_size: int = 32
    lr: float = 2e-3
    encoder_lr: float = 2e-3
    box_loss: float = 1.0  # attention supervision from the shapes' boxes (training.train)
    dropout: float = 0.1
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK_RECIPE = Recipe(backbone="mobilenet_v3_small_s16", image_size=64, n_train=48, n_calib=8, n_test=8, grid=4,
                      phases=((72, 64, 1, True),), batch_size=16)


@dataclass
class BenchModel:
    """A checkpoint, its bundle, the bench images (with references where known) and where they came from."""

    ckpt: Path
    bundle: Path
    images: list[Path]
    references: dict[str, list[list[str]]] | None = None  # image file name -> tokenised references
    info: dict = field(default_factory=dict)


def bench_bundle(ckpt: Path, calib: Path, int8: Int8Options, cache: Path, console: Console) -> tuple[Path, dict]:
    """The cached bundle of ``ckpt`` (fp32, int8 encoder and NNCF int8 encoder calibrated on ``calib`` and judged
    with ``int8.beam``); built on first use. The NNCF encoder is added to a cached bundle without one once OpenVINO
    is installed."""
    files = calibration_files(calib)
    beam = f"|beam {int8.beam}" if int8.beam > 1 else ""  # greedy bundles keep their cache key
    h = hashlib.sha256(f"{BUNDLE_VERSION}|{sha256(ckpt)}|{int8.method}|{int8.target}{beam}".encode())
    for f in files:
        h.update(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}\n".encode())
    out = cache / "bundles" / h.hexdigest()[:16]
    start = time.perf_counter()
    built = not (out / BUILT).is_file()
    if built:
        _build(ckpt, calib, int8, out, console)
    else:
        console.print(f"using the cached bundle {out}", highlight=False, soft_wrap=True)
    record = json.loads((out / BUILT).read_text())
    if not read_manifest(out).get("openvino_int8"):
        record["openvino_int8_error"] = _openvino_int8(out, calib, int8, console)
    manifest = read_manifest(out)
    return out, {**record, "bundle_built_s": round(time.perf_counter() - start, 1) if built else None,
                 "int8_search": manifest.get("int8"), "openvino_int8": manifest.get("openvino_int8")}


def _build(ckpt: Path, calib: Path, int8: Int8Options, out: Path, console: Console) -> None:
    """``sat-export build`` of the bench bundle: fp32, fp16, int8 encoder."""
    from sat_export.bundler.builder import build_bundle
    from sat_export.options import BuildOptions

    console.print(f"building the bench bundle in {out} (fp32, fp16, int8 encoder)", highlight=False, soft_wrap=True)
    shutil.rmtree(out, ignore_errors=True)
    options = BuildOptions(int8_calib=calib, int8_method=int8.method, int8_target=int8.target, fp16=True,
                           int8_beam=int8.beam)
    record = {"bundle": str(out), "parity_error": None}
    try:
        build_bundle(ckpt, out, options, console)
    except ParityError as err:  # the report is in the manifest; the bench measures agreement itself
        if "int8" not in read_manifest(out)["precisions"]:
            raise
        record["parity_error"] = str(err)
        console.print(f"[yellow]int8 parity gate failed[/] (the bench goes on and measures it): {err}",
                      highlight=False, soft_wrap=True)
    (out / BUILT).write_text(json.dumps(record) + "\n")


def _openvino_int8(bundle: Path, calib: Path, int8: Int8Options, console: Console) -> str | None:
    """Add the NNCF int8 encoder to ``bundle``; None, or why it could not be (the ``ov-int8`` row then says
    the bundle has none)."""
    from engines.errors import BackendUnavailable
    from sat_export.quantize.openvino import quantize_openvino_encoder

    try:
        quantize_openvino_encoder(bundle, calib, int8.target, console=console, beam=int8.beam)
    except BackendUnavailable as err:  # OpenVINO or NNCF not installed: the ov rows say so too
        return str(err)
    except Exception as err:  # noqa: BLE001 - an NNCF failure costs the ov-int8 row, not the whole bench
        console.print(f"[yellow]NNCF int8 quantisation failed[/] (the ov-int8 row will say so): {err}",
                      highlight=False, soft_wrap=True)
        return f"{type(err).__name__}: {err}"
    return None


def from_checkpoint(ckpt: Path, images: Path, calib: Path | None, int8: Int8Options, cache: Path,
                    console: Console, refs: Path | None = None) -> BenchModel:
    """The user's checkpoint and images; the int8 encoder is calibrated on ``calib`` (default: ``images``).

    ``refs``: the images' captions file (any format ``training.data`` reads); without it the
    accuracy of every row is judged against eager fp32's own captions.
    """
    files = calibration_files(images)
    if not files:
        raise SatError(f"{images}: no images to benchmark with")
    references = None
    if refs is not None:
        from training.data import load_captions

        by_path = {it.path.resolve(): it.captions for it in load_captions(refs, images, val_frac=0.0, test_frac=0.0)}
        files = [f for f in files if f.resolve() in by_path]
        if not files:
            raise SatError(f"{refs}: none of the images under {images} has a reference caption")
        references = {f.name: by_path[f.resolve()] for f in files}
    bundle, info = bench_bundle(ckpt, calib or images, int8, cache, console)
    info.update(source="--ckpt", checkpoint=str(ckpt), checkpoint_sha256=sha256(ckpt), images=str(images),
                references=str(refs) if refs else None, calibration_images=str(calib or images),
                note=None if calib else "the int8 encoder was calibrated on the bench images themselves")
    return BenchModel(ckpt, bundle, files, references, info)


def reference_model(recipe: Recipe, int8: Int8Options, cache: Path, console: Console) -> BenchModel:
    """The prepared reference model (cached by recipe and training precision), its bundle, its test images."""
    precision = "bf16" if cpu_info().native_bf16 else "fp32"
    root = cache / f"reference-{recipe.key()}-{precision}"
    if not (root / PREPARED).is_file():
        start = time.perf_counter()
        console.print(f"preparing the reference model (first run only, cached in {root}), training in {precision} "
                      f"on {cpu_info().describe()}", highlight=False, soft_wrap=True)
        shutil.rmtree(root, ignore_errors=True)
        record = _prepare(recipe, root, console, precision)
        record["prepare_s"] = round(time.perf_counter() - start, 1)
        (root / PREPARED).write_text(json.dumps(record, indent=1) + "\n")
    else:
        console.print(f"using the cached reference model in {root}", highlight=False, soft_wrap=True)
    record = json.loads((root / PREPARED).read_text())
    ckpt = root / "model.pth"
    bundle, info = bench_bundle(ckpt, root / "calib" / "images", int8, cache, console)
    from training.data import load_captions

    test = load_captions(root / "test", val_frac=0.0, test_frac=0.0)
    info.update(source="prepared reference model (no --ckpt)", cache=str(root), checkpoint=str(ckpt),
                checkpoint_sha256=sha256(ckpt), recipe=asdict(recipe), training=record,
                images=f"{len(test)} held-out synthetic shapes images ({root / 'test'})",
                calibration_images=f"{recipe.n_calib} other synthetic shapes images ({root / 'calib'})")
    return BenchModel(ckpt, bundle, [it.path for it in test], {it.path.name: it.captions for it in test}, info)


def _prepare(recipe: Recipe, root: Path, console: Console, precision: str) -> dict:
    """Generate the three image sets, train in phases (``precision`` bf16 or fp32), keep ``model.pth``."""
    from training.options import TrainConfig
    from training.shapes import make_shapes
    from training.train import Trainer

    start = time.perf_counter()
    for name, n, offset in (("train", recipe.n_train, 0), ("calib", recipe.n_calib, 1), ("test", recipe.n_test, 2)):
        make_shapes(root / name, n, seed=recipe.seed + offset, size=recipe.image_size)
    record = {"generated_s": round(time.perf_counter() - start, 1), "precision": precision,
              "cpu": cpu_info().describe(), "phases": []}
    vocab, state_dict = None, None
    for i, (resize, crop, epochs, finetune) in enumerate(recipe.phases):
        cfg = TrainConfig(data=str(root / "train"), out=str(root / f"phase{i}"), backbone=recipe.backbone,
                          preset=recipe.preset, grid=recipe.grid, resize=resize, crop=crop, finetune_encoder=finetune,
                          cache=not finetune, cache_dir=str(root / "features"), epochs=epochs,
                          batch_size=recipe.batch_size, lr=recipe.lr, encoder_lr=recipe.encoder_lr,
                          amp=precision == "bf16",
                          box_loss=recipe.box_loss, dropout=recipe.dropout, val_frac=0.05, test_frac=0.0,
                          patience=epochs, val_every_epoch=False, seed=recipe.seed)
        what = "end to end" if finetune else "decoder on the frozen backbone"
        console.print(f"training phase {i + 1}/{len(recipe.phases)}: {recipe.backbone} {what} at {crop} px, "
                      f"{epochs} epochs of {recipe.n_train} images", highlight=False, soft_wrap=True)
        start = time.perf_counter()
        if state_dict is not None and not finetune:  # batch-norm statistics at this phase's resolution
            calibrate = Trainer(replace(cfg, finetune_encoder=True, cache=False), vocab=vocab, state_dict=state_dict,
                                console=console)
            calibrate.recalibrate_batchnorm(256)
            state_dict = calibrate.model.state_dict()
        trainer = Trainer(cfg, vocab=vocab, state_dict=state_dict, console=console)
        last = trainer.fit()
        vocab, state_dict = trainer.data.vocab, trainer.model.state_dict()
        record["phases"].append({"resize": resize, "crop": crop, "epochs": epochs, "finetune_encoder": finetune,
                                 "steps": trainer.step,
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "val_bleu4": last.get("bleu4"), "val_loss": last.get("val_loss")})
    save_checkpoint(root / "model.pth", trainer.model.eval(), vocab, {"prepared_by": "sat-bench", **record})
    return record
