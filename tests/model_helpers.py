"""Helpers of the model tests: random input series, and a small model that genuinely follows
`models.base.TemporalEncoderModel` for testing wrappers of such models."""

from __future__ import annotations

import torch
from torch import nn

from models.ltae import doy_encoding


class TinyTemporalEncoder(nn.Module):
    """Per-date pixel MLP with a day-of-year encoding (`encode`), attention pooling over valid dates (`classify`)."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 16) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.embed = nn.Sequential(nn.Linear(in_channels, feature_dim), nn.ReLU(), nn.Linear(feature_dim, feature_dim))
        self.score = nn.Linear(feature_dim, 1, bias=False)  # a bias cancels in the softmax
        self.out = nn.Linear(feature_dim, num_classes)

    def encode(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        position = doy_encoding(doy, self.feature_dim)[:, :, None, None, :]  # (B, T, 1, 1, D)
        return (self.embed(x.permute(0, 1, 3, 4, 2)) + position.to(x.dtype)).permute(0, 1, 4, 2, 3)

    def classify(self, features: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        f = features.permute(0, 3, 4, 1, 2)  # (B, H, W, T, D)
        score = self.score(torch.relu(f)).squeeze(-1)  # (B, H, W, T)
        if valid is not None:
            score = score.masked_fill(~valid.permute(0, 2, 3, 1), -1e4)
        pooled = (score.float().softmax(-1).to(f.dtype).unsqueeze(-1) * f).sum(-2)
        return self.out(pooled).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.encode(x, doy, valid), doy, valid)


def inputs(b: int, t: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random series `x (B, T, C, H, W)`, sorted days of year `(B, T)` and ~70 % valid pixel-dates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, h, w, generator=g)
    doy = torch.sort(torch.randint(1, 366, (b, t), generator=g), dim=1).values
    valid = torch.rand(b, t, h, w, generator=g) > 0.3
    return x, doy, valid
