"""The decode loop: batched greedy and beam search over any backend's ``step``.

The loop owns everything stateful (finished rows, beams, lengths); a backend only maps
``(tokens, h, c, features, features_proj) -> (logprobs, alpha, h_next, c_next)`` (the
decoder_step graph contract). Tensors are torch tensors on the backend's device, so the same
loop drives CPU runtimes (zero-copy to numpy) and CUDA ones (no host round trip per step).
Rows whose caption ended are dropped from the active batch, so late steps get cheaper.
"""
from __future__ import annotations

from collections.abc import Callable
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
    """Caption every image of the batch ``enc``; greedy when ``options.beam == 1``."""
    with torch.inference_mode():
        if options.beam == 1:
            return greedy_search(step, enc, special_ids, options)
        return beam_search(step, enc, special_ids, options)


def greedy_search(step: StepFn, enc: EncoderOutputs, special_ids: dict[str, int],
                  options: DecodeOptions) -> list[Caption]:
    """Batched greedy decoding with compaction of finished rows."""
    features, proj, h, c = enc
    n_img, n_pix, device = features.size(0), features.size(1), features.device
    start, end = special_ids["start"], special_ids["end"]
    out_tokens = torch.full((n_img, options.max_len), end, dtype=torch.long, device=device)
    out_alphas = torch.zeros((n_img, options.max_len, n_pix), device=device)
    scores = torch.zeros(n_img, device=device)
    lengths = torch.full((n_img,), options.max_len, dtype=torch.long, device=device)
    active = torch.arange(n_img, device=device)  # original row of each active row
    tokens = torch.full((n_img,), start, dtype=torch.long, device=device)
    for t in range(options.max_len):
        logprobs, alpha, h, c = step(tokens, h, c, features, proj)  # (n_act, vocab), (n_act, n_pix)
        best_lp, tokens = logprobs.max(dim=1)  # (n_act,), (n_act,)
        scores[active] += best_lp.float()
        out_tokens[active, t] = tokens
        out_alphas[active, t] = alpha.float()
        ended = tokens == end  # (n_act,)
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


