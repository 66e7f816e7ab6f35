"""The decode loop: batched greedy and beam search over any backend's ``step``.

The loop owns everything stateful (finished rows, beams, lengths); a backend only maps
``(tokens, h, c, features, features_proj) -> (logprobs, alpha, h_next, c_next)`` (the
decoder_step graph contract: ``k`` rows per image, 1 for greedy, the image's features once).
Tensors are torch tensors on the backend's device, so the same loop drives CPU runtimes (zero-copy
to numpy) and CUDA ones (no host round trip per step). Images whose caption ended are dropped from
the active batch, so late steps get cheaper.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.options import DecodeOptions

EncoderOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # features, features_proj, h0, c0
StepOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # logprobs, alpha, h_next, c_next
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], StepOutputs]


@dataclass
class Caption:
    """One decoded caption: word ids without ``<start>``/``<end>``, and each word's attention.

    ``alphas`` is ``(len(tokens), n_pix)`` float32, row i the attention that produced ``tokens[i]``.
    ``finished`` is False when ``max_len`` was reached before ``<end>``.
    """

    tokens: list[int]
    score: float
    alphas: np.ndarray
    finished: bool


def decode(step: StepFn, enc: EncoderOutputs, special_ids: dict[str, int],
           options: DecodeOptions = DecodeOptions()) -> list[Caption]:
    """Caption every image of the batch ``enc``; greedy when ``options.beam == 1``.

    The loop's own torch ops run on one thread and ``step`` on the caller's torch threads: the loop's ops are
    small, and on a pool of threads each one waits for every thread of it, which costs a time slice whenever
    another job has one of them descheduled (measured with ``benchmarks.beam --load spin``)."""
    with torch.inference_mode(), _one_thread_between_steps(step) as step:
        if options.beam == 1:
            return greedy_search(step, enc, special_ids, options)
        return beam_search(step, enc, special_ids, options)


@contextmanager
def _one_thread_between_steps(step: StepFn) -> Iterator[StepFn]:
    """``step`` wrapped to run on the current torch thread count, while the code around it runs on one."""
    threads = torch.get_num_threads()

    def threaded(*inputs: Tensor) -> StepOutputs:
        torch.set_num_threads(threads)
        try:
            return step(*inputs)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        yield threaded
    finally:
        torch.set_num_threads(threads)


def greedy_search(step: StepFn, enc: EncoderOutputs, special_ids: dict[str, int],
                  options: DecodeOptions) -> list[Caption]:
    """Batched greedy decoding with compaction of finished rows."""
    features, proj, h, c = enc
    h, c = h.unsqueeze(1), c.unsqueeze(1)  # (n_img, 1, dec_dim): one row per image
    n_img, n_pix, device = features.size(0), features.size(1), features.device
    start, end = special_ids["start"], special_ids["end"]
    out_tokens = torch.full((n_img, options.max_len), end, dtype=torch.long, device=device)
    out_alphas = torch.zeros((n_img, options.max_len, n_pix), device=device)
    scores = torch.zeros(n_img, device=device)
    lengths = torch.full((n_img,), options.max_len, dtype=torch.long, device=device)
    active = torch.arange(n_img, device=device)  # original row of each active row
    tokens = torch.full((n_img, 1), start, dtype=torch.long, device=device)
    for t in range(options.max_len):
        logprobs, alpha, h, c = step(tokens, h, c, features, proj)  # (n_act, 1, vocab), (n_act, 1, n_pix)
        best_lp, tokens = logprobs.max(dim=2)  # (n_act, 1), (n_act, 1)
        scores[active] += best_lp[:, 0].float()
        out_tokens[active, t] = tokens[:, 0]
        out_alphas[active, t] = alpha[:, 0].float()
        ended = tokens[:, 0] == end  # (n_act,)
        if bool(ended.any()):
            lengths[active[ended]] = t
            keep = ~ended
            if not bool(keep.any()):
                break
            active, tokens, h, c, features, proj = (x[keep] for x in (active, tokens, h, c, features, proj))
    return _captions(out_tokens, out_alphas, scores, lengths, options)


def _captions(tokens: Tensor, alphas: Tensor, scores: Tensor, lengths: Tensor, options) -> list[Caption]:
    tokens, alphas, scores, lengths = tokens.cpu(), alphas.float().cpu().numpy(), scores.cpu(), lengths.cpu()
    result = []
    for i in range(tokens.size(0)):
        n = int(lengths[i])
        finished = n < options.max_len
        score = float(scores[i]) / float(n + finished) ** options.length_penalty
        result.append(Caption(tokens[i, :n].tolist(), score, alphas[i, :n], finished))
    return result


def beam_search(step: StepFn, enc: EncoderOutputs, special_ids: dict[str, int],
                options: DecodeOptions) -> list[Caption]:
    """Batched beam search: all images' beams go through one ``step`` call per position.

    Each step takes the top ``2k`` of ``(n_img, k * vocab)`` candidates: those ending in ``<end>``
    within the top k are finished hypotheses (each image keeps its best), the best k others
    continue. An image stops once no live beam can still finish above its best finished hypothesis.
    A live beam's raw score s (a sum of log-probs, <= 0) only falls and it ends within ``max_len``
    words, so under length penalty p its final score is at most ``s / max_len**p`` (the exact bound,
    as Hugging Face's ``early_stopping="never"``; s itself when p = 0). At ``max_len`` live beams
    are candidates too (unfinished), so a caption is always returned.

    The history is kept as back-pointers (``_History``: each step's words, their beams' parents and
    attention, written once) and followed once at the end; a hypothesis is its image's best as an
    ``(end step, beam)`` pair. The step reads each image's features once for its k beams (the graph
    contract), so they are never copied per beam. Stopped images leave the active batch at once, by moving
    the images still searching from its tail into their places (``_compact``): each moves at most once. The
    host reads the device once a step: how many images still search, and how many of them must move.
    """
    features, proj, h, c = enc
    n_img, n_pix, device = features.size(0), features.size(1), features.device
    k, end, p = options.beam, special_ids["end"], options.length_penalty
    h, c = (x.unsqueeze(1).repeat(1, k, 1) for x in (h, c))  # (n_img, k, dec_dim): beam b of image i at [i, b]
    images = torch.arange(n_img, device=device)  # original index of each active image
    beam_scores = torch.full((n_img, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # one live beam at the start, so the k beams do not duplicate
    tokens = torch.full((n_img, k), special_ids["start"], dtype=torch.long, device=device)
    history = _History(options.max_len, n_img, k, n_pix, end, device)
    live_norm = float(options.max_len) ** p  # the longest any live beam can end up

    for t in range(options.max_len):
        logprobs, alpha, h, c = step(tokens, h, c, features, proj)  # (n_act, k, vocab), (n_act, k, n_pix)
        n_act, vocab = images.numel(), logprobs.size(2)
        cand = (beam_scores.unsqueeze(2) + logprobs.float()).view(n_act, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # (n_act, 2k)
        src_beam, word = top_idx // vocab, top_idx % vocab  # (n_act, 2k)
        is_end = (word == end) & torch.isfinite(top_scores)
        rank = torch.arange(top_idx.size(1), device=device).expand_as(top_idx)
        ended = torch.where(is_end & (rank < k), top_scores, float("-inf"))  # (n_act, 2k)
        end_best, j = ended.max(dim=1)  # (n_act,): each image's best new finished hypothesis
        history.finish(images, end_best, end_best / float(t + 1) ** p, t,
                       src_beam.gather(1, j.unsqueeze(1)).squeeze(1))
        # The best k candidates that do not end continue (end ones sort last, ties keep rank order).
        sel = torch.sort(is_end.long() * top_idx.size(1) + rank, dim=1).indices[:, :k]  # (n_act, k)
        beam_scores = torch.where(is_end.gather(1, sel), float("-inf"), top_scores.gather(1, sel))
        src, word = src_beam.gather(1, sel), word.gather(1, sel)  # (n_act, k)
        history.record(t, images, word, src, alpha.float())
        parents = src.unsqueeze(2).expand_as(h)  # (n_act, k, dec_dim)
        h, c, tokens = h.gather(1, parents), c.gather(1, parents), word

        live_best, live_beam = beam_scores.max(dim=1)  # (n_act,)
        if t == options.max_len - 1:  # the live beams are (unfinished) candidates too
            history.finish(images, live_best, live_best / live_norm, t + 1, live_beam)
            break
        searching = live_best / live_norm > history.normed[images]  # (n_act,) else no live beam can still win
        left = searching.sum()
        front = torch.arange(n_act, device=device) < left  # (n_act,) the places that stay
        n_left, n_move = torch.stack([left, (front & ~searching).sum()]).tolist()  # the step's one host read
        if n_left == 0:
            break
        if n_left < n_act:
            holes, movers = _compact(front & ~searching, ~front & searching, n_move)
            borrowed = features is enc[0]  # the caller's: gathered once into the loop's own, then moved in place
            if borrowed:
                order = torch.arange(n_left, device=device).index_put_((holes,), movers)  # (n_left,)
                features, proj = features[order], proj[order]
            for x in (images, beam_scores, h, c, tokens) + (() if borrowed else (features, proj)):
                x[holes] = x[movers]
            images, beam_scores, h, c, tokens, features, proj = (
                x[:n_left] for x in (images, beam_scores, h, c, tokens, features, proj))
    return _captions(*history.best(), options)


def _compact(holes: Tensor, movers: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` places of the masks ``holes`` and ``movers`` (both ``(n_act,)``, n set each), in order, without a
    host read: a stable sort puts the set places first."""
    return tuple(torch.sort(~mask, stable=True).indices[:n] for mask in (holes, movers))


