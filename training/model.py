"""Show, Attend and Tell (Xu et al. 2015): CNN grid features, soft attention, LSTM decoder.

Read top to bottom: Attention -> ShowAttendTell. The model exposes exactly the graph contract
of ``engines.contract``: ``encode(images)`` and ``step(tokens, h, c, features, features_proj)``.
The teacher-forced ``forward`` loops over ``step``: there is one step implementation.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.backbones import build_backbone
from training.config import PRESETS, ModelConfig, backbone_spec


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half type (fp16, bf16); float32 and float64 (the parity oracle) as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without a call where it is ``dtype`` already (the decode loop's hot path)."""
    return x if x.dtype == dtype else x.to(dtype)


class Attention(nn.Module):
    """Soft (Bahdanau) attention: ``e = w . act(U feats + W h)``, ``alpha = softmax(e)``."""

    def __init__(self, enc_dim: int, dec_dim: int, att_dim: int, kind: str = "tanh"):
        super().__init__()
        self.enc_att = nn.Linear(enc_dim, att_dim)  # U, applied once per image (encoder graph)
        self.dec_att = nn.Linear(dec_dim, att_dim)  # W
        self.full_att = nn.Linear(att_dim, 1)  # w
        self.act = torch.tanh if kind == "tanh" else F.relu

    def forward(self, features: Tensor, features_proj: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``features (n_img, n_pix, enc_dim)``, ``features_proj (n_img, n_pix, att_dim)`` and the ``k`` rows of each
        image ``h (n_img, k, dec_dim)`` -> ``context (n_img, k, enc_dim)``, ``alpha (n_img, k, n_pix)``: an image's
        features are read once for all its rows (beams), its context one ``(k, n_pix) x (n_pix, enc_dim)`` product."""
        e = self.full_att(self.act(features_proj.unsqueeze(1) + self.dec_att(h).unsqueeze(2))).squeeze(3)
        alpha = torch.softmax(at_least_fp32(e), dim=2)  # (n_img, k, n_pix), float32 at half precision
        context = torch.bmm(as_dtype(alpha, features.dtype), features)  # (n_img, k, enc_dim)
        return context, alpha


class ShowAttendTell(nn.Module):
    """Encoder (torchvision backbone + adaptive pool to ``grid x grid``) and attention LSTM decoder."""

    def __init__(self, config: ModelConfig, pretrained: bool | str | Path = False):
        super().__init__()
        self.config = config
        c = config
        channels = backbone_spec(c.backbone).channels
        if channels != c.enc_dim:
            raise ValueError(f"{c.backbone} gives {channels} channels, config says enc_dim={c.enc_dim}")
        self.backbone = build_backbone(c.backbone, pretrained)
        self.pool = nn.AdaptiveAvgPool2d((c.grid, c.grid))
        self.attention = Attention(c.enc_dim, c.dec_dim, c.att_dim, c.attention)
        self.init_h = nn.Linear(c.enc_dim, c.dec_dim)
        self.init_c = nn.Linear(c.enc_dim, c.dec_dim)
        self.f_beta = nn.Linear(c.dec_dim, c.enc_dim) if c.gate else None
        self.embedding = nn.Embedding(c.vocab_size, c.emb_dim)
        self.lstm = nn.LSTMCell(c.emb_dim + c.enc_dim, c.dec_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.dec_dim, c.vocab_size)

    # --- encoder -------------------------------------------------------------------------------
    def grid_features(self, images: Tensor) -> Tensor:
        """``(n_img, 3, H, W)`` normalised images -> ``(n_img, n_pix, enc_dim)`` grid features."""
        x = self.pool(self.backbone(images))  # (n_img, enc_dim, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (n_img, n_pix, enc_dim)

    def init_state(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Grid features -> ``features, features_proj, h0, c0`` (the rest of the encoder graph)."""
        features_proj = self.attention.enc_att(features)  # (n_img, n_pix, att_dim)
        mean = features.mean(dim=1)  # (n_img, enc_dim)
        return features, features_proj, self.init_h(mean), self.init_c(mean)  # h0, c0: (n_img, dec_dim)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The encoder graph: ``images -> features, features_proj, h0, c0``."""
        return self.init_state(self.grid_features(images))

    # --- decoder -------------------------------------------------------------------------------
    def step(
        self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor, features_proj: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The decoder_step graph: one word for each of the ``k`` rows (beams) of every image -> ``logprobs, alpha,
        h_next, c_next``, each ``(n_img, k, ...)``; ``tokens (n_img, k)``, ``h, c (n_img, k, dec_dim)``, ``features``
        and ``features_proj`` one per image (``engines.contract``).

        In a half-precision model (the fp16 graphs' source) the attention softmax, the log-softmax and the LSTM cell
        state stay float32, as the outputs are; ``h`` and ``c`` may be of any float dtype."""
        n_img, k = tokens.shape
        rows = (n_img * k, -1)  # the LSTM and the output layer see every row alike
        emb = self.embedding(tokens.reshape(-1))  # (rows, emb_dim)
        h = as_dtype(h, self.fc.weight.dtype)
        context, alpha = self.attention(features, features_proj, h)  # (n_img, k, enc_dim), (n_img, k, n_pix)
        h, context = h.reshape(rows), context.reshape(rows)
        if self.f_beta is not None:
            context = torch.sigmoid(self.f_beta(h)) * context  # gate beta: (rows, enc_dim)
        h_next, c_next = self.cell(torch.cat([emb, context], dim=1), h, c.reshape(rows))  # (rows, dec_dim), float32
        logits = self.fc(self.dropout(as_dtype(h_next, self.fc.weight.dtype)))  # (rows, vocab)
        logprobs = torch.log_softmax(at_least_fp32(logits), dim=1)
        return tuple(x.view(n_img, k, -1) for x in (logprobs, alpha, h_next, c_next))

    def cell(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``self.lstm``: ``nn.LSTMCell`` itself at float32 or float64; in a half-precision model its gates (i, f, g, o)
        written out, so that only the two matmuls run in half and the gates' nonlinearities and the cell state in
        float32. ``x (n_img, emb_dim + enc_dim)``, ``h (n_img, dec_dim)`` in the weights' dtype, ``c`` any float."""
        lstm = self.lstm
        if lstm.weight_ih.dtype in (torch.float32, torch.float64):
            return lstm(x, (h, c))
        gates = F.linear(x, lstm.weight_ih, lstm.bias_ih) + F.linear(h, lstm.weight_hh, lstm.bias_hh)  # (n_img, 4*dec_dim)
        i, f, g, o = at_least_fp32(gates).chunk(4, dim=1)  # (n_img, dec_dim) each
        c_next = torch.sigmoid(f) * at_least_fp32(c) + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_next), c_next

    def decode_teacher_forced(self, features: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Feed ground-truth ``captions[:, :-1]`` (``(n_img, T+1)``, starting with ``<start>``).

        Returns ``logprobs (n_img, T, vocab)`` predicting ``captions[:, 1:]`` and ``alphas (n_img, T, n_pix)``.
        """
        features, features_proj, h, c = self.init_state(features)
        h, c = h.unsqueeze(1), c.unsqueeze(1)  # one row (beam) per image
        logprobs, alphas = [], []
        for t in range(captions.size(1) - 1):
            lp, alpha, h, c = self.step(captions[:, t:t + 1], h, c, features, features_proj)
            logprobs.append(lp)
            alphas.append(alpha)
        return torch.cat(logprobs, 1), torch.cat(alphas, 1)

    def forward(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced training forward from images; see ``decode_teacher_forced``."""
        return self.decode_teacher_forced(self.grid_features(images), captions)


def caption_loss(
    logprobs: Tensor, alphas: Tensor, captions: Tensor, pad_id: int, alpha_c: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Masked NLL of ``captions[:, 1:]`` plus doubly stochastic attention regularisation.

    ``alpha_c * mean_i (1 - sum_t alpha_ti)^2`` over real (non-pad) steps pushes the model to look
    at every location over the whole caption (paper eq. 14). Returns ``(total, nll)``.
    """
    target = captions[:, 1:]  # (n_img, T)
    mask = target != pad_id  # (n_img, T)
    nll = F.nll_loss(logprobs[mask], target[mask])
    att_sum = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (n_img, n_pix)
    reg = ((1.0 - att_sum) ** 2).mean()
    return nll + alpha_c * reg, nll


def make_model(
    vocab_size: int, backbone: str = "resnet101", preset: str = "small", pretrained: bool | str | Path = False,
    **overrides,
) -> ShowAttendTell:
    """A new model from a preset name; ``enc_dim`` follows the backbone."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    dims = {**PRESETS[preset], **overrides}
    config = ModelConfig(vocab_size=vocab_size, backbone=backbone, enc_dim=backbone_spec(backbone).channels, **dims)
    return ShowAttendTell(config, pretrained)
