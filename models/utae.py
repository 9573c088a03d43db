"""U-TAE: U-Net with temporal attention encoder, for semantic segmentation of satellite image time series.

Garnot, V. S. F., Landrieu, L. (2021). "Panoptic segmentation of satellite image time series with convolutional
temporal attention networks". ICCV 2021. (The paper reports 63.1 mIoU for semantic segmentation on PASTIS with
about 1.1 M parameters; this implementation has not been evaluated there.)

A shared 2D encoder processes every date separately: a block of two 3x3 convolutions, then levels that each halve
height and width with a 4x4 strided convolution followed by two 3x3 convolutions (residual); GroupNorm (4 groups)
in the encoder, so that no statistics are shared across dates. An L-TAE (`models.ltae.LTAE`) runs on every pixel
of the lowest resolution: its output feeds the decoder, and its per-head attention masks (B, heads, T, h, w) are
upsampled (bilinear) to every other level, where they weight a temporal sum of the encoder features, one head per
group of channels. A U-Net decoder (transposed convolutions, skip connections, BatchNorm) maps back to logits.

Invalid observations (`valid` False: clouds, padded dates) are handled per pixel, an extension of the paper's
padded-date mask: their input values are zeroed before the encoder, a date is excluded from the attention at a
low-resolution cell when none of the cell's pixels is valid, and at every level the upsampled attention is
multiplied by the level's validity and renormalised over dates. A pixel without any valid date aggregates zeros.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Count, Fraction, Widths
from models.ltae import LTAE, pixels_first


def conv_norm_relu(
    c_in: int, c_out: int, norm: str, kernel: int = 3, stride: int = 1, padding: int = 1
) -> nn.Sequential:
    """Conv2d (no bias, the norm has one) + GroupNorm(4 groups) or BatchNorm + ReLU."""
    layer_norm = nn.GroupNorm(4, c_out) if norm == "group" else nn.BatchNorm2d(c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), layer_norm, nn.ReLU(inplace=True)
    )


class DownBlock(nn.Module):
    """Strided 4x4 convolution (halves H and W, keeps channels), then two 3x3 convolutions with a residual sum."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = conv_norm_relu(c_in, c_in, "group", kernel=4, stride=2, padding=1)
        self.conv1 = conv_norm_relu(c_in, c_out, "group")
        self.conv2 = conv_norm_relu(c_out, c_out, "group")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.down(x))
        return y + self.conv2(y)


class UpBlock(nn.Module):
    """Transposed 4x4 convolution (doubles H and W), 1x1 convolution of the skip, concatenation, two 3x3 convs."""

    def __init__(self, c_in: int, c_out: int, c_skip: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
        self.skip = conv_norm_relu(c_skip, c_skip, "batch", kernel=1, padding=0)
        self.conv1 = conv_norm_relu(c_out + c_skip, c_out, "batch")
        self.conv2 = conv_norm_relu(c_out, c_out, "batch")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.cat([self.up(x), self.skip(skip)], dim=1))
        return y + self.conv2(y)


