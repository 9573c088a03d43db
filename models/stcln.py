"""STCLN: SpatioTemporal Collaborative Learning Network, with masked pre-training.

Qin, X. et al. (2025). "Spatiotemporal masked pre-training for advancing crop mapping on satellite image time series
with limited labels". International Journal of Applied Earth Observation and Geoinformation (JAG).

Architecture (paper and its public code):

1. A per-date 2D CNN without downsampling, two double convolutions (3x3 conv + BatchNorm + ReLU, twice each):
   C -> 32 -> 32, then 32 -> 256 -> 256.
2. A per-pixel Transformer temporal encoder over the dates (3 post-norm layers, d=256, 8 heads, feed-forward 4d,
   dropout 0.1).
3. SpatioTemporal Attention (STA) between pixels: per pixel, queries are the temporal-encoder output and keys the
   CNN features (step 1), each through a 1x1 projection and flattened over (time x channels); values are the
   temporal max-pool of the temporal-encoder output through a 1x1 projection. `A = softmax(Q K^T / sqrt(d))` over
   pixels; output `gamma * (A V) + V` with `gamma` a learned scalar initialised at 0.
4. A per-pixel linear classifier.

Masked pre-training: inputs of hidden pixel-dates are replaced by a learned token, a linear reconstruction head
regresses the input bands of every date from the temporal-encoder output, and the loss is the MSE on the hidden
entries only (`models.losses.masked_mse`); masks come from `models.masking.pretraining_mask` (p = 0.4). Fine-tuning
then starts from the pre-trained CNN, mask token and temporal encoder (`load_encoder`).

Improvements over the public code, and the choices the paper leaves open:

- Positional encoding: sinusoidal (period 1000, all d channels) of the day of year, not of the date index.
- Invalid dates (clouds, padding; `valid` False) are treated as hidden: their inputs are replaced by the mask
  token before the CNN, they are masked out as keys of the temporal attention (`key_padding_mask`; a pixel without
  any valid date attends to all its dates, which then hold only the token, so nothing is NaN), their queries and keys
  are zeroed in the STA, and the temporal max-pool runs over valid dates only (a pixel without a valid date gets
  V = 0, its STA output is then `gamma` times the mean of its window's values). Changing x at invalid dates leaves
  the output unchanged.
- The public code normalises the temporal encoder's input with a GroupNorm over channels and dates, which mixes
  invalid dates into every date; a per-date LayerNorm is used instead.
- The mask token is one learned value per input band (initialised at 0, the band mean after standardisation); the
  public code uses one scalar. Pre-training loss counts hidden entries that were valid (the others have no truth).
- The public code also regresses the inputs from the CNN features with a second head; only the temporal-encoder
  head is kept (the CNN sees a hidden pixel-date only through its neighbours).
- The public code's unused modules (L-TAE projections, MLP, extra Transformer, out norm, dropout) are gone.
- STA memory: the paper attends over all pixels of the image, an `(H W) x (H W)` matrix per image. Here attention
  runs inside non-overlapping `window x window` tiles (the input is zero-padded to a multiple of the tile, padded
  pixels are never keys); `window=None` is the paper's global attention. The default, 64, is the inference
  window of `tasks/predict.py`: at that size the STA is the paper's global attention. Per sample, STA holds
  `ceil(H / w) * ceil(W / w) * w^4` attention scores (w = min(window, H) by min(window, W) for non-square
  inputs), about 2 such matrices under autograd (scores and softmax), besides queries and keys of
  `T * d * H * W` values each. At 64 x 64 pixels: w = 64 gives 16.8 M scores (67 MB in float32) per sample,
  w = 32 gives 4.2 M, w = 16 gives 1.0 M. Each score costs 2 T d FLOPs (and each output 2 d), so the STA costs
  about `2 * ceil(H / w) * ceil(W / w) * w^4 * T * d` FLOPs: at T=24, d=256, 64 x 64 pixels, w = 64 gives 206 GFLOP of
  the model's 845 GFLOP forward (w = 32: 52 GFLOP), the Transformer about 460 and the CNN about 120.

`encode` / `classify` split (`models.base.TemporalEncoderModel`): STA needs both the temporal-encoder output and
the CNN features, so the per-date features returned by `encode` are their concatenation along channels,
`[temporal (d) | cnn (d)]`, and `feature_dim = 2 * d_model`; `classify` splits them again. `forward` is exactly
`classify(encode(...))`, and the architecture is the paper's. `encode` also gives features at invalid dates: the
temporal part is then inferred from the pixel's valid dates (the mask token stands in for the input), which
`classify` ignores unless it is told the date is valid.

Parameters at the paper's size (d_model=256, hidden=32, 3 layers, 8 heads): 3,240,321 + 289 C + 257 K for C bands
and K classes, 3,248,351 (3.25 M) for C=10, K=20 (the issue gives no figure for STCLN); the pre-training head adds
257 C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Count, Fraction
from models.losses import masked_mse

ENCODER_PREFIXES = ("mask_token", "cnn.", "input_norm.", "temporal.")


def doy_encoding(doy: torch.Tensor, dim: int, period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal encoding `(..., dim)` of days of year `(...)` (Vaswani et al. 2017, positions = days of year)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=doy.device, dtype=torch.float32) * (-math.log(period) / dim))
    angles = doy.float().unsqueeze(-1) * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(3x3 conv, zero padding, no bias + BatchNorm + ReLU) twice: the per-date CNN block of STCLN."""
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float
) -> torch.Tensor:
    """Attention between the pixels of each non-overlapping window: `softmax(q k^T * scale) v`.

    q, k `(B, H, W, E)`, v `(B, H, W, Dv)` -> `(B, H, W, Dv)`. Windows are `min(window, H) x min(window, W)` pixels
    (the whole image when `window` is None); H and W are zero-padded to multiples of them and padded pixels are
    masked out as keys (every window holds at least one real pixel, so no softmax row is empty).
    """
    b, h, w, _ = q.shape
    wh, ww = (h, w) if window is None else (min(window, h), min(window, w))
    pad_h, pad_w = -h % wh, -w % ww
    nh, nw = (h + pad_h) // wh, (w + pad_w) // ww

    def tiles(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, E) -> (B, nh * nw, wh * ww, E)
        t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
        return t.reshape(t.shape[0], nh, wh, nw, ww, -1).transpose(2, 3).reshape(t.shape[0], nh * nw, wh * ww, -1)

    mask = None
    if pad_h or pad_w:
        real = torch.ones((1, h, w, 1), dtype=torch.bool, device=q.device)
        mask = tiles(real).transpose(-1, -2)  # (1, nh * nw, 1, wh * ww): keys that are real pixels
    out = F.scaled_dot_product_attention(tiles(q), tiles(k), tiles(v), attn_mask=mask, scale=scale)
    out = out.reshape(b, nh, nw, wh, ww, -1).transpose(2, 3).reshape(b, nh * wh, nw * ww, -1)
    return out[:, :h, :w]


