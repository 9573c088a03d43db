"""Cloud masking, temporal binning and the cube builder."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from region_helpers import (
    STORED_ATOL,
    accepts_o_direct,
    as_stored,
    file_bytes,
    pages_cached,
    region_items,
    region_season,
)

from infra.errors import CropflowError
from infra.storage import open_zarr
from tasks.cube import build_cube, time_bins
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


def test_build_cube_from_sample_region(tiny_region, tmp_path):
    """The cube of the tiny sample region: grid, masking against SCL, validity, Zarr v3 layout."""
    import rasterio

    meta = json.loads((tiny_region / "region.json").read_text())
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    s1 = region_items(tiny_region, "sentinel-1-rtc")
    start, end = (date.fromisoformat(d) for d in meta["season"])
    out = build_cube({"s2": s2, "s1": s1}, meta["epsg"], tuple(meta["bounds"]), start, end, tmp_path / "cube.zarr")
    ds = open_zarr(out)
    n = meta["size"]
    assert ds["s2"].dims == ("time", "band", "y", "x") and ds["s2"].shape[1:] == (10, n, n)
    assert ds["s2"].dtype == np.float32 and ds["s2_valid"].dtype == np.float32
    assert ds["s2"].encoding["dtype"] == np.uint16 and ds["s1"].encoding["dtype"] == np.float32  # reflectance packed
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


# ---------------------------------------------------------------------------------------------------------------------
# Block-wise builder: grid, masking, resampling, binning, resume, bad assets, S1, gap filling, bad input.

SCL_CLEAR = [2, 4, 5, 6, 7]


def _read(href):
    import rasterio

    with rasterio.open(href.removeprefix("file://")) as src:
        return src.read(1)


def _grow(mask, px):
    """Square dilation by shifting (independent of the builder's scipy-based one)."""
    n = mask.shape[0]
    padded = np.pad(mask, px)
    out = np.zeros_like(mask)
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            out |= padded[px + dy : px + dy + n, px + dx : px + dx + n]
    return out


def _bin_of(item, start, bin_days=10):
    return (date.fromisoformat(item["properties"]["datetime"][:10]) - start).days // bin_days


def test_grid_utm_zone_of_centroid_and_snapping():
    from tasks.grid import check_bbox, projected_bounds, region_grid, snap_bounds, utm_epsg

    assert utm_epsg((5.5, 50.0, 6.7, 50.5)) == 32632  # straddles zones 31/32; centroid 6.1 E is in 32
    assert utm_epsg((5.5, 50.0, 6.3, 50.5)) == 32631  # centroid 5.9 E
    assert utm_epsg((-47.2, -15.9, -47.0, -15.7)) == 32723  # southern hemisphere
    assert snap_bounds((600003.0, 5649001.0, 600641.0, 5649999.0), 10) == (600000, 5649000, 600650, 5650000)
    xmin, ymin, xmax, ymax = projected_bounds((4.30, 50.80, 4.40, 50.90), 32631, 20)
    assert all(v % 20 == 0 for v in (xmin, ymin, xmax, ymax))
    grid = region_grid((4.30, 50.80, 4.40, 50.90))
    xmin, ymin, xmax, ymax = grid.bounds
    assert grid.epsg == 32631 and grid.bounds == projected_bounds((4.30, 50.80, 4.40, 50.90), 32631, 10)
    assert grid.shape == ((ymax - ymin) / 10, (xmax - xmin) / 10)
    with pytest.raises(CropflowError, match="inverted"):
        check_bbox((4.4, 50.8, 4.3, 50.9))
    with pytest.raises(CropflowError, match="outside"):
        check_bbox((4.3, 50.8, 4.4, 95.0))


def test_build_snaps_bounds_and_records_provenance(tiny_region, tmp_path):
    meta, start, end = region_season(tiny_region)
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    xmin, ymin, xmax, ymax = meta["bounds"]
    out = build_cube(
        {"s2": s2},
        meta["epsg"],
        (xmin + 3, ymin + 4, xmax - 6, ymax - 1),
        start,
        end,
        tmp_path / "cube.zarr",
        bands={"s2": ["B04"]},
        query={"collections": ["sentinel-2-l2a"], "bbox": meta["bbox"]},
    )
    ds = open_zarr(out)
    assert ds.attrs["transform"] == [10.0, 0.0, xmin, 0.0, -10.0, ymax]
    assert ds.sizes["x"] == meta["size"] and ds.sizes["y"] == meta["size"]
    assert ds["s2"].encoding["chunks"][:2] == (ds.sizes["time"], 1)  # all time steps of a spatial chunk together
    per_bin = json.loads(ds.attrs["items_per_bin"])["s2"]
    assert len(per_bin) == ds.sizes["time"]
    assert sorted(i for ids in per_bin for i in ids) == sorted(it["id"] for it in s2)
    for it in s2:
        assert it["id"] in per_bin[_bin_of(it, start)]
    assert json.loads(ds.attrs["query"])["collections"] == ["sentinel-2-l2a"]
    assert json.loads(ds.attrs["software"])["cropflow"] == ds.attrs["cropflow_version"]
    assert ds.attrs["bad_asset_count"] == 0
    assert json.loads(ds.attrs["valid_fraction"])["s2"] == pytest.approx(float(ds["s2_valid"].mean()), rel=1e-6)
    assert all(ds[v].dtype == np.float32 for v in ds.data_vars)
    assert json.loads(ds.attrs["clipped_values"]) == {"s2": 0}


def test_s2_mask_with_dilation_is_exact_across_blocks(tiny_region, tmp_path):
    """Validity fraction and NaN equal the SCL flags (clouds grown by 1 px), with 4 blocks sharing edges."""
    meta, start, end = region_season(tiny_region)
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    n = meta["size"]
    out = build_cube(
        {"s2": s2},
        meta["epsg"],
        tuple(meta["bounds"]),
        start,
        end,
        tmp_path / "cube.zarr",
        chunk=32,
        block=32,
        bands={"s2": ["B04"]},
        scl_dilation=1,
    )
    ds = open_zarr(out).load()
    valid_sum = np.zeros((ds.sizes["time"], n, n))
    count = np.zeros(ds.sizes["time"])
    grown_any = False
    for it in s2:
        scl = np.kron(_read(it["assets"]["SCL"]["href"]), np.ones((2, 2), dtype="uint8"))[:n, :n]
        clouds = np.isin(scl, [3, 8, 9, 10])
        valid = np.isin(scl, SCL_CLEAR) & ~_grow(clouds, 1)
        grown_any |= bool((np.isin(scl, SCL_CLEAR) & ~valid).any())
        b = _bin_of(it, start)
        valid_sum[b] += valid
        count[b] += 1
    expected = valid_sum / np.maximum(count, 1)[:, None, None]
    assert grown_any  # the dilation masked clear pixels next to clouds
    assert np.array_equal(ds["s2_valid"].values, expected.astype("float32"))
    assert np.array_equal(np.isnan(ds["s2"].values[:, 0]), expected == 0)


def test_landsat_qa_mask_and_bilinear_20m_band(tiny_region, tmp_path):
    """Landsat validity follows QA_PIXEL bits; a 20 m S2 band equals GDAL's bilinear warp of the COGs (within half
    a digital number: GDAL rounds the interpolated value to the source's integers; and within the cube's own step
    of storage)."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    meta, start, end = region_season(tiny_region)
    n = meta["size"]
    landsat = region_items(tiny_region, "landsat-c2-l2")
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    out = build_cube(
        {"landsat": landsat, "s2": s2},
        meta["epsg"],
        tuple(meta["bounds"]),
        start,
        end,
        tmp_path / "cube.zarr",
        chunk=32,
        block=32,
        bands={"s2": ["B05"]},
    )
    ds = open_zarr(out).load()
    valid_sum, count = np.zeros((ds.sizes["time"], n, n)), np.zeros(ds.sizes["time"])
    for it in landsat:
        qa = np.kron(_read(it["assets"]["qa_pixel"]["href"]), np.ones((3, 3), dtype="uint16"))[:n, :n]
        b = _bin_of(it, start)
        valid_sum[b] += (qa & 0b111111) == 0
        count[b] += 1
    assert np.array_equal(ds["landsat_valid"].values, (valid_sum / np.maximum(count, 1)[:, None, None]).astype("f4"))
    assert list(ds["landsat_band"].values) == ["B02", "B03", "B04", "B08", "B11", "B12"]

    xmin, _, _, ymax = meta["bounds"]
    b = int(ds["s2_valid"].mean(["y", "x"]).argmax())
    stack = []
    for it in (it for it in s2 if _bin_of(it, start) == b):
        with (
            rasterio.open(it["assets"]["B05"]["href"]) as src,
            WarpedVRT(
                src, transform=Affine(10, 0, xmin, 0, -10, ymax), width=n, height=n, resampling=Resampling.bilinear
            ) as vrt,
        ):
            value = vrt.read(1).astype("float32") * np.float32(1e-4) + np.float32(-0.1)
        scl = np.kron(_read(it["assets"]["SCL"]["href"]), np.ones((2, 2), dtype="uint8"))[:n, :n]
        stack.append(np.where(np.isin(scl, SCL_CLEAR), value, np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        expected = np.nanmedian(np.stack(stack), axis=0)
    got = ds["s2"].isel(time=b, band=0).values
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=0, atol=0.5e-4 + STORED_ATOL)


def test_blocks_cover_the_grid_once_in_z_order():
    from tasks.cube import blocks_of

    blocks = blocks_of((70, 100), 32)
    covered = np.zeros((70, 100), dtype=int)
    for blk in blocks:
        covered[blk.r0 : blk.r1, blk.c0 : blk.c1] += 1
    assert (covered == 1).all()
    assert [(b.r0, b.c0) for b in blocks[:5]] == [(0, 0), (0, 32), (32, 0), (32, 32), (0, 64)]


def test_tiles_are_needed_until_the_last_block_that_reads_them_is_built(tiny_region, tmp_path):
    from dataclasses import dataclass, field

    from affine import Affine

    from tasks.cube import _tiles_needed, prepare_cube

    @dataclass(eq=False)
    class Source:  # what `_tiles_needed` reads of a dataset
        transform: Affine
        epsg: int
        cached: tuple[int, int, int, int]
        tile: tuple[int, int] = (32, 32)
        memo: dict = field(default_factory=dict)

    meta, start, end = region_season(tiny_region)
    items = {"s2": region_items(tiny_region, "sentinel-2-l2a")}
    job = prepare_cube(items, meta["epsg"], tuple(meta["bounds"]), start, end, tmp_path / "c.zarr", chunk=16, block=16)
    assert [(b.r0, b.c0) for b in job.todo[:5]] == [(0, 0), (0, 16), (16, 0), (16, 16), (0, 32)]  # 4 x 4 blocks
    needed = _tiles_needed(job, job.todo)
    x0, y1 = job.grid.bounds[0], job.grid.bounds[3]

    def source(resolution: float, tiles: tuple[int, int, int, int], tile: int) -> Source:
        return Source(Affine(resolution, 0, x0, 0, -resolution, y1), job.grid.epsg, tiles, (tile, tile))

    ten = source(10.0, (0, 1, 0, 1), 32)  # a 10 m tile covering the first four blocks, read as they are
    assert [needed(ten, i) for i in range(5)] == [True, True, True, False, False]
    twenty = source(20.0, (0, 1, 0, 1), 16)  # the same at 20 m: the next blocks' bilinear margins read it too
    assert needed(twenty, 3) and needed(twenty, 4) and not needed(twenty, 15)
    outside = source(10.0, (9, 10, 9, 10), 32)  # tiles beyond the grid: another build's, perhaps; kept
    assert needed(outside, 15)
    warped = Source(Affine(7.0, 0, x0, 0, -7.0, y1), job.grid.epsg, (0, 1, 0, 1))
    assert needed(warped, 15)  # not on the grid's pixels: kept, whatever it holds
    tile_job = _tiles_needed(job, job.todo[:4])  # a Dask tile of the first four blocks: the others are built apart
    assert tile_job(ten, 3) is False and tile_job(twenty, 3) is True


def test_open_assets_are_reused_and_a_failed_one_is_closed(tiny_region):
    from tasks.cube import Datasets

    s2 = region_items(tiny_region, "sentinel-2-l2a")
    href, other = s2[0]["assets"]["B04"]["href"], s2[0]["assets"]["B05"]["href"]
    datasets = Datasets(limit=1)
    with datasets.open(href) as first:
        pass
    with datasets.open(href) as again:
        assert again is first and not first.closed
    with pytest.raises(ValueError), datasets.open(href) as failed:
        raise ValueError("read failed")
    assert failed.closed
    with datasets.open(href) as reopened:
        assert reopened is not failed
    with datasets.open(other):
        pass
    assert reopened.closed  # the least recently used one beyond `limit`
    datasets.close()


def _open_files(folder: Path) -> int:
    """How many file descriptors of this process point into `folder`."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += Path(os.readlink(fd)).is_relative_to(folder)
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files in /proc/self/fd (Linux)")
def test_reader_threads_share_one_limit_of_open_files(tmp_path):
    import rasterio
    from affine import Affine

    from tasks.cube import Datasets

    hrefs = []
    for i in range(8):
        hrefs.append(str(tmp_path / f"{i}.tif"))
        profile = {"driver": "GTiff", "width": 4, "height": 4, "count": 1, "dtype": "uint8", "crs": "EPSG:32631"}
        profile["transform"] = Affine(10, 0, 600000, 0, -10, 5650000)
        with rasterio.open(hrefs[-1], "w", **profile) as dst:
            dst.write(np.full((1, 4, 4), i, dtype="uint8"))
    datasets = Datasets(limit=3)

    def reads(seed: int) -> None:
        for i in np.random.default_rng(seed).integers(0, len(hrefs), 40):
            with datasets.open(hrefs[i]) as src:
                assert src.read(0, 0, np.empty((1, 1), src.dtype))[0, 0] == i
                assert _open_files(tmp_path) <= 3
            assert _open_files(tmp_path) <= 3

    with ThreadPoolExecutor(2) as threads:  # two builds' readers in one process, at the same time
        list(threads.map(reads, [0, 1]))
    assert datasets.count == _open_files(tmp_path) == 3
    datasets.close()
    assert datasets.count == _open_files(tmp_path) == 0

    with datasets.open(hrefs[0]) as oldest:
        pass
    for href in hrefs[1:3]:
        with datasets.open(href):
            pass
    with datasets.open(hrefs[3]):
        assert oldest.closed and _open_files(tmp_path) == 3  # the least recently used idle one went
    with contextlib.ExitStack() as busy:  # nothing idle to close: the read goes ahead over the limit, never waits
        held = [busy.enter_context(datasets.open(href)) for href in hrefs[4:]]
        assert _open_files(tmp_path) == datasets.count == 4 and not any(src.closed for src in held)
    assert _open_files(tmp_path) == datasets.count == 3  # back within the limit once given back
    datasets.close()
    assert _open_files(tmp_path) == datasets.count == 0


class Interrupted(Exception):
    pass


def test_interrupted_build_resumes_only_missing_blocks_and_publishes_atomically(tiny_region, tmp_path):
    from tasks.cube import partial_path

    meta, start, end = region_season(tiny_region)
    items = {"s2": region_items(tiny_region, "sentinel-2-l2a"), "s1": region_items(tiny_region, "sentinel-1-rtc")}
    args = (items, meta["epsg"], tuple(meta["bounds"]), start, end)
    opts = {"chunk": 32, "block": 32, "bands": {"s2": ["B04", "B11"]}}
    out = tmp_path / "cube.zarr"
    out.mkdir()
    (out / "previous").write_text("an older cube")

    first: list = []

    def stop_after_two(block):
        first.append(block)
        if len(first) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_cube(*args, out, **opts, on_block=stop_after_two)
    assert (out / "previous").exists()  # the published cube is untouched by the unfinished build
    records = sorted((partial_path(out) / "blocks").glob("*.json"))
    assert len(records) == 2
    older = json.loads(records[0].read_text())
    records[0].write_text(json.dumps({"bad": older["bad"]}))  # as an older build recorded it: summed from the store

    second: list = []
    build_cube(*args, out, **opts, on_block=second.append)
    assert len(second) == 2 and not set(first) & set(second)
    assert not partial_path(out).exists() and not (out / "previous").exists()

    reference = build_cube(*args, tmp_path / "reference.zarr", **opts)
    resumed, whole = open_zarr(out).load(), open_zarr(reference).load()
    xr.testing.assert_identical(resumed, whole)  # attrs too: valid_fraction the same from records or the store

    # other parameters: the unfinished build is discarded and everything is rebuilt
    first.clear()
    with pytest.raises(Interrupted):
        build_cube(*args, tmp_path / "other.zarr", **opts, on_block=stop_after_two)
    third: list = []
    build_cube(*args, tmp_path / "other.zarr", **opts, scl_dilation=1, on_block=third.append)
    assert len(third) == 4


def test_chunks_go_straight_to_their_files_as_zarr_would_write_them(tiny_region, tmp_path, monkeypatch):
    """A local cube's chunks are written past the page cache (`infra.chunks`), byte for byte those zarr writes:
    blocks of 2 x 2 chunks, chunks cut by the grid's edge, two sensors."""
    from tasks import cube

    meta, start, end = region_season(tiny_region)
    items = {"s2": region_items(tiny_region, "sentinel-2-l2a"), "s1": region_items(tiny_region, "sentinel-1-rtc")}
    bounds = (meta["bounds"][0], meta["bounds"][1] + 100, meta["bounds"][2] - 100, meta["bounds"][3])  # 54 x 54 px
    args = (items, meta["epsg"], bounds, start, end)
    options = {"chunk": 16, "block": 32, "bands": {"s2": ["B04", "B11"]}}
    out = build_cube(*args, tmp_path / "cube.zarr", **options)
    written = [p for a in ("s2", "s2_valid", "s1", "s1_valid") for p in (out / a / "c").rglob("*") if p.is_file()]
    assert len(written) == 4 * 16
    if accepts_o_direct(tmp_path):  # (the test machine's disk does; tmpfs does not)
        assert sum(pages_cached(p)[0] for p in written) == 0
    monkeypatch.setattr(cube.chunks, "direct_chunks", lambda array: None)  # through zarr
    ref = build_cube(*args, tmp_path / "ref.zarr", **options)
    assert file_bytes(out) == file_bytes(ref)


def test_missing_and_corrupt_assets_count_as_no_data(tiny_region, tmp_path, caplog):
    import shutil

    import rasterio

    meta, start, end = region_season(tiny_region)
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    bad = [json.loads(json.dumps(it)) for it in s2]
    bad[5]["assets"]["B04"]["href"] = (tmp_path / "gone" / "B04.tif").as_uri()  # 404 (of a scene with clear pixels)
    corrupt = tmp_path / "SCL.tif"
    shutil.copy(bad[4]["assets"]["SCL"]["href"].removeprefix("file://"), corrupt)
    with rasterio.open(corrupt) as src:  # where the first tile's DEFLATE stream lies
        offset, size = (int(src.get_tag_item(f"BLOCK_{k}_0_0", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    data = bytearray(corrupt.read_bytes())
    data[offset + 2 : offset + size] = (bytes(range(256)) * size)[: size - 2]  # garbage after the zlib header
    corrupt.write_bytes(bytes(data))
    bad[4]["assets"]["SCL"]["href"] = corrupt.as_uri()
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    with caplog.at_level("WARNING"):
        out = build_cube({"s2": bad}, *args, tmp_path / "cube.zarr", bands={"s2": ["B04"]})
    ds = open_zarr(out).load()
    assert ds.attrs["bad_asset_count"] == 2 and ds.attrs["bad_scene_count"] == 2
    recorded = {(r["item"], r["asset"]) for r in json.loads(ds.attrs["bad_assets"])}
    assert recorded == {(s2[5]["id"], "B04"), (s2[4]["id"], "SCL")}
    assert "unreadable" in caplog.text
    # each bad scene is an acquisition with no valid pixel: the others' composite, validity scaled by n-1/n
    others = [it for i, it in enumerate(s2) if i not in (4, 5)]
    ref = open_zarr(build_cube({"s2": others}, *args, tmp_path / "ref.zarr", bands={"s2": ["B04"]})).load()
    per_bin = np.bincount([_bin_of(it, start) for it in s2], minlength=ds.sizes["time"])
    per_bin_ok = np.bincount([_bin_of(it, start) for it in others], minlength=ds.sizes["time"])
    scale = (per_bin_ok / per_bin)[:, None, None]
    assert np.allclose(ds["s2_valid"].values, ref["s2_valid"].values * scale, atol=1e-6)
    xr.testing.assert_equal(ds["s2"], ref["s2"])


def test_bands_of_a_scene_the_mask_leaves_nothing_valid_are_never_read(tiny_region, tmp_path):
    """An overcast scene's SCL is read first; its bands are not: here they do not even exist, and the cube is the
    one built with them there (no asset counted unreadable)."""
    import rasterio

    meta, start, end = region_season(tiny_region)
    s2 = [json.loads(json.dumps(it)) for it in region_items(tiny_region, "sentinel-2-l2a")]
    overcast = tmp_path / "SCL.tif"
    with rasterio.open(s2[2]["assets"]["SCL"]["href"].removeprefix("file://")) as src:
        profile, shape = src.profile, src.shape
    with rasterio.open(overcast, "w", **profile) as dst:
        dst.write(np.full(shape, 9, np.uint8), 1)  # cloud, high probability, everywhere
    s2[2]["assets"]["SCL"]["href"] = overcast.as_uri()
    gone = json.loads(json.dumps(s2))
    for key in ("B02", "B04", "B11"):
        gone[2]["assets"][key]["href"] = (tmp_path / "gone" / f"{key}.tif").as_uri()
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    bands = {"s2": ["B02", "B04", "B11"]}
    ds = open_zarr(build_cube({"s2": gone}, *args, tmp_path / "cube.zarr", bands=bands)).load()
    ref = open_zarr(build_cube({"s2": s2}, *args, tmp_path / "ref.zarr", bands=bands)).load()
    assert ds.attrs["bad_asset_count"] == 0
    xr.testing.assert_identical(ds[["s2", "s2_valid"]], ref[["s2", "s2_valid"]])
    assert (ds["s2_valid"].isel(time=_bin_of(s2[2], start)) < 1).all()  # the scene counts, with nothing valid


def test_lee_filter_reduces_speckle_and_keeps_the_mean():
    from tasks.cube import lee_filter

    rng = np.random.default_rng(0)
    clean = np.full((200, 200), 0.08, dtype=np.float32)
    clean[:, 100:] = 0.02  # an edge between two fields
    noisy = clean * rng.gamma(4.4, 1 / 4.4, clean.shape).astype(np.float32)
    noisy[50, 50] = np.nan
    filtered = lee_filter(noisy, 7, enl=4.4)
    left, right = (slice(10, 190), slice(10, 90)), (slice(10, 190), slice(110, 190))
    for part in (left, right):
        assert np.nanvar(filtered[part]) < np.nanvar(noisy[part]) / 4
        assert np.nanmean(filtered[part]) == pytest.approx(np.nanmean(noisy[part]), rel=0.02)
    assert np.isnan(filtered[50, 50]) and np.isfinite(filtered[51, 51])
    assert filtered.dtype == np.float32


def test_s1_orbit_choice_decibels_and_speckle(tiny_region, tmp_path):
    meta, start, end = region_season(tiny_region)
    s1 = region_items(tiny_region, "sentinel-1-rtc")
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    asc = build_cube({"s1": s1}, *args, tmp_path / "asc.zarr", s1_orbit="ascending")
    ids = json.loads(open_zarr(asc).attrs["items"])["s1"]
    assert ids and ids == [it["id"] for it in s1 if it["properties"]["sat:orbit_state"] == "ascending"]
    raw = open_zarr(build_cube({"s1": s1}, *args, tmp_path / "raw.zarr", speckle_window=0))["s1"].load()
    lee = open_zarr(build_cube({"s1": s1}, *args, tmp_path / "lee.zarr", speckle_window=5))["s1"].load()
    assert -35 < float(lee.mean()) < 5  # decibels
    assert float(lee.std(["y", "x"]).mean()) < float(raw.std(["y", "x"]).mean())
    with pytest.raises(CropflowError, match="orbit"):
        build_cube({"s1": s1}, *args, tmp_path / "x.zarr", s1_orbit="sideways")


def test_fill_cube_gaps_is_a_separate_step(tiny_region, tmp_path):
    from tasks.cube import fill_cube_gaps

    meta, start, end = region_season(tiny_region)
    cube = build_cube(
        {"s2": region_items(tiny_region, "sentinel-2-l2a")},
        meta["epsg"],
        tuple(meta["bounds"]),
        start,
        end,
        tmp_path / "cube.zarr",
        bands={"s2": ["B04"]},
    )
    filled_path = fill_cube_gaps(cube, tmp_path / "filled.zarr")
    ds, filled = open_zarr(cube).load(), open_zarr(filled_path).load()
    assert filled.attrs["gap_filled"] is True and "gap_filled" not in ds.attrs
    xr.testing.assert_identical(filled["s2_valid"], ds["s2_valid"])
    series, got = ds["s2"].values[:, 0], filled["s2"].values[:, 0]
    observed = ~np.isnan(series)
    assert np.array_equal(got[observed], series[observed])
    assert not np.isnan(got[:, observed.any(axis=0)]).any()
    # a gap between two observations is on the line between them
    t, y, x = np.argwhere(~observed[1:-1] & observed[:-2] & observed[2:])[0] + (1, 0, 0)
    assert got[t, y, x] == pytest.approx((series[t - 1, y, x] + series[t + 1, y, x]) / 2, rel=1e-5)


def test_bad_input_gives_clear_errors(tiny_region, tmp_path):
    meta, start, end = region_season(tiny_region)
    s2 = region_items(tiny_region, "sentinel-2-l2a")
    bounds = tuple(meta["bounds"])
    out = tmp_path / "cube.zarr"
    with pytest.raises(CropflowError, match="inverted"):
        build_cube({"s2": s2}, meta["epsg"], (bounds[2], bounds[1], bounds[0], bounds[3]), start, end, out)
    with pytest.raises(CropflowError, match="no s2 items"):
        build_cube({"s2": []}, meta["epsg"], bounds, start, end, out)
    with pytest.raises(CropflowError, match="unknown s2 band"):
        build_cube({"s2": s2}, meta["epsg"], bounds, start, end, out, bands={"s2": ["B99"]})
    with pytest.raises(CropflowError, match="unknown sensor"):
        build_cube({"modis": s2}, meta["epsg"], bounds, start, end, out)
    with pytest.raises(CropflowError, match="inside the season"):
        build_cube({"s2": s2}, meta["epsg"], bounds, date(2020, 1, 1), date(2020, 2, 1), out)
    assert not out.exists()


def test_s2_items_without_scl_are_masked_by_the_spectral_test(tiny_region, tmp_path):
    """`s2_cloud_mask="auto"`: items with SCL are masked by it, the others exactly where `spectral_mask` (grown by
    `scl_dilation`) flags the scaled reflectance, whose bands are read for the test though the cube lacks them."""
    from rasterio.enums import Resampling

    from infra.gdal import Raster
    from tasks.cloudmask import CLEAR, dilate, spectral_mask
    from tasks.cube import SCL_CLOUDS, SPECTRAL_BANDS, Block, plan_sensor, read_window
    from tasks.grid import Grid, snap_bounds

    meta, _, _ = region_season(tiny_region)
    n, bounds = meta["size"], tuple(meta["bounds"])
    items = json.loads(json.dumps(region_items(tiny_region)[:6]))  # one per 5-day bin
    scl = {i: items[i]["assets"].pop("SCL") for i in (0, 2, 5)}
    start, end = date(2024, 3, 1), date(2024, 3, 30)
    grid, whole = Grid(meta["epsg"], snap_bounds(bounds, 10.0), 10.0), Block(0, n, 0, n)

    def read(href: str, resampling: Resampling = Resampling.bilinear) -> tuple[np.ndarray, np.ndarray]:
        with Raster(href) as src:
            return read_window(src, grid, whole, resampling, 0)

    def reflectance(item: dict, bands: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(bands, n, n) scaled reflectance on the grid, and where any band has no data."""
        scale, offset = scale_offset([item], bands, "s2")
        raw = [read(item["assets"][b]["href"]) for b in bands]
        values = [r * np.float32(scale[0, j]) + np.float32(offset[0, j]) for j, (r, _) in enumerate(raw)]
        return np.stack(values), np.any([invalid for _, invalid in raw], axis=0)

    opts = {"bin_days": 5, "chunk": 32, "block": 32, "bands": {"s2": ["B04", "B08"]}, "scl_dilation": 1}
    ds = open_zarr(build_cube({"s2": items}, meta["epsg"], bounds, start, end, tmp_path / "c.zarr", **opts)).load()
    differs = False
    for b, item in enumerate(items):
        values, invalid = reflectance(item, ["B04", "B08"])
        if b in scl:
            img, invalid = reflectance(item, list(SPECTRAL_BANDS))
            classes = spectral_mask(np.moveaxis(np.where(invalid, np.nan, img), 0, -1), dilation=1)
            valid = (classes == CLEAR) & ~invalid
            codes = read(scl[b]["href"], Resampling.nearest)[0]
            differs |= not np.array_equal(valid, scl_valid(codes) & ~invalid)
            assert 0 < valid.mean() < 1
        else:
            codes = read(item["assets"]["SCL"]["href"], Resampling.nearest)[0]
            valid = scl_valid(codes) & ~dilate(np.isin(codes, SCL_CLOUDS), 1) & ~invalid
        assert np.array_equal(ds["s2_valid"].values[b], valid.astype("float32"))
        expected = np.where(valid, values, np.float32(np.nan))
        assert np.array_equal(ds["s2"].values[b], as_stored(expected), equal_nan=True)
    assert differs  # the spectral test, not the SCL left out, masked those items
    assert ds.attrs["spectral_masked_count"] == 3
    assert json.loads(ds.attrs["spectral_masked_items"]) == [items[i]["id"] for i in sorted(scl)]
    assert json.loads(ds.attrs["options"])["s2_cloud_mask"] == "auto"

    bins = time_bins(start, end, 5)
    spectral = plan_sensor("s2", items, bins, 5, ["B04"], s2_cloud_mask="spectral")
    assert all(s.spectral for s in spectral.sources) and spectral.sources[1].keys[-1] == "B12"  # SCL not read
    with pytest.raises(CropflowError, match=f"{items[0]['id']} has no asset\\(s\\) SCL.*s2_cloud_mask='auto'"):
        plan_sensor("s2", items, bins, 5, ["B04"], s2_cloud_mask="scl")
    with pytest.raises(CropflowError, match="s2_cloud_mask='fmask'; choose one of auto, scl, spectral"):
        build_cube({"s2": items}, meta["epsg"], bounds, start, end, tmp_path / "bad.zarr", s2_cloud_mask="fmask")
    del items[2]["assets"]["B11"]
    with pytest.raises(CropflowError, match="no SCL asset and no asset\\(s\\) B11 for the spectral cloud test"):
        plan_sensor("s2", items, bins, 5, ["B04"])
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize(("factor", "shift"), [(2, 0), (2, 1), (3, 0), (3, 2)])
def test_coarse_bands_resampled_in_numpy_match_gdal_warp(tmp_path, factor, shift):
    """Integer-factor bilinear upsampling (20 m and 30 m bands), with no-data holes and a source that ends inside
    the grid, gives GDAL's bilinear warp within half a digital number; nearest (masks) gives it exactly."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from infra.gdal import Raster
    from tasks.cube import Block, read_window
    from tasks.grid import Grid

    rng = np.random.default_rng(factor + shift)
    res, n_src = 10.0 * factor, 23
    pixels = rng.integers(1, 10_000, (n_src, n_src), dtype=np.uint16)
    pixels[5:8, 9:12] = 0  # a no-data hole
    path = tmp_path / "coarse.tif"
    x0, y0 = 600_000.0 - shift * 10, 5_650_000.0 + shift * 10  # the source starts `shift` grid pixels off the grid
    profile = {"driver": "GTiff", "width": n_src, "height": n_src, "count": 1, "dtype": "uint16", "nodata": 0}
    with rasterio.open(path, "w", crs="EPSG:32631", transform=Affine(res, 0, x0, 0, -res, y0), **profile) as dst:
        dst.write(pixels, 1)
    n = n_src * factor + 8  # the grid reaches past the source's end
    grid = Grid(32631, (600_000.0, 5_650_000.0 - n * 10, 600_000.0 + n * 10, 5_650_000.0), 10.0)
    with Raster(str(path)) as src:
        for resampling in (Resampling.bilinear, Resampling.nearest):
            got, invalid = read_window(src, grid, Block(0, n, 0, n), resampling, 0)
            with WarpedVRT(
                src.dataset,
                transform=Affine(10, 0, 600_000, 0, -10, 5_650_000),
                width=n,
                height=n,
                resampling=resampling,
            ) as vrt:
                expected = vrt.read(1)
            assert np.array_equal(invalid, expected == 0)
            tolerance = 0.5 if resampling == Resampling.bilinear else 0
            assert np.abs(got[~invalid].astype("f8") - expected[~invalid]).max() <= tolerance


def test_bands_missing_from_some_items_are_left_out_unless_asked_for(tiny_region, caplog):
    """Extractions without the 10 m files: the cube keeps the bands every item has; asking for a missing one fails."""
    from tasks.cube import plan_sensor

    _, start, end = region_season(tiny_region)
    items = region_items(tiny_region, "sentinel-2-l2a")
    items[1] = {**items[1], "assets": {k: v for k, v in items[1]["assets"].items() if k not in ("B02", "B08")}}
    bins = time_bins(start, end)
    with caplog.at_level("WARNING", logger="tasks.cube"):
        plan = plan_sensor("s2", items, bins, 10)
    assert plan.bands == ["B03", "B04", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert "['B02', 'B08'] missing from some items" in caplog.text
    assert all(len(s.hrefs) == 9 for s in plan.sources)  # 8 bands + SCL
    with pytest.raises(CropflowError, match=rf"item {items[1]['id']} has no asset\(s\) B02"):
        plan_sensor("s2", items, bins, 10, bands=["B02", "B03"])
    items[2] = {**items[2], "assets": {k: v for k, v in items[2]["assets"].items() if k != "SCL"}}
    with pytest.raises(CropflowError, match="has no asset\\(s\\) SCL"):
        plan_sensor("s2", items, bins, 10, s2_cloud_mask="scl")


def test_reflectance_is_stored_packed_and_read_back_as_float32(tiny_region, tmp_path, caplog):
    """Stored uint16 in steps of 1e-4, read back float32 alike by the xarray readers and by direct chunk reads; a
    value beyond what it holds (here: a catalog giving digital numbers unscaled) is clipped, counted and logged."""
    import zarr

    from infra.storage import unpack
    from tasks.cube import PACKED_RANGE

    meta, start, end = region_season(tiny_region)
    items = json.loads(json.dumps(region_items(tiny_region)))
    items[0]["assets"]["B04"]["raster:bands"] = [{"scale": 1.0, "offset": 0.0}]  # DN as reflectance: 100s to 1000s
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    with caplog.at_level("WARNING"):
        out = build_cube({"s2": items}, *args, tmp_path / "cube.zarr", bands={"s2": ["B04", "B08"]}, chunk=32)
    ds = open_zarr(out, chunks=None)
    array = zarr.open_group(out, mode="r")["s2"]
    assert array.dtype == np.uint16 and array.fill_value == 65535 and ds["s2"].dtype == np.float32
    raw = array[:, :, :32, :32]
    np.testing.assert_array_equal(unpack(raw, ds["s2"].encoding), ds["s2"].values[:, :, :32, :32])  # to the bit
    some = {"time": [1, 3], "band": [1], "y": slice(5, 40), "x": [0, 33, 2]}  # lazily, only what is selected
    whole = ds["s2"].values
    np.testing.assert_array_equal(ds["s2"].isel(some).values, whole[[1, 3]][:, [1]][:, :, 5:40][..., [0, 33, 2]])
    dask = open_zarr(out)["s2"]
    assert dask.chunks is not None and dask.dtype == np.float32
    np.testing.assert_array_equal(dask.values, ds["s2"].values)
    plain = xr.open_zarr(out)["s2"].values  # CF attributes: any xarray reads the same values (as float64)
    np.testing.assert_allclose(plain, ds["s2"].values, rtol=1e-6, atol=1e-7)
    assert np.isnan(ds["s2"].values).any() and (raw == 65535).sum() == np.isnan(ds["s2"].values[:, :, :32, :32]).sum()
    b = _bin_of(items[0], start)
    clipped = json.loads(ds.attrs["clipped_values"])["s2"]
    assert clipped == int((ds["s2"].sel(band="B04").isel(time=b).values == np.float32(PACKED_RANGE[1])).sum()) > 0
    assert "clipped" in caplog.text
    assert np.nanmax(np.delete(ds["s2"].sel(band="B04").values, b, axis=0)) < 1  # the other bins are reflectance
