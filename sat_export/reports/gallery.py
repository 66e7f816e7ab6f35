"""``sat-infer --overlays DIR``: one attention overlay PNG per word, and a static HTML gallery.

For the image with key ``sub/a.jpg``, ``DIR/sub/a.jpg/`` holds ``image.jpg`` (a thumbnail) and
``00_word.png``, ``01_word.png``... drawn by ``sat_export.reports.overlays.overlay``. ``DIR/index.html``
links them (relative URLs, so the folder can be moved or served as is) and lists error rows;
it is rebuilt from the whole JSONL at the end of a run, resumed rows included. The page shares
its style with the ``sat-eval`` report (``sat_export.reports.html``).
"""
from __future__ import annotations

import json
import os
import re
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from sat_export.reports.html import THUMB, card_html, figure_html, named_list, page_head, steps_html
from sat_export.reports.overlays import overlay
from sat_export.results.paths import sidecar_path
from sat_export.text import printable
from training.config import PreprocessConfig
from training.vocab import Vocab

_UNSAFE = re.compile(r"[^\w-]+")
WORD_CHARS = 48  # of a word in its overlay's file name: 4 bytes each at most, far inside the 255 a name may have


def overlay_folder(key: str, root: Path) -> Path:
    """The folder of the image with this key: the input tree mirrored under ``root``."""
    return sidecar_path(key, root, "")


def overlay_name(step: int, word: str) -> str:
    return f"{step:02d}_{_UNSAFE.sub('_', word)[:WORD_CHARS]}.png"


def write_overlays(folder: Path, image: Image.Image, alphas: np.ndarray, words: list[str],
                   preprocess: PreprocessConfig) -> None:
    """Write ``image.jpg`` and one overlay PNG per word; ``alphas`` is ``(T, g, g)`` for ``T`` words."""
    if len(alphas) != len(words):
        raise ValueError(f"{len(alphas)} attention maps for {len(words)} words")
    folder.mkdir(parents=True, exist_ok=True)
    thumb = image.copy()
    thumb.thumbnail((THUMB, THUMB))
    thumb.save(folder / "image.jpg", quality=85)
    for step, (word, alpha) in enumerate(zip(words, alphas)):
        overlay(image, alpha, preprocess, max_side=THUMB).save(folder / overlay_name(step, word))


def write_gallery(rows_file: Path, root: Path, vocab: Vocab) -> Path:
    """Write ``root/index.html`` for every row of ``rows_file`` (a sat-infer JSONL) and return its path."""
    cards, errors = [], []
    with rows_file.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "error" in row:
                errors.append(row)
            elif overlay_folder(row["image"], root).is_dir():
                cards.append(_card(row, root, [vocab.itos[t] for t in row["tokens"]]))
    title = f"sat-infer: {rows_file.name}"
    error_list = named_list("Error rows", errors, expanded=False) if errors else ""
    page = (page_head(title) + f"<p>{len(cards)} captioned images with attention</p>{error_list}"
            + "\n".join(cards) + "</body></html>")
    index = root / "index.html"
    root.mkdir(parents=True, exist_ok=True)
    index.write_text(page, encoding="utf-8", errors="backslashreplace")  # as sat-eval's page
    return index


def _card(row: dict, root: Path, words: list[str]) -> str:
    base = quote(os.fsencode(overlay_folder(row["image"], root).relative_to(root).as_posix()))  # a name's own bytes
    lazy = " loading='lazy'"
    figures = [figure_html(f"{base}/image.jpg", "(image)", lazy)]
    figures += [figure_html(f"{base}/{quote(overlay_name(step, word))}", escape(word), lazy)
                for step, word in enumerate(words)]
    return card_html(row["caption"], f"{escape(printable(row['image']))} · score {row['score']:.3f}", steps_html(figures))
