"""Attention overlays: a ``g x g`` attention map drawn over the original image.

The grid covers the model's centre crop (``training.metrics.crop_window``; the whole image for a
``squash`` without crop), so the map is upsampled bilinearly onto that window only; the parts of the
image the model never saw get the colour of zero attention. Used by ``sat-eval --html`` and
``sat-infer --overlays``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from training.config import PreprocessConfig
from training.metrics import crop_window

FLAT_PEAK = 4.0  # the colour scale tops out at no less than 4x the uniform weight 1 / n_pix


def heat_colours(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] on the classic "jet" ramp (blue, cyan, yellow, red), ``(..., 3)``."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(image: Image.Image, alpha: np.ndarray, preprocess: PreprocessConfig,
            opacity: float = 0.5, max_side: int | None = None) -> Image.Image:
    """Blend one step's attention over the image it was computed on.

    Parameters
    ----------
    image : the original RGB image, or a copy scaled with its aspect ratio kept (the crop window is
        computed from its size).
    alpha : ``(g, g)`` or ``(g*g,)`` attention weights. The colour scale runs from 0 to the map's
        peak, but at least ``FLAT_PEAK`` times the uniform weight: a flat map stays cool, not red.
    preprocess : the model's resize/crop settings, to place the grid on the image.
    opacity : weight of the colour map in the blend.
    max_side : shrink the result so its longer side is at most this many pixels.

    Returns
    -------
    An RGB image of the original aspect ratio.
    """
    a = np.asarray(alpha, dtype=np.float32)
    grid = int(round(np.sqrt(a.size)))
    if grid * grid != a.size:
        raise ValueError(f"alpha has {a.size} values, not a square grid")
    window = crop_window(image.size, preprocess)
    scale = min(1.0, max_side / max(image.size)) if max_side else 1.0
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = (v * scale for v in window)
    left, top = round(x0), round(y0)
    w, h = max(1, round(x1) - left), max(1, round(y1) - top)
    peak = max(float(a.max()), FLAT_PEAK / a.size)
    heat_grid = Image.fromarray(a.reshape(grid, grid) / peak, mode="F")
    heat = np.zeros((image.height, image.width), np.float32)  # zero attention outside the crop
    heat[top:top + h, left:left + w] = np.asarray(heat_grid.resize((w, h), Image.Resampling.BILINEAR))
    rgb = np.asarray(image.convert("RGB"), np.float32) / 255.0  # (h, w, 3)
    blended = (1.0 - opacity) * rgb + opacity * heat_colours(heat)
    return Image.fromarray(np.rint(blended * 255.0).astype(np.uint8))
