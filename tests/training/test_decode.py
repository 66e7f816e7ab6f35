"""The decode loop against references: a per-image loop, exhaustive search, and its own invariants."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from tests.conftest import tiny_model
from training.decode import beam_search, decode, greedy_search
from training.options import DecodeOptions

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
            lp, alpha, h, c = (x[:, 0] for x in model.step(tok.view(1, 1), h.unsqueeze(1), c.unsqueeze(1), f, p))
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


def per_image(row_step):
    """The contract's step (``k`` rows per image, the image's features once) from ``row_step``, a step function over
    independent rows."""
    def step(tokens, h, c, features, proj):
        n, k = tokens.shape
        out = row_step(tokens.reshape(-1), h.flatten(0, 1), c.flatten(0, 1), *(x.repeat_interleave(k, 0)
                                                                                for x in (features, proj)))
        return tuple(x.view(n, k, *x.shape[1:]) for x in out)
    return step


class ToyLM:
    """A step function over a tiny vocabulary whose log-probs depend on the whole prefix.

    h carries a hash of the prefix; logprobs come from a fixed random table indexed by it.
    Greedy is sub-optimal on it, so beam and exhaustive search differ from greedy.
    """

    def __init__(self, vocab=5, seed=0, n_pix=3):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(997, vocab, generator=gen) * 2.0, dim=1)
        self.vocab, self.n_pix = vocab, n_pix

    def __call__(self, *inputs):
        return per_image(self.row_step)(*inputs)

    def row_step(self, tokens, h, c, features, proj):
        state = (h[:, 0].long() * 31 + tokens + 7) % 997  # (n,)
        lp = self.table[state]
        alpha = torch.softmax(torch.stack([state.float() % (i + 2) for i in range(self.n_pix)], 1), 1)
        h_next = h.clone()
        h_next[:, 0] = state.float()
        return lp, alpha, h_next, c

    def enc(self, n_img):
        h = torch.arange(n_img, dtype=torch.float32).unsqueeze(1) * 13.0
        return torch.zeros(n_img, self.n_pix, 2), torch.zeros(n_img, self.n_pix, 2), h, torch.zeros(n_img, 1)

    def image(self, img):
        """Encoder outputs of image ``img`` alone, batch 1."""
        return tuple(x[img : img + 1] for x in self.enc(img + 1))

    def exhaustive(self, img, max_len, length_penalty=0.0):
        """Best normalised score over every sequence that ends with <end> within max_len, or runs to max_len.

        Breadth first in float64: every prefix of one length goes through one call.
        """
        f, p, h, c = self.image(img)
        raw, tokens, best = torch.zeros(1, dtype=torch.float64), torch.tensor([1]), -np.inf
        words = [w for w in range(self.vocab) if w != 2]
        for t in range(max_len):
            lp, _, h, c = self.row_step(tokens, h, c, f, p)
            total = raw.unsqueeze(1) + lp.double()  # (n_prefix, vocab)
            best = max(best, float(total[:, 2].max()) / (t + 1) ** length_penalty)
            raw = total[:, words].reshape(-1)  # (n_prefix * (vocab - 1),) the prefixes one word longer
            tokens = torch.tensor(words).repeat(total.size(0))
            h, c = h.repeat_interleave(len(words), 0), c.repeat_interleave(len(words), 0)
        return max(best, float(raw.max()) / max_len ** length_penalty)

    def beam_to_max_len(self, img, k, max_len, length_penalty=0.0):
        """Reference: one image's beam search with ``beam_search``'s candidate rule (top 2k; <end> within
        the top k finishes, the best k others continue) in the same float32 arithmetic, never stopped
        before max_len. Returns the normalised score of every hypothesis it finishes and of its last beams."""
        f, p, h, c = self.image(img)
        beams, hyps = [(np.float32(0.0), h, 1)], []  # raw score, state, last word
        for t in range(max_len):
            cands = []
            for raw, h_b, tok in beams:
                lp, _, h_next, _ = self.row_step(torch.tensor([tok]), h_b, c, f, p)
                cands += [(raw + np.float32(lp[0, w].item()), h_next, w) for w in range(self.vocab)]
            top = sorted(cands, key=lambda cand: -cand[0])[: 2 * k]
            hyps += [float(raw) / (t + 1) ** length_penalty for raw, _, w in top[:k] if w == 2]
            beams = [cand for cand in top if cand[2] != 2][:k]
        return hyps + [float(raw) / max_len ** length_penalty for raw, _, _ in beams]

    def rescore(self, img, cap):
        """Sum of log-probs of ``cap``'s words (and of its <end> if finished), in float64."""
        f, p, h, c = self.image(img)
        tok, total = torch.tensor([1]), 0.0
        for w in cap.tokens + ([2] if cap.finished else []):
            lp, _, h, c = self.row_step(tok, h, c, f, p)
            total += lp[0, w].item()
            tok = torch.tensor([w])
        return total


