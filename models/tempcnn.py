"""TempCNN: temporal 1D convolutions on every pixel's time series.

Pelletier, C., Webb, G. I., Petitjean, F. (2019). "Temporal convolutional neural network for the classification of
satellite image time series". Remote Sensing 11(5), 523.

Three 1D convolutions over time (64 filters, kernel 5, BatchNorm, ReLU, dropout 0.2), a dense layer of 256 units
(BatchNorm, ReLU, dropout) and a linear classifier, applied to every pixel independently.

Deviations, for series with a varying number of dates and gaps: the paper flattens the (fixed-length) time axis
before the dense layer; here the convolution features are averaged over the pixel's valid dates instead, so any
T works. Since pooling forgets where in the season a pattern occurred, the day of year enters as two input
channels (sine and cosine of the annual cycle). Invalid observations are zeroed (bands and day of year) and a
validity channel tells them apart from real zeros, so the values at invalid dates never reach the output.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from models.base import Count, Fraction, Widths


def conv_bn_relu(c_in: int, c_out: int, kernel: int, dropout: float) -> nn.Sequential:
    """Conv1d ('same' padding, no bias: BatchNorm has one) + BatchNorm1d + ReLU + Dropout."""
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    )


class TempCNN(nn.Module):
    """TempCNN (Pelletier et al. 2019) with valid-date average pooling over time.

    Args:
        in_channels: C, bands per date.
        num_classes: K.
        widths: filters of the temporal convolutions (paper: three of 64).
        kernel: temporal kernel size (paper: 5).
        hidden: units of the dense layer (paper: 256).
        dropout: dropout after every layer but the classifier (paper: 0.2).

    64,970 parameters at the defaults with 10 bands and 10 classes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Widths = (64, 64, 64),
        kernel: Count = 5,
        hidden: Count = 256,
        dropout: Fraction = 0.2,
    ) -> None:
        super().__init__()
        dims = (in_channels + 3, *widths)  # + validity + sin, cos of the day of year
        self.convs = nn.Sequential(*(conv_bn_relu(a, b, kernel, dropout) for a, b in pairwise(dims)))
        self.dense = nn.Sequential(
            nn.Linear(widths[-1], hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) for x (B, T, C, H, W), doy (B, T) and valid (B, T, H, W) (None: all valid)."""
        b, t, c, h, w = x.shape
        if valid is None:
            valid = torch.ones((b, t, h, w), dtype=torch.bool, device=x.device)
        v = valid.unsqueeze(2).to(x.dtype)  # (B, T, 1, H, W)
        angle = (2 * math.pi / 365.25) * doy.to(x.dtype).reshape(b, t, 1, 1, 1)
        season = torch.cat([angle.sin(), angle.cos()], dim=2).expand(b, t, 2, h, w)
        series = torch.cat([x, season, torch.ones_like(v)], dim=2) * v  # (B, T, C + 3, H, W)
        series = series.permute(0, 3, 4, 2, 1).reshape(b * h * w, c + 3, t)
        features = self.convs(series)  # (N, F, T)
        weights = v.permute(0, 3, 4, 2, 1).reshape(b * h * w, 1, t)
        pooled = (features * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
        logits = self.classifier(self.dense(pooled))
        return logits.view(b, h, w, -1).permute(0, 3, 1, 2)
