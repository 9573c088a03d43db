"""`infra.gdal.Raster`: GDAL's C API gives what rasterio gives, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError

from infra.gdal import Raster
from tasks.sample_region import write_cog
from tasks.sample_stac import Grid

TRANSFORM = Affine(20.0, 0.0, 600_000.0, 0.0, -20.0, 5_650_000.0)


def _write(path: Path, pixels: np.ndarray, crs: str | None = "EPSG:32631", nodata: float | None = 0) -> str:
    profile = {"driver": "GTiff", "width": pixels.shape[1], "height": pixels.shape[0], "count": 1}
    profile |= {"dtype": pixels.dtype.name, "tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"}
    with rasterio.open(path, "w", crs=crs, transform=TRANSFORM, nodata=nodata, **profile) as dst:
        dst.write(pixels, 1)
    return str(path)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_metadata_and_windows_match_rasterio(tmp_path, dtype):
    pixels = np.random.default_rng(0).integers(0, 120, (37, 45)).astype(dtype)
    href = _write(tmp_path / "a.tif", pixels)
    with Raster(href) as src, rasterio.open(href) as ref:
        assert (src.width, src.height, src.dtype) == (ref.width, ref.height, np.dtype(ref.dtypes[0]))
        assert src.transform == ref.transform and src.epsg == ref.crs.to_epsg() == 32631
        assert src.nodata == ref.nodata == 0
        for r0, c0, h, w in [(0, 0, 37, 45), (5, 7, 20, 30), (36, 44, 1, 1)]:
            got = src.read(r0, c0, np.empty((h, w), src.dtype))
            assert np.array_equal(got, ref.read(1, window=((r0, r0 + h), (c0, c0 + w))))
        into = np.zeros((10, 40), src.dtype)  # into a strided view: the rest of `into` is left alone
        src.read(3, 4, into[2:8, 5:25])
        assert np.array_equal(into[2:8, 5:25], pixels[3:9, 4:24]) and not into[:2].any() and not into[:, :5].any()
    assert src.closed


def test_reads_record_the_tiles_cached_and_drop_cached_frees_them(tmp_path):
    import ctypes

    from infra.gdal import library

    used = library().GDALGetCacheUsed64
    used.restype = ctypes.c_int64
    href = _write(tmp_path / "a.tif", np.arange(40 * 50, dtype="uint16").reshape(40, 50))  # 16 px tiles
    with Raster(href) as src:
        assert src.tile == (16, 16) and src.cached is None
        before = used()
        src.read(3, 20, np.empty((10, 5), src.dtype))  # rows 3-12 in tile row 0, columns 20-24 in tile column 1
        assert src.cached == (0, 1, 1, 2)
        src.read(30, 40, np.empty((10, 10), src.dtype))  # the union: tile rows 0-2, columns 1-3
        assert src.cached == (0, 3, 1, 4)
        assert used() > before
        src.drop_cached()
        assert used() == before and src.cached is None
        assert np.array_equal(src.read(0, 0, np.empty((2, 2), src.dtype)), [[0, 1], [50, 51]])  # read again


def test_crs_without_an_authority_code_goes_to_proj_and_no_nodata_is_none(tmp_path):
    custom = "+proj=tmerc +lat_0=0 +lon_0=4.3 +k=0.9996 +x_0=500000 +y_0=0 +ellps=WGS84 +units=m"  # no EPSG code
    href = _write(tmp_path / "b.tif", np.ones((8, 8), "uint16"), crs=custom, nodata=None)
    with Raster(href) as src, rasterio.open(href) as ref:
        assert src.epsg is None and ref.crs.to_epsg() is None
        assert src.nodata is None
    href = _write(tmp_path / "c.tif", np.ones((8, 8), "uint16"), crs=None)
    with Raster(href) as src:
        assert src.epsg is None


def test_bad_files_and_reads_raise_clear_errors(tmp_path):
    with pytest.raises(RasterioIOError, match=r"missing\.tif: .*No such file"):
        Raster(str(tmp_path / "missing.tif"))
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(RasterioIOError, match=r"corrupt\.tif: "):
        Raster(str(corrupt))
    href = _write(tmp_path / "d.tif", np.ones((8, 8), "uint16"))
    with Raster(href) as src:
        with pytest.raises(RasterioIOError, match=r"d\.tif: reading rows 4-12, columns 0-8: .*out of range"):
            src.read(4, 0, np.empty((8, 8), "uint16"))
        with pytest.raises(ValueError, match="read into uint16"):
            src.read(0, 0, np.empty((8, 8), "float32"))


def test_local_files_open_with_their_options_in_this_thread_alone_and_no_messages_on_stderr(
    tmp_path, capfd, monkeypatch
):
    """A local file opens without a rasterio environment (starting one in each reader thread for each open cost
    more than the open): its configuration options hold during the open only, in the opening thread only, and a
    failed open raises with GDAL's message instead of printing it."""
    import threading

    from rasterio import env

    href = _write(tmp_path / "a.tif", np.ones((8, 8), "uint16"), nodata=None)
    Path(f"{href}.aux.xml").write_text(
        '<PAMDataset><PAMRasterBand band="1"><NoDataValue>7</NoDataValue></PAMRasterBand></PAMDataset>'
    )
    Raster(href)  # whatever the process needs once
    started, found = [], []
    monkeypatch.setattr(env, "defenv", lambda **options: started.append(options))

    def in_a_thread() -> None:  # as the cube's readers open: a thread without any rasterio environment
        found.append(Raster(href).nodata)  # the side-car file is read
        found.append(Raster(href, {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}).nodata)  # not listed, not read
        found.append(Raster(href).nodata)  # the option was for that open only
        try:
            Raster(str(tmp_path / "missing.tif"))
        except RasterioIOError as exc:
            found.append(str(exc))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert found[:3] == [7.0, None, 7.0]
    assert "missing.tif: " in found[3] and "No such file" in found[3]
    assert "ERROR" not in capfd.readouterr().err
    assert not started


