"""Turn cube windows into model inputs: fill cloud gaps in time, then standardise per band.

Shared by training (`tasks.dataset`) and inference (`tasks.predict`) so both see identical inputs.
"""

from __future__ import annotations

import numpy as np

from tasks import kernels


def fill_time_gaps(values: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs along axis 0 (time), per pixel and band.

    Leading and trailing gaps take the nearest valid value; series with no valid value stay NaN.
    `values` has shape `(T, ...)`; the result has the same shape and dtype (float32).
    """
    series = np.ascontiguousarray(values, dtype=np.float32).reshape(values.shape[0], 1, -1)
    filled, valid = np.empty_like(series), np.empty((series.shape[0], series.shape[2]), dtype=bool)
    kernels.prepare_series(series, np.zeros(1, np.float32), np.ones(1, np.float32), True, np.nan, filled, valid)
    return filled.reshape(values.shape)


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
    Returns `x` `(T, C, H, W)` float32 standardised with gaps filled (`fill_time_gaps`; remaining NaN set to 0, the
    band mean) and `valid` `(T, H, W)` bool, True where the date held a real (not filled) observation.
    """
    t, c, h, w = values.shape
    series = np.ascontiguousarray(values, dtype=np.float32).reshape(t, c, h * w)
    x, valid = np.empty_like(series), np.empty((t, h * w), dtype=bool)
    norm = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    kernels.prepare_series(series, *norm, fill_gaps, 0.0, x, valid)
    return x.reshape(values.shape), valid.reshape(t, h, w)