class _History:
    """Beam search's hypotheses as back-pointers, by original image, in buffers allocated once.

    Step t's ``words (max_len, n_img, k)`` are the words its beams end with, ``parents`` the beam of
    step t-1 each extends, ``alphas (max_len, n_img, k, n_pix)`` the attention each beam of step t-1
    computed at step t (a word's attention is its parent's). Each image's best hypothesis so far is
    ``(lengths, last)``: its word count and the beam it ends at after step ``length - 1``, with its raw
    score (a sum of log-probs) and ``normed``, the score hypotheses are ranked by (``-inf`` until the
    first one).
    """

    def __init__(self, max_len: int, n_img: int, k: int, n_pix: int, end: int, device: torch.device):
        self.end = end
        self.words = torch.full((max_len, n_img, k), end, dtype=torch.long, device=device)
        self.parents = torch.zeros((max_len, n_img, k), dtype=torch.long, device=device)
        self.alphas = torch.zeros((max_len, n_img, k, n_pix), device=device)
        self.scores = torch.zeros(n_img, device=device)
        self.normed = torch.full((n_img,), float("-inf"), device=device)
        self.lengths = torch.full((n_img,), max_len, dtype=torch.long, device=device)
        self.last = torch.zeros(n_img, dtype=torch.long, device=device)

    def record(self, t: int, images: Tensor, words: Tensor, parents: Tensor, alphas: Tensor) -> None:
        """Step ``t`` of the active ``images (n_act,)``: ``words, parents (n_act, k)``, ``alphas (n_act, k, n_pix)``
        (by the beams that computed them)."""
        self.words[t, images], self.parents[t, images], self.alphas[t, images] = words, parents, alphas

    def finish(self, images: Tensor, raw: Tensor, normed: Tensor, length: int, beam: Tensor) -> None:
        """Per active image, the hypothesis of ``length`` words ending at ``beam`` (of step ``length - 1``) becomes
        its best if its ``normed`` score beats the best so far; all ``(n_act,)``."""
        better = normed > self.normed[images]  # (n_act,)
        for best, new in ((self.scores, raw), (self.normed, normed), (self.last, beam)):
            best[images] = torch.where(better, new, best[images])
        self.lengths[images] = torch.where(better, length, self.lengths[images])

    def best(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each image's best hypothesis followed back once: ``tokens (n_img, max_len)`` (``<end>`` past its
        length), ``alphas (n_img, max_len, n_pix)``, raw ``scores`` and ``lengths (n_img,)``."""
        max_len, n_img, _, n_pix = self.alphas.shape
        image = torch.arange(n_img, device=self.words.device)
        tokens = torch.full((n_img, max_len), self.end, dtype=torch.long, device=self.words.device)
        alphas = torch.zeros((n_img, max_len, n_pix), device=self.words.device)
        beam = self.last.clone()  # (n_img,) the beam each hypothesis is at, step by step backwards
        for t in range(max_len - 1, -1, -1):
            inside = (t < self.lengths).unsqueeze(1)  # (n_img, 1)
            parent = self.parents[t, image, beam]  # (n_img,)
            tokens[:, t] = torch.where(inside[:, 0], self.words[t, image, beam], self.end)
            alphas[:, t] = torch.where(inside, self.alphas[t, image, parent], 0.0)
            beam = torch.where(inside[:, 0], parent, beam)
        return tokens, alphas, self.scores, self.lengths