def test_rasters_of_a_type_cropflow_does_not_read_are_refused(tmp_path):
    href = _write(tmp_path / "complex.tif", np.ones((8, 8), "complex64"), nodata=None)
    with pytest.raises(RasterioIOError, match=r"complex\.tif has a first band of GDAL data type 10; cropflow reads "):
        Raster(href)


def test_the_library_is_rasterios_even_with_another_gdal_loaded():
    """pyogrio's wheels bring a second GDAL into the process: configuration set through rasterio must be the one
    `Raster` opens with (credentials, cache size)."""
    import ctypes

    import pyogrio  # noqa: F401  (its own libgdal, loaded into this process)

    from infra.gdal import library

    lib = library()
    assert lib.GDALVersionInfo(b"RELEASE_NAME").decode() == rasterio.__gdal_version__
    get = lib.CPLGetConfigOption
    get.restype, get.argtypes = ctypes.c_char_p, [ctypes.c_char_p, ctypes.c_char_p]
    with rasterio.Env(CROPFLOW_PROBE="seen"):
        assert get(b"CROPFLOW_PROBE", None) == b"seen"
    assert get(b"CROPFLOW_PROBE", None) is None


def test_s3_hrefs_get_credentials_and_other_opens_no_boto3_session(tmp_path, bucket, monkeypatch):
    """`s3://` rasters open with the credentials of the environment (as `rasterio.open` would), while local files
    and URLs open without building a boto3 session for each (the AWS_* variables are set here)."""
    import os

    import fsspec
    from rasterio import session

    pixels = np.arange(64, dtype="uint16").reshape(8, 8)
    local = _write(tmp_path / "s3.tif", pixels)
    fsspec.filesystem("s3").put(local, f"{bucket}/cog/s3.tif")
    endpoint = {"AWS_S3_ENDPOINT": os.environ["AWS_ENDPOINT_URL"].removeprefix("http://"), "AWS_HTTPS": "NO"}
    endpoint["AWS_VIRTUAL_HOSTING"] = "FALSE"
    with Raster(f"{bucket}/cog/s3.tif", endpoint) as src:
        assert np.array_equal(src.read(0, 0, np.empty((8, 8), "uint16")), pixels)

    made = []
    monkeypatch.setattr(session.AWSSession, "__init__", lambda self, *a, **k: made.append(1) or None)
    with Raster(local, endpoint) as src:
        assert src.read(7, 7, np.empty((1, 1), "uint16"))[0, 0] == 63
    assert not made
    # nor do the COGs that cropflow writes (sample regions, WorldCereal imports): `rasterio.open(..., "w")` alone did
    grid = Grid((8, 8), Affine(10, 0, 500000, 0, -10, 5000000))
    write_cog(tmp_path / "written.tif", pixels, grid, 0)
    assert not made
    with Raster(str(tmp_path / "written.tif")) as src:
        assert np.array_equal(src.read(0, 0, np.empty((8, 8), "uint16")), pixels)
