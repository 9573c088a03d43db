"""Turn cube windows into model inputs: fill cloud gaps in time, then standardise per band.

Shared by training (`tasks.dataset`) and inference (`tasks.predict`) so both see identical inputs.
"""

from __future__ import annotations

import numpy as np


def fill_time_gaps(values: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs along axis 0 (time), per pixel and band.

    Leading and trailing gaps take the nearest valid value; series with no valid value stay NaN.
    `values` has shape `(T, ...)`; the result has the same shape and dtype.
    """
    t = values.shape[0]
    flat = values.reshape(t, -1)
    valid = ~np.isnan(flat)
    idx = np.arange(t)[:, None]
    # index of the previous / next valid date for every (date, series)
    prev = np.where(valid, idx, -1)
    prev = np.maximum.accumulate(prev, axis=0)
    nxt = np.where(valid, idx, t)
    nxt = np.minimum.accumulate(nxt[::-1], axis=0)[::-1]
    has_prev, has_next = prev >= 0, nxt < t
    cols = np.arange(flat.shape[1])[None, :]
    prev_val = flat[np.clip(prev, 0, t - 1), cols]
    next_val = flat[np.clip(nxt, 0, t - 1), cols]
    span = np.where(has_prev & has_next, nxt - prev, 1)
    weight = np.where(has_prev & has_next, (idx - prev) / np.maximum(span, 1), 0.0)
    interp = prev_val + (next_val - prev_val) * weight
    filled = np.where(has_prev & has_next, interp, np.where(has_prev, prev_val, next_val))
    filled = np.where(valid, flat, filled)
    return filled.reshape(values.shape).astype(values.dtype, copy=False)


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
