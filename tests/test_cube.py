"""Cloud masking, temporal binning and the cube builder."""

from __future__ import annotations

import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from infra.errors import CropflowError
from tasks.cube import build_cube, composite_bins, time_bins
from tasks.sensors import qa_pixel_valid, scale_offset, scl_valid


def test_scl_mask_keeps_only_clear_classes():
    scl = xr.DataArray(np.arange(12, dtype="uint8"))
    assert scl_valid(scl).values.tolist() == [
        False,
        False,
        True,
        False,
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_qa_pixel_mask_bits():
    clear = 1 << 6
    values = [clear, clear | 1, clear | 2, clear | 4, clear | 8, clear | 16, clear | 32, clear | 128]
    qa = xr.DataArray(np.array(values, dtype="uint16"))
    # fill, dilated cloud, cirrus, cloud, shadow, snow invalidate; bit 7 (water) does not
    assert qa_pixel_valid(qa).values.tolist() == [True, False, False, False, False, False, False, True]


def test_scale_offset_from_raster_bands_or_s2_baseline():
    with_rb = {
        "assets": {"B02": {"raster:bands": [{"scale": 1e-4, "offset": -0.1}]}},
        "properties": {"s2:processing_baseline": "05.10"},
    }
    new = {"assets": {"B02": {}}, "properties": {"s2:processing_baseline": "04.00"}}
    old = {"assets": {"B02": {}}, "properties": {"s2:processing_baseline": "02.14"}}
    scale, offset = scale_offset([with_rb, new, old], ["B02"], "s2")
    assert scale[:, 0].tolist() == pytest.approx([1e-4, 1e-4, 1e-4])
    assert offset[:, 0].tolist() == pytest.approx([-0.1, -0.1, 0.0])
    landsat = {"assets": {"red": {"raster:bands": [{"scale": 2.75e-05, "offset": -0.2}]}}, "properties": {}}
    scale, offset = scale_offset([landsat], ["red"], "landsat")
    assert (scale[0, 0], offset[0, 0]) == pytest.approx((2.75e-05, -0.2))


def test_time_bins_cover_season_and_refuse_inverted():
    bins = time_bins(date(2024, 3, 1), date(2024, 3, 31), 10)
    assert bins == [date(2024, 3, 1), date(2024, 3, 11), date(2024, 3, 21), date(2024, 3, 31)]
    with pytest.raises(CropflowError, match="before its start"):
        time_bins(date(2024, 3, 31), date(2024, 3, 1))


def test_composite_median_and_validity_fraction():
    times = pd.to_datetime(["2024-03-01", "2024-03-03", "2024-03-05", "2024-03-12", "2024-03-25"])
    data = np.array([1.0, 3.0, 100.0, 5.0, 7.0], dtype="float32").reshape(5, 1, 1, 1)
    valid = np.array([True, True, False, True, False]).reshape(5, 1, 1)
    values = xr.DataArray(
        np.where(valid[:, None], data, np.nan), dims=("time", "band", "y", "x"), coords={"time": times, "band": ["B04"]}
    )
    valid_da = xr.DataArray(valid, dims=("time", "y", "x"), coords={"time": times})
    bins = time_bins(date(2024, 3, 1), date(2024, 4, 9), 10)
    comp, frac = composite_bins(values, valid_da, bins, 10)
    comp, frac = comp.compute(), frac.compute()
    assert comp.sizes["time"] == 4
    # bin 1: median of the two valid values (the cloudy 100 is excluded)
    assert float(comp[0, 0, 0, 0]) == pytest.approx(2.0)
    assert float(frac[0, 0, 0]) == pytest.approx(2 / 3)
    assert float(comp[1, 0, 0, 0]) == pytest.approx(5.0)
    # bin 3 has one cloudy acquisition, bin 4 none: both are gaps
    assert np.isnan(comp[2, 0, 0, 0]) and float(frac[2, 0, 0]) == 0.0
    assert np.isnan(comp[3, 0, 0, 0]) and float(frac[3, 0, 0]) == 0.0


def _items(region_dir, collection):
    lines = (region_dir / "items" / f"{collection}.ndjson").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_build_cube_from_sample_region(tiny_region, tmp_path):
    """The cube of the tiny sample region: grid, masking against SCL, validity, Zarr v3 layout."""
    import rasterio

    meta = json.loads((tiny_region / "region.json").read_text())
    s2 = _items(tiny_region, "sentinel-2-l2a")
    s1 = _items(tiny_region, "sentinel-1-rtc")
    start, end = (date.fromisoformat(d) for d in meta["season"])
    out = build_cube({"s2": s2, "s1": s1}, meta["epsg"], tuple(meta["bounds"]), start, end, tmp_path / "cube.zarr")
    ds = xr.open_zarr(out)
    n = meta["size"]
    assert ds["s2"].dims == ("time", "band", "y", "x") and ds["s2"].shape[1:] == (10, n, n)
    assert ds["s2"].dtype == np.float32 and ds["s2_valid"].dtype == np.float32
    assert ds.attrs["crs"] == f"EPSG:{meta['epsg']}"
    assert ds.attrs["transform"] == [10.0, 0.0, meta["bounds"][0], 0.0, -10.0, meta["bounds"][3]]
    assert float(ds["x"][0]) == meta["bounds"][0] + 5
    # the clearest bin's values equal the masked median of its acquisitions, checked against the COGs themselves
    b = int(ds["s2_valid"].mean(["y", "x"]).argmax())
    lo, hi = start + timedelta(days=10 * b), start + timedelta(days=10 * b + 10)
    acquisitions = [it for it in s2 if lo <= date.fromisoformat(it["properties"]["datetime"][:10]) < hi]
    stack, masks = [], []
    for it in acquisitions:
        with rasterio.open(it["assets"]["B04"]["href"].removeprefix("file://")) as src:
            stack.append(src.read(1).astype("float32") * 1e-4 - 0.1)
        with rasterio.open(it["assets"]["SCL"]["href"].removeprefix("file://")) as src:
            scl = src.read(1)
        masks.append(np.isin(np.kron(scl, np.ones((2, 2), dtype=scl.dtype))[:n, :n], [2, 4, 5, 6, 7]))
    stack, masks = np.stack(stack)[:, :n, :n], np.stack(masks)
    expected = np.nanmedian(np.where(masks, stack, np.nan), axis=0)
    got = ds["s2"].sel(band="B04").isel(time=b).values
    both = ~np.isnan(expected) & ~np.isnan(got)
    assert both.mean() > 0.5
    assert np.allclose(got[both], expected[both], atol=2e-4)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.allclose(ds["s2_valid"].isel(time=b).values, masks.mean(axis=0))
    assert ds["s1"].sizes["time"] == ds["s2"].sizes["time"]