@dataclass
class _Best:
    """Each image's best hypothesis so far, laid out as ``greedy_search``'s outputs for ``_captions``.

    ``tokens (n_img, max_len)``, ``alphas (n_img, max_len, n_pix)``, ``scores (n_img,)`` raw sums of
    log-probs, ``lengths (n_img,)`` words (``max_len``: unfinished), ``normed (n_img,)`` the score
    hypotheses are ranked by (``-inf`` until the first one).
    """

    tokens: Tensor
    alphas: Tensor
    scores: Tensor
    lengths: Tensor
    normed: Tensor

    def update(self, images: Tensor, raw: Tensor, normed: Tensor, beam: Tensor, hist_tokens: Tensor,
               hist_alphas: Tensor) -> None:
        """Per active image, beam ``beam`` of the history, if its ``normed`` score beats the best so far.

        ``images, raw, normed, beam``: ``(n_act,)``; ``hist_tokens (n_act, k, n)``, ``hist_alphas
        (n_act, k, n, n_pix)``: the hypothesis' words (without ``<end>``) and their attention.
        """
        better = normed > self.normed[images]  # (n_act,)
        if not bool(better.any()):
            return
        rows = better.nonzero().squeeze(1)  # (n_better,)
        img, b, n = images[rows], beam[rows], hist_tokens.size(2)
        self.tokens[img, :n] = hist_tokens[rows, b]
        self.alphas[img, :n] = hist_alphas[rows, b]
        self.scores[img], self.normed[img], self.lengths[img] = raw[rows], normed[rows], n


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
    """
    features, proj, h, c = enc
    n_img, n_pix, device = features.size(0), features.size(1), features.device
    k, end, p = options.beam, special_ids["end"], options.length_penalty
    # The k beams of an image are consecutive rows: row = image * k + beam.
    features, proj, h, c = (x.repeat_interleave(k, dim=0) for x in (features, proj, h, c))
    images = torch.arange(n_img, device=device)  # original index of each active image
    beam_scores = torch.full((n_img, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # one live beam at the start, so the k beams do not duplicate
    tokens = torch.full((n_img * k,), special_ids["start"], dtype=torch.long, device=device)
    hist_tokens = torch.zeros((n_img, k, 0), dtype=torch.long, device=device)
    hist_alphas = torch.zeros((n_img, k, 0, n_pix), device=device)
    best = _Best(torch.full((n_img, options.max_len), end, dtype=torch.long, device=device),
                 torch.zeros((n_img, options.max_len, n_pix), device=device),
                 torch.zeros(n_img, device=device),
                 torch.full((n_img,), options.max_len, dtype=torch.long, device=device),
                 torch.full((n_img,), float("-inf"), device=device))
    live_norm = float(options.max_len) ** p  # the longest any live beam can end up

    for t in range(options.max_len):
        logprobs, alpha, h, c = step(tokens, h, c, features, proj)  # (n_act*k, vocab), (n_act*k, n_pix)
        n_act, vocab = images.numel(), logprobs.size(1)
        cand = (beam_scores.unsqueeze(2) + logprobs.float().view(n_act, k, vocab)).view(n_act, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # (n_act, 2k)
        src_beam, word = top_idx // vocab, top_idx % vocab  # (n_act, 2k)
        is_end = (word == end) & torch.isfinite(top_scores)
        rank = torch.arange(top_idx.size(1), device=device).expand_as(top_idx)
        ended = torch.where(is_end & (rank < k), top_scores, float("-inf"))  # (n_act, 2k)
        end_best, j = ended.max(dim=1)  # (n_act,): each image's best new finished hypothesis
        best.update(images, end_best, end_best / float(t + 1) ** p, src_beam.gather(1, j.unsqueeze(1)).squeeze(1),
                    hist_tokens, hist_alphas)
        # The best k candidates that do not end continue (end ones sort last, ties keep rank order).
        sel = torch.sort(is_end.long() * top_idx.size(1) + rank, dim=1).indices[:, :k]  # (n_act, k)
        beam_scores = torch.where(is_end.gather(1, sel), float("-inf"), top_scores.gather(1, sel))
        src, word = src_beam.gather(1, sel), word.gather(1, sel)  # (n_act, k)
        rows = (torch.arange(n_act, device=device).unsqueeze(1) * k + src).view(-1)  # (n_act*k,)
        h, c, tokens = h[rows], c[rows], word.view(-1)
        hist_tokens = torch.cat([hist_tokens.gather(1, src.unsqueeze(2).expand_as(hist_tokens)),
                                 word.unsqueeze(2)], dim=2)  # (n_act, k, t+1)
        step_alpha = alpha.float()[rows].view(n_act, k, 1, n_pix)
        hist_alphas = torch.cat([hist_alphas[torch.arange(n_act, device=device).unsqueeze(1), src], step_alpha], 2)

        live_best, live_beam = beam_scores.max(dim=1)  # (n_act,)
        if t == options.max_len - 1:  # the live beams are (unfinished) candidates too
            best.update(images, live_best, live_best / live_norm, live_beam, hist_tokens, hist_alphas)
            break
        done = live_best / live_norm <= best.normed[images]  # (n_act,): no live beam can still win
        if bool(done.any()):
            keep = ~done
            if not bool(keep.any()):
                break
            rows_keep = keep.repeat_interleave(k)
            images, beam_scores, hist_tokens, hist_alphas = (
                x[keep] for x in (images, beam_scores, hist_tokens, hist_alphas))
            h, c, tokens, features, proj = (x[rows_keep] for x in (h, c, tokens, features, proj))
    return _captions(best.tokens, best.alphas, best.scores, best.lengths, options)
