"""Rasters read through GDAL's C API, for the cube build's hot path.

rasterio runs Python around every read (window checks, mask flags, dtype names: about 150 us a read, with the GIL
held) and opens datasets with the GIL held too. A build does thousands of small window reads from two or more
threads, so that Python, not decoding, set its pace. `Raster` calls GDAL through `ctypes`, which releases the GIL for
the whole call. It opens an href the way `rasterio.open` does: the same GDAL name (`gdal_name`) and the same
credentials (`rasterio.env.ensure_env_with_credentials`), and it is the same GDAL library, with its caches and
configuration. A local file needs no credentials: it opens without a rasterio environment, which in a thread that has
none starts GDAL's default one and stops it again around each open (0.17 ms an open, with the GIL held: measured).
Whatever a `Raster` cannot do (resampling on read, warping) goes through its rasterio dataset, `Raster.dataset`,
opened on first use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio._path import _parse_path  # rasterio's own href -> GDAL name rule (no public API)
from rasterio.crs import CRS
from rasterio.env import ensure_env_with_credentials
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader
from rasterio.session import DummySession

GDAL_OF_RASTER, GDAL_OF_VERBOSE_ERROR = 0x02, 0x40  # the flags rasterio opens datasets with
GF_READ = 0
# GDAL's data types (GDALDataType) that a cube reads
DTYPES = {1: "uint8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "float64", 14: "int8"}


def gdal_name(href: str) -> str:
    """The name GDAL opens (and caches) `href` under when rasterio opens it: `/vsicurl/https://...` for a URL,
    `/vsis3/bucket/key` for `s3://bucket/key`, ..., a plain path for a local file."""
    return _parse_path(href).as_vsi()


def _find_library() -> str:
    """The path of the GDAL library rasterio runs on. Other packages may load their own copy into the process
    (pyogrio's wheels do), with its own drivers, caches and configuration: the one wanted is rasterio's."""
    package = Path(rasterio.__file__).parent
    bundled = sorted(package.parent.glob("rasterio.libs/libgdal*")) + sorted((package / ".dylibs").glob("libgdal*"))
    path = str(bundled[0]) if bundled else ctypes.util.find_library("gdal")  # else rasterio links the system's
    if not path:
        raise RuntimeError("cannot find the GDAL library rasterio uses; reinstall rasterio from its wheels")
    return path


@functools.cache
def library() -> ctypes.CDLL:
    """GDAL's C API, with the signatures of the functions used here (ctypes releases the GIL during each call)."""
    lib = ctypes.CDLL(_find_library())
    p, i, d, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_char_p
    signatures = {
        "GDALOpenEx": (p, [s, ctypes.c_uint, p, p, p]),
        "GDALClose": (None, [p]),
        "GDALGetRasterXSize": (i, [p]),
        "GDALGetRasterYSize": (i, [p]),
        "GDALGetGeoTransform": (i, [p, ctypes.POINTER(d)]),
        "GDALGetProjectionRef": (s, [p]),
        "GDALGetSpatialRef": (p, [p]),
        "OSRGetAuthorityName": (s, [p, s]),
        "OSRGetAuthorityCode": (s, [p, s]),
        "GDALGetRasterBand": (p, [p, i]),
        "GDALGetRasterDataType": (i, [p]),
        "GDALGetRasterNoDataValue": (d, [p, ctypes.POINTER(i)]),
        "GDALRasterIO": (i, [p, i, i, i, i, i, p, i, i, i, i, i]),
        "GDALGetBlockSize": (None, [p, ctypes.POINTER(i), ctypes.POINTER(i)]),
        "GDALFlushRasterCache": (i, [p]),
        "CPLErrorReset": (None, []),
        "CPLPushErrorHandler": (None, [p]),
        "CPLPopErrorHandler": (None, []),
        "CPLGetThreadLocalConfigOption": (s, [s, s]),
        "CPLSetThreadLocalConfigOption": (None, [s, s]),
        "CPLGetLastErrorMsg": (s, []),
        "VSICurlPartialClearCache": (None, [s]),
        "GDALVersionInfo": (s, [s]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    found = lib.GDALVersionInfo(b"RELEASE_NAME").decode()
    if found != rasterio.__gdal_version__:
        raise RuntimeError(f"found GDAL {found}, but rasterio runs on GDAL {rasterio.__gdal_version__}")
    with gdal_env():  # the first one registers GDAL's drivers and points GDAL and PROJ at rasterio's data files
        pass
    return lib


def _last_error(what: str) -> RasterioIOError:
    message = (library().CPLGetLastErrorMsg() or b"").decode(errors="replace").strip()
    return RasterioIOError(f"{what}: {message or 'GDAL gave no reason'}")


class Raster:
    """Band 1 of a raster opened with GDAL's C API: its size, georeferencing, dtype and no-data, and `read` of a
    window into a numpy array. Used by one thread at a time (as a GDAL dataset must be).

    `cached` is the range of tiles (rows, then columns: first and past the last) read since the band's tiles were
    last dropped from GDAL's block cache (`drop_cached`), or None. `memo` holds what callers work out once per
    raster (by a key of their own)."""

    def __init__(self, href: str, options: dict[str, str] | None = None) -> None:
        self.href, self.options = href, options or {}  # GDAL configuration options while opening
        self._dataset: DatasetReader | None = None
        lib = library()
        lib.CPLErrorReset()
        name = gdal_name(href)
        if name.startswith("/vsi"):  # remote, or in an archive: with the credentials its scheme needs
            with gdal_env(self.options):
                self._handle = _open(href)
        else:
            self._handle = _open_local(name, self.options)
        if not self._handle:
            raise _last_error(href)
        self._band = lib.GDALGetRasterBand(self._handle, 1)
        code = lib.GDALGetRasterDataType(self._band) if self._band else None
        if code not in DTYPES:
            self.close()
            what = "has no band" if code is None else f"has a first band of GDAL data type {code}"
            raise RasterioIOError(f"{href} {what}; cropflow reads {', '.join(DTYPES.values())} rasters")
        self.dtype, self._type = np.dtype(DTYPES[code]), code
        self.width, self.height = lib.GDALGetRasterXSize(self._handle), lib.GDALGetRasterYSize(self._handle)
        coefficients = (ctypes.c_double * 6)(0, 1, 0, 0, 0, 1)
        lib.GDALGetGeoTransform(self._handle, coefficients)  # GDAL's default (pixels) when the raster has none
        self.transform = Affine.from_gdal(*coefficients)
        has_nodata = ctypes.c_int(0)
        nodata = lib.GDALGetRasterNoDataValue(self._band, ctypes.byref(has_nodata))
        self.nodata = nodata if has_nodata.value else None
        self.epsg = self._epsg()
        tile_w, tile_h = ctypes.c_int(0), ctypes.c_int(0)
        lib.GDALGetBlockSize(self._band, ctypes.byref(tile_w), ctypes.byref(tile_h))
        self.tile = (max(tile_h.value, 1), max(tile_w.value, 1))
        self.cached: tuple[int, int, int, int] | None = None
        self.memo: dict[str, Any] = {}

    def _epsg(self) -> int | None:
        """The EPSG code of the raster's CRS: its authority code when it has one, else identified by PROJ."""
        lib = library()
        srs = lib.GDALGetSpatialRef(self._handle)
        if not srs:
            return None
        if (lib.OSRGetAuthorityName(srs, None) or b"").upper() == b"EPSG":
            return int(lib.OSRGetAuthorityCode(srs, None))
        return CRS.from_wkt(lib.GDALGetProjectionRef(self._handle).decode()).to_epsg()

    @property
    def closed(self) -> bool:
        return not self._handle

    def read(self, r0: int, c0: int, out: np.ndarray) -> np.ndarray:
        """Pixels from row `r0`, column `c0` (inside the raster) into `out` (2-D, the raster's dtype, rows may be
        strided), which is returned."""
        if out.dtype != self.dtype or out.strides[1] != out.itemsize:
            raise ValueError(f"read into {self.dtype} with contiguous rows, not {out.dtype} strided {out.strides}")
        h, w = out.shape
        lib = library()
        lib.CPLErrorReset()
        failed = lib.GDALRasterIO(
            self._band, GF_READ, c0, r0, w, h, out.ctypes.data, w, h, self._type, 0, out.strides[0]
        )
        if failed:
            raise _last_error(f"{self.href}: reading rows {r0}-{r0 + h}, columns {c0}-{c0 + w}")
        th, tw = self.tile
        t0, t1, u0, u1 = r0 // th, (r0 + h - 1) // th + 1, c0 // tw, (c0 + w - 1) // tw + 1
        if (was := self.cached) is not None:
            t0, t1, u0, u1 = min(was[0], t0), max(was[1], t1), min(was[2], u0), max(was[3], u1)
        self.cached = t0, t1, u0, u1
        return out

    def drop_cached(self) -> None:
        """Drop this band's decoded tiles from GDAL's block cache (when no read to come needs them)."""
        library().GDALFlushRasterCache(self._band)
        self.cached = None

    @property
    def dataset(self) -> DatasetReader:
        """The same raster opened by rasterio (resampled reads, `WarpedVRT`), opened on first use."""
        if self._dataset is None:
            with gdal_env(self.options):
                self._dataset = rasterio.open(self.href)
        return self._dataset

    def close(self) -> None:
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
        if self._handle:
            library().GDALClose(self._handle)
            self._handle = self._band = None

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gdal_env(options: dict[str, str | int] | None = None) -> rasterio.Env:
    """A rasterio environment with GDAL configuration `options` and no credentials: a read inside still takes those
    its href's scheme needs (`rasterio.open`, `Raster`: `ensure_env_with_credentials`). A plain `rasterio.Env`, and
    `rasterio.open` of a file to write without one, build a boto3 session from the `AWS_*` variables when they are
    set, even for a local file: 10-20 ms an open or a write, against 1-3 ms (measured)."""
    return rasterio.Env(session=DummySession(), **(options or {}))


@ensure_env_with_credentials  # the configuration and credentials `rasterio.open` would open `href` with
def _open(href: str) -> int | None:
    return library().GDALOpenEx(gdal_name(href).encode(), GDAL_OF_RASTER | GDAL_OF_VERBOSE_ERROR, None, None, None)


def _open_local(path: str, options: dict[str, str]) -> int | None:
    """GDALOpenEx of a local file, with configuration `options` set for this thread alone during the call, and
    GDAL's messages kept out of stderr (the caller raises the error, `_last_error`)."""
    lib = library()
    keys = [key.encode() for key in options]
    before = [lib.CPLGetThreadLocalConfigOption(key, None) for key in keys]  # copies (ctypes returns bytes)
    for key, value in zip(keys, options.values(), strict=True):
        lib.CPLSetThreadLocalConfigOption(key, str(value).encode())
    lib.CPLPushErrorHandler(ctypes.cast(lib.CPLQuietErrorHandler, ctypes.c_void_p))
    try:
        return lib.GDALOpenEx(path.encode(), GDAL_OF_RASTER | GDAL_OF_VERBOSE_ERROR, None, None, None)
    finally:
        lib.CPLPopErrorHandler()
        for key, value in zip(keys, before, strict=True):
            lib.CPLSetThreadLocalConfigOption(key, value)


def forget_failed_reads(href: str) -> None:
    """Forget what GDAL's cache of remote files (/vsicurl/, /vsis3/, ...) holds about `href`: it remembers a failed
    request (a timeout, a 5xx) as "does not exist" and would answer a retry with that. Other files' cached headers
    and tiles are kept."""
    name = gdal_name(href)
    if name.startswith("/vsi"):
        library().VSICurlPartialClearCache(name.encode())
