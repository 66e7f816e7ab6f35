"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping, doubly stochastic
attention loss, bf16 autocast, validation loss and corpus BLEU every epoch, best/last checkpoints,
early stopping and exact resume.

With a frozen encoder (the default) grid features come from the on-disk feature cache
(``training.features``) and only the decoder runs per step; ``finetune_encoder`` trains the
backbone end to end from images. Resume is exact: epoch ``e``'s batches depend only on
``(seed, e)`` (``EpochBatches``), and the checkpoint's ``train["resume"]`` holds the optimiser,
scheduler and torch RNG state, so a run stopped after any step ends with the same weights as one
that was never stopped.
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from training.checkpoint import load_checkpoint, save_checkpoint
from training.console import make_console
from training.data import (CaptionDataset, EpochBatches, ImageCaptions, ImageInputs, attention_targets, boxes_next_to,
                           check_images, collate, load_boxes, load_captions)
from training.decode import Caption, decode
from training.errors import CheckpointError, DatasetError
from training.features import build_feature_cache
from training.machine import cpu_info
from training.metrics import corpus_bleu
from training.model import ShowAttendTell, caption_loss, make_model
from training.options import DecodeOptions, TrainConfig
from training.vocab import Vocab


@dataclass
class Data:
    """Items with readable images, the vocabulary, and the indices of each split."""

    items: list[ImageCaptions]
    vocab: Vocab
    train: list[int]
    val: list[int]


def load_data(cfg: TrainConfig, vocab: Vocab | None = None, console: Console | None = None) -> Data:
    """Read, check and split the captions; build the vocabulary from train captions unless given.

    Skipped images are listed in ``<out>/skipped_images.txt`` and reported on ``console``.
    """
    items = load_captions(cfg.data, cfg.images, cfg.format, cfg.max_len, cfg.val_frac, cfg.test_frac)
    items, skipped = check_images(items)
    if skipped:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        report = Path(cfg.out) / "skipped_images.txt"
        report.write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
        (console or make_console()).print(
            f"[yellow]skipped {len(skipped)} missing or unreadable images[/] "
            + escape(f"(first: {skipped[0][0]}: {skipped[0][1]}; all listed in {report})"), highlight=False)
    train = [i for i, it in enumerate(items) if it.split == "train"]
    val = [i for i, it in enumerate(items) if it.split == "val"]
    if not train or not val:
        raise DatasetError(f"{cfg.data}: need train and val images, got {len(train)} and {len(val)}")
    if vocab is None:
        vocab = Vocab.build((c for i in train for c in items[i].captions), cfg.min_freq)
    return Data(items, vocab, train, val)


def new_model(cfg: TrainConfig, vocab_size: int, load_pretrained: bool = True) -> ShowAttendTell:
    """The model ``cfg`` describes; ImageNet backbone weights only if asked and ``load_pretrained``."""
    pretrained = (cfg.pretrained_weights or cfg.pretrained) if load_pretrained else False
    return make_model(vocab_size, cfg.backbone, cfg.preset, pretrained, grid=cfg.grid, attention=cfg.attention,
                      gate=cfg.gate, dropout=cfg.dropout, preprocess=cfg.preprocess)


def set_mode(model: ShowAttendTell, training: bool, finetune_encoder: bool) -> None:
    """Decoder in train/eval mode; a frozen backbone always in eval mode (fixed batch-norm statistics)."""
    model.train(training)
    model.backbone.train(training and finetune_encoder)


def grid_features(model: ShowAttendTell, inputs: torch.Tensor, cached: bool) -> torch.Tensor:
    """A batch of inputs -> ``(n_img, n_pix, enc_dim)``: cached features as they are, images encoded."""
    return inputs if cached else model.grid_features(inputs)


