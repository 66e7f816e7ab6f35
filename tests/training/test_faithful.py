"""The task-metric rule: corpus BLEU-4 from per-image statistics equals nltk's; the verdict and bootstrap."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.faithful import bleu4, bleu_statistics, judge
from training.metrics import cider_d, corpus_bleu

WORDS = st.lists(st.sampled_from("a b c d e f".split()), max_size=9)
CORPUS = st.lists(st.tuples(st.lists(WORDS.filter(bool), min_size=1, max_size=4), WORDS), min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(CORPUS)
def test_compare_bleu4_from_statistics_vs_nltk_corpus_bleu(corpus):
    refs, hyps = [r for r, _ in corpus], [h for _, h in corpus]
    ours, nltk = float(bleu4(bleu_statistics(refs, hyps).sum(0))), corpus_bleu(refs, hyps)["bleu4"]
    assert ours == pytest.approx(nltk, rel=1e-12, abs=1e-300)


def test_a_resample_is_a_weighted_sum_of_statistics():
    refs = [[["a", "b", "c", "d", "e"]], [["b", "c", "d", "e", "f"]], [["a", "a", "b", "b", "c"]]]
    hyps = [["a", "b", "c", "d"], ["b", "c", "d", "e", "f"], ["a", "b", "b", "c", "e"]]
    stats = bleu_statistics(refs, hyps)
    weights = np.array([2, 0, 1])  # image 0 twice, image 2 once
    resampled = [refs[0], refs[0], refs[2]], [hyps[0], hyps[0], hyps[2]]
    assert float(bleu4(weights @ stats)) == pytest.approx(corpus_bleu(*resampled)["bleu4"], rel=1e-12)


def _corpus(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    refs = [[list(rng.choice(words, 8)) for _ in range(4)] for _ in range(n)]
    return refs, [r[0][:7] for r in refs]


def test_identical_captions_are_faithful_with_a_zero_interval():
    refs, caps = _corpus()
    verdict = judge(refs, caps, caps)
    assert verdict["faithful"] and verdict["agreement"] == 1.0 and verdict["images"] == 200
    for metric in ("bleu4", "cider_d"):
        assert verdict[metric]["difference"] == 0 and verdict[metric]["ci95"] == [0.0, 0.0]
        assert verdict[metric]["ratio"] == 1.0
    assert verdict["cider_d"]["reference"] == pytest.approx(cider_d(refs, caps)[0])


def test_worse_captions_fail_and_the_interval_holds_the_difference():
    refs, caps = _corpus()
    worse = [c[:4] if i % 4 == 0 else c for i, c in enumerate(caps)]  # a quarter of the captions cut short
    verdict = judge(refs, caps, worse)
    assert not verdict["faithful"] and verdict["agreement"] == 0.75
    for metric in ("bleu4", "cider_d"):
        lo, hi = verdict[metric]["ci95"]
        assert lo <= verdict[metric]["difference"] <= hi < 0 and not verdict[metric]["kept"]
    assert judge(refs, caps, worse, ratio=0.5)["faithful"]


def test_different_but_no_worse_captions_can_be_faithful_below_full_agreement():
    refs, caps = _corpus()
    other = [r[1][:7] if i % 5 == 0 else c for i, (r, c) in enumerate(zip(refs, caps))]  # another reference
    verdict = judge(refs, caps, other)
    assert verdict["agreement"] == 0.8 and verdict["faithful"]


def test_judge_needs_aligned_captions():
    refs, caps = _corpus(5)
    with pytest.raises(ValueError, match="each of the 5 images"):
        judge(refs, caps, caps[:4])
