"""Caption datasets: readers for the formats users have, image checks, splits, batching.

Formats (``load_captions`` picks one from the file):

- Flickr8k ``captions.txt``: CSV with an ``image,caption`` header, one caption per line.
- Flickr8k ``Flickr8k.token.txt``: ``name.jpg#n<TAB>caption``.
- Karpathy's ``dataset_*.json``: ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``.

Every caption goes through the one tokeniser, ``training.vocab.tokenize``. Images without a split
in the file get a deterministic one from a hash of their name, so it survives added images.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from training.config import PreprocessConfig
from training.errors import DatasetError, ImageDecodeError
from training.images import load_image, load_rgb
from training.metrics import box_coverage, crop_window
from training.options import MAX_LEN
from training.vocab import Vocab, tokenize

SPLITS = ("train", "val", "test")
IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset")  # tried next to the captions file
_TOKEN_LINE = re.compile(r"^(?P<name>[^\t#]+)#\d+\t(?P<caption>.*)$")
EXIF_ORIENTATION, TRANSPOSED = 0x0112, (5, 6, 7, 8)  # orientations that swap width and height


@dataclass
class ImageCaptions:
    """One image and its tokenised reference captions."""

    name: str  # as written in the captions file (the key of ``boxes.json``)
    path: Path
    captions: list[list[str]]
    split: str | None = None  # "train", "val", "test", or None when the file has no split


def load_captions(path: str | Path, images: str | Path | None = None, fmt: str = "auto", max_len: int = MAX_LEN,
                  val_frac: float = 0.05, test_frac: float = 0.05) -> list[ImageCaptions]:
    """Read a captions file in any supported format and give every image a split.

    Parameters
    ----------
    path : the captions file, or a folder holding ``captions.txt``, ``Flickr8k.token.txt`` or one
        ``dataset_*.json``.
    images : the image folder; by default the first of ``Images``, ``images``, ``Flicker8k_Dataset``
        next to the captions file, else the captions file's folder.
    fmt : ``"auto"``, ``"csv"``, ``"token"`` or ``"karpathy"``.
    val_frac, test_frac : shares of images, by name hash, for formats without splits.
    """
    path = _captions_file(Path(path))
    if fmt == "auto":
        fmt = _sniff(path)
    readers = {"csv": read_captions_csv, "token": read_flickr_token, "karpathy": read_karpathy_json}
    if fmt not in readers:
        raise DatasetError(f"unknown captions format {fmt!r}; choose auto, {', '.join(readers)}")
    items = readers[fmt](path, _image_dir(path, images), max_len)
    if not items:
        raise DatasetError(f"{path}: no captions found")
    return assign_splits(items, val_frac, test_frac)


def _captions_file(path: Path) -> Path:
    if path.is_dir():
        found = [path / n for n in ("captions.txt", "Flickr8k.token.txt") if (path / n).is_file()]
        found += sorted(path.glob("dataset_*.json"))
        if not found:
            raise DatasetError(f"{path}: no captions.txt, Flickr8k.token.txt or dataset_*.json in this folder")
        path = found[0]
    if not path.is_file():
        raise DatasetError(f"{path}: captions file not found")
    return path


def _sniff(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "karpathy"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return "token" if _TOKEN_LINE.match(first.rstrip("\r\n")) else "csv"


def _image_dir(captions: Path, images: str | Path | None) -> Path:
    if images is not None:
        if not Path(images).is_dir():
            raise DatasetError(f"{images}: image folder not found")
        return Path(images)
    return next((captions.parent / d for d in IMAGE_DIRS if (captions.parent / d).is_dir()), captions.parent)


def _group(pairs: Iterator[tuple[str, list[str]]], image_dir: Path) -> list[ImageCaptions]:
    """``(name, tokens)`` pairs -> one ``ImageCaptions`` per name, in first-seen order."""
    by_name: dict[str, ImageCaptions] = {}
    for name, tokens in pairs:
        if name not in by_name:
            by_name[name] = ImageCaptions(name, image_dir / name, [])
        by_name[name].captions.append(tokens)
    return list(by_name.values())


def _tokens(text: str, max_len: int, where: str) -> list[str]:
    words = tokenize(text, max_len)
    if not words:
        raise DatasetError(f"{where}: malformed line: the caption has no words")
    return words


def read_captions_csv(path: Path, image_dir: Path, max_len: int = MAX_LEN) -> list[ImageCaptions]:
    """Flickr8k ``captions.txt``: ``image,caption`` CSV (an unquoted caption may contain commas)."""
    def pairs():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or (reader.line_num == 1 and [c.strip().lower() for c in row] == ["image", "caption"]):
                    continue
                if len(row) < 2 or not row[0].strip():
                    raise DatasetError(f"{where}: malformed line: expected 'image,caption', got {','.join(row)!r}")
                yield row[0].strip(), _tokens(",".join(row[1:]), max_len, where)
    return _group(pairs(), image_dir)


def read_flickr_token(path: Path, image_dir: Path, max_len: int = MAX_LEN) -> list[ImageCaptions]:
    """Flickr8k ``Flickr8k.token.txt``: ``name.jpg#n<TAB>caption`` per line."""
    def pairs():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                m = _TOKEN_LINE.match(line)
                if m is None:
                    raise DatasetError(f"{path}:{lineno}: malformed line: expected 'name.jpg#n<TAB>caption', "
                                       f"got {line[:80]!r}")
                yield m["name"], _tokens(m["caption"], max_len, f"{path}:{lineno}")
    return _group(pairs(), image_dir)


