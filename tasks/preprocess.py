"""Turn cube windows into model inputs: fill cloud gaps in time, then standardise per band.

Shared by training (`tasks.dataset`) and inference (`tasks.predict`) so both see identical inputs.
"""

from __future__ import annotations

import numpy as np


def fill_time_gaps(values: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs along axis 0 (time), per pixel and band.

    Leading and trailing gaps take the nearest valid value; series with no valid value stay NaN.
    `values` has shape `(T, ...)`; the result has the same shape and dtype. Running maxima/minima over time give
    each value its previous and next valid date, so the cost is a few operations per value; when every band has
    the same gaps (cube masks), the dates are found once per pixel.
    """
    t = values.shape[0]
    if values.ndim > 2:
        gaps = np.isnan(values)
        if (gaps == gaps[:, :1]).all():
            return _fill_shared_gaps(values, ~gaps[:, 0])
    flat = values.reshape(t, -1)
    valid = ~np.isnan(flat)
    if valid.all():
        return values.copy()
    return _fill_shared_gaps(flat[:, None], valid).reshape(values.shape)


def _fill_shared_gaps(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`fill_time_gaps` of `values` `(T, C, ...)` whose gaps are the same in every `C` (`valid` `(T, ...)`, as cube
    masks per pixel-date give): the neighbouring dates and weights are found once per pixel, not once per band."""
    t = values.shape[0]
    flat, ok = values.reshape(t, values.shape[1], -1), valid.reshape(t, -1)
    steps = np.arange(t, dtype=np.int32)[:, None]
    prev_idx = np.maximum.accumulate(np.where(ok, steps, -1), axis=0)
    next_idx = np.minimum.accumulate(np.where(ok, steps, t)[::-1], axis=0)[::-1]
    # before the first and after the last valid date both neighbours are the nearest valid date
    prev_src, next_src = np.where(prev_idx >= 0, prev_idx, next_idx), np.where(next_idx < t, next_idx, prev_idx)
    prev_src, next_src = np.clip(prev_src, 0, t - 1), np.clip(next_src, 0, t - 1)  # all-gap pixels stay NaN
    weight = ((steps - prev_idx) / np.maximum(next_idx - prev_idx, 1)).astype(values.dtype)
    pixels = np.arange(flat.shape[2])
    out = np.empty_like(flat)
    for c in range(flat.shape[1]):
        prev_val, next_val = flat[:, c][prev_src, pixels], flat[:, c][next_src, pixels]
        out[:, c] = prev_val + (next_val - prev_val) * weight
    return out.reshape(values.shape)


def band_statistics(values: np.ndarray, sample: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation of valid values of a `(T, C, H, W)` array (NaN ignored).

    At most `sample` pixels are drawn (deterministically) so statistics stay cheap on large regions.
    """
    c = values.shape[1]
    flat = np.moveaxis(values, 1, -1).reshape(-1, c)
    if flat.shape[0] > sample:
        rows = np.random.default_rng(seed).choice(flat.shape[0], size=sample, replace=False)
        flat = flat[np.sort(rows)]
    mean = np.nanmean(flat, axis=0)
    std = np.nanstd(flat, axis=0)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def prepare_window(
    values: np.ndarray, mean: np.ndarray, std: np.ndarray, fill_gaps: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Model input from a cube window.

    `values`: `(T, C, H, W)` float32 reflectance with NaN for dates without a valid observation.
    Returns `x` `(T, C, H, W)` float32 standardised with gaps filled (remaining NaN set to 0, the band
    mean) and `valid` `(T, H, W)` bool, True where the date held a real (not filled) observation.
    """
    valid = ~np.isnan(values).any(axis=1)
    filled = fill_time_gaps(values) if fill_gaps else values
    x = (filled - mean[None, :, None, None]) / std[None, :, None, None]
    return np.nan_to_num(x, nan=0.0).astype(np.float32, copy=False), valid
