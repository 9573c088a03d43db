"""Random masks of pixel-dates for masked pre-training and for simulating cloud gaps.

Every generator takes a `torch.Generator` and draws all its random numbers from it, on the generator's device:
the same seed gives the same mask. Masks are bool tensors, True = hidden (masked).

Pre-training masks (Qin et al., JAG 2025, "Spatiotemporal masked pre-training for advancing crop mapping on
satellite image time series with limited labels"): each pixel-date of a `(B, T, H, W)` grid is hidden with
probability `p`, following one of three patterns:

- `spatial_mask`: whole pixel time series (a pixel is hidden at every date),
- `temporal_mask`: whole images (a date is hidden at every pixel),
- `spatiotemporal_mask`: independent pixel-dates.

`block > 1` draws the spatial patterns on a grid of `block x block` cells, so that hidden areas are larger than
the 3x3 context a convolution sees (the paper masks single pixels: `block=1`, the default).

Cloud gaps (Wang, Belgiu et al., 2025, arXiv 2505.19159): `cloud_gap_mask` hides whole dates of each sample, at
random or as one contiguous run, at a rate drawn per sample (0 to 80 % by default).
"""

from __future__ import annotations

import torch

PATTERNS = ("spatial", "temporal", "spatiotemporal")
GAP_MODES = ("random", "contiguous", "mixed")


def _cells(shape: tuple[int, int, int, int], p: float, block: int, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(p) draws on a `(B, T, ceil(H/block), ceil(W/block))` grid, each cell covering `block x block`
    pixels, cropped to `(B, T, H, W)`."""
    if not 0.0 <= p <= 1.0 or block < 1:
        raise ValueError(f"need 0 <= p <= 1 and block >= 1, got p={p}, block={block}")
    b, t, h, w = shape
    cells = torch.rand((b, t, -(-h // block), -(-w // block)), generator=generator, device=generator.device) < p
    return cells.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :h, :w].contiguous()


def spatial_mask(
    shape: tuple[int, int, int, int], p: float, generator: torch.Generator, block: int = 1
) -> torch.Tensor:
    """`(B, T, H, W)` mask constant over time: each pixel (or `block x block` cell) is hidden with probability p."""
    b, t, h, w = shape
    return _cells((b, 1, h, w), p, block, generator).expand(b, t, h, w).contiguous()


def temporal_mask(shape: tuple[int, int, int, int], p: float, generator: torch.Generator) -> torch.Tensor:
    """`(B, T, H, W)` mask constant over space: each date of each sample is hidden with probability p."""
    b, t, h, w = shape
    return _cells((b, t, 1, 1), p, 1, generator).expand(b, t, h, w).contiguous()


def spatiotemporal_mask(
    shape: tuple[int, int, int, int], p: float, generator: torch.Generator, block: int = 1
) -> torch.Tensor:
    """`(B, T, H, W)` mask of independent draws: each pixel-date (or cell-date) is hidden with probability p."""
    return _cells(shape, p, block, generator)


def pretraining_mask(
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    p: float = 0.4,
    patterns: tuple[str, ...] = PATTERNS,
    block: int = 1,
) -> torch.Tensor:
    """`(B, T, H, W)` pre-training mask: each sample follows one of `patterns`, chosen uniformly at random.

    Whatever the pattern, each pixel-date is hidden with probability `p` (0.4 in the paper).
    """
    unknown = set(patterns) - set(PATTERNS)
    if not patterns or unknown:
        raise ValueError(f"patterns must be a non-empty subset of {PATTERNS}, got {patterns}")
    masks = {
        "spatial": spatial_mask(shape, p, generator, block),
        "temporal": temporal_mask(shape, p, generator),
        "spatiotemporal": spatiotemporal_mask(shape, p, generator, block),
    }
    choice = torch.randint(len(patterns), (shape[0],), generator=generator, device=generator.device)
    stacked = torch.stack([masks[name] for name in patterns])  # (P, B, T, H, W)
    return stacked[choice, torch.arange(shape[0], device=generator.device)]


def cloud_gap_mask(
    batch_size: int,
    num_dates: int,
    generator: torch.Generator,
    rate: float | tuple[float, float] = (0.0, 0.8),
    mode: str = "mixed",
) -> torch.Tensor:
    """`(B, T)` mask of simulated cloud gaps: the dates hidden in each sample (broadcast over H, W as needed).

    Args:
        batch_size: B.
        num_dates: T.
        generator: source of all random draws (and device of the mask).
        rate: fraction of the dates to hide; a pair `(low, high)` draws it uniformly per sample. Each sample hides
            exactly `round(rate * T)` dates, capped at `T - 1` so that at least one date stays visible.
        mode: "random" hides dates chosen uniformly without replacement, "contiguous" one run of consecutive dates
            at a uniform random start (a long cloudy spell), "mixed" picks one of the two per sample.
    """
    if mode not in GAP_MODES:
        raise ValueError(f"mode must be one of {GAP_MODES}, got {mode!r}")
    low, high = (rate, rate) if isinstance(rate, float | int) else rate
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= rate <= 1 (low <= high), got {rate}")
    device = generator.device
    rates = low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
    count = (rates * num_dates).round().long().clamp(max=max(num_dates - 1, 0)).unsqueeze(1)  # (B, 1)
    dates = torch.arange(num_dates, device=device)
    # random: the `count` dates with the smallest random keys
    rank = torch.rand((batch_size, num_dates), generator=generator, device=device).argsort(1).argsort(1)
    scattered = rank < count
    # contiguous: dates start .. start + count - 1, start uniform in [0, T - count]
    start = (torch.rand((batch_size, 1), generator=generator, device=device) * (num_dates - count + 1)).floor()
    run = (dates >= start) & (dates < start + count)
    if mode == "random":
        return scattered
    if mode == "contiguous":
        return run
    use_run = torch.rand((batch_size, 1), generator=generator, device=device) < 0.5
    return torch.where(use_run, run, scattered)
