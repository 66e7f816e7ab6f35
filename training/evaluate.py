"""Held-out evaluation (corpus BLEU-1..4 and attention grounding) and the shipped demo model.

The demo recipe: a synthetic shapes set (``training.shapes``), the small ``mobilenet_v3_small_s16``
backbone trained end to end at 128 px (8 x 8 grid), evaluated on shapes drawn from another seed,
the best checkpoint copied to where the product ships it (``sat-train demo`` passes
``sat_export/assets/demo.pth``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from training.checkpoint import load_checkpoint
from training.data import SPLITS, ImageInputs, boxes_next_to, check_images, load_boxes, load_captions, upright_size
from training.errors import DatasetError
from training.metrics import attention_grounding, corpus_bleu, summarize_grounding
from training.options import DecodeOptions, TrainConfig
from training.shapes import make_shapes
from training.train import caption_images, train

DEMO_CONFIG = dict(backbone="mobilenet_v3_small_s16", preset="small", grid=8, resize=128, crop=128,
                   finetune_encoder=True, epochs=10, batch_size=64, lr=2e-3, encoder_lr=2e-3, alpha_c=1.0, box_loss=0.5,
                   dropout=0.1, val_frac=0.05, test_frac=0.0, val_images=300)
DEMO_TRAIN_IMAGES, DEMO_TEST_IMAGES = 6000, 500
TRAIN_SEED, TEST_SEED = 1, 2  # the shipped examples (examples/) use seed 3


def evaluate(ckpt: str | Path, data: str | Path, images: str | Path | None = None, fmt: str = "auto",
             split: str = "all", boxes: str | Path | None = None, beam: int = 1, max_len: int = 32,
             batch_size: int = 64) -> dict:
    """Caption a dataset's images with a checkpoint; corpus BLEU-1..4 and, with boxes, grounding.

    Parameters
    ----------
    data, images, fmt : the captions and images (see ``training.data.load_captions``).
    split : ``"all"`` or the split to score (``"train"``, ``"val"``, ``"test"``).
    boxes : ``boxes.json`` (image name -> {word: [[x0, y0, x1, y1], ...]}); by default the one
        next to the captions file, if any.

    Returns
    -------
    ``{"images", "skipped", "bleu1".."bleu4", "grounding": summarize_grounding(...) or None, "seconds"}``
    """
    started = time.perf_counter()
    ck = load_checkpoint(ckpt)
    model, vocab = ck.build_model(), ck.vocab
    items = [it for it in load_captions(data, images, fmt) if split == "all" or it.split == split]
    if not items:
        raise DatasetError(f"{data}: no images in split {split!r} (splits: all, {', '.join(SPLITS)})")
    items, skipped = check_images(items)
    boxes_path = boxes or boxes_next_to(data)
    all_boxes = load_boxes(boxes_path) if boxes_path else {}
    inputs = ImageInputs([it.path for it in items], ck.config.preprocess)
    options = DecodeOptions(beam=beam, max_len=max_len)
    refs, hyps, grounding = [], [], []
    for start in range(0, len(items), batch_size):
        batch = range(start, min(start + batch_size, len(items)))
        images_t = torch.stack([inputs[i] for i in batch])  # (n, 3, crop, crop)
        for i, cap in zip(batch, caption_images(model, images_t, False, vocab, options)):
            words = [vocab.itos[t] for t in cap.tokens]
            hyps.append(words)
            refs.append(items[i].captions)
            if items[i].name in all_boxes:
                grounding += attention_grounding(cap.alphas, words, all_boxes[items[i].name],
                                                 upright_size(items[i].path), ck.config.preprocess)
    return {"images": len(items), "skipped": len(skipped), **corpus_bleu(refs, hyps),
            "grounding": summarize_grounding(grounding) if all_boxes else None,
            "seconds": round(time.perf_counter() - started, 1)}


def demo(out: str | Path, asset: str | Path, n_train: int = DEMO_TRAIN_IMAGES, n_test: int = DEMO_TEST_IMAGES,
         epochs: int = DEMO_CONFIG["epochs"], console: Console | None = None) -> dict:
    """Reproduce the shipped demo model: shapes sets, training, held-out evaluation, copy to ``asset``.

    Returns the evaluation of the best checkpoint on the held-out set, plus the training time.
    """
    out = Path(out)
    started = time.perf_counter()
    make_shapes(out / "shapes-train", n_train, seed=TRAIN_SEED)
    make_shapes(out / "shapes-test", n_test, seed=TEST_SEED)
    cfg = TrainConfig(data=str(out / "shapes-train"), out=str(out), cache_dir=str(out / "cache"),
                      **{**DEMO_CONFIG, "epochs": epochs})
    train(cfg, console)
    minutes = (time.perf_counter() - started) / 60
    report = {"train_minutes": round(minutes, 1), "config": asdict(cfg),
              **evaluate(out / "best.pth", out / "shapes-test")}
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    asset = Path(asset)
    asset.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "best.pth", asset)
    return report