def caption_images(model: ShowAttendTell, inputs: torch.Tensor, cached: bool, vocab: Vocab,
                   options: DecodeOptions) -> list[Caption]:
    """Decode a batch of images (or cached grid features) with ``training.decode``."""
    with torch.inference_mode():
        return decode(model.step, model.init_state(grid_features(model, inputs, cached)), vocab.special_ids(), options)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Trainer:
    """One run: data, model, optimiser, schedule and the record of epochs.

    Progress and epoch lines go to ``console`` (default: a new rich console on stderr).
    """

    def __init__(self, cfg: TrainConfig, resume: dict | None = None, vocab: Vocab | None = None,
                 state_dict: dict | None = None, console: Console | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.console = console or make_console()
        self.amp = cfg.amp and cpu_info().native_bf16
        if cfg.amp and not self.amp:
            self.console.print(f"[yellow]--amp: bf16 is emulated on this CPU[/] ({cpu_info().describe()}), "
                               "slower than fp32: training in fp32", highlight=False, soft_wrap=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg, vocab, self.console)
        self.model = new_model(cfg, len(self.data.vocab), load_pretrained=state_dict is None)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.backbone.requires_grad_(cfg.finetune_encoder)
        self.cached = cfg.cache and not cfg.finetune_encoder
        paths = [it.path for it in self.data.items]
        inputs = (self._feature_cache(paths) if self.cached else ImageInputs(paths, self.model.config.preprocess))
        self.dataset = CaptionDataset(self.data.items, self.data.vocab, inputs, self._targets())
        decoder = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": decoder, "lr": cfg.lr}]
        if cfg.finetune_encoder:
            groups.append({"params": list(self.model.backbone.parameters()), "lr": cfg.encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(EpochBatches(self.data.train, [], cfg.batch_size))
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(_warmup_cosine, warmup=int(cfg.warmup * total), total=total))
        self.epoch, self.step, self.step_in_epoch, self.history = 0, 0, 0, []
        self.best, self.bad_epochs, self.running = None, 0, float("nan")  # running: smoothed train nll
        if resume is not None:
            self._restore(resume)

    def _targets(self) -> list | None:
        if not self.cfg.box_loss:
            return None
        path = self.cfg.boxes or boxes_next_to(self.cfg.data)
        if path is None:
            raise DatasetError(f"{self.cfg.data}: box_loss needs a boxes.json (none next to the captions; pass boxes)")
        return attention_targets(self.data.items, load_boxes(path), self.model.config.preprocess, self.cfg.grid)

    def _feature_cache(self, paths):
        with _progress(self.console) as bar:
            task = bar.add_task("features", total=len(paths), epoch="cache", loss=float("nan"), bleu4="")
            return build_feature_cache(self.model, paths, self.cfg.cache_dir, self.cfg.batch_size,
                                       lambda done: bar.update(task, completed=done))

    def _restore(self, train: dict) -> None:
        state = train["resume"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.step, self.step_in_epoch = train["epoch"], train["step"], train["step_in_epoch"]
        self.history, self.best, self.bad_epochs = train["history"], train["best"], train["bad_epochs"]
        self.running = train["running"]

    def loader(self, images: list[int], shuffle: bool, skip: int = 0) -> Iterator[tuple]:
        """Collated batches of the current epoch; draws nothing from the global RNG (exact resume)."""
        n_captions = [len(it.captions) for it in self.data.items]
        for keys in EpochBatches(images, n_captions, self.cfg.batch_size, shuffle, self.cfg.seed, self.epoch, skip):
            yield collate([self.dataset[k] for k in keys], self.data.vocab.pad)

    def loss(self, inputs: torch.Tensor, captions: torch.Tensor, targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, nll)`` of one batch (a ``loader`` tuple), bf16 autocast for the forward when ``amp``."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            features = grid_features(self.model, inputs, self.cached)  # (n_img, n_pix, enc_dim)
            logprobs, alphas = self.model.decode_teacher_forced(features, captions)  # (n_img, T, vocab|n_pix)
        total, nll = caption_loss(logprobs.float(), alphas.float(), captions, self.data.vocab.pad, self.cfg.alpha_c)
        if targets is not None:
            total = total + self.cfg.box_loss * box_attention_loss(alphas.float(), targets[:, 1:])
        return total, nll

    def fit(self) -> dict:
        """Train until ``epochs``, early stopping or ``max_steps``; returns the last epoch's record."""
        cfg = self.cfg
        with _progress(self.console) as bar:
            task = bar.add_task("train", total=self.steps_per_epoch, epoch="", loss=float("nan"), bleu4="")
            while self.epoch < cfg.epochs and self.bad_epochs < cfg.patience:
                last_bleu = f"val BLEU-4 {self.history[-1]['bleu4']:.3f}" if self.history else ""
                bar.reset(task, completed=self.step_in_epoch, epoch=f"{self.epoch + 1}/{cfg.epochs}",
                          loss=self.running, bleu4=last_bleu)
                started = time.perf_counter()
                if not self._train_epoch(bar, task):
                    self.save("last.pth")
                    return {"epoch": self.epoch, "step": self.step, "stopped": "max_steps"}
                self._end_epoch(train_seconds=time.perf_counter() - started)
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    break
        return self.history[-1]

    def _train_epoch(self, bar: Progress, task) -> bool:
        """Run the rest of the current epoch; False when ``max_steps`` interrupted it."""
        set_mode(self.model, True, self.cfg.finetune_encoder)
        for batch in self.loader(self.data.train, shuffle=True, skip=self.step_in_epoch):
            total, nll = self.loss(*batch)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
            self.running = nll.item() if self.step_in_epoch == 1 else 0.95 * self.running + 0.05 * nll.item()
            bar.update(task, completed=self.step_in_epoch, loss=self.running)
            if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps \
                    and self.step_in_epoch < self.steps_per_epoch:
                return False
        return True

    def _end_epoch(self, train_seconds: float) -> None:
        """Re-estimate batch norm, validate, record and save. With ``val_every_epoch`` off only the last epoch is
        validated (no early stopping): neither step changes the weights or draws from the RNG, and batch-norm
        statistics are re-estimated from scratch, so the model trained is the same, only sooner."""
        started = time.perf_counter()
        final = self.epoch + 1 >= self.cfg.epochs or (self.cfg.max_steps is not None
                                                      and self.step >= self.cfg.max_steps)
        if not (self.cfg.val_every_epoch or final):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save("last.pth")
            return
        if self.cfg.finetune_encoder:
            self.recalibrate_batchnorm()
        metrics = self.validate()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        score = [round(metrics["bleu4"], 4), -metrics["val_loss"]]
        improved = self.best is None or score > self.best["score"]
        record = {"epoch": self.epoch, "step": self.step, "train_nll": self.running, **metrics,
                  "lr": self.scheduler.get_last_lr()[0], "precision": "bf16" if self.amp else "fp32",
                  "train_seconds": round(train_seconds, 1), "val_seconds": round(time.perf_counter() - started, 1)}
        self.history.append(record)
        if improved:
            self.best, self.bad_epochs = {"epoch": self.epoch, "score": score, **metrics}, 0
            self.save("best.pth")
        else:
            self.bad_epochs += 1
        self.save("last.pth")
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.console.print(f"epoch {self.epoch}: train nll {self.running:.3f}  val loss {metrics['val_loss']:.3f}  "
                      f"BLEU-1..4 {metrics['bleu1']:.3f} {metrics['bleu2']:.3f} {metrics['bleu3']:.3f} "
                      f"{metrics['bleu4']:.3f}{'  (best)' if improved else ''}", highlight=False)

    @torch.no_grad()
    def recalibrate_batchnorm(self, n_images: int = 512) -> None:
        """Re-estimate the backbone's batch-norm statistics at the current weights.

        The running averages lag behind a backbone trained from scratch at a high learning rate,
        and eval-mode outputs then differ badly from training; an exact average over ``n_images``
        training images (forward passes only, in a fixed order) removes the lag.
        """
        norms = [m for m in self.model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.model.backbone.train()
        for images, *_ in self.loader(self.data.train[:n_images], shuffle=False):
            self.model.grid_features(images)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def validate(self) -> dict:
        """Teacher-forced validation loss (caption 0 of each image) and greedy corpus BLEU-1..4."""
        set_mode(self.model, False, self.cfg.finetune_encoder)
        losses, refs, hyps = [], [], []
        bleu_images = set(self.data.val[: self.cfg.val_images])
        options = DecodeOptions(beam=1, max_len=self.cfg.max_len + 1)
        vocab, keys = self.data.vocab, iter(self.data.val)
        with torch.inference_mode():
            for inputs, captions, targets in self.loader(self.data.val, shuffle=False):
                losses.append((self.loss(inputs, captions, targets)[0].item(), len(captions)))
                batch = [next(keys) for _ in range(len(captions))]
                rows = [k for k, i in enumerate(batch) if i in bleu_images]
                if rows:
                    for i, cap in zip([batch[k] for k in rows],
                                      caption_images(self.model, inputs[rows], self.cached, vocab, options)):
                        hyps.append(vocab.decode(cap.tokens))
                        refs.append(self.data.items[i].captions)
        val_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        return {"val_loss": val_loss, **corpus_bleu(refs, hyps)}

    def save(self, name: str) -> Path:
        train = {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                 "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs, "running": self.running,
                 "config": asdict(self.cfg)}
        if name == "last.pth":
            train["resume"] = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "rng": torch.get_rng_state()}
        return save_checkpoint(self.out / name, self.model, self.data.vocab, train)


def box_attention_loss(alphas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean ``-log`` attention mass inside the boxes, over the steps that emit a boxed word.

    ``alphas`` ``(n_img, T, n_pix)``; ``targets`` ``(n_img, T, n_pix)`` box coverage of each cell
    (all zero for steps without boxes), aligned with the words the steps emit.
    """
    mass = (alphas * targets).sum(dim=2)  # (n_img, T)
    boxed = targets.sum(dim=2) > 0  # (n_img, T)
    if not bool(boxed.any()):
        return alphas.new_zeros(())
    return -torch.log(mass[boxed].clamp_min(1e-6)).mean()


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description} {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("nll {task.fields[loss]:.3f}"), TextColumn("{task.fields[bleu4]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def train(cfg: TrainConfig, console: Console | None = None) -> dict:
    """Train a new model with ``cfg``; checkpoints go to ``cfg.out`` (``best.pth``, ``last.pth``)."""
    return Trainer(cfg, console=console).fit()


def resume(ckpt: str | Path, max_steps: int | None = None, console: Console | None = None) -> dict:
    """Continue the run saved in ``ckpt`` (a ``last.pth``) exactly where it stopped."""
    ck = load_checkpoint(ckpt)
    if "resume" not in ck.train or "config" not in ck.train:
        raise CheckpointError(f"{ckpt}: no training state to resume from (resume from a run's last.pth)")
    cfg = replace(TrainConfig.from_dict(ck.train["config"]), max_steps=max_steps)
    return Trainer(cfg, ck.train, ck.vocab, ck.state_dict, console).fit()
