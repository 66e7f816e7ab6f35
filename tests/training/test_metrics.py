"""Metrics against their reference implementations (nltk corpus_bleu, pycocoevalcap CIDEr-D) and the
grounding geometry against ``training.images.preprocess`` itself."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
from PIL import Image, ImageDraw
from pycocoevalcap.cider.cider import Cider

from training.config import PreprocessConfig
from training.images import preprocess
from training.metrics import (attention_grounding, box_coverage, caption_agreement, cider_d, corpus_bleu, crop_window,
                                summarize_grounding)

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "of"]
caption = st.lists(st.sampled_from(WORDS), max_size=9)
references = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=9), min_size=1, max_size=4)
corpora = st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.lists(references, min_size=n, max_size=n), st.lists(caption, min_size=n, max_size=n)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None)
@given(corpora)
def test_compare_bleu_vs_nltk_corpus_bleu(corpus):
    refs, hyps = corpus
    ours = corpus_bleu(refs, hyps)
    for n in range(1, 5):
        assert ours[f"bleu{n}"] == pytest.approx(nltk_corpus_bleu(refs, hyps, weights=(1 / n,) * n), abs=1e-9)


def test_bleu_hypothesis_shorter_than_every_reference_gets_the_brevity_penalty():
    refs = [[["a", "red", "circle"], ["the", "red", "circle", "on", "the", "left"]]]
    scores = corpus_bleu(refs, [["red", "circle"]])
    # all unigrams and the bigram match; closest reference length 3 -> BP = exp(1 - 3/2)
    assert scores["bleu1"] == pytest.approx(math.exp(-0.5), abs=1e-12)
    assert scores["bleu2"] == pytest.approx(math.exp(-0.5), abs=1e-12)
    assert scores["bleu3"] < 1e-100


def test_bleu_without_any_matching_word_is_zero():
    assert corpus_bleu([[["a", "red", "circle"]]], [["blue", "square"]])["bleu1"] == 0.0


def test_bleu_refuses_misaligned_or_empty_input():
    with pytest.raises(ValueError, match="2 reference lists for 1 hypotheses"):
        corpus_bleu([[["a"]], [["a"]]], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu([[]], [["a"]])


@settings(max_examples=150, deadline=None)
@given(corpora)
def test_compare_cider_d_vs_pycocoevalcap(corpus):
    refs, hyps = corpus
    refs = [[r[:-1] if r[0] == "of" else r for r in rs] for rs in refs]  # some empty references too
    assume(any(r for rs in refs for r in rs))  # the reference code divides by zero otherwise
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    expected, expected_each = Cider().compute_score(gts, res)
    score, each = cider_d(refs, hyps)
    assert score == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(each, expected_each, rtol=0, atol=1e-9)


def test_cider_d_by_hand():
    # two images, disjoint words: idf = log 2 everywhere, cosine 1 for 1- and 2-grams, no 3/4-grams
    score, each = cider_d([[["red", "circle"]], [["blue", "square"]]], [["red", "circle"], ["blue", "square"]])
    np.testing.assert_allclose(each, [5.0, 5.0])
    assert cider_d([[["red", "circle"]]], [["red", "circle"]])[0] == 0.0  # one image: every idf is 0
    assert cider_d([[["red"]], [["blue"]]], [[], ["blue"]])[1][0] == 0.0  # an empty caption scores 0


@pytest.mark.parametrize("mode", ["shorter_side", "squash", "torchvision"])
@pytest.mark.parametrize("size", [(64, 64), (100, 60), (37, 90), (513, 301), (301, 515)])
def test_crop_window_is_what_preprocess_keeps(size, mode):
    # encode each pixel's x and y in its colour; nearest resampling shows which source pixel each
    # output pixel came from: its centre must lie in the window cell the output pixel stands for
    cfg = PreprocessConfig(resize=40, crop=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest",
                           resize_mode=mode)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([xx % 256, xx // 256 * 16 + yy // 256, yy % 256], -1).astype(np.uint8))
    r, g, b = np.rint(preprocess(img, cfg) * 255).astype(int)  # (32, 32) each
    src_x, src_y = r + (g // 16) * 256 + 0.5, b + (g % 16) * 256 + 0.5  # source pixel centres
    x0, y0, x1, y1 = crop_window(size, cfg)
    centres = (np.arange(32) + 0.5) / 32
    np.testing.assert_allclose(src_x, np.broadcast_to(x0 + centres * (x1 - x0), (32, 32)), atol=0.51)
    np.testing.assert_allclose(src_y, np.broadcast_to((y0 + centres * (y1 - y0))[:, None], (32, 32)), atol=0.51)


@settings(max_examples=60, deadline=None)
@given(st.integers(20, 120), st.integers(20, 120), st.floats(0, 1), st.floats(0, 1), st.floats(0.2, 1),
       st.floats(0.2, 1), st.sampled_from(["shorter_side", "squash", "torchvision"]))
def test_box_coverage_matches_preprocessed_pixels(w, h, fx, fy, fw, fh, mode):
    # a white box drawn in the original image ends up, after preprocess, in the cells box_coverage says
    cfg = PreprocessConfig(resize=64, crop=48, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear",
                           resize_mode=mode)
    box = [fx * w * 0.8, fy * h * 0.8, min(w, fx * w * 0.8 + fw * w / 2), min(h, fy * h * 0.8 + fh * h / 2)]
    big = Image.new("L", (w * 8, h * 8))  # draw at 8x then downsample: anti-aliased box edges
    ImageDraw.Draw(big).rectangle([v * 8 for v in box[:2]] + [v * 8 - 1 for v in box[2:]], fill=255)
    img = big.resize((w, h), Image.Resampling.BOX).convert("RGB")
    seen = preprocess(img, cfg)[0].reshape(4, 12, 4, 12).mean(axis=(1, 3))  # (4, 4) cell means
    expected = box_coverage([box], crop_window((w, h), cfg), 4)
    np.testing.assert_allclose(seen, expected, atol=0.12)


def test_box_coverage_union_and_clipping():
    cov = box_coverage([[0, 0, 32, 32], [16, 16, 48, 48], [200, 200, 300, 300]], (0, 0, 64, 64), 4)
    assert cov.mean() == pytest.approx((2 * 32 * 32 - 16 * 16) / 64 ** 2)  # overlap counted once
    assert cov[0, 0] == 1.0 and cov[3, 3] == 0.0 and cov[1, 2] == 1.0
    assert box_coverage([[-10, -10, 8, 80]], (0, 0, 64, 64), 4)[:, 0].tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="x0 <= x1"):
        box_coverage([[10, 0, 5, 5]], (0, 0, 64, 64), 4)


def test_attention_grounding_mass_share_ratio():
    cfg = PreprocessConfig(resize=64, crop=64)
    boxes = {"circle": [[0, 0, 32, 32]], "square": [[500, 500, 600, 600]]}
    alphas = np.full((4, 4, 4), 1 / 16)
    alphas[1] = 0
    alphas[1, 0, 1] = 1.0  # all attention in a cell inside the circle's box
    got = attention_grounding(alphas, ["circle", "circle", "on", "square"], boxes, (64, 64), cfg)
    assert [(g.step, g.word) for g in got] == [(0, "circle"), (1, "circle"), (3, "square")]
    assert (got[0].mass, got[0].share, got[0].ratio) == (0.25, 0.25, 1.0)  # uniform attention: ratio 1
    assert (got[1].mass, got[1].ratio) == (1.0, 4.0)
    assert got[2].share == 0.0 and got[2].ratio is None  # box outside the image
    flat = attention_grounding(alphas.reshape(4, 16), ["circle", "circle", "on", "square"], boxes, (64, 64), cfg)
    assert flat == got
    assert summarize_grounding(got) == {"n_words": 2, "n_cropped_away": 1, "mean_mass": 0.625,
                                        "mean_share": 0.25, "mean_ratio": 2.5}
    assert summarize_grounding([])["mean_ratio"] is None


def test_attention_grounding_uses_the_crop_window():
    # 128x64 image, centre crop 64x64 = x in [32, 96): a box on the left third is cropped away
    cfg = PreprocessConfig(resize=64, crop=64)
    got = attention_grounding(np.full((1, 2, 2), 0.25), ["circle"], {"circle": [[0, 0, 32, 64]]}, (128, 64), cfg)
    assert got[0].share == 0.0
    got = attention_grounding(np.full((1, 2, 2), 0.25), ["circle"], {"circle": [[32, 0, 64, 64]]}, (128, 64), cfg)
    assert got[0].share == 0.5


def test_a_squash_without_crop_covers_the_whole_image():
    cfg = PreprocessConfig(resize=64, crop=64, resize_mode="squash")
    assert crop_window((128, 64), cfg) == (0.0, 0.0, 128.0, 64.0)
    got = attention_grounding(np.full((1, 2, 2), 0.25), ["circle"], {"circle": [[0, 0, 32, 64]]}, (128, 64), cfg)
    assert got[0].share == 0.25  # the left quarter, which a centre crop would have cut away
    assert crop_window((128, 64), PreprocessConfig(resize=64, crop=48, resize_mode="squash")) == (16.0, 8.0, 112.0, 56.0)


def test_attention_grounding_refuses_misaligned_alphas():
    cfg = PreprocessConfig(resize=64, crop=64)
    with pytest.raises(ValueError, match="2 steps for 1 words"):
        attention_grounding(np.zeros((2, 4, 4)), ["a"], {}, (64, 64), cfg)
    with pytest.raises(ValueError, match="not a square grid"):
        attention_grounding(np.zeros((1, 15)), ["a"], {}, (64, 64), cfg)


def test_caption_agreement_is_the_share_of_identical_token_lists():
    assert caption_agreement([[1, 2], [3], []], [[1, 2], [3, 4], []]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal"):
        caption_agreement([[1]], [])