class ForkLM:
    """Issue 13's 4-word LM (<end>, a, b; the other specials never win): greedy finds "a a" (-0.81), a
    beam search that stops at k finished hypotheses returns the empty caption (-0.90).

    Step 1: <end> -0.90, a -0.70, b -2.34; after "a": a -0.10, <end> -2.50; after "b", "a a" or
    anything else: <end> -0.01. Every other word -5. h carries the prefix's state.
    """

    A, B = 4, 5
    START, AFTER_A, AFTER_B, AFTER_AA, OTHER = range(5)

    def __init__(self):
        self.table = torch.full((5, 6), -5.0)  # (state, word)
        self.table[self.START, [2, self.A, self.B]] = torch.tensor([-0.90, -0.70, -2.34])
        self.table[self.AFTER_A, [2, self.A]] = torch.tensor([-2.50, -0.10])
        self.table[[self.AFTER_B, self.AFTER_AA, self.OTHER], 2] = -0.01
        self.next = torch.full((5, 6), self.OTHER)  # (state, word) -> state
        self.next[self.START, SPECIALS["start"]] = self.START
        self.next[self.START, self.A], self.next[self.START, self.B] = self.AFTER_A, self.AFTER_B
        self.next[self.AFTER_A, self.A] = self.AFTER_AA

    def __call__(self, *inputs):
        return per_image(self.row_step)(*inputs)

    def row_step(self, tokens, h, c, features, proj):
        state = h[:, 0].long()  # (n,) the state the input word is read in
        h_next = self.next[state, tokens].float().unsqueeze(1)  # (n, 1)
        return self.table[h_next[:, 0].long()], torch.ones(tokens.numel(), 1), h_next, c

    def enc(self, n_img):
        """``<start>`` read in ``START`` stays there, so step 1 gives START's log-probs."""
        h = torch.full((n_img, 1), float(self.START))
        return torch.zeros(n_img, 1, 1), torch.zeros(n_img, 1, 1), h, torch.zeros(n_img, 1)


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_beam_search_does_not_stop_while_a_live_beam_can_still_win(beam):
    lm = ForkLM()
    caps = decode(lm, lm.enc(2), SPECIALS, DecodeOptions(beam=beam, max_len=6))
    assert [c.tokens for c in caps] == [[lm.A, lm.A]] * 2
    assert all(c.finished and c.score == pytest.approx(-0.81, abs=1e-6) for c in caps)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), vocab=st.integers(7, 8), max_len=st.integers(3, 4),
       length_penalty=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_beam_search_with_wide_beam_equals_exhaustive_search(seed, vocab, max_len, length_penalty):
    lm = ToyLM(vocab=vocab, seed=seed)  # the 4 specials and 3-4 words, every id emittable but <start>'s role
    wide = (vocab - 1) ** (max_len - 1)  # every live prefix keeps a beam
    caps = beam_search(lm, lm.enc(2), SPECIALS, DecodeOptions(beam=wide, max_len=max_len,
                                                              length_penalty=length_penalty))
    for img, cap in enumerate(caps):
        best = lm.exhaustive(img, max_len, length_penalty)
        assert cap.score == pytest.approx(best, abs=1e-5)
        length = len(cap.tokens) + cap.finished
        assert lm.rescore(img, cap) / length ** length_penalty == pytest.approx(best, abs=1e-5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), vocab=st.integers(5, 8), beam=st.integers(1, 3), max_len=st.integers(2, 7),
       length_penalty=st.sampled_from([0.0, 1.0]))
def test_small_beam_never_returns_less_than_a_hypothesis_its_beams_finish_later(seed, vocab, beam, max_len,
                                                                               length_penalty):
    lm = ToyLM(vocab=vocab, seed=seed)
    caps = beam_search(lm, lm.enc(3), SPECIALS, DecodeOptions(beam=beam, max_len=max_len,
                                                              length_penalty=length_penalty))
    for img, cap in enumerate(caps):
        assert cap.score >= max(lm.beam_to_max_len(img, beam, max_len, length_penalty)) - 1e-5


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
            lp, alpha, h, c = lm.row_step(tok, h, c, f, p)
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

    enc = lm.enc(16)
    before = [x.clone() for x in enc]
    caps = decode(step, enc, SPECIALS, DecodeOptions(beam=beam, max_len=8))
    assert all(torch.equal(x, y) for x, y in zip(enc, before))  # rows are moved in the loop's own copies
    lengths = sorted(len(c.tokens) for c in caps)
    assert sizes[0] == 16 * beam
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], sizes
    if beam == 1:  # row count at step t is the number of captions longer than t-1 words
        assert sizes == [sum(n >= t for n in lengths) for t in range(len(sizes))]


