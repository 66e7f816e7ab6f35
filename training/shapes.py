"""A procedurally generated captioning set with ground-truth attention: coloured shapes on noise.

Each image holds 1-3 shapes of distinct kinds (six kinds, six colours, two sizes) on a smooth,
blotchy, noisy background. One shape sits in one of nine places (``in the top left``); two or
three shapes sit in distinct columns and are described from left to right. Every image gets four
paraphrased references (Flickr8k ``captions.txt`` format) and ``boxes.json`` maps each image's
shape nouns to their pixel boxes ``[x0, y0, x1, y1]`` (pixel edges, ``x1``/``y1`` exclusive), so
attention can be scored against them (``training.metrics.attention_grounding``).

Image ``i`` depends only on ``(seed, i)``: sets are reproducible and a prefix of a larger set.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
    "yellow": (235, 205, 30), "purple": (135, 55, 185), "orange": (245, 135, 25),
}
SIZES = {"small": (0.18, 0.22), "large": (0.28, 0.33)}  # side of the shape, as a fraction of the image
SYNONYMS = {"small": "little", "large": "big", "centre": "middle"}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Shape:
    """One drawn object: its words, colour and geometry (centre and side in pixels)."""

    kind: str
    colour: str
    size: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    side: float
    place: str = ""  # "top left" ... for a lone shape, "" when several are ordered left to right

    def words(self, synonyms: bool = False) -> str:
        size = SYNONYMS[self.size] if synonyms else self.size
        return f"a {size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image: background, shapes (left to right) and noise."""

    size: int
    corners: tuple[tuple[int, int, int], ...]  # background colours at the four corners
    blotches: np.ndarray  # (4, 4, 3) low-frequency variation, upsampled over the image
    shapes: tuple[Shape, ...]
    noise: float  # std of the per-pixel Gaussian noise, in 8-bit levels
    noise_seed: int


def sample_scene(rng: np.random.Generator, size: int = 128) -> Scene:
    """Draw a random scene: 1-3 shapes of distinct kinds, a greyish background, noise."""
    n = int(rng.integers(1, 4))
    kinds = rng.choice(len(KINDS), size=n, replace=False)
    shapes = []
    for column, k in enumerate(kinds):
        size_word = ("small", "large")[int(rng.integers(2))]
        side = float(rng.uniform(*SIZES[size_word])) * size
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
        if n == 1:
            row, col = int(rng.integers(3)), int(rng.integers(3))
            cx, cy = _in_cell(rng, col, 3, side, size), _in_cell(rng, row, 3, side, size)
            place = _place_name(row, col)
        else:
            cx, cy, place = _in_cell(rng, column, n, side, size), float(rng.uniform(side / 2, size - side / 2)), ""
        shapes.append(Shape(KINDS[k], colour, size_word, rgb, cx, cy, side, place))
    grey = rng.uniform(70, 190, size=4)
    corners = tuple(tuple(int(np.clip(g + t, 0, 255)) for t in rng.uniform(-25, 25, size=3)) for g in grey)
    return Scene(size, corners, rng.normal(0.0, 12.0, size=(4, 4, 3)), tuple(shapes),
                 float(rng.uniform(3.0, 14.0)), int(rng.integers(2**31)))


