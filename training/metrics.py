"""Caption metrics (corpus BLEU-1..4, CIDEr-D, agreement of two captioners) and attention grounding.

BLEU is nltk's ``corpus_bleu`` itself (cumulative weights, no smoothing). CIDEr-D reproduces the COCO
caption evaluation code (``pycocoevalcap.cider``) quirk for quirk. Grounding measures how much
of a word's attention falls inside the boxes of the object it names, in original-image pixels.

Attention grid -> image mapping
-------------------------------
``training.images.preprocess`` resizes the image (its short side to ``resize``, or the whole image to
``resize x resize`` with ``resize_mode="squash"``: ``PreprocessConfig.placement``), then centre-crops
``crop x crop``. The ``g x g`` attention grid covers exactly that crop:
flattened pixel ``p`` is row ``p // g``, column ``p % g`` (``features.flatten(2)`` is row-major), and
cell ``(r, c)`` covers crop pixels ``[c, c+1) * crop/g`` by ``[r, r+1) * crop/g``. Mapped back to the
original ``w x h`` image (Pillow's resize scales pixel edges by ``w / W``), the crop is the window
``crop_window(image_size, preprocess)`` and each cell is a ``1/g`` share of it (of its width and of its
height, which differ after a squash). Boxes are clipped to that window: the parts of an object cut away
by the crop cannot receive attention.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from nltk.translate.bleu_score import corpus_bleu as _nltk_corpus_bleu

from training.config import PreprocessConfig

Box = Sequence[float]  # [x0, y0, x1, y1] in original-image pixels, x0 < x1, y0 < y1


def corpus_bleu(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4, exactly as ``nltk.translate.bleu_score.corpus_bleu`` computes it.

    Parameters
    ----------
    references : per hypothesis, a list of tokenised reference captions (at least one).
    hypotheses : tokenised hypotheses, aligned with ``references``.

    Returns
    -------
    ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}``; no smoothing, so a corpus without any
    matching n-gram of some order scores (nltk's) ~1e-100 or less for that order and above.
    """
    _check_corpus(references, hypotheses)
    with warnings.catch_warnings():  # nltk warns when an n-gram order has no match; the score says it
        warnings.simplefilter("ignore", UserWarning)
        return {f"bleu{n}": float(_nltk_corpus_bleu(references, hypotheses, weights=(1.0 / n,) * n))
                for n in range(1, 5)}


