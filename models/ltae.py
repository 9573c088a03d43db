"""Lightweight Temporal Attention Encoder (L-TAE), applied to every pixel.

Garnot, V. S. F., Landrieu, L. (2020). "Lightweight temporal self-attention for classifying satellite images time
series". AALTD workshop, ECML-PKDD 2020.

The L-TAE pools a sequence of per-date embeddings with multi-head attention where each head has a single learned
*master query* (no query computed from the input), keys are a linear projection of the embeddings and the values
are the embeddings themselves, split into one channel group per head. Dates are located by a sinusoidal encoding
of their day of year (the paper's period of 1000 days), the same for every head.

Here the pixel-set encoder of the paper is replaced by a per-pixel MLP (the model sees one pixel at a time), and
the input normalisation is a LayerNorm per date instead of a GroupNorm over (channels, dates), so that invalid dates
never leak into the features of valid ones. Invalid dates get a zero attention weight; a pixel without any valid
date gets zero attention everywhere (its pooled features are 0, never NaN).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from models.base import Count, Fraction, Widths


def doy_encoding(doy: torch.Tensor, dim: int, period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal encoding (..., dim) of days of year `doy` (...): sin and cos at `dim // 2` geometric frequencies."""
    freqs = period ** (-torch.arange(0, dim, 2, device=doy.device, dtype=torch.float32) / dim)
    angles = doy.float().unsqueeze(-1) * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]