def _in_cell(rng: np.random.Generator, index: int, n_cells: int, side: float, size: int) -> float:
    """A centre coordinate that keeps the whole shape inside cell ``index`` of ``n_cells``."""
    lo, hi = index * size / n_cells + side / 2, (index + 1) * size / n_cells - side / 2
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _place_name(row: int, col: int) -> str:
    if row == 1:
        return COLS[col]  # "left", "centre", "right"
    return ROWS[row] if col == 1 else f"{ROWS[row]} {COLS[col]}"


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image ``(size, size, 3)`` uint8 and each shape's coverage ``(size, size)`` float in [0, 1]."""
    s = scene.size
    ramp = np.linspace(0.0, 1.0, s)
    wy, wx = ramp[:, None, None], ramp[None, :, None]  # (s, 1, 1), (1, s, 1)
    c = np.asarray(scene.corners, dtype=np.float32)  # (4, 3): top-left, top-right, bottom-left, bottom-right
    img = (1 - wy) * ((1 - wx) * c[0] + wx * c[1]) + wy * ((1 - wx) * c[2] + wx * c[3])  # (s, s, 3)
    blotches = [Image.fromarray(scene.blotches[..., ch].astype(np.float32)).resize((s, s), Image.Resampling.BICUBIC)
                for ch in range(3)]
    img = img + np.stack([np.asarray(b) for b in blotches], axis=2)  # (s, s, 3)
    masks = []
    for shape in scene.shapes:
        alpha = _coverage(shape, s)[..., None]  # (s, s, 1)
        img = img * (1 - alpha) + np.asarray(shape.rgb, np.float32) * alpha
        masks.append(alpha[..., 0])
    if scene.noise > 0:
        img = img + np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, size=img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), masks


def _coverage(shape: Shape, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, drawn at ``SUPERSAMPLE`` x and averaged down."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = shape.cx * k, shape.cy * k, shape.side * k / 2
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape.kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape.kind == "cross":
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    else:
        draw.polygon(_polygon(shape.kind, cx, cy, r), fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0  # (size, size)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    points = []  # five-pointed star, point up
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
    return points


def box_of(mask: np.ndarray) -> list[int]:
    """Pixel box ``[x0, y0, x1, y1]`` (exclusive ends) of the pixels at least half covered."""
    ys, xs = np.nonzero(mask >= 0.5)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def captions(scene: Scene) -> list[str]:
    """Four paraphrased references; the first is the canonical wording."""
    shapes = scene.shapes
    if len(shapes) == 1:
        s = shapes[0]
        place = f"in the {s.place}" if " " in s.place or s.place == "centre" else (
            f"at the {s.place}" if s.place in ROWS else f"on the {s.place}")
        return [f"{s.words()} {place}", f"{s.words(True)} {_synonyms(place)}", f"there is {s.words()} {place}",
                f"{_synonyms(place)} there is {s.words(True)}"]
    if len(shapes) == 2:
        a, b = shapes
        return [f"{a.words()} to the left of {b.words()}", f"{a.words(True)} to the left of {b.words(True)}",
                f"{b.words()} to the right of {a.words()}", f"there is {a.words()} and {b.words()} on its right"]
    a, b, c = shapes
    return [f"{a.words()} , {b.words()} and {c.words()} from left to right",
            f"{a.words(True)} , {b.words(True)} and {c.words(True)} from left to right",
            f"from left to right {a.words()} , {b.words()} and {c.words()}",
            f"three shapes : {a.words()} on the left , {b.words()} in the middle and {c.words()} on the right"]


def _synonyms(text: str) -> str:
    return " ".join(SYNONYMS.get(w, w) for w in text.split())


def make_shapes(out: str | Path, n: int, seed: int = 0, size: int = 128, quality: int = 95) -> Path:
    """Write ``out/images/NNNNN.jpg``, ``out/captions.txt`` and ``out/boxes.json``; returns ``out``.

    ``captions.txt`` is Flickr8k's ``image,caption`` CSV (four lines per image); ``boxes.json`` maps
    each image name to ``{shape noun: [[x0, y0, x1, y1]]}`` in pixels.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    boxes: dict[str, dict[str, list[list[int]]]] = {}
    with open(out / "captions.txt", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(n):
            scene = sample_scene(np.random.default_rng([seed, i]), size)
            pixels, masks = render(scene)
            name = f"{i:05d}.jpg"
            Image.fromarray(pixels).save(out / "images" / name, quality=quality)
            writer.writerows([name, text] for text in captions(scene))
            boxes[name] = {s.kind: [box_of(m)] for s, m in zip(scene.shapes, masks)}
    (out / "boxes.json").write_text(json.dumps(boxes, indent=0) + "\n", encoding="utf-8")
    return out

