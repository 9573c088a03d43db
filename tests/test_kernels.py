"""The cube's compiled kernels against numpy's definitions."""

import numpy as np
import pytest
from region_helpers import packed

from tasks import kernels
from tasks.cube import _source_axis


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_nan_median_and_mean_match_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    stack = rng.uniform(-0.1, 0.8, size=(n, 3, 17, 9)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.4] = np.nan
    stack[:, 0, 0, 0] = np.nan  # all missing: NaN
    valid = rng.random((n, 17, 9)) < 0.8  # where not valid, a value counts as missing, whatever it holds
    median, mean = np.empty(stack.shape[1:], np.uint16), np.empty(stack.shape[1:], np.float32)
    clipped = kernels.nan_median(stack, valid, 1e-4, -0.2, 65535, median)
    kernels.nan_mean(stack, valid, mean)
    stack = np.where(valid[:, None], stack, np.nan)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected_median, expected_mean = np.nanmedian(stack, axis=0), np.nanmean(stack, axis=0)
    np.testing.assert_array_equal(median, packed(expected_median))  # the same float32 medians, packed alike
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-7)
    assert clipped == 0 and median[0, 0, 0] == 65535 and np.isnan(mean[0, 0, 0])


def _upsample(plane: np.ndarray, factor: int, ri, rt, ci, ct, scale: float = 1.0, offset: float = 0.0):
    out, missing = np.empty((ri.size, ci.size), np.float32), np.zeros((ri.size, ci.size), bool)
    kernels.bilinear_upsample(plane, 0.0, factor, ri, rt, ci, ct, scale, offset, out, missing)
    return out, missing


@pytest.mark.parametrize(("factor", "start"), [(2, 2), (2, 3), (3, 4)])  # Sentinel-2's 20 m, Landsat's 30 m
def test_source_axis_gives_each_target_centre_in_source_pixels(factor: int, start: int) -> None:
    index, t, lo, hi = _source_axis(11, start, factor)
    centre = (np.arange(start, start + 11) + 0.5) / factor - 0.5
    np.testing.assert_allclose(index + lo + t, centre, rtol=0, atol=1e-6)
    assert ((t >= 0) & (t < 1)).all() and index.min() == 0 and hi == index.max() + lo + 2


@pytest.mark.parametrize("factor", [2, 3])
def test_bilinear_upsample_interpolates_and_keeps_no_data_where_the_centre_has_none(factor: int) -> None:
    ri, rt, r_lo, r_hi = _source_axis(8, 0, factor)  # 8 target rows over source rows r_lo..r_hi, `factor` as fine
    ci, ct, c_lo, c_hi = _source_axis(7, 2, factor)
    rows, cols = np.arange(r_lo, r_hi, dtype=np.float32), np.arange(c_lo, c_hi, dtype=np.float32)
    plane = (10 * rows[:, None] + cols[None, :] + 100).astype(np.uint16)  # linear: interpolation is exact
    out, invalid = _upsample(plane, factor, ri, rt, ci, ct)
    centre_r, centre_c = (ri + rt + r_lo)[:, None], (ci + ct + c_lo)[None, :]
    np.testing.assert_allclose(out, 10 * centre_r + centre_c + 100, rtol=0, atol=1e-4)
    assert not invalid.any()
    scaled, _ = _upsample(plane, factor, ri, rt, ci, ct, 1e-4, -0.1)  # scaled after interpolation, in float32
    np.testing.assert_array_equal(scaled, out * np.float32(1e-4) + np.float32(-0.1))

    plane[3, 2] = 0  # a no-data source pixel: the target pixels whose centre it holds have no data, others keep value
    whole = out
    out, invalid = _upsample(plane, factor, ri, rt, ci, ct)
    apart = ~np.isin(ri, (2, 3))[:, None] | ~np.isin(ci, (1, 2))[None, :]  # pixels that do not interpolate (3, 2)
    np.testing.assert_array_equal(out[apart], whole[apart])
    holder_r = (ri + (rt >= 0.5))[:, None] == 3
    holder_c = (ci + (ct >= 0.5))[None, :] == 2
    np.testing.assert_array_equal(invalid, holder_r & holder_c)
    assert (out[invalid] == 0).all()
    assert (out[~invalid] >= plane[plane > 0].min()).all()  # the hole's weight went to valid neighbours, never 0


def test_scale_band_scales_and_marks_no_data_without_clearing_what_is_already_missing() -> None:
    raw = np.array([[0, 1000], [5000, 0]], np.uint16)
    out, missing = np.empty(raw.shape, np.float32), np.array([[False, True], [False, False]])
    kernels.scale_band(raw, 0.0, 1e-4, -0.1, out, missing)
    np.testing.assert_array_equal(out, raw.astype(np.float32) * np.float32(1e-4) + np.float32(-0.1))
    np.testing.assert_array_equal(missing, [[True, True], [False, True]])


def test_mask_lookup_marks_the_codes_the_table_says_are_not_valid() -> None:
    from tasks.sensors import scl_valid

    codes = np.arange(12, dtype=np.uint8).reshape(3, 4)
    table = scl_valid(np.arange(256, dtype=np.uint8))
    missing = np.zeros(codes.shape, bool)
    missing[1, 0] = True  # already missing where the code (4, vegetation) is valid: stays so
    kernels.mask_lookup(codes, np.arange(3), np.arange(4), table, missing)
    assert scl_valid(codes)[1, 0]
    expected = ~scl_valid(codes)
    expected[1, 0] = True
    np.testing.assert_array_equal(missing, expected)
    # each pixel through the source pixel its row and column name: a 2x coarser mask to its 6 x 8 pixels
    rows, cols = np.arange(6) // 2, np.arange(8) // 2
    missing = np.zeros((6, 8), bool)
    kernels.mask_lookup(codes, rows, cols, table, missing)
    np.testing.assert_array_equal(missing, np.repeat(np.repeat(~scl_valid(codes), 2, axis=0), 2, axis=1))


def test_median_packs_to_the_step_clips_and_marks_no_data() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.19, 1.5, 1000).astype(np.float32)
    values[::7] = np.nan
    values[:4] = [-0.2, 6.3534, -0.25, 7.0]  # the ends of what is stored, and beyond them
    out = np.empty(values.size, np.uint16)  # one value a pixel: its median is itself
    stack, valid = values.reshape(1, 1, 1, -1), np.ones((1, 1, values.size), bool)
    clipped = kernels.nan_median(stack, valid, 1e-4, -0.2, 65535, out.reshape(1, 1, -1))
    assert clipped == 2 and out[:4].tolist() == [0, 65534, 0, 65534]
    assert (out[::7][1:] == 65535).all() and (out[~np.isnan(values)] < 65535).all()
    ok = ~np.isnan(values)
    ok[:4] = False
    back = out.astype(np.float64) * 1e-4 - 0.2
    assert np.abs(back[ok] - values[ok]).max() <= 0.5e-4 + 1e-7


@pytest.mark.parametrize(("k", "n"), [(0, 0), (0, 2), (1, 1), (2, 3), (3, 3), (4, 9)])
def test_valid_fraction_matches_numpy(k: int, n: int) -> None:
    valid = np.random.default_rng(k).random((k, 13, 21)) < 0.6
    out = np.full((13, 21), np.nan, np.float32)
    kernels.valid_fraction(valid, n, out)
    expected = valid.sum(axis=0, dtype=np.float32) / n if k else np.zeros((13, 21), np.float32)
    np.testing.assert_array_equal(out, expected)