def _reference_beam_search(step, enc, k, max_len, length_penalty):
    """Reference: one image at a time, each beam its own batch-1 ``step`` call, hypotheses as Python lists; the
    candidate and stopping rules of ``beam_search`` in the same float32 arithmetic. ``(tokens, score, alphas,
    finished)`` per image."""
    out = []
    for img in range(enc[0].size(0)):
        f, p, h, c = (x[img : img + 1] for x in enc)
        beams = [(np.float32(0.0), [], [], h, c, 1)]  # raw score, words, alphas, state, last word
        best = (-np.inf, None)  # normed score, (tokens, raw, alphas, finished)
        for t in range(max_len):
            cands = []
            for b, (raw, words, alphas, h_b, c_b, tok) in enumerate(beams):
                lp, alpha, h_next, c_next = step(torch.tensor([tok]), h_b, c_b, f, p)
                cands += [(np.float32(raw + np.float32(lp[0, w].item())), b, w, alpha[0].numpy(), h_next, c_next)
                          for w in range(lp.size(1))]
            top = sorted(cands, key=lambda cand: -cand[0])[: 2 * k]  # stable: ties keep (beam, word) order
            for raw, b, w, *_ in top[:k]:
                normed = float(np.float32(raw / np.float32((t + 1) ** length_penalty)))
                if w == 2 and normed > best[0]:
                    best = (normed, (beams[b][1], raw, beams[b][2], True))
            beams = [(raw, beams[b][1] + [w], beams[b][2] + [a], h_n, c_n, w)
                     for raw, b, w, a, h_n, c_n in top if w != 2][:k]
            live = max(beams, key=lambda beam: beam[0])
            live_normed = float(np.float32(live[0] / np.float32(max_len ** length_penalty)))
            if t == max_len - 1:
                if live_normed > best[0]:
                    best = (live_normed, (live[1], live[0], live[2], False))
            elif live_normed <= best[0]:
                break
        tokens, raw, alphas, finished = best[1]
        out.append((tokens, float(raw), np.array(alphas, dtype=np.float32).reshape(len(tokens), 4), finished))
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), vocab=st.integers(7, 12), beam=st.integers(1, 3), max_len=st.integers(1, 9),
       n_img=st.integers(1, 9), length_penalty=st.sampled_from([0.0, 0.7, 1.0]))
def test_compare_beam_search_vs_reference_beam_search_on_random_step_functions(seed, vocab, beam, max_len, n_img,
                                                                               length_penalty):
    lm = ToyLM(vocab=vocab, seed=seed, n_pix=4)  # the reference's alphas are (n, 4)
    got = beam_search(lm, lm.enc(n_img), SPECIALS, DecodeOptions(beam=beam, max_len=max_len,
                                                                 length_penalty=length_penalty))
    for cap, (tokens, raw, alphas, finished) in zip(got, _reference_beam_search(lm.row_step, lm.enc(n_img), beam,
                                                                                max_len, length_penalty)):
        assert (cap.tokens, cap.finished) == (tokens, finished)
        np.testing.assert_array_equal(cap.alphas, alphas)
        length = len(tokens) + finished
        assert cap.score == pytest.approx(raw / length ** length_penalty, abs=1e-6)


def test_beam_search_reads_the_device_from_the_host_once_per_step():
    from tests.training.host_reads import HostReads

    lm = ToyLM(vocab=6, seed=3)
    reads = HostReads()

    def step(*inputs):
        reads.mark("step")
        return lm(*inputs)

    with torch.inference_mode(), reads:
        beam_search(step, lm.enc(12), SPECIALS, DecodeOptions(beam=3, max_len=8))
    per_step = reads.per_mark("step")
    assert len(per_step) > 2 and per_step[:-1] == [1] * (len(per_step) - 1), per_step  # the last: the captions' copy


class _Threads(TorchFunctionMode):
    """Records the torch thread count at each torch call: ``inside`` the step, or in the loop around it."""

    def __init__(self):
        super().__init__()
        self.inside, self.step, self.loop = False, set(), set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        (self.step if self.inside else self.loop).add(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("beam", [1, 3])
def test_the_step_runs_on_the_callers_threads_and_the_loop_between_steps_on_one(beam):
    lm, threads, calls = ToyLM(vocab=6, seed=5), torch.get_num_threads(), _Threads()

    def step(*inputs):
        calls.inside = True
        try:
            return lm(*inputs)
        finally:
            calls.inside = False

    def failing(*inputs):
        raise RuntimeError("boom")

    try:
        torch.set_num_threads(2)
        enc = lm.enc(4)
        with calls:
            decode(step, enc, SPECIALS, DecodeOptions(beam=beam, max_len=5))
        assert calls.step == {2} and calls.loop == {1}
        assert torch.get_num_threads() == 2  # restored after
        with pytest.raises(RuntimeError, match="boom"):
            decode(failing, lm.enc(4), SPECIALS, DecodeOptions(beam=beam))
        assert torch.get_num_threads() == 2  # and after a failing step
    finally:
        torch.set_num_threads(threads)