class STCLN(nn.Module):
    """STCLN (Qin et al., JAG 2025) with day-of-year encoding, validity masking and windowed STA.

    Args:
        in_channels: C, bands per date.
        num_classes: K, number of output classes.
        hidden: width of the first CNN block (32 in the paper).
        d_model: width of the second CNN block, of the temporal encoder and of the STA (256 in the paper).
        num_layers: Transformer layers of the temporal encoder (3).
        num_heads: attention heads of the temporal encoder (8).
        dropout: dropout of the temporal encoder (0.1).
        window: side of the STA attention windows in pixels; None = attention over the whole input (the paper).
            See the module docstring for the memory cost.
        reconstruction_head: build the linear head of masked pre-training (`pretrain_loss`, `reconstruct`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: Count = 32,
        d_model: Count = 256,
        num_layers: Count = 3,
        num_heads: Count = 8,
        dropout: Fraction = 0.1,
        window: Count | None = 64,
        reconstruction_head: bool = False,
    ) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.d_model = d_model
        self.feature_dim = 2 * d_model
        self.window = window
        self.mask_token = nn.Parameter(torch.zeros(in_channels))
        self.cnn = nn.Sequential(double_conv(in_channels, hidden), double_conv(hidden, d_model))
        self.input_norm = nn.LayerNorm(d_model)
        self.temporal = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, batch_first=True)
            for _ in range(num_layers)
        )
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Linear(d_model, num_classes)
        self.reconstruction = nn.Linear(d_model, in_channels) if reconstruction_head else None

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, K, H, W) for x (B, T, C, H, W), doy (B, T) and valid (B, T, H, W) (None: all valid)."""
        return self.classify(self.encode(x, doy, valid), doy, valid)

    def encode(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per-date features (B, T, 2 d, H, W): `[temporal-encoder output | CNN features]` along channels."""
        temporal, spatial = self._encode(x, doy, valid)
        return torch.cat([temporal, spatial], dim=-1).permute(0, 1, 4, 2, 3)

    def classify(self, features: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K, H, W) from `encode`'s features through STA and the classifier; `doy` is not used.

        Dates where `valid` is False are ignored: zero queries and keys, left out of the temporal max-pool.
        """
        features = features.permute(0, 1, 3, 4, 2)  # (B, T, H, W, 2d)
        b, t, h, w, _ = features.shape
        temporal, spatial = features.split(self.d_model, dim=-1)
        observed = torch.ones((b, t, h, w, 1), dtype=torch.bool, device=features.device)
        if valid is not None:
            observed = valid.unsqueeze(-1)
        q = torch.where(observed, self.query(temporal), 0.0).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        k = torch.where(observed, self.key(spatial), 0.0).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        pooled = torch.where(observed, temporal, float("-inf")).amax(dim=1)  # (B, H, W, d)
        v = self.value(torch.where(observed.any(dim=1), pooled, 0.0))
        attended = window_attention(q, k, v, self.window, scale=self.d_model**-0.5)
        return self.classifier(self.gamma * attended + v).permute(0, 3, 1, 2)

    def _encode(
        self, x: torch.Tensor, doy: torch.Tensor, observed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temporal-encoder output and CNN features, both (B, T, H, W, d); hidden where `observed` is False."""
        b, t, c, h, w = x.shape
        if observed is not None:
            x = torch.where(observed.unsqueeze(2), x, self.mask_token.view(1, 1, c, 1, 1).to(x.dtype))
        spatial = self.cnn(x.reshape(b * t, c, h, w)).reshape(b, t, -1, h, w).permute(0, 1, 3, 4, 2)
        tokens = self.input_norm(spatial) + doy_encoding(doy, self.d_model).view(b, t, 1, 1, -1)
        tokens = tokens.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, -1)
        padding = None
        if observed is not None:
            padding = ~observed.permute(0, 2, 3, 1).reshape(b * h * w, t)
            padding = padding & ~padding.all(dim=1, keepdim=True)  # no valid date: attend to all (finite output)
        for layer in self.temporal:
            tokens = layer(tokens, src_key_padding_mask=padding)
        temporal = tokens.reshape(b, h, w, t, -1).permute(0, 3, 1, 2, 4)
        return temporal, spatial

    def reconstruct(
        self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        """Inputs (B, T, C, H, W) rebuilt by the reconstruction head from x with pixel-dates hidden where `mask`
        (B, T, H, W) is True (or `valid` False)."""
        if self.reconstruction is None:
            raise RuntimeError("this STCLN has no reconstruction head (build it with reconstruction_head=True)")
        observed = ~mask if valid is None else valid & ~mask
        temporal, _ = self._encode(x, doy, observed)
        return self.reconstruction(temporal).permute(0, 1, 4, 2, 3)

    def pretrain_loss(
        self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        """Masked pre-training loss: MSE of the reconstruction on the hidden (`mask`) and valid pixel-dates."""
        target = mask if valid is None else mask & valid
        return masked_mse(self.reconstruct(x, doy, valid, mask), x, target.unsqueeze(2))

    def drop_reconstruction_head(self) -> None:
        """Remove the pre-training head (its weights leave the state dict)."""
        self.reconstruction = None

    def load_encoder(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the pre-trained encoder (mask token, CNN, input norm, temporal encoder) from a pre-training
        state dict.

        Same as `load_state_dict(state_dict, strict=False)` restricted to the encoder's keys: the STA and classifier
        keep their fresh initialisation, the pre-training head's weights are ignored. Raises `KeyError` if the state
        dict lacks an encoder weight, and `RuntimeError` on a shape mismatch (another d_model or band count).
        """
        encoder = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}
        missing = [k for k in self.state_dict() if k.startswith(ENCODER_PREFIXES) and k not in encoder]
        if missing:
            raise KeyError(f"pre-trained state dict lacks encoder weights: {', '.join(missing)}")
        self.load_state_dict(encoder, strict=False)
