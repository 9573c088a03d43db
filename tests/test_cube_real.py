"""Cubes of real pixels: WorldCereal patches (S2 L2A with SCL, S1 GRD, Landsat 8 with QA_PIXEL) imported as COGs and
STAC items, served by the local STAC API, built into cubes and checked against the netCDF sources with numpy."""

from __future__ import annotations

import os
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from region_helpers import STORED_ATOL, as_stored

from infra import stac_api as stac_api_module
from infra.settings import Settings, real_data_dir
from infra.storage import open_zarr
from tasks.catalog import get_catalog, search_items
from tasks.cube import build_cube
from tasks.sample_stac import lonlat_footprint
from tasks.worldcereal import Patch, import_patches, open_product, product_grid

REAL = real_data_dir()
SRC = REAL / "worldcereal-patches" if REAL else None
if SRC is None or not SRC.is_dir():
    pytest.skip(
        f"real data not found at {os.environ.get('CROPFLOW_REAL_DATA', '../shared/data')}/worldcereal-patches; "
        "set CROPFLOW_REAL_DATA",
        allow_module_level=True,
    )
PATCH_IDS = sorted(p.parent.name for p in SRC.glob("*/S2_L2A_20m_*.nc"))
SCL_INVALID = (0, 1, 3, 8, 9, 10, 11)  # written out here, not imported, so the test checks tasks.sensors
QA_INVALID_BITS = 0b111111  # fill, dilated cloud, cirrus, cloud, cloud shadow, snow
S1_FLOOR = 1e-4  # linear backscatter below -40 dB is border noise for the cube (tasks/cube.py)
COLLECTIONS = {"s2": "sentinel-2-l2a", "s1": "sentinel-1-rtc", "landsat": "landsat-c2-l2"}
S2_10M = ["B02", "B03", "B04", "B08"]
S2_20M = ["B05", "B06", "B07", "B8A", "B11", "B12"]
LANDSAT = ["B02", "B03", "B04", "B05", "B06", "B07"]  # Landsat 8 band numbers: blue green red nir swir16 swir22


@pytest.fixture(scope="module")
def patches(stac_api: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Patch]:
    """Every patch of the folder imported and loaded into the test STAC API."""
    imported = import_patches(SRC, tmp_path_factory.mktemp("worldcereal"))
    for patch in imported:
        stac_api_module.load(stac_api, patch.folder)
    return {p.location_id: p for p in imported}


def season(patch: Patch) -> tuple[date, date]:
    return date.fromisoformat(patch.season[0]), date.fromisoformat(patch.season[1])


def search(settings: Settings, patch: Patch, sensors: list[str]) -> dict[str, list[dict]]:
    """The patch's items per sensor, found by lon/lat bbox and season through the STAC API."""
    catalog = get_catalog("local", settings.stac_url)
    bbox = tuple(lonlat_footprint(patch.bounds, patch.epsg)[0])
    return {s: search_items(catalog, s, *season(patch), bbox=bbox) for s in sensors}


def has_s2_10m(patch_id: str) -> bool:
    return any((SRC / patch_id).glob("S2_L2A_10m_*.nc"))


def cube(items: dict[str, list[dict]], patch: Patch, out: Path, resolution: float, bin_days: int) -> xr.Dataset:
    """The cube on the patch's own grid; S2 of the 20 m bands alone where the patch has no 10 m file; no speckle
    filter, so that S1 values can be compared with the source."""
    bands = {} if has_s2_10m(patch.location_id) or "s2" not in items else {"s2": S2_20M}
    path = build_cube(
        items,
        patch.epsg,
        patch.bounds,
        *season(patch),
        out,
        resolution=resolution,
        bin_days=bin_days,
        bands=bands,
        speckle_window=0,
    )
    return open_zarr(path).load()


def bin_index(ds: xr.Dataset, start: date, bin_days: int) -> np.ndarray:
    """Bin of each acquisition of a netCDF product: whole days since `start`, divided by `bin_days`."""
    days = ds["timestamp"].values.astype("datetime64[D]") - np.datetime64(start, "D")
    return days.astype(int) // bin_days


def composite(index: np.ndarray, values: np.ndarray, valid: np.ndarray, n_bins: int, how: str = "median"):
    """Independent per-bin composite of valid values `(bins, C, H, W)` and validity fraction `(bins, H, W)`."""
    values = np.where(valid[:, None], values, np.nan).astype("float32")
    out = np.full((n_bins, *values.shape[1:]), np.nan, dtype="float32")
    fraction = np.zeros((n_bins, *valid.shape[1:]), dtype="float32")
    reduce = np.nanmedian if how == "median" else np.nanmean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        for b in np.unique(index):
            out[b] = reduce(values[index == b], axis=0)
            fraction[b] = valid[index == b].mean(axis=0)
    return out, fraction


