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

EncoderOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # features, features_proj, h0, c0
StepOutputs = tuple[Tensor, Tensor, Tensor, Tensor]  # logprobs, alpha, h_next, c_next
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], StepOutputs]


@dataclass(frozen=True)
class DecodeOptions:
    """``beam`` 1 is greedy; ``length_penalty`` p ranks hypotheses by ``sum(logp) / length**p``."""

    beam: int = 1
    max_len: int = 20
    length_penalty: float = 0.0

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"beam must be at least 1, got {self.beam}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must not be negative, got {self.length_penalty}")


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
class _Hyp:
    score: float  # length-normalised
    tokens: Tensor
    alphas: Tensor
    finished: bool


def beam_search(step: StepFn, enc: EncoderOutputs, special_ids: dict[str, int],
                options: DecodeOptions) -> list[Caption]:
    """Batched beam search: all images' beams go through one ``step`` call per position.

    Each step takes the top ``2k`` of ``(n_img, k * vocab)`` candidates: those ending in ``<end>``
    within the top k become finished hypotheses, the best k others continue. An image is done
    once it has k finished hypotheses; at ``max_len`` live beams become unfinished hypotheses,
    so a caption is always returned. The best hypothesis by normalised score wins.
    """
    features, proj, h, c = enc
    n_img, n_pix, device = features.size(0), features.size(1), features.device
    k, end = options.beam, special_ids["end"]
    # The k beams of an image are consecutive rows: row = image * k + beam.
    features, proj, h, c = (x.repeat_interleave(k, dim=0) for x in (features, proj, h, c))
    images = torch.arange(n_img, device=device)  # original index of each active image
    beam_scores = torch.full((n_img, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # one live beam at the start, so the k beams do not duplicate
    tokens = torch.full((n_img * k,), special_ids["start"], dtype=torch.long, device=device)
    hist_tokens = torch.zeros((n_img, k, 0), dtype=torch.long, device=device)
    hist_alphas = torch.zeros((n_img, k, 0, n_pix), device=device)
    hyps: list[list[_Hyp]] = [[] for _ in range(n_img)]
    n_finished = torch.zeros(n_img, dtype=torch.long, device=device)

    for t in range(options.max_len):
        logprobs, alpha, h, c = step(tokens, h, c, features, proj)  # (n_act*k, vocab), (n_act*k, n_pix)
        n_act, vocab = images.numel(), logprobs.size(1)
        cand = (beam_scores.unsqueeze(2) + logprobs.float().view(n_act, k, vocab)).view(n_act, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # (n_act, 2k)
        src_beam, word = top_idx // vocab, top_idx % vocab  # (n_act, 2k)
        is_end = (word == end) & torch.isfinite(top_scores)
        rank = torch.arange(top_idx.size(1), device=device).expand_as(top_idx)
        new_hyps = is_end & (rank < k)  # (n_act, 2k)
        n_finished += new_hyps.sum(dim=1)
        for i, j in new_hyps.nonzero().tolist():
            b = int(src_beam[i, j])
            hyps[int(images[i])].append(_Hyp(float(top_scores[i, j]) / float(t + 1) ** options.length_penalty,
                                             hist_tokens[i, b], hist_alphas[i, b], True))
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

        done = n_finished >= k  # (n_act,)
        if t < options.max_len - 1 and bool(done.any()):  # at the last step every live beam is handed over
            keep = ~done
            if not bool(keep.any()):
                break
            rows_keep = keep.repeat_interleave(k)
            images, n_finished, beam_scores, hist_tokens, hist_alphas = (
                x[keep] for x in (images, n_finished, beam_scores, hist_tokens, hist_alphas))
            h, c, tokens, features, proj = (x[rows_keep] for x in (h, c, tokens, features, proj))
    else:
        norm = float(options.max_len) ** options.length_penalty
        for i, img in enumerate(images.tolist()):
            for b in range(k):
                if torch.isfinite(beam_scores[i, b]):
                    hyps[img].append(_Hyp(float(beam_scores[i, b]) / norm, hist_tokens[i, b], hist_alphas[i, b], False))

    best = [max(image_hyps, key=lambda hyp: hyp.score) for image_hyps in hyps]
    return [Caption(hyp.tokens.tolist(), hyp.score, hyp.alphas.cpu().numpy(), hyp.finished) for hyp in best]
