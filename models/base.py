"""The interfaces every crop-type model of `models/` follows.

A model maps a satellite image time series to per-pixel class logits:
`forward(x (B, T, C, H, W) float, doy (B, T) long, valid (B, T, H, W) bool | None) -> logits (B, K, H, W)`,
where `doy` are the acquisition days of year and `valid` marks the real (not cloudy, not padded) observations.

Models built on a per-date temporal encoder (L-TAE, STCLN, U-TAE) also split `forward` in two, so that wrappers
such as the joint reconstruction framework and the modality-balancing distillation can work on per-date
features whatever the backbone: `forward(x, doy, valid) == classify(encode(x, doy, valid), doy, valid)`.
"""

from __future__ import annotations

from typing import Annotated, Protocol, runtime_checkable

import torch
from annotated_types import Ge, Gt, Lt

# Value types of the models' settings, as their constructors annotate them; `registry.check_settings` validates a
# user's settings against these annotations before any work.
Count = Annotated[int, Gt(0)]  # widths, layers, heads, kernel sizes, trees
Widths = tuple[Count, ...]
Fraction = Annotated[float, Ge(0), Lt(1)]  # a dropout rate
Positive = Annotated[float, Gt(0)]  # a distillation temperature
Weight = Annotated[float, Ge(0)]  # a loss term's weight


@runtime_checkable
class TemporalEncoderModel(Protocol):
    """A model whose `forward` is `classify(encode(...))` over per-date features.

    `feature_dim` is D, the channels of the per-date features.
    """

    feature_dim: int

    def encode(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per-date features `(B, T, D, H, W)` at the input's spatial size."""
        ...

    def classify(self, features: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Class logits `(B, K, H, W)` from per-date features; dates where `valid` is False are ignored."""
        ...
