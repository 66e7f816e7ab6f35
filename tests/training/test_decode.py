"""The decode loop against references: a per-image loop, exhaustive search, and its own invariants."""
import itertools

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from training.decode import DecodeOptions, beam_search, decode, greedy_search

SPECIALS = {"pad": 0, "start": 1, "end": 2, "unk": 3}


def _enc(model, n_img, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.encode(torch.randn(n_img, 3, 64, 64))


def _one_by_one_greedy(model, enc, max_len):
    """Reference: each image alone, plain Python loop over model.step."""
    out = []
    for i in range(enc[0].size(0)):
        f, p, h, c = (x[i : i + 1] for x in enc)
        tok, words, alphas, score = torch.tensor([1]), [], [], 0.0
        for _ in range(max_len):
            lp, alpha, h, c = model.step(tok, h, c, f, p)
            score += lp.max().item()
            tok = lp.argmax(1)
            if tok.item() == 2:
                break
            words.append(tok.item())
            alphas.append(alpha[0].numpy())
        out.append((words, score, np.array(alphas).reshape(len(words), -1)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_greedy_equals_one_image_at_a_time(seed):
    model = tiny_model(seed)
    enc = _enc(model, 9, seed)
    with torch.no_grad():
        got = decode(model.step, enc, SPECIALS, DecodeOptions(max_len=12))
        ref = _one_by_one_greedy(model, enc, 12)
    for cap, (words, score, alphas) in zip(got, ref):
        assert cap.tokens == words
        assert cap.score == pytest.approx(score, abs=1e-4)
        np.testing.assert_allclose(cap.alphas, alphas, atol=1e-6)
        assert cap.finished == (len(words) < 12)


class ToyLM:
    """A step function over a tiny vocabulary whose log-probs depend on the whole prefix.

    h carries a hash of the prefix; logprobs come from a fixed random table indexed by it.
    Greedy is sub-optimal on it, so beam and exhaustive search differ from greedy.
    """

    def __init__(self, vocab=5, seed=0, n_pix=3):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(997, vocab, generator=gen) * 2.0, dim=1)
        self.vocab, self.n_pix = vocab, n_pix

    def __call__(self, tokens, h, c, features, proj):
        state = (h[:, 0].long() * 31 + tokens + 7) % 997  # (n,)
        lp = self.table[state]
        alpha = torch.softmax(torch.stack([state.float() % (i + 2) for i in range(self.n_pix)], 1), 1)
        h_next = h.clone()
        h_next[:, 0] = state.float()
        return lp, alpha, h_next, c

    def enc(self, n_img):
        h = torch.arange(n_img, dtype=torch.float32).unsqueeze(1) * 13.0
        return torch.zeros(n_img, self.n_pix, 2), torch.zeros(n_img, self.n_pix, 2), h, torch.zeros(n_img, 1)

    def exhaustive(self, img, max_len, length_penalty=0.0):
        """Best over every sequence that ends with <end> within max_len, or runs to max_len."""
        best = (-np.inf, None)
        _, _, h0, c0 = self.enc(img + 1)
        for n in range(1, max_len + 1):
            for seq in itertools.product(range(self.vocab), repeat=n):
                if 2 in seq[:-1] or (n < max_len and seq[-1] != 2):
                    continue
                h, tok, total = h0[img : img + 1], torch.tensor([1]), 0.0
                for w in seq:
                    lp, _, h, _ = self(tok, h, c0[:1], None, None)
                    total += lp[0, w].item()
                    tok = torch.tensor([w])
                words = [w for w in seq if w != 2]
                score = total / n ** length_penalty
                if score > best[0]:
                    best = (score, words)
        return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_wide_beam_equals_exhaustive_search(length_penalty):
    lm, max_len = ToyLM(vocab=4, seed=3), 4
    caps = beam_search(lm, lm.enc(3), SPECIALS, DecodeOptions(beam=4 ** 4, max_len=max_len,
                                                              length_penalty=length_penalty))
    for img, cap in enumerate(caps):
        score, words = lm.exhaustive(img, max_len, length_penalty)
        assert cap.tokens == words
        assert cap.score == pytest.approx(score, abs=1e-5)


def test_beam_one_equals_greedy_and_beam_never_scores_worse():
    lm = ToyLM(vocab=6, seed=1)
    opts = DecodeOptions(max_len=6)
    greedy = greedy_search(lm, lm.enc(8), SPECIALS, opts)
    beam1 = beam_search(lm, lm.enc(8), SPECIALS, DecodeOptions(beam=1, max_len=6))
    beam4 = beam_search(lm, lm.enc(8), SPECIALS, DecodeOptions(beam=4, max_len=6))
    assert [c.tokens for c in beam1] == [c.tokens for c in greedy]
    assert [c.score for c in beam1] == pytest.approx([c.score for c in greedy], abs=1e-5)
    assert all(b.score >= g.score - 1e-6 for b, g in zip(beam4, greedy))
    assert any(b.score > g.score + 1e-6 for b, g in zip(beam4, greedy)), "toy LM should reward search"


def test_alphas_align_with_tokens_and_beam_matches_rescoring():
    lm = ToyLM(vocab=5, seed=2)
    for cap, (f, p, h, c) in zip(beam_search(lm, lm.enc(4), SPECIALS, DecodeOptions(beam=3, max_len=5)),
                                 [tuple(x[i : i + 1] for x in lm.enc(4)) for i in range(4)]):
        tok, total, alphas = torch.tensor([1]), 0.0, []
        for w in cap.tokens + ([2] if cap.finished else []):
            lp, alpha, h, c = lm(tok, h, c, f, p)
            total += lp[0, w].item()
            alphas.append(alpha[0].numpy())
            tok = torch.tensor([w])
        assert cap.score == pytest.approx(total, abs=1e-5)
        np.testing.assert_allclose(cap.alphas, np.array(alphas)[: len(cap.tokens)], atol=1e-6)


def test_no_end_token_still_returns_captions():
    lm = ToyLM(vocab=5, seed=0)
    lm.table[:, 2] = -1e9  # <end> never wins
    for opts in (DecodeOptions(max_len=3), DecodeOptions(beam=3, max_len=3)):
        caps = decode(lm, lm.enc(5), SPECIALS, opts)
        assert all(len(c.tokens) == 3 and not c.finished and c.alphas.shape == (3, 3) for c in caps)


def test_options_are_checked_up_front():
    for bad in (dict(beam=0), dict(max_len=0), dict(length_penalty=-1)):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)


@pytest.mark.parametrize("beam", [1, 3])
def test_finished_rows_are_compacted_out_of_the_active_batch(beam):
    lm = ToyLM(vocab=5, seed=4)
    sizes = []

    def step(tokens, h, c, f, p):
        sizes.append(tokens.numel())
        return lm(tokens, h, c, f, p)

    caps = decode(step, lm.enc(16), SPECIALS, DecodeOptions(beam=beam, max_len=8))
    lengths = sorted(len(c.tokens) for c in caps)
    assert sizes[0] == 16 * beam
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], sizes
    if beam == 1:  # row count at step t is the number of captions longer than t-1 words
        assert sizes == [sum(n >= t for n in lengths) for t in range(len(sizes))]
