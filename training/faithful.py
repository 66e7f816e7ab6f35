"""Faithfulness judged by the task, as the field judges quantised inference.

MLPerf Inference accepts a quantised result when its task metric is at least 99 % of the fp32
reference's. Here: a candidate captioner (an int8 encoder, bf16 autocast, another runtime) is
*faithful* to a reference (eager fp32, same images, same run) when its corpus BLEU-4 and CIDEr-D
against the human references are each at least ``FAITHFUL_RATIO`` times the reference's. Exact-caption
agreement is reported beside it, as information: a model whose captions change at 3 % feature noise
changes words where neither caption is worse.

Each difference comes with its paired-bootstrap 95 % interval: images are resampled with
replacement and both captioners are scored on every resample. Corpus BLEU is a function of
per-image sufficient statistics (``bleu_statistics``: clipped n-gram matches, n-gram totals,
hypothesis and closest reference lengths), so a resample is a weighted sum of them and scores
exactly as ``nltk``'s ``corpus_bleu`` would; CIDEr-D is a mean of per-image scores, resampled as
such (its document frequencies stay those of the whole set).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import closest_ref_length, modified_precision

from training.metrics import caption_agreement, cider_d
from training.options import FAITHFUL_RATIO

N_BOOTSTRAP = 1000
ORDER = 4


def bleu_statistics(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> np.ndarray:
    """``(n_img, 2 * ORDER + 2)``: per image, clipped matches of 1..4-grams, their totals (at least 1),
    the hypothesis length and the closest reference length (ties: the shorter), counted by nltk's own
    ``modified_precision`` (an unreduced fraction) and ``closest_ref_length``."""
    stats = np.zeros((len(hypotheses), 2 * ORDER + 2))
    for i, (refs, hyp) in enumerate(zip(references, hypotheses)):
        for n in range(1, ORDER + 1):
            precision = modified_precision(refs, hyp, n)
            stats[i, n - 1], stats[i, ORDER + n - 1] = precision.numerator, precision.denominator
        stats[i, 2 * ORDER], stats[i, 2 * ORDER + 1] = len(hyp), closest_ref_length(refs, len(hyp))
    return stats


def bleu4(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 of summed ``bleu_statistics`` (``(..., 10)`` -> ``(...)``), as nltk without smoothing."""
    matches, grams = totals[..., :ORDER], totals[..., ORDER:2 * ORDER]
    hyp_len, ref_len = totals[..., 2 * ORDER], totals[..., 2 * ORDER + 1]
    precision = np.where(matches > 0, matches / grams, sys.float_info.min)
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(hyp_len > ref_len, 1.0, np.where(hyp_len > 0, np.exp(1 - ref_len / hyp_len), 0.0))
    score = brevity * np.exp(np.log(precision).sum(axis=-1) / ORDER)
    return np.where(matches[..., 0] > 0, score, 0.0)


def _comparison(reference: float, candidate: float, boot_ref: np.ndarray, boot_cand: np.ndarray,
                ratio: float) -> dict:
    lo, hi = np.percentile(boot_cand - boot_ref, [2.5, 97.5])
    return {"reference": reference, "candidate": candidate, "difference": candidate - reference,
            "ci95": [float(lo), float(hi)], "ratio": candidate / reference if reference > 0 else math.nan,
            "kept": bool(candidate >= ratio * reference)}


def judge(references: Sequence[Sequence[Sequence[str]]], reference_captions: Sequence[Sequence[str]],
          candidate_captions: Sequence[Sequence[str]], ratio: float = FAITHFUL_RATIO, n_bootstrap: int = N_BOOTSTRAP,
          seed: int = 0) -> dict:
    """Is the candidate faithful to the reference captioner on these images?

    Parameters
    ----------
    references : per image, its tokenised human reference captions.
    reference_captions, candidate_captions : per image, the tokenised caption of each captioner.
    ratio : each task metric of the candidate must be at least this share of the reference's.

    Returns
    -------
    ``{"faithful", "ratio_required", "images", "agreement", "bleu4": {...}, "cider_d": {...}}``; each
    metric has ``reference``, ``candidate``, ``difference``, ``ci95`` (paired bootstrap), ``ratio``, ``kept``.
    """
    n = len(references)
    if not n or len(reference_captions) != n or len(candidate_captions) != n:
        raise ValueError(f"need captions of both captioners for each of the {n} images with references")
    stats_ref, stats_cand = bleu_statistics(references, reference_captions), bleu_statistics(references,
                                                                                           candidate_captions)
    cider_ref = cider_d(references, list(reference_captions))[1]
    cider_cand = cider_d(references, list(candidate_captions))[1]
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_bootstrap)])  # (B, n)
    bleu = _comparison(float(bleu4(stats_ref.sum(0))), float(bleu4(stats_cand.sum(0))), bleu4(weights @ stats_ref),
                       bleu4(weights @ stats_cand), ratio)
    cider = _comparison(float(cider_ref.mean()), float(cider_cand.mean()), weights @ cider_ref / n,
                        weights @ cider_cand / n, ratio)
    return {"faithful": bleu["kept"] and cider["kept"], "ratio_required": ratio, "images": n,
            "agreement": caption_agreement(reference_captions, candidate_captions), "bleu4": bleu, "cider_d": cider}
