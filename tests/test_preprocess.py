"""Gap filling in time and standardisation of model inputs."""

import numpy as np

from tasks.preprocess import band_statistics, fill_time_gaps, prepare_window

nan = np.nan


def test_fill_time_gaps_linear_inside_nearest_at_ends():
    series = np.array([[nan, 1.0, nan, nan, 4.0, nan], [nan] * 6, [2.0, nan, 6.0, 8.0, 9.0, 10.0]]).T
    filled = fill_time_gaps(series.astype("float32"))
    assert filled[:, 0].tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    assert np.isnan(filled[:, 1]).all()  # no valid value at all: stays a gap
    assert filled[:, 2].tolist() == [2.0, 4.0, 6.0, 8.0, 9.0, 10.0]
    assert filled.dtype == np.float32


def test_prepare_window_marks_real_observations_and_standardises():
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.1, size=(6, 2, 4, 4)).astype("float32")
    values[2, :, 1, 1] = nan
    mean, std = band_statistics(values)
    x, valid = prepare_window(values, mean, std)
    assert x.shape == values.shape and valid.shape == (6, 4, 4)
    assert not valid[2, 1, 1] and valid.sum() == 6 * 16 - 1
    assert np.isfinite(x).all()
    assert abs(float(x[:, 0].mean())) < 0.1 and abs(float(x[:, 0].std()) - 1) < 0.1


def test_gaps_shared_by_all_bands_fill_like_the_general_path():
    """Masks per pixel-date (the cube's), shared by every band: the same values as filling each band alone."""
    rng = np.random.default_rng(1)
    values = rng.random((9, 4, 5, 6), dtype=np.float32)
    values = np.where(rng.random((9, 1, 5, 6)) < 0.5, np.nan, values)
    values[:, :, 0, 0] = np.nan  # never observed
    values[:, :, 1, 1] = np.nan
    values[4, :, 1, 1] = 0.25  # observed once
    filled = fill_time_gaps(values)
    np.testing.assert_array_equal(filled, fill_time_gaps(values.reshape(9, -1)).reshape(values.shape))
    assert (
        np.isnan(filled[:, :, 0, 0]).all()
        and (filled[:, :, 1, 1] == 0.25).all()
        and not np.isnan(filled[:, :, 2:]).any()
    )
