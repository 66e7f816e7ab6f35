import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import PreprocessConfig
from training.data import (CaptionDataset, EpochBatches, ImageInputs, assign_splits, attention_targets, boxes_next_to,
                           check_images, collate, load_boxes, load_captions, upright_size)
from training.errors import DatasetError
from training.images import load_rgb
from training.metrics import box_coverage
from training.shapes import make_shapes
from training.vocab import Vocab


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "Images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(folder / name)
    return folder


def test_captions_csv_reads_quoted_and_unquoted_commas_and_groups_by_image(tmp_path, image_dir):
    f = tmp_path / "captions.txt"
    f.write_text('image,caption\na.jpg,A dog runs, fast.\na.jpg,"The dog\'s ball, red!"\nb.jpg,Two cats .\n')
    items = load_captions(f)
    assert [it.name for it in items] == ["a.jpg", "b.jpg"]
    assert items[0].captions == [["a", "dog", "runs", "fast"], ["the", "dogs", "ball", "red"]]
    assert items[0].path == image_dir / "a.jpg"
    assert all(it.split in ("train", "val", "test") for it in items)


def test_captions_csv_malformed_line_names_file_and_line(tmp_path, image_dir):
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\na.jpg,a dog\nb.jpg,a cat\njust-one-field\n")
    with pytest.raises(DatasetError, match=r"captions\.txt:4: malformed line"):
        load_captions(f)
    f.write_text("image,caption\na.jpg,...\n")  # a caption without words is malformed too
    with pytest.raises(DatasetError, match=r"captions\.txt:2: malformed line"):
        load_captions(f)


def test_flickr_token_file_is_sniffed_and_read(tmp_path, image_dir):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_text("a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog .\n\nc.jpg#0\tA man on a bike , smiling .\n")
    items = load_captions(tmp_path)  # the folder: the token file is found and its format recognised
    assert [it.name for it in items] == ["a.jpg", "c.jpg"]
    assert items[1].captions == [["a", "man", "on", "a", "bike", "smiling"]]


def test_flickr_token_malformed_line_names_file_and_line(tmp_path, image_dir):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_text("a.jpg#0\tA dog runs .\nb.jpg A cat without a tab\n")
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt:2: malformed line"):
        load_captions(f, fmt="token")


def _karpathy(tmp_path, images):
    f = tmp_path / "dataset_flickr8k.json"
    f.write_text(json.dumps({"dataset": "flickr8k", "images": images}, indent=1))
    return f


def test_karpathy_json_keeps_its_splits_and_maps_restval_to_train(tmp_path, image_dir):
    f = _karpathy(tmp_path, [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "Two CATS!"}, {"raw": "cats"}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A bike"}]},
    ])
    items = load_captions(f)
    assert [(it.name, it.split) for it in items] == [("a.jpg", "test"), ("b.jpg", "train"), ("c.jpg", "val")]
    assert items[1].captions == [["two", "cats"], ["cats"]]


def test_karpathy_json_syntax_error_names_line_and_bad_entry_names_index(tmp_path, image_dir):
    f = tmp_path / "dataset_flickr8k.json"
    f.write_text('{"images": [\n{"filename": "a.jpg",\n"split": "train" "sentences": []}]}')
    with pytest.raises(DatasetError, match=r"dataset_flickr8k\.json:3: malformed JSON"):
        load_captions(f)
    f = _karpathy(tmp_path, [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "ok"}]},
                             {"split": "train", "sentences": [{"raw": "no file name"}]}])
    with pytest.raises(DatasetError, match=r"images\[1\]: malformed entry"):
        load_captions(f)


def test_splits_are_deterministic_by_image_name_and_near_the_requested_shares(tmp_path):
    f = tmp_path / "captions.txt"
    names = [f"img{i}.jpg" for i in range(2000)]
    f.write_text("image,caption\n" + "".join(f"{n},a caption\n" for n in names))
    first = {it.name: it.split for it in load_captions(f, val_frac=0.1, test_frac=0.2)}
    f.write_text("image,caption\n" + "".join(f"{n},a caption\n" for n in reversed(names[:500])))
    again = {it.name: it.split for it in load_captions(f, val_frac=0.1, test_frac=0.2)}
    assert all(first[n] == s for n, s in again.items())  # the split of an image follows its name only
    shares = {s: list(first.values()).count(s) / len(first) for s in ("train", "val", "test")}
    assert abs(shares["val"] - 0.1) < 0.03 and abs(shares["test"] - 0.2) < 0.03
    with pytest.raises(ValueError, match="sum below 1"):
        assign_splits([], 0.5, 0.5)