def aggregate(features: torch.Tensor, attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Temporal sum of features (B, T, D, H, W) weighted per channel group by attn (B, heads, T, h, w).

    The attention is upsampled to (H, W), zeroed where `valid` (B, T, H, W) is False and renormalised over dates.
    """
    b, t, d, h, w = features.shape
    heads = attn.shape[1]
    if attn.shape[-2:] != (h, w):
        attn = F.interpolate(attn.flatten(1, 2), size=(h, w), mode="bilinear", align_corners=False)
        attn = attn.view(b, heads, t, h, w)
    attn = attn * valid.unsqueeze(1)
    attn = attn / attn.sum(dim=2, keepdim=True).clamp(min=1e-6)
    grouped = features.view(b, t, heads, d // heads, h, w)
    return torch.einsum("bgthw,btgchw->bgchw", attn.to(grouped.dtype), grouped).reshape(b, d, h, w)


class UTAE(nn.Module):
    """U-TAE (Garnot & Landrieu, ICCV 2021) for per-pixel crop-type logits.

    Args:
        in_channels: C, bands per date.
        num_classes: K.
        encoder_widths: channels of the encoder levels (the first at full resolution; each next one halves H, W).
        decoder_widths: channels of the decoder at the same levels; the last equals `encoder_widths[-1]`.
        out_widths: hidden widths of the output convolutions (their last layer gives K channels).
        n_head, d_model, d_k: the L-TAE's (its output width is `encoder_widths[-1]`).
        dropout: dropout in the L-TAE.

    The defaults are the paper's: 1,085,076 parameters with 10 bands and 20 classes (paper: about 1.1 M).
    Height and width are padded internally to a multiple of 2 ** (levels - 1) and the logits cropped back.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_widths: Widths = (64, 64, 64, 128),
        decoder_widths: Widths = (32, 32, 64, 128),
        out_widths: Widths = (32,),
        n_head: Count = 16,
        d_model: Count = 256,
        d_k: Count = 4,
        dropout: Fraction = 0.2,
    ) -> None:
        super().__init__()
        if decoder_widths[-1] != encoder_widths[-1] or len(decoder_widths) != len(encoder_widths):
            raise ValueError("decoder_widths must have the encoder's length and end with its last width")
        if any(width % n_head for width in encoder_widths[:-1]):
            raise ValueError(f"every encoder width but the last must be a multiple of n_head={n_head}")
        self.multiple = 2 ** (len(encoder_widths) - 1)
        first = encoder_widths[0]
        self.in_conv = nn.Sequential(conv_norm_relu(in_channels, first, "group"), conv_norm_relu(first, first, "group"))
        self.down = nn.ModuleList(DownBlock(a, b) for a, b in pairwise(encoder_widths))
        self.temporal = LTAE(encoder_widths[-1], d_model, n_head, d_k, (encoder_widths[-1],), dropout)
        self.up = nn.ModuleList(
            UpBlock(decoder_widths[i + 1], decoder_widths[i], encoder_widths[i]) for i in range(len(encoder_widths) - 1)
        )
        hidden = (decoder_widths[0], *out_widths)
        self.out = nn.Sequential(
            *(conv_norm_relu(a, b, "batch") for a, b in pairwise(hidden)),
            nn.Conv2d(hidden[-1], num_classes, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) for x (B, T, C, H, W), doy (B, T) and valid (B, T, H, W) (None: all valid)."""
        b, t, _, h, w = x.shape
        if valid is None:
            valid = torch.ones((b, t, h, w), dtype=torch.bool, device=x.device)
        x = x * valid.unsqueeze(2)
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h)).flatten(0, 1)  # (B*T, C, H', W')
        level_valid = F.pad(valid, (0, pad_w, 0, pad_h)).to(x.dtype)

        features = [self.in_conv(x)]
        valids = [level_valid]
        for block in self.down:
            features.append(block(features[-1]))
            valids.append(F.max_pool2d(valids[-1], 2))  # a cell is valid at a date when one of its pixels is
        per_date = [f.unflatten(0, (b, t)) for f in features]  # (B, T, D, H_l, W_l)

        low = per_date[-1]
        _, _, d, lh, lw = low.shape
        low_valid = valids[-1].bool()
        doy_px = doy.reshape(b, 1, t).expand(b, lh * lw, t).reshape(b * lh * lw, t)
        mask = low_valid.permute(0, 2, 3, 1).reshape(b * lh * lw, t)
        pooled, attn = self.temporal(pixels_first(low), doy_px, mask)
        y = pooled.view(b, lh, lw, d).permute(0, 3, 1, 2)
        attn = attn.view(b, lh, lw, -1, t).permute(0, 3, 4, 1, 2)  # (B, heads, T, h, w)

        for level in range(len(self.up) - 1, -1, -1):
            skip = aggregate(per_date[level], attn, valids[level])
            y = self.up[level](y, skip)
        return self.out(y)[:, :, :h, :w]
