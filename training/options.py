"""The options a command takes, as frozen dataclasses that import no runtime (torch, nltk, onnxruntime):
the command-line tools build their ``--help`` from these defaults, in well under a second."""
from __future__ import annotations

from dataclasses import dataclass, fields

from training.config import PRESETS, PreprocessConfig, backbone_spec

MAX_LEN = 30  # words per caption; longer captions are cut
FAITHFUL_RATIO = 0.99  # a faithful run keeps >= this share of the reference's BLEU-4 and CIDEr-D (training.faithful)


@dataclass(frozen=True)
class DecodeOptions:
    """``beam`` 1 is greedy; ``length_penalty`` p ranks hypotheses by ``sum(logp) / length**p``."""

    beam: int = 1
    max_len: int = 20
    length_penalty: float = 0.0

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"beam must be at least 1, got {self.beam}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must not be negative, got {self.length_penalty}")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; stored in its checkpoints (``train["config"]``) so it can resume."""

    data: str  # captions file or folder (see training.data.load_captions)
    out: str = "runs/train"
    images: str | None = None
    format: str = "auto"
    backbone: str = "resnet101"
    preset: str = "small"
    grid: int = 14
    resize: int = 256
    crop: int = 224
    resize_mode: str = "shorter_side"  # or "squash", "torchvision" (training.config.PreprocessConfig)
    attention: str = "tanh"
    gate: bool = True
    dropout: float = 0.5
    pretrained: bool = False
    pretrained_weights: str | None = None
    finetune_encoder: bool = False
    cache: bool = True  # frozen encoder: train from cached grid features
    cache_dir: str = ".cache/features"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    encoder_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # share of all steps with a linear learning-rate warm-up
    grad_clip: float = 5.0
    alpha_c: float = 1.0
    box_loss: float = 0.0  # weight of the attention supervision from boxes.json (ground-truth attention)
    boxes: str | None = None  # boxes.json for box_loss; default: the one next to the captions
    amp: bool = False  # bf16 autocast, where the CPU has native bf16 (else fp32, with a warning)
    max_len: int = MAX_LEN
    min_freq: int = 1
    val_frac: float = 0.05
    test_frac: float = 0.05
    val_images: int = 500  # at most this many validation images are captioned for BLEU
    patience: int = 5
    val_every_epoch: bool = True  # False: validate (and re-estimate batch norm) after the last epoch only, same weights
    seed: int = 0
    max_steps: int | None = None  # stop (and save last.pth) after this many optimiser steps in all
    threads: int | None = None  # torch intra-op threads (None: torch's default, one per core)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience", "val_images", "min_freq", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        backbone_spec(self.backbone)  # raises for an unknown backbone
        self.preprocess  # noqa: B018 - raises for an unknown resize mode or a crop larger than the resize

    @property
    def preprocess(self) -> PreprocessConfig:
        """The model's preprocessing (ImageNet mean/std), recorded in its checkpoints."""
        return PreprocessConfig(self.resize, self.crop, resize_mode=self.resize_mode)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
