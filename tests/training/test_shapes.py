import json
from dataclasses import replace

import numpy as np
import pytest

from training.data import load_captions
from training.shapes import KINDS, box_of, captions, make_shapes, render, sample_scene


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_other_seed_differs_and_sets_are_prefixes(tmp_path):
    a, b = _files(make_shapes(tmp_path / "a", 12, seed=5)), _files(make_shapes(tmp_path / "b", 12, seed=5))
    assert a == b
    c = _files(make_shapes(tmp_path / "c", 12, seed=6))
    assert a["images/00000.jpg"] != c["images/00000.jpg"] and a["captions.txt"] != c["captions.txt"]
    small = _files(make_shapes(tmp_path / "d", 5, seed=5))
    assert all(small[f"images/{i:05d}.jpg"] == a[f"images/{i:05d}.jpg"] for i in range(5))


@pytest.mark.parametrize("seed", range(12))
def test_boxes_match_the_drawn_pixels(seed):
    scene = replace(sample_scene(np.random.default_rng([99, seed])), noise=0.0)
    image, masks = render(scene)
    background, _ = render(replace(scene, shapes=()))
    changed = np.abs(image.astype(int) - background.astype(int)).max(axis=2) > 2  # (size, size)
    boxes = [box_of(m) for m in masks]
    near_a_box = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        near_a_box[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
        ys, xs = np.nonzero(changed[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1])
        drawn = [xs.min() + max(0, x0 - 1), ys.min() + max(0, y0 - 1), xs.max() + max(0, x0 - 1) + 1,
                 ys.max() + max(0, y0 - 1) + 1]
        assert np.abs(np.subtract(drawn, [x0, y0, x1, y1])).max() <= 1, (drawn, [x0, y0, x1, y1])
        assert min(x1 - x0, y1 - y0) >= 0.15 * scene.size  # a box is the whole shape, not a speck
    assert not (changed & ~near_a_box).any()  # nothing drawn outside the boxes
    for i, a in enumerate(boxes):  # shapes never overlap
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_captions_and_boxes_files_describe_each_image(tmp_path):
    out = make_shapes(tmp_path / "s", 40, seed=3)
    items = load_captions(out / "captions.txt")
    boxes = json.loads((out / "boxes.json").read_text())
    assert len(items) == 40 and set(boxes) == {it.name for it in items}
    for it in items:
        assert len(it.captions) >= 3 and len({tuple(c) for c in it.captions}) == len(it.captions)
        assert 1 <= len(boxes[it.name]) <= 3 and set(boxes[it.name]) <= set(KINDS)
        for caption in it.captions:  # every reference names every shape
            assert set(boxes[it.name]) <= set(caption)
        for (x0, y0, x1, y1), in boxes[it.name].values():
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert {len(b) for b in boxes.values()} == {1, 2, 3}


def test_canonical_caption_names_the_shapes_from_left_to_right():
    for seed in range(30):
        scene = sample_scene(np.random.default_rng([1, seed]))
        words = captions(scene)[0].split()
        by_x = [s.kind for s in sorted(scene.shapes, key=lambda s: s.cx)]
        assert [w for w in words if w in KINDS] == by_x


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 1"):
        make_shapes(tmp_path, 0)
    with pytest.raises(ValueError, match="size must be at least 32"):
        make_shapes(tmp_path, 1, size=8)