def caption_agreement(reference: Sequence[Sequence], other: Sequence[Sequence]) -> float:
    """Share of captions (token or word lists) identical to the reference's, in [0, 1]."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need two equal, non-empty lists of captions, got {len(reference)} and {len(other)}")
    return sum(list(a) == list(b) for a, b in zip(reference, other)) / len(reference)


def _check_corpus(references: list, hypotheses: list) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists for {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("the corpus is empty: no hypotheses")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def _ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(references: list[list[list[str]]], hypotheses: list[list[str]],
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """CIDEr-D, equal to ``pycocoevalcap.cider.Cider().compute_score`` on the same tokens.

    For n = 1..4: tf-idf vectors of n-grams, idf ``log(n_img) - log(max(1, df))`` with document
    frequency counted over the references of the evaluated set (so one image alone scores 0);
    hypothesis weights clipped at the reference's, cosine similarity, times the length penalty
    ``exp(-delta^2 / (2 sigma^2))`` (``delta``: difference in length). Scores are averaged over n and
    references, times 10.

    Parameters
    ----------
    references, hypotheses : as for ``corpus_bleu``.

    Returns
    -------
    (corpus score = mean of per-image scores, per-image scores ``(n_img,)``)
    """
    _check_corpus(references, hypotheses)
    ref_counts = [[_ngram_counts(r) for r in refs] for refs in references]
    df = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_n_img = math.log(len(references))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec = [{} for _ in range(4)]  # per n-gram order: ngram -> weight
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n_img - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 1)

    scores = np.zeros(len(hypotheses))
    for i, (hyp, refs) in enumerate(zip(hypotheses, ref_counts)):
        vec_h, norm_h, len_h = tfidf(_ngram_counts(hyp))
        total = np.zeros(4)
        for ref in refs:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.e ** (-float(len_h - len_r) ** 2 / (2 * sigma ** 2))
            for n in range(4):
                val = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
                if norm_h[n] != 0 and norm_r[n] != 0:
                    val /= norm_h[n] * norm_r[n]
                total[n] += val * penalty
        scores[i] = total.mean() / len(refs) * 10.0
    return float(scores.mean()), scores


def crop_window(image_size: tuple[int, int], preprocess: PreprocessConfig) -> tuple[float, float, float, float]:
    """The centre crop the encoder sees, as ``(x0, y0, x1, y1)`` in original-image pixels.

    Maps ``preprocess.placement`` (the geometry ``training.images.preprocess`` applies) back: with
    ``squash`` and ``crop == resize`` it is the whole image.
    """
    w, h = image_size
    (big_w, big_h), (left, top) = preprocess.placement(image_size)
    sx, sy = w / big_w, h / big_h  # original pixels per resized pixel
    return left * sx, top * sy, (left + preprocess.crop) * sx, (top + preprocess.crop) * sy


def box_coverage(boxes: Sequence[Box], window: tuple[float, float, float, float], grid: int) -> np.ndarray:
    """Fraction of each grid cell covered by the union of ``boxes``, ``(grid, grid)`` in [0, 1].

    The window (``crop_window``) is split into ``grid x grid`` equal cells. Exact: the plane is cut at
    every cell and box edge, and each elementary rectangle inside a box adds its area to its cell.
    """
    wx0, wy0, wx1, wy1 = window
    cell_w, cell_h = (wx1 - wx0) / grid, (wy1 - wy0) / grid
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"boxes must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {b.tolist()}")
    xs = np.unique(np.clip(np.concatenate([wx0 + cell_w * np.arange(grid + 1), b[:, 0], b[:, 2]]), wx0, wx1))
    ys = np.unique(np.clip(np.concatenate([wy0 + cell_h * np.arange(grid + 1), b[:, 1], b[:, 3]]), wy0, wy1))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # centres of elementary rectangles
    inside_x = (b[:, None, 0] <= cx) & (cx <= b[:, None, 2])  # (n_box, n_x)
    inside_y = (b[:, None, 1] <= cy) & (cy <= b[:, None, 3])  # (n_box, n_y)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)  # (n_y, n_x)
    area = np.outer(np.diff(ys), np.diff(xs)) * covered  # (n_y, n_x)
    col = np.minimum(((cx - wx0) / cell_w).astype(int), grid - 1)
    row = np.minimum(((cy - wy0) / cell_h).astype(int), grid - 1)
    cells = np.zeros((grid, grid))
    np.add.at(cells, (row[:, None], col[None, :]), area)
    return cells / (cell_w * cell_h)


@dataclass(frozen=True)
class WordGrounding:
    """Attention on one generated word that has boxes.

    ``mass``: attention inside the boxes (0..1); ``share``: the boxes' share of the cropped image;
    ``ratio``: ``mass / share`` (1 = no better than uniform attention; None when the crop cut the
    boxes away entirely, ``share == 0``).
    """

    step: int
    word: str
    mass: float
    share: float
    ratio: float | None


def attention_grounding(alphas: np.ndarray, words: Sequence[str], boxes: Mapping[str, Sequence[Box]],
                        image_size: tuple[int, int], preprocess: PreprocessConfig) -> list[WordGrounding]:
    """Per generated word with boxes: attention mass inside them and its ratio to their area share.

    Parameters
    ----------
    alphas : ``(T, g, g)`` or ``(T, n_pix)`` with ``n_pix = g*g``, the attention of each emitted token.
    words : the T emitted tokens (the ``tokens`` of the alphas ``.npz``), aligned with ``alphas``.
    boxes : word -> list of ``[x0, y0, x1, y1]`` boxes in original-image pixels (one image's entry of
        ``boxes.json``); words absent from it are skipped.
    image_size : ``(w, h)`` of the original image.
    preprocess : the model's resize/centre-crop settings; see the module docstring for the mapping.

    Returns
    -------
    One ``WordGrounding`` per step whose word has boxes, in step order.
    """
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim == 2:
        grid = int(round(np.sqrt(a.shape[1])))
        if grid * grid != a.shape[1]:
            raise ValueError(f"alphas have {a.shape[1]} pixels per step, not a square grid")
        a = a.reshape(a.shape[0], grid, grid)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"alphas must be (T, g, g) or (T, g*g), got shape {np.shape(alphas)}")
    if a.shape[0] != len(words):
        raise ValueError(f"alphas have {a.shape[0]} steps for {len(words)} words")
    window = crop_window(image_size, preprocess)
    coverage = {}  # word -> (g, g) covered fraction, computed once per word
    out = []
    for step, word in enumerate(words):
        if not boxes.get(word):
            continue
        if word not in coverage:
            coverage[word] = box_coverage(boxes[word], window, a.shape[1])
        cov = coverage[word]
        share = float(cov.mean())
        mass = float((a[step] * cov).sum() / a[step].sum())
        out.append(WordGrounding(step, word, mass, share, mass / share if share > 0 else None))
    return out


def summarize_grounding(items: Sequence[WordGrounding]) -> dict[str, float | int | None]:
    """Corpus grounding figures over the words whose boxes the crop kept (``share > 0``).

    ``n_words`` counts them, ``n_cropped_away`` the others; ``mean_mass``, ``mean_share`` and
    ``mean_ratio`` are plain means over the counted words (None when there are none).
    """
    kept = [g for g in items if g.ratio is not None]
    mean = (lambda xs: float(np.mean(xs))) if kept else (lambda xs: None)
    return {"n_words": len(kept), "n_cropped_away": len(items) - len(kept),
            "mean_mass": mean([g.mass for g in kept]), "mean_share": mean([g.share for g in kept]),
            "mean_ratio": mean([g.ratio for g in kept])}