def read_karpathy_json(path: Path, image_dir: Path, max_len: int = MAX_LEN) -> list[ImageCaptions]:
    """Karpathy's ``dataset_*.json``; ``restval`` counts as train, ``filepath`` (COCO) is honoured."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected a JSON object with an 'images' list (Karpathy's dataset_*.json)")
    items = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry.get("sentences"):
            raise DatasetError(f"{where}: malformed entry: needs 'filename' and a non-empty 'sentences' list")
        name = str(Path(entry.get("filepath", "")) / entry["filename"])
        try:
            captions = [_tokens(s["raw"], max_len, where) for s in entry["sentences"]]
        except (KeyError, TypeError):
            raise DatasetError(f"{where}: malformed entry: every sentence needs a 'raw' caption") from None
        split = {"restval": "train"}.get(entry.get("split"), entry.get("split"))
        if split not in SPLITS:
            raise DatasetError(f"{where}: unknown split {entry.get('split')!r}")
        items.append(ImageCaptions(name, image_dir / name, captions, split))
    return items


def assign_splits(items: list[ImageCaptions], val_frac: float, test_frac: float) -> list[ImageCaptions]:
    """Give images without a split one from a hash of their name (stable as images are added)."""
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be >= 0 and sum below 1")
    for item in items:
        if item.split is None:
            u = int.from_bytes(hashlib.sha256(item.name.encode()).digest()[:8], "big") / 2**64
            item.split = "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"
    return items


def check_images(items: Sequence[ImageCaptions]) -> tuple[list[ImageCaptions], list[tuple[Path, str]]]:
    """Decode every image once: ``(readable items, [(path, reason) for missing or unreadable ones])``."""
    kept, skipped = [], []
    for item in items:
        try:
            load_rgb(item.path)
            kept.append(item)
        except ImageDecodeError as err:
            skipped.append((item.path, str(err)))
    return kept, skipped


class ImageInputs:
    """Preprocessed images by index: ``inputs[i] -> (3, crop, crop)`` float32."""

    def __init__(self, paths: Sequence[Path], preprocess: PreprocessConfig):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(load_image(self.paths[i], self.preprocess))


def load_boxes(path: str | Path) -> dict[str, dict[str, list]]:
    """``boxes.json``: image name -> {word: [[x0, y0, x1, y1], ...]} (see ``training.shapes``)."""
    try:
        boxes = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read boxes ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
    if not isinstance(boxes, dict) or not all(isinstance(v, dict) for v in boxes.values()):
        raise DatasetError(f"{path}: expected {{image name: {{word: [[x0, y0, x1, y1], ...]}}}}")
    return boxes


def upright_size(path: Path) -> tuple[int, int]:
    """``(w, h)`` of the image as ``training.images.load_rgb`` returns it (EXIF rotation applied), header only."""
    with Image.open(path) as img:
        swap = img.getexif().get(EXIF_ORIENTATION) in TRANSPOSED
        return (img.height, img.width) if swap else img.size


def boxes_next_to(data: str | Path) -> Path | None:
    """The ``boxes.json`` beside a captions file (or in a captions folder), if there is one."""
    path = (Path(data) if Path(data).is_dir() else Path(data).parent) / "boxes.json"
    return path if path.is_file() else None


def attention_targets(items: list[ImageCaptions], boxes: dict, preprocess: PreprocessConfig,
                      grid: int) -> list[dict[str, np.ndarray]]:
    """Per image, object word -> ``(grid*grid,)`` share of each attention cell inside its boxes.

    ``boxes`` is a ``boxes.json`` (image name -> {word: [[x0, y0, x1, y1], ...]}). The cells are
    those of the model's centre crop (``training.metrics.box_coverage``), so a target is exactly
    what ``attention_grounding`` scores.
    """
    targets = []
    for item in items:
        words = boxes.get(item.name, {})
        window = crop_window(upright_size(item.path), preprocess) if words else None
        targets.append({w: box_coverage(b, window, grid).reshape(-1).astype(np.float32) for w, b in words.items()})
    return targets


class CaptionDataset(Dataset):
    """``dataset[(i, j)]`` -> ``(inputs[i], ids of caption j of image i, attention target or None)``.

    ``inputs`` is anything indexable by image: ``ImageInputs`` (images) or a
    ``training.features.FeatureCache`` (grid features). With ``targets``
    (``attention_targets``), the third element is ``(len(ids), n_pix)``: row t is the box coverage of word t, zero for
    words without boxes.
    """

    def __init__(self, items: Sequence[ImageCaptions], vocab: Vocab, inputs,
                 targets: Sequence[dict[str, np.ndarray]] | None = None):
        if len(items) != len(inputs) or (targets is not None and len(targets) != len(items)):
            raise ValueError(f"{len(items)} images but {len(inputs)} inputs")
        self.items, self.vocab, self.inputs, self.targets = items, vocab, inputs, targets
        if targets is not None:
            self.n_pix = next((len(v) for t in targets for v in t.values()), None)
            if self.n_pix is None:
                raise DatasetError("no image of the captions file has an entry in the boxes file")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor | None]:
        i, j = key
        words = self.items[i].captions[j]
        ids = torch.tensor(self.vocab.encode(words))
        if self.targets is None:
            return self.inputs[i], ids, None
        target = torch.zeros(len(ids), self.n_pix)  # (T+2, n_pix): rows of <start>, words, <end>
        for t, word in enumerate(words, start=1):
            if word in self.targets[i]:
                target[t] = torch.from_numpy(self.targets[i][word])
        return self.inputs[i], ids, target


def collate(batch: Sequence[tuple[Tensor, Tensor, Tensor | None]], pad_id: int = 0
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Stack inputs, right-pad captions (and attention targets with zero rows).

    Returns ``(n_img, ...)``, ``(n_img, T+1)`` int64 ``<start> .. <end> <pad>..``, and
    ``(n_img, T+1, n_pix)`` or None.
    """
    inputs = torch.stack([x for x, _, _ in batch])  # (n_img, ...)
    captions = torch.nn.utils.rnn.pad_sequence([c for _, c, _ in batch], batch_first=True, padding_value=pad_id)
    if batch[0][2] is None:
        return inputs, captions, None
    targets = torch.nn.utils.rnn.pad_sequence([t for _, _, t in batch], batch_first=True)  # (n_img, T+1, n_pix)
    return inputs, captions, targets


class EpochBatches(Sampler):
    """Batches of ``(image, caption)`` keys: every image once per epoch.

    With ``shuffle``, epoch ``e``'s image order and caption choice come from a generator seeded
    with ``(seed, e)`` only, so a resumed run sees exactly the batches it would have; ``skip``
    drops the first batches (those done before the interruption). Without ``shuffle``: images
    in order, caption 0.
    """

    def __init__(self, images: Sequence[int], n_captions: Sequence[int], batch_size: int, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, skip: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.images, self.n_captions, self.batch_size = list(images), n_captions, batch_size
        self.shuffle, self.seed, self.epoch, self.skip = shuffle, seed, epoch, skip

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size) - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, choice = torch.arange(len(self.images)), torch.zeros(len(self.images))
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order, choice = torch.randperm(len(self.images), generator=gen), torch.rand(len(self.images), generator=gen)
        keys = [(self.images[k], int(choice[k] * self.n_captions[self.images[k]])) for k in order.tolist()]
        for start in range(self.skip * self.batch_size, len(keys), self.batch_size):
            yield keys[start:start + self.batch_size]
