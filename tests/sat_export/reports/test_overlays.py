"""Attention overlays: the heat lands where the attention is, inside the model's crop window."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sat_export.reports.overlays import heat_colours, overlay
from training.config import PreprocessConfig

CFG = PreprocessConfig(resize=64, crop=64)


def test_heat_colours_run_from_blue_to_red():
    np.testing.assert_allclose(heat_colours(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_overlay_puts_the_heat_on_the_attended_cell_of_the_crop():
    img = Image.new("RGB", (128, 64), "black")  # centre crop: x in [32, 96)
    alpha = np.zeros((2, 2))
    alpha[1, 0] = 1.0  # bottom-left cell of the crop: x in [32, 64), y in [32, 64)
    out = np.asarray(overlay(img, alpha, CFG, opacity=1.0)).astype(int)
    assert out.shape == (64, 128, 3)
    red = out[..., 0] - out[..., 2]
    assert red[48, 36] > 100  # inside the attended cell, away from the bilinear ramp
    assert red[8, 80] < 0 and red[48, 10] < 0 and red[48, 120] < 0  # other cell, outside the crop: blue
    assert np.argmax(red[48]) < 64 and np.argmax(red[:, 40]) >= 32


def test_a_squashed_grid_spans_the_whole_image():
    img = Image.new("RGB", (128, 64), "black")
    alpha = np.zeros((2, 2))
    alpha[1, 0] = 1.0  # bottom-left cell: x in [0, 64), y in [32, 64) of the squashed image
    red = np.asarray(overlay(img, alpha, PreprocessConfig(64, 64, resize_mode="squash"), opacity=1.0)).astype(int)
    red = red[..., 0] - red[..., 2]
    assert red[48, 8] > 100 and red[48, 56] > 100  # a centre crop would have left x < 32 blue
    assert red[8, 8] < 0 and red[48, 120] < 0


def test_a_flat_map_stays_cool_and_a_peaked_one_reaches_red():
    img = Image.new("RGB", (64, 64), "black")
    flat = np.asarray(overlay(img, np.full(16, 1 / 16), CFG, opacity=1.0)).astype(int)
    assert (flat[..., 2] > flat[..., 0]).all()  # uniform attention: blue everywhere
    peaked = np.full(16, 0.5 / 15)
    peaked[5] = 0.5
    assert np.asarray(overlay(img, peaked, CFG, opacity=1.0))[..., 0].max() >= 127  # jet's red end


def test_overlay_accepts_flattened_alphas_and_shrinks():
    img = Image.new("RGB", (300, 150), "white")
    a = np.random.default_rng(0).random(16)
    small = overlay(img, a, CFG, max_side=100)
    assert small.size == (100, 50)
    assert np.asarray(small).shape == np.asarray(overlay(img, a.reshape(4, 4), CFG, max_side=100)).shape
    with pytest.raises(ValueError, match="not a square grid"):
        overlay(img, np.ones(15), CFG)
