"""Model and preprocessing configuration, stored verbatim in every checkpoint and bundle manifest.

A stored config is JSON data, read back through one strict schema: these dataclasses' own types,
checked by pydantic (``__pydantic_config__``: no coercion, so ``grid: 8.0`` or ``crop: "128"`` is
refused, and no unknown keys), then their ``__post_init__`` ranges. ``ModelConfig.from_dict``
applies it to a checkpoint's config; the bundle manifest's schema embeds ``ModelConfig`` itself.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import cache

from pydantic import ConfigDict, TypeAdapter, ValidationError

from training.errors import CheckpointError, clip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Attention / decoder sizes: the seed project's four, plus 512/512 of the most-used public
# implementation (sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning).
PRESETS: dict[str, dict[str, int]] = {
    "small": {"att_dim": 128, "dec_dim": 256, "emb_dim": 128},
    "medium": {"att_dim": 256, "dec_dim": 512, "emb_dim": 256},
    "sgrvinod": {"att_dim": 512, "dec_dim": 512, "emb_dim": 512},
    "large": {"att_dim": 1024, "dec_dim": 1024, "emb_dim": 512},
    "xl": {"att_dim": 3000, "dec_dim": 3000, "emb_dim": 512},
}


RESIZE_MODES = ("shorter_side", "squash", "torchvision")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the encoder's input: resize, centre crop ``crop x crop``, normalise.

    ``resize_mode``:

    - ``"shorter_side"`` (default): the short side becomes ``resize`` (the long one ``round``-ed,
      each side at least ``crop``), crop offsets rounded down;
    - ``"squash"``: the whole image becomes ``resize x resize`` (aspect ratio lost), as sgrvinod's
      ``caption.py`` does with ``resize = crop = 256``;
    - ``"torchvision"``: ``T.Resize(resize)`` + ``T.CenterCrop(crop)`` on a PIL image exactly (long
      side truncated, crop offsets rounded half to even), as the seed project's notebooks did.

    ``reducing_gap`` is Pillow's ``resize(..., reducing_gap=)``: 3.0 is faster on large photos and
    within a few grey levels of a plain resize; None is the plain resize that SciPy's ``imresize``
    and torchvision make.

    ``draft_margin``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's
    reduced-size decoding, ``Image.draft``) that still leaves at least ``draft_margin x resize``
    pixels on its short side, the model's own resize then taking it down. On 12 MP photos that is
    about 5x less decoding work; measured against full decoding on 294 photos at 128 px, 97.3 % of
    the demo model's captions stay identical, as many as switching ``reducing_gap`` to None keeps
    (the changed ones are near-ties), and a margin of 3 or 4 kept no more. None decodes every pixel:
    the importers of other projects' checkpoints record it (with ``reducing_gap`` None), so their
    models see exactly what their own code fed them. Checkpoints written before these fields load
    with their defaults.
    """

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "shorter_side"
    reducing_gap: float | None = 3.0
    draft_margin: float | None = 2.0

    def __post_init__(self):
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"crop ({self.crop}) must be at least 1 and not exceed resize ({self.resize})")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, not {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        if self.reducing_gap is not None and not self.reducing_gap >= 1.0:
            raise ValueError(f"reducing_gap must be None or at least 1.0, got {self.reducing_gap}")
        if self.draft_margin is not None and not self.draft_margin >= 1.0:
            raise ValueError(f"draft_margin must be None or at least 1.0, got {self.draft_margin}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {len(self.mean)} and {len(self.std)}")
        if not all(map(math.isfinite, self.mean)) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"mean must be finite and std positive, got {self.mean} and {self.std}")

    @property
    def draft_short_side(self) -> int | None:
        """The fewest pixels a reduced-size decode may leave on the short side (None: decode them all)."""
        return None if self.draft_margin is None else math.ceil(self.draft_margin * self.resize)

    def placement(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where a ``(w, h)`` image goes: the size it is resized to, and the crop's ``(left, top)`` in it.

        The single definition of the geometry: ``training.images.preprocess`` applies it and
        ``training.metrics.crop_window`` maps the attention grid back through it.
        """
        w, h = image_size
        if self.resize_mode == "torchvision":
            long = int(self.resize * max(w, h) / min(w, h))
            size = (self.resize, long) if w <= h else (long, self.resize)
            return size, (round((size[0] - self.crop) / 2), round((size[1] - self.crop) / 2))
        if self.resize_mode == "squash":
            size = (self.resize, self.resize)
        else:
            scale = self.resize / min(w, h)
            size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        return size, ((size[0] - self.crop) // 2, (size[1] - self.crop) // 2)


MAX_SIZE = 1 << 20  # any layer or vocabulary size above this is a crafted config, not a model (xl is 3000)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: ``ShowAttendTell(ModelConfig(**ckpt["config"]))``."""

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")

    vocab_size: int
    backbone: str = "resnet101"
    enc_dim: int = 2048
    grid: int = 14
    att_dim: int = 128
    dec_dim: int = 256
    emb_dim: int = 128
    attention: str = "tanh"  # "tanh" (paper) or "relu" (sgrvinod)
    gate: bool = True  # sigmoid gate beta on the context vector (paper section 4.2.1)
    dropout: float = 0.5
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self):
        if isinstance(self.preprocess, dict):
            object.__setattr__(self, "preprocess", PreprocessConfig(**self.preprocess))
        if self.attention not in ("tanh", "relu"):
            raise ValueError(f"attention must be 'tanh' or 'relu', not {self.attention!r}")
        for name in ("vocab_size", "enc_dim", "grid", "att_dim", "dec_dim", "emb_dim"):
            if not 1 <= getattr(self, name) <= MAX_SIZE:
                raise ValueError(f"{name} must be in 1..{MAX_SIZE}, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_pix(self) -> int:
        return self.grid * self.grid

    def dims(self) -> dict[str, int]:
        """Sizes of the named axes of the graph contract (``engines.contract``)."""
        return {
            "n_pix": self.n_pix, "enc_dim": self.enc_dim, "att_dim": self.att_dim, "dec_dim": self.dec_dim,
            "vocab": self.vocab_size, "height": self.preprocess.crop, "width": self.preprocess.crop,
        }

    def to_dict(self) -> dict:
        """Plain, JSON- and ``weights_only``-safe dict (tuples become lists)."""
        d = asdict(self)
        d["preprocess"]["mean"] = list(d["preprocess"]["mean"])
        d["preprocess"]["std"] = list(d["preprocess"]["std"])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        """Build from a stored dict through the strict schema, refusing it with a message naming
        ``source`` and the field."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: config is a {type(d).__name__}, expected a dict")
        unknown = sorted(map(str, set(d) - {f.name for f in fields(cls)}))
        if unknown:
            raise CheckpointError(f"{source}: unknown config keys {unknown}")
        try:
            return _schema().validate_json(json.dumps(d))  # stored configs are JSON data: one schema for all
        except ValidationError as err:
            raise CheckpointError(f"{source}: invalid config: {first_error(err)}") from None
        except (TypeError, ValueError, RecursionError) as err:  # json.dumps: not JSON data
            raise CheckpointError(f"{source}: invalid config: {type(err).__name__}: {clip(str(err), 160)}") from None


@cache
def _schema() -> TypeAdapter:
    return TypeAdapter(ModelConfig)


def first_error(err: ValidationError) -> str:
    """The first problem of a pydantic ``err`` as ``field 'a.b': what is wrong`` (values not echoed)."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    what = first["msg"].removeprefix("Value error, ")
    return f"field {where!r}: {what}" if where else what


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier (``arch``), how to cut it, and its channels and stride once cut."""

    arch: str
    channels: int
    stride: int
    n_blocks: int | None = None  # keep only ``features[:n_blocks]`` (MobileNet)


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", 512, 32),
    "resnet34": Backbone("resnet34", 512, 32),
    "resnet50": Backbone("resnet50", 2048, 32),
    "resnet101": Backbone("resnet101", 2048, 32),
    "resnet152": Backbone("resnet152", 2048, 32),
    "mobilenet_v3_small": Backbone("mobilenet_v3_small", 576, 32),
    # First 9 blocks only: stride 16 keeps a 14x14 grid at 224 px (0.19 M params): the demo model's.
    "mobilenet_v3_small_s16": Backbone("mobilenet_v3_small", 48, 16, n_blocks=9),
}


def backbone_spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]