def mlp(dims: tuple[int, ...], norm: type[nn.Module] = nn.BatchNorm1d) -> nn.Sequential:
    """Linear + norm + ReLU layers for the consecutive widths of `dims` (no linear bias before a BatchNorm)."""
    layers: list[nn.Module] = []
    for d_in, d_out in pairwise(dims):
        layers += [nn.Linear(d_in, d_out, bias=norm is not nn.BatchNorm1d), norm(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class LTAE(nn.Module):
    """L-TAE over sequences (N, T, in_dim) -> pooled features (N, mlp_dims[-1]) and attention (N, n_head, T).

    `project` (per-date LayerNorm + linear map to `d_model`) and `attend` (positional encoding, master-query
    attention, MLP, LayerNorm) are separate so that per-date features can be taken between them.

    Args:
        in_dim: channels of the per-date input embeddings.
        d_model: channels after the input projection; a multiple of `n_head` (one value group per head).
        n_head: attention heads, each with its own learned master query.
        d_k: dimension of keys and queries.
        mlp_dims: widths of the MLP (Linear, BatchNorm, ReLU) after the attention (its input is `d_model`).
        dropout: dropout after that MLP.
        period: period of the day-of-year positional encoding (paper: 1000).
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 256,
        n_head: int = 16,
        d_k: int = 8,
        mlp_dims: tuple[int, ...] = (128,),
        dropout: float = 0.2,
        period: float = 1000.0,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.n_head, self.d_k, self.d_model, self.period = n_head, d_k, d_model, period
        if not mlp_dims:
            raise ValueError("mlp_dims needs at least one width")
        self.out_dim = mlp_dims[-1]
        # no biases before the attention: a shift of the values passes it (weights sum to 1), then BatchNorm cancels it
        self.in_norm = nn.LayerNorm(in_dim, bias=False)
        self.in_proj = nn.Linear(in_dim, d_model, bias=False)
        self.key = nn.Linear(d_model, n_head * d_k, bias=False)  # a key bias adds a per-head constant: no effect
        self.query = nn.Parameter(torch.randn(n_head, d_k) * math.sqrt(2.0 / d_k))
        self.mlp = mlp((d_model, *mlp_dims))
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(self.out_dim, bias=False)  # users follow it by linear + BatchNorm: no bias

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Per-date input projection (N, T, in_dim) -> (N, T, d_model); dates stay independent."""
        return self.in_proj(self.in_norm(e))

    def attend(
        self, z: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool projected features z (N, T, d_model) with days of year (N, T) and validity (N, T).

        Returns the pooled features (N, out_dim) and the attention weights (N, n_head, T), zero at invalid dates.
        """
        n, t, _ = z.shape
        pe = doy_encoding(doy, self.d_model // self.n_head, self.period).repeat(1, 1, self.n_head)
        z = z + pe.to(z.dtype)
        keys = self.key(z).view(n, t, self.n_head, self.d_k)
        scores = torch.einsum("nthk,hk->nht", keys, self.query.to(keys.dtype)) / math.sqrt(self.d_k)
        if mask is not None:
            # a finite fill: an all-invalid row gives a uniform softmax, zeroed below, instead of NaN
            scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1)
        if mask is not None:
            attn = attn * mask.unsqueeze(1)
        values = z.view(n, t, self.n_head, self.d_model // self.n_head)
        pooled = torch.einsum("nht,nthd->nhd", attn.to(values.dtype), values).reshape(n, self.d_model)
        return self.out_norm(self.dropout(self.mlp(pooled))), attn

    def forward(
        self, e: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend(project(e), doy, mask)`."""
        return self.attend(self.project(e), doy, mask)


def pixels_first(t: torch.Tensor) -> torch.Tensor:
    """(B, T, D, H, W) -> (B*H*W, T, D)."""
    b, n_t, d, h, w = t.shape
    return t.permute(0, 3, 4, 1, 2).reshape(b * h * w, n_t, d)


class PixelLTAE(nn.Module):
    """Pixel-wise L-TAE classifier (Garnot & Landrieu 2020): every pixel is classified from its own time series.

    `encode` embeds every pixel-date (MLP over bands, then the L-TAE input projection): features (B, T, D, H, W)
    with D = `d_model`, no mixing across dates or pixels. `classify` adds the day-of-year encoding, pools the dates
    with the master-query attention (invalid dates excluded) and maps the result to logits with an MLP (the paper's
    decoder widths 128 -> 64 -> 32 -> K). `forward(x, doy, valid) == classify(encode(x, doy, valid), doy, valid)`.

    Args:
        in_channels: C, bands per date.
        num_classes: K.
        embed_dims: widths of the per-pixel embedding MLP (replaces the paper's pixel-set encoder).
        d_model, n_head, d_k, mlp_dims, dropout: the L-TAE's, see `LTAE`.
        decoder_dims: hidden widths of the classifier MLP.

    69,962 parameters at the defaults with 10 bands and 10 classes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dims: Widths = (64, 128),
        d_model: Count = 128,
        n_head: Count = 16,
        d_k: Count = 8,
        mlp_dims: Widths = (128,),
        dropout: Fraction = 0.2,
        decoder_dims: Widths = (64, 32),
    ) -> None:
        super().__init__()
        self.feature_dim = d_model
        self.embed = mlp((in_channels, *embed_dims), norm=nn.LayerNorm)
        self.ltae = LTAE(embed_dims[-1], d_model, n_head, d_k, mlp_dims, dropout)
        self.decoder = nn.Sequential(
            mlp((self.ltae.out_dim, *decoder_dims)), nn.Linear((self.ltae.out_dim, *decoder_dims)[-1], num_classes)
        )

    def encode(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-date features (B, T, d_model, H, W) of x (B, T, C, H, W); `doy` and `valid` are not needed here."""
        z = self.ltae.project(self.embed(x.movedim(2, -1)))  # (B, T, H, W, D)
        return z.movedim(-1, 2)

    def classify(self, features: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) from per-date features (B, T, D, H, W); dates where `valid` is False are ignored."""
        b, t, _, h, w = features.shape
        doy_px = doy.reshape(b, 1, t).expand(b, h * w, t).reshape(b * h * w, t)
        mask = None if valid is None else valid.permute(0, 2, 3, 1).reshape(b * h * w, t)
        pooled, _ = self.ltae.attend(pixels_first(features), doy_px, mask)
        logits = self.decoder(pooled)  # (B*H*W, K)
        return logits.view(b, h, w, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) for x (B, T, C, H, W), doy (B, T) and valid (B, T, H, W) (None: all valid)."""
        return self.classify(self.encode(x, doy, valid), doy, valid)