def read_cog(href: str) -> np.ndarray:
    with rasterio.open(href) as src:
        return src.read(1)


def up2(a: np.ndarray) -> np.ndarray:
    """20 m pixels onto the 10 m grid (each 10 m pixel lies inside one 20 m pixel: nearest is exact)."""
    return a.repeat(2, axis=-2).repeat(2, axis=-1)


def s2_expected(patch_dir: Path, start: date, bin_days: int, n_bins: int, resolution: int):
    """Expected S2 reflectance of the bands on the cube grid (10 m: B02 B03 B04 B08, if any; 20 m: the 20 m bands)
    and validity: SCL clear and no band at no-data."""
    s10, s20 = open_product(patch_dir, "S2_L2A_10m"), open_product(patch_dir, "S2_L2A_20m")
    bands20 = np.stack([s20[b].values for b in S2_20M], axis=1)
    valid = ~np.isin(s20["SCL"].values, SCL_INVALID) & (bands20 != 0).all(axis=1)
    dn = bands20
    if resolution == 10:
        valid = up2(valid)
        if s10 is not None:
            dn = np.stack([s10[b].values for b in S2_10M], axis=1)
            valid &= (dn != 0).all(axis=1)
        else:  # the cube holds the 20 m bands alone, resampled: their values are checked in the 20 m cube
            dn = np.zeros((len(valid), 0, *valid.shape[1:]), dtype=bands20.dtype)
    refl = dn.astype("float32") * np.float32(1e-4)
    return composite(bin_index(s20, start, bin_days), refl, valid, n_bins)


def landsat_expected(patch_dir: Path, start: date, bin_days: int, n_bins: int):
    """Expected Landsat cube (B02 B03 B04 B08 B11 B12 from Landsat bands 2-7) and validity from QA_PIXEL bits 0-5."""
    sr, qa = open_product(patch_dir, "L8_SR_10m"), open_product(patch_dir, "L8_L2-ST_10m")
    qa_days = qa["timestamp"].values.astype("datetime64[D]")
    sr_days = sr["timestamp"].values.astype("datetime64[D]")
    qa_pixel = qa["QA-PIXEL"].values[[int(np.flatnonzero(qa_days == d)[0]) for d in sr_days]]
    dn = np.stack([sr[b].values.view(np.int16) for b in LANDSAT], axis=1)
    valid = ((qa_pixel & QA_INVALID_BITS) == 0) & (dn != 0).all(axis=1)
    return composite(bin_index(sr, start, bin_days), dn.astype("float32") * np.float32(1e-4), valid, n_bins)


@pytest.mark.parametrize("patch_id", PATCH_IDS)
def test_import_and_search(stac_api: Settings, patches: dict[str, Patch], patch_id: str) -> None:
    """Every patch is converted (Landsat only where it has both Landsat files) and found by bbox and season."""
    patch, folder = patches[patch_id], SRC / patch_id
    s20 = open_product(folder, "S2_L2A_20m")
    epsg, grid = product_grid(s20)
    assert (patch.epsg, patch.bounds) == (epsg, grid.bounds)
    has_landsat = any(folder.glob("L8_SR_10m_*.nc")) and any(folder.glob("L8_L2-ST_10m_*.nc"))
    assert ("landsat-c2-l2" in patch.counts) == has_landsat
    assert patch.counts["sentinel-2-l2a"] == s20.sizes["timestamp"]
    sensors = ["s1", "landsat", "s2"] if has_landsat else ["s1", "s2"]
    for sensor in sensors:
        items = search(stac_api, patch, [sensor])[sensor]
        assert len(items) == patch.counts[COLLECTIONS[sensor]]
        assert all(it["id"].endswith((patch_id, f"{patch_id}_rtc")) for it in items)
        if sensor == "s2":
            assert (set(S2_10M) <= set(items[0]["assets"])) == has_s2_10m(patch_id)
        if sensor == "landsat":  # Collection 1 reflectance: int16 stored as uint16 in the netCDF; negatives come back
            blue = np.stack([read_cog(it["assets"]["blue"]["href"]) for it in items])
            np.testing.assert_array_equal(blue, open_product(folder, "L8_SR_10m")["B02"].values.view(np.int16))
            assert (blue < 0).any()