def test_missing_and_unreadable_images_are_listed_and_skipped(tmp_path, image_dir):
    (image_dir / "b.jpg").write_bytes(b"not an image at all")
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\na.jpg,one\nb.jpg,two\nmissing.jpg,three\n")
    kept, skipped = check_images(load_captions(f))
    assert [it.name for it in kept] == ["a.jpg"]
    assert [p.name for p, _ in skipped] == ["b.jpg", "missing.jpg"]
    assert "cannot identify" in skipped[0][1] and "not found" in skipped[1][1]


def test_missing_captions_file_or_image_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="captions file not found"):
        load_captions(tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match="no captions.txt"):
        load_captions(tmp_path)
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,x\n")
    with pytest.raises(DatasetError, match="image folder not found"):
        load_captions(tmp_path, images=tmp_path / "absent")


def test_epoch_batches_cover_each_image_once_are_reproducible_and_skip_resumes(tmp_path):
    images, n_captions = list(range(10, 33)), [3] * 40
    batches = lambda **kw: list(EpochBatches(images, n_captions, 5, seed=7, **kw))  # noqa: E731
    epoch0 = batches(epoch=0)
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3] and len(EpochBatches(images, n_captions, 5)) == 5
    assert sorted(i for b in epoch0 for i, _ in b) == images
    assert all(0 <= j < 3 for b in epoch0 for _, j in b)
    assert epoch0 == batches(epoch=0) and epoch0 != batches(epoch=1)
    assert batches(epoch=0, skip=2) == epoch0[2:]
    assert list(EpochBatches(images[:3], n_captions, 2, shuffle=False)) == [[(10, 0), (11, 0)], [(12, 0)]]


def test_dataset_and_collate_pad_captions_and_stack_images(tmp_path, image_dir):
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\na.jpg,a red circle\nc.jpg,blue\n")
    items = load_captions(f)
    vocab = Vocab.build(c for it in items for c in it.captions)
    inputs = ImageInputs([it.path for it in items], PreprocessConfig(resize=16, crop=16))
    images, captions, targets = collate([CaptionDataset(items, vocab, inputs)[(i, 0)] for i in range(2)],
                                        pad_id=vocab.pad)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and targets is None
    assert captions.tolist() == [vocab.encode(["a", "red", "circle"]), vocab.encode(["blue"]) + [vocab.pad] * 2]


def test_attention_targets_put_each_boxed_words_coverage_on_its_row(tmp_path):
    out = make_shapes(tmp_path / "s", 6, seed=2, size=64)
    items = load_captions(out)
    boxes = load_boxes(boxes_next_to(out / "captions.txt"))
    cfg = PreprocessConfig(resize=64, crop=64)
    targets = attention_targets(items, boxes, cfg, grid=4)
    vocab = Vocab.build(c for it in items for c in it.captions)
    dataset = CaptionDataset(items, vocab, ImageInputs([it.path for it in items], cfg), targets)
    for i, it in enumerate(items):
        _, ids, target = dataset[(i, 1)]
        assert target.shape == (len(ids), 16)
        for t, word in enumerate(it.captions[1], start=1):
            if word in boxes[it.name]:
                expected = box_coverage(boxes[it.name][word], (0, 0, 64, 64), 4).reshape(-1)
                np.testing.assert_allclose(target[t].numpy(), expected, rtol=1e-6)
            else:
                assert not target[t].any()
        assert not target[0].any() and not target[-1].any()  # <start>, <end>


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_upright_size_is_the_size_load_rgb_gives(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (40, 24)).save(tmp_path / "a.jpg", exif=exif)
    assert upright_size(tmp_path / "a.jpg") == load_rgb(tmp_path / "a.jpg").size