@pytest.mark.parametrize("patch_id", PATCH_IDS)
def test_daily_cube_10m(stac_api: Settings, patches: dict[str, Patch], patch_id: str, tmp_path: Path) -> None:
    """10 m, 1-day bins: S2 10 m bands and Landsat equal the sources after scale/offset; masks follow SCL/QA_PIXEL."""
    patch, folder = patches[patch_id], SRC / patch_id
    start = season(patch)[0]
    sensors = ["s2", "landsat"] if "landsat-c2-l2" in patch.counts else ["s2"]
    ds = cube(search(stac_api, patch, sensors), patch, tmp_path / "cube.zarr", 10.0, 1)
    n = ds.sizes["time"]
    assert ds.sizes["y"] == ds.sizes["x"] == 64

    refl, fraction = s2_expected(folder, start, 1, n, 10)
    np.testing.assert_array_equal(ds["s2_valid"].values, fraction)  # masked exactly where SCL (or no-data) says
    assert 0 < fraction.mean() < 1
    if has_s2_10m(patch_id):  # same grid as the cube: exact, to the step the cube stores
        np.testing.assert_array_equal(ds["s2"].sel(band=S2_10M).values, as_stored(refl))
    else:
        assert list(ds["band"].values) == S2_20M

    if "landsat" in sensors:
        values, frac = landsat_expected(folder, start, 1, n)
        np.testing.assert_array_equal(ds["landsat_valid"].values, frac)
        np.testing.assert_array_equal(ds["landsat"].values, as_stored(values))


@pytest.mark.parametrize("patch_id", PATCH_IDS)
def test_daily_cube_20m(stac_api: Settings, patches: dict[str, Patch], patch_id: str, tmp_path: Path) -> None:
    """20 m, 1-day bins (the 20 m sources' own grid, so exact): S2 20 m bands, SCL mask, S1 in dB."""
    patch, folder = patches[patch_id], SRC / patch_id
    start = season(patch)[0]
    ds = cube(search(stac_api, patch, ["s2", "s1"]), patch, tmp_path / "cube.zarr", 20.0, 1)
    n = ds.sizes["time"]
    assert ds.sizes["y"] == ds.sizes["x"] == 32

    refl, fraction = s2_expected(folder, start, 1, n, 20)
    np.testing.assert_array_equal(ds["s2_valid"].values, fraction)
    np.testing.assert_array_equal(ds["s2"].sel(band=S2_20M).values, as_stored(refl))

    s1 = open_product(folder, "S1_GRD-ASCENDING_20m")
    dn = np.stack([s1["VV"].values, s1["VH"].values], axis=1)
    linear = (10 ** (dn / 1e5)).astype("float32")  # dB x 10000 -> linear power
    valid = (dn != 0).all(axis=1) & (linear >= S1_FLOOR).all(axis=1)
    linear, frac = composite(bin_index(s1, start, 1), linear, valid, n, "mean")
    assert 0 < frac.mean() < 1
    np.testing.assert_array_equal(ds["s1_valid"].values, frac)
    np.testing.assert_allclose(ds["s1"].values, 10 * np.log10(linear), atol=1e-4, equal_nan=True)


def test_ten_day_validity(stac_api: Settings, patches: dict[str, Patch], tmp_path: Path) -> None:
    """10-day bins: the S2 and Landsat validity fractions equal the fraction of clear acquisitions per bin."""
    patch_id = next(p for p in PATCH_IDS if "landsat-c2-l2" in patches[p].counts and has_s2_10m(p))
    patch, folder = patches[patch_id], SRC / patch_id
    start = season(patch)[0]
    ds = cube(search(stac_api, patch, ["s2", "landsat"]), patch, tmp_path / "cube.zarr", 10.0, 10)
    n = ds.sizes["time"]
    refl, fraction = s2_expected(folder, start, 10, n, 10)
    np.testing.assert_allclose(ds["s2_valid"].values, fraction, rtol=1e-6)
    assert 0 < fraction.mean() < 1 and ((fraction > 0) & (fraction < 1)).any()
    np.testing.assert_allclose(ds["s2"].sel(band=S2_10M).values, refl, rtol=0, atol=STORED_ATOL, equal_nan=True)
    values, frac = landsat_expected(folder, start, 10, n)
    np.testing.assert_allclose(ds["landsat_valid"].values, frac, rtol=1e-6)
    np.testing.assert_allclose(ds["landsat"].values, values, rtol=0, atol=STORED_ATOL, equal_nan=True)
