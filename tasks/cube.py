"""Build cloud-masked, temporally regular datacubes from STAC items into Zarr v3, one spatial block at a time.

For each block, every item's assets are decoded in threads through GDAL's C API (`infra.gdal.Raster`, which
releases the GIL for the whole read) straight onto the cube grid (bilinear for reflectance, nearest for SCL/QA;
`WarpedVRT` when an item is in another CRS), masked, scaled and composited per time bin (numpy, and the compiled
kernels of `tasks.kernels`, which release the GIL too), and written into the block's region of the store (in the
background, while the next block is read). Assets stay open from block to block, and blocks go in Z order, so the
COG tiles that neighbouring blocks share are decoded once (GDAL's block cache, `GDAL_CACHE_BYTES`). Completed blocks
are recorded beside the store (`<out>.partial/`), so an interrupted build resumes with the blocks still missing; the
finished store is published atomically. Memory depends on the block size and the cache, not on the region's size.
Reflectance is stored packed as uint16 (`REFLECTANCE_PACKING`); readers decode it to float32 (`infra.storage`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import resource
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from affine import Affine
from prefect import task
from prefect.cache_policies import NO_CACHE
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from scipy import ndimage
from zarr.codecs import BloscCodec

from infra import atomic, chunks, memory, storage
from infra.errors import CropflowError
from infra.gdal import Raster, forget_failed_reads, gdal_env
from tasks import kernels
from tasks.catalog import Catalog, sign_href
from tasks.cloudmask import CLEAR, dilate, spectral_mask
from tasks.grid import Bounds, Grid, snap_bounds
from tasks.preprocess import fill_time_gaps
from tasks.sensors import SENSORS, Sensor, scale_offset

log = logging.getLogger(__name__)
# Blosc LZ4 with byte shuffle: about 3x faster to write than zarr's default zstd for a similar ratio on float32
# reflectance (1.6x against 2.1x), and compression was a third of the build's CPU time
CUBE_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
# Reflectance (Sentinel-2, Landsat) is stored packed, the CF way: uint16 steps of 1e-4 (one Sentinel-2 digital
# number) from -0.2 (Landsat C2 L2's lowest value), 65535 for no data (Zarr's fill value too: a chunk never written
# reads as no data); `infra.storage.open_zarr` decodes it to float32 (`unpack` for direct chunk reads). That spans
# -0.2 to 6.3534 (`PACKED_RANGE`): values beyond (saturated, never physical) are clipped and counted in the cube's
# `clipped_values`. Against float32: 2.3x smaller, and a 1024 px build 4.5 -> 3.9 s, 2048 px 18 -> 15 s (2 cores):
# the kernel's copying of the written bytes into the page cache was the largest cost left (docs/benchmarks.md).
# SAR (dB) stays float32.
REFLECTANCE_PACKING = {
    "dtype": "uint16", "scale_factor": 1e-4, "add_offset": -0.2, "_FillValue": 65535, "fill_value": 65535
}  # fmt: skip
PACKED_RANGE = tuple(  # the lowest and highest value stored
    REFLECTANCE_PACKING["add_offset"] + q * REFLECTANCE_PACKING["scale_factor"]
    for q in (0, REFLECTANCE_PACKING["_FillValue"] - 1)
)

# Sentinel-2 SCL codes grown by `scl_dilation`: cloud shadow, cloud medium/high probability, thin cirrus.
SCL_CLOUDS = (3, 8, 9, 10)
# How Sentinel-2 clouds are masked: SCL where an item has it, else the spectral test (auto); SCL only (items without
# it are refused); the spectral test for every item (`tasks.cloudmask.spectral_mask`).
S2_CLOUD_MASKS = ("auto", "scl", "spectral")
SPECTRAL_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")  # blue, green, red, NIR, SWIR1, SWIR2 of `spectral_mask`
S1_FLOOR = 1e-4  # linear backscatter below this (-40 dB) is border noise or no-data, never a real return
S1_ENL = 4.4  # equivalent number of looks of Sentinel-1 IW GRD, when the item does not say
READ_RETRIES = 2  # retries of a failed asset read before the scene is recorded as no-data
ORBITS = ("both", "ascending", "descending")
GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
# GDAL's block cache during a build: decoded tiles that neighbouring blocks share (the 20 m bands' margins). With 128
# MB a 2048 px build decoded them again and again: 43 s, against 36 s with 256 MB and 28.5 s with 512 MB.
GDAL_CACHE_BYTES = 512 * 2**20
WRITES_QUEUED = 2  # built blocks waiting for the writer while the next is built, at most (each holds its buffers)
MAX_OPEN = 4096  # datasets kept open by a process at most (also: half its soft limit of open files)


def cropflow_version() -> str:
    try:
        return version("cropflow")
    except PackageNotFoundError:
        return "unknown"


def time_bins(start: date, end: date, bin_days: int = 10) -> list[date]:
    """Start dates of consecutive `bin_days`-day bins covering `start`..`end`."""
    if end < start:
        raise CropflowError(f"season end {end} is before its start {start}; give the dates in order.")
    if bin_days < 1:
        raise CropflowError(f"bin_days={bin_days} must be a positive number of days.")
    n = (end - start).days // bin_days + 1
    return [start + timedelta(days=i * bin_days) for i in range(n)]


def item_date(item: dict) -> date:
    """Acquisition date of an item (`datetime`, else `start_datetime`)."""
    props = item["properties"]
    when = props.get("datetime") or props.get("start_datetime")
    return datetime.fromisoformat(str(when).replace("Z", "+00:00")).date()


# ------------------------------------------------------------------------------------------------ pixel operations


def lee_filter(image: np.ndarray, window: int, enl: float = S1_ENL) -> np.ndarray:
    """Lee speckle filter of a linear-power SAR image (`window` x `window`), NaN-aware; NaN stays NaN.

    Each pixel moves from its local mean towards its own value by `k = var_x / var_z`, where the signal variance
    `var_x` is the local variance less the speckle's (`mean^2 / enl`): flat areas take the local mean, edges and
    point targets keep their value. Local statistics use only valid neighbours.
    """
    if window <= 1:
        return image
    valid = np.isfinite(image)
    z = np.where(valid, image, 0).astype(np.float32)
    weight = ndimage.uniform_filter(valid.astype(np.float32), window, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = ndimage.uniform_filter(z, window, mode="constant") / weight
        square = ndimage.uniform_filter(z * z, window, mode="constant") / weight
        var_z = np.maximum(square - mean * mean, 0)
        cu2 = np.float32(1.0 / enl)
        var_x = np.maximum((var_z - mean * mean * cu2) / (1 + cu2), 0)
        k = np.where(var_z > 0, var_x / var_z, 0).astype(np.float32)
    return np.where(valid, mean + k * (z - mean), np.nan).astype(np.float32)


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Block:
    """A window of the cube grid: rows `r0:r1`, columns `c0:c1`."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def name(self) -> str:
        return f"{self.r0}_{self.c0}"

    def grown(self, px: int) -> Block:
        return Block(self.r0 - px, self.r1 + px, self.c0 - px, self.c1 + px)

    def shifted(self, rows: int, cols: int) -> Block:
        return Block(self.r0 + rows, self.r1 + rows, self.c0 + cols, self.c1 + cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


class Datasets:
    """Open datasets shared by the reader threads of this process (across blocks, builds and Dask tiles in worker
    threads), each used by one thread at a time.

    An asset stays open from block to block, so it is opened once and its decoded tiles stay in GDAL's block cache
    for the neighbouring blocks' margins. At most `limit` datasets are open (default half the soft limit of open
    files, at most `MAX_OPEN`): one more opened at the limit first closes the least recently used idle one; when none
    is idle the read goes ahead over the limit (never waits), and datasets given back are closed until it is met
    again. A dataset whose read failed is closed, never reused.
    """

    def __init__(self, limit: int | None = None) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = limit or (MAX_OPEN if soft == resource.RLIM_INFINITY else max(1, min(MAX_OPEN, soft // 2)))
        self.count = 0  # open datasets: idle and taken
        self._idle: OrderedDict[str, Raster] = OrderedDict()  # href -> dataset, least recently used first
        self._lock = threading.Lock()

    def open(self, href: str) -> _Taken:
        """The raster of `href`, taken for the duration of a `with` block (opened when none is idle)."""
        with self._lock:
            src = self._idle.pop(href, None)
        if src is None:
            self._settle(1)
            try:
                src = Raster(href, GDAL_ENV)
            except BaseException:
                self._settle(-1)
                raise
        return _Taken(self, href, src)

    def _settle(self, opened: int, given_back: tuple[str, Raster] | None = None) -> None:
        """Count `opened` datasets (closed ones when negative), make `given_back` idle, then close the least recently
        used idle datasets while over the limit."""
        closing = []
        with self._lock:
            self.count += opened
            if given_back is not None:
                href, src = given_back
                if (spare := self._idle.pop(href, None)) is not None:  # another thread's handle, given back meanwhile
                    closing.append(spare)
                self._idle[href] = src
            while self._idle and self.count - len(closing) > self.limit:
                closing.append(self._idle.popitem(last=False)[1])
            self.count -= len(closing)
        for src in closing:
            src.close()

    def drop_cached(self, needed: Callable[[Raster], bool]) -> None:
        """Drop from GDAL's block cache the tiles of each idle dataset for which `needed` is False.

        The datasets are sorted out without the lock, so the readers taking and giving back datasets meanwhile do not
        wait (all idle ones: about 1 ms a call, 10 ms at most, measured); each is checked again, and dropped, under it
        (datasets are taken under it: none of those is read meanwhile)."""
        with self._lock:
            idle = list(self._idle.items())
        unneeded = [(href, src) for href, src in idle if src.cached is not None and not needed(src)]
        with self._lock:
            for href, src in unneeded:
                if self._idle.get(href) is src and src.cached is not None and not needed(src):
                    src.drop_cached()

    def close(self) -> None:
        """Close every idle dataset."""
        with self._lock:
            idle, self._idle = list(self._idle.values()), OrderedDict()
            self.count -= len(idle)
        for src in idle:
            src.close()


class _Taken:
    """A dataset taken from `Datasets` (`Datasets.open`): given back at the end of the `with` block, or closed when
    the block raised (its read failed). A class, not a generator: thousands are taken per block."""

    __slots__ = ("datasets", "href", "src")

    def __init__(self, datasets: Datasets, href: str, src: Raster) -> None:
        self.datasets, self.href, self.src = datasets, href, src

    def __enter__(self) -> Raster:
        return self.src

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.datasets._settle(0, (self.href, self.src))
        else:
            self.src.close()
            self.datasets._settle(-1)


DATASETS = Datasets()  # the open datasets of this process


def close_datasets() -> None:
    """Close the idle datasets of this process's pool: at the end of a build (on each Dask worker, `Client.run`)."""
    DATASETS.close()


@functools.lru_cache(maxsize=4096)
def _source_axis(n_out: int, start: int, factor: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Target pixels `start..start+n_out` of a grid `factor` times finer than the source (pixel edges aligned) in
    source pixels: for each, the source pixel before its centre (`i0`, relative to `lo`) and the centre's distance
    past it (`t`, 0..1), and the source range `lo..hi` that bilinear interpolation reads. Cached: every block of a
    build asks for the same few (the arrays are read-only)."""
    centre = (np.arange(start, start + min(factor, n_out)) + 0.5) / factor - 0.5  # one period: the others follow
    i0 = np.floor(centre).astype(np.int64)
    periods = -(-n_out // factor)
    i0 = (i0[None, :] + np.arange(periods)[:, None]).ravel()[:n_out]
    t = np.tile((centre - np.floor(centre)).astype(np.float32), periods)[:n_out]
    lo = int(i0[0])
    index = i0 - lo
    index.flags.writeable = t.flags.writeable = False
    return index, t, lo, int(i0[-1]) + 2


@functools.lru_cache(maxsize=4096)
def _nearest_axis(n_out: int, start: int, factor: int) -> tuple[np.ndarray, int, int]:
    """Target pixels `start..start+n_out` of a grid `factor` times finer than the source (pixel edges aligned) in
    source pixels: for each, the source pixel holding its centre (relative to `lo`), and the source range `lo..hi`
    they fall in (nearest resampling). Cached, as `_source_axis`."""
    holder = np.arange(start, start + n_out) // factor
    lo = int(holder[0])
    index = holder - lo
    index.flags.writeable = False
    return index, lo, int(holder[-1]) + 1


def _pixels(src: Raster, window: Block, nodata: float) -> np.ndarray:
    """The pixels of `src` in `window` (in source pixels; it may reach outside the source: `nodata` there)."""
    inside = Block(max(window.r0, 0), min(window.r1, src.height), max(window.c0, 0), min(window.c1, src.width))
    if inside == window:
        return src.read(inside.r0, inside.c0, np.empty(window.shape, dtype=src.dtype))
    raw = np.full(window.shape, nodata, dtype=src.dtype)
    if inside.r1 > inside.r0 and inside.c1 > inside.c0:
        r, c = inside.r0 - window.r0, inside.c0 - window.c0
        src.read(inside.r0, inside.c0, raw[r : r + inside.shape[0], c : c + inside.shape[1]])
    return raw


def _source_pixels(
    src: Raster, block: Block, offset: tuple[int, int], factor: int, nodata: float
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The pixels of `src` that `_upsample` needs for `block` (`_pixels`), and the rows' and columns'
    `(index, distance)` in them (`_source_axis`)."""
    ri, rt, r_lo, r_hi = _source_axis(block.shape[0], block.r0 + offset[0], factor)
    ci, ct, c_lo, c_hi = _source_axis(block.shape[1], block.c0 + offset[1], factor)
    return _pixels(src, Block(r_lo, r_hi, c_lo, c_hi), nodata), (ri, rt, ci, ct)


def _nearest_pixels(
    src: Raster, block: Block, offset: tuple[int, int], factor: int, nodata: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of `src` that `block`'s pixels fall in (nearest resampling; `_pixels`), and for each row and column
    of `block` the row and column of them holding its centre (`_nearest_axis`)."""
    rows, r_lo, r_hi = _nearest_axis(block.shape[0], block.r0 + offset[0], factor)
    cols, c_lo, c_hi = _nearest_axis(block.shape[1], block.c0 + offset[1], factor)
    return _pixels(src, Block(r_lo, r_hi, c_lo, c_hi), nodata), rows, cols


def _upsample(
    src: Raster, block: Block, offset: tuple[int, int], factor: int, resampling: Resampling, nodata: float
) -> tuple[np.ndarray, np.ndarray]:
    """`block` of a grid `factor` times finer than `src` whose pixel edges fall on the source's (the grid's origin is
    `offset` target pixels (rows, columns) from the source's), decoded at the source's resolution and resampled here.

    Nearest repeats source pixels; bilinear interpolates between the two nearest source centres along each axis, in
    float32 without rounding to the source's integers. As in GDAL's warper, a pixel has no data where the source
    pixel holding its centre has none, and the weights of invalid or outside neighbours go to the valid ones.
    """
    if resampling == Resampling.nearest:  # the source pixel holding each target pixel's centre
        raw, rows, cols = _nearest_pixels(src, block, offset, factor, nodata)
        nearest = raw[rows][:, cols]
        return nearest, nearest == nodata
    raw, (ri, rt, ci, ct) = _source_pixels(src, block, offset, factor, nodata)
    out, invalid = np.empty(block.shape, np.float32), np.zeros(block.shape, bool)
    kernels.bilinear_upsample(raw, float(nodata), factor, ri, rt, ci, ct, 1.0, 0.0, out, invalid)
    return out, invalid


def _on_grid(src: Raster, grid: Grid) -> tuple[int, tuple[int, int]] | None:
    """`(factor, offset)` when `src` is in the grid's CRS at an integer `factor` times its resolution with its pixel
    edges on the grid's (`offset`: the grid's origin from the source's in grid pixels, rows and columns): read as is
    (factor 1) or resampled by `_upsample`; else None. Worked out once per dataset and grid."""
    known = src.memo.setdefault("on_grid", {})
    if (placed := known.get(grid, False)) is not False:
        return placed
    a, b, c, d, e, f = src.transform[:6]
    factor = a / grid.resolution
    offset = ((grid.bounds[3] - f) / e * factor, (grid.bounds[0] - c) / a * factor)
    integer = factor >= 1 and factor == round(factor) and all(o == round(o) for o in offset)
    on_grid = src.epsg == grid.epsg and b == 0 and d == 0 and -e == a and integer
    placed = known[grid] = (round(factor), (round(offset[0]), round(offset[1]))) if on_grid else None
    return placed


def read_window(
    src: Raster, grid: Grid, block: Block, resampling: Resampling, nodata: float
) -> tuple[np.ndarray, np.ndarray]:
    """One band of `src` on `block` of the cube grid (which may reach outside the grid), and where it has no data.

    Sources on the grid's pixels are read as they are; sources aligned with the grid at an integer multiple of its
    resolution (Sentinel-2's 20 m, Landsat's 30 m on a 10 m grid) are decoded at their own resolution and resampled
    here (`_upsample`); other sources in the grid's CRS are read with a (fractional) window and GDAL's resampling on
    decode, which gives the same values as warping; sources in another CRS go through a `WarpedVRT` of the block.
    When GDAL resamples, a margin around the block keeps the kernel the same whatever the block. Pixels are in the
    source's dtype, or float32 when interpolated; no-data is the source's own value, else `nodata`, and everything
    outside the source.
    """
    h, w = block.shape
    res = grid.resolution
    nodata = src.nodata if src.nodata is not None else nodata
    a, b, c, d, e, f = src.transform[:6]
    same_crs = src.epsg == grid.epsg
    if not same_crs or b != 0 or d != 0:
        x0, y1 = grid.bounds[0] + block.c0 * res, grid.bounds[3] - block.r0 * res
        transform = Affine(res, 0.0, x0, 0.0, -res, y1)
        with WarpedVRT(
            src.dataset, crs=grid.crs, transform=transform, width=w, height=h, resampling=resampling, nodata=nodata
        ) as vrt:
            out = vrt.read(1)
            return out, out == nodata
    if (placed := _on_grid(src, grid)) is not None:
        factor, offset = placed
        if factor > 1:
            return _upsample(src, block, offset, factor, resampling, nodata)
        out = _pixels(src, block.shifted(*offset), nodata)
        return out, out == nodata
    col0, row0 = (grid.bounds[0] - c) / a, (grid.bounds[3] - f) / e  # grid origin in source pixels
    margin = 0 if resampling == Resampling.nearest else math.ceil(max(a, -e) / res) + 1
    outer = block.grown(margin)
    # target rows/columns whose pixels lie within the source's extent
    col_lo, col_hi = math.ceil(round(-col0 * a / res, 6)), math.floor(round((src.width - col0) * a / res, 6))
    row_lo, row_hi = math.ceil(round(-row0 * -e / res, 6)), math.floor(round((src.height - row0) * -e / res, 6))
    inner = Block(max(outer.r0, row_lo), min(outer.r1, row_hi), max(outer.c0, col_lo), min(outer.c1, col_hi))
    if inner.r1 <= inner.r0 or inner.c1 <= inner.c0:
        return np.full(block.shape, nodata, dtype=src.dtype), np.ones(block.shape, dtype=bool)
    window = Window(
        col0 + inner.c0 * res / a, row0 + inner.r0 * res / -e, inner.shape[1] * res / a, inner.shape[0] * res / -e
    )
    out = src.dataset.read(1, window=window, out_shape=inner.shape, resampling=resampling)
    if inner != outer:
        data, out = out, np.full(outer.shape, nodata, dtype=src.dtype)
        out[inner.r0 - outer.r0 : inner.r1 - outer.r0, inner.c0 - outer.c0 : inner.c1 - outer.c0] = data
    out = out[margin : margin + h, margin : margin + w]
    return out, out == nodata


def read_band(
    src: Raster,
    grid: Grid,
    block: Block,
    nodata: float,
    scale: float,
    offset: float,
    out: np.ndarray,
    missing: np.ndarray,
) -> None:
    """One band of `src` on `block` as `read_window` reads it (bilinear), scaled (`value * scale + offset`, float32)
    into `out`, and `missing` set where it has no data: in one pass over memory after decoding."""
    nodata = src.nodata if src.nodata is not None else nodata
    placed = _on_grid(src, grid)
    if placed is None:  # GDAL resamples; no data is where `raw` is `nodata`
        raw, _ = read_window(src, grid, block, Resampling.bilinear, nodata)
    elif placed[0] == 1:
        raw = _pixels(src, block.shifted(*placed[1]), nodata)
    else:
        factor, grid_offset = placed
        raw, axes = _source_pixels(src, block, grid_offset, factor, nodata)
        kernels.bilinear_upsample(raw, float(nodata), factor, *axes, scale, offset, out, missing)
        return
    kernels.scale_band(raw, float(nodata), scale, offset, out, missing)


def read_mask(src: Raster, grid: Grid, block: Block, nodata: float, valid: np.ndarray, missing: np.ndarray) -> None:
    """A mask asset (SCL classes, QA bits) of `src` on `block`, read as `read_window` reads it (nearest): `missing`
    set where its code is not `valid` (a table of every code, `_valid_codes`). A source on the grid's pixels or at a
    multiple of its resolution is looked up at its own resolution, each pixel through the source pixel holding its
    centre, in one pass after decoding."""
    if (placed := _on_grid(src, grid)) is None:
        _look_up(read_window(src, grid, block, Resampling.nearest, nodata)[0], valid, missing)
        return
    factor, offset = placed
    codes, rows, cols = _nearest_pixels(src, block, offset, factor, nodata)
    kernels.mask_lookup(codes, rows, cols, valid, missing)


def _look_up(codes: np.ndarray, valid: np.ndarray, missing: np.ndarray) -> None:
    """`missing` set where `codes`, a mask asset's codes on the pixels of `missing`, are not `valid` (a table of every
    code, `_valid_codes`): `kernels.mask_lookup`, each row and column its own."""
    kernels.mask_lookup(
        codes, _nearest_axis(codes.shape[0], 0, 1)[0], _nearest_axis(codes.shape[1], 0, 1)[0], valid, missing
    )


@functools.cache
def _valid_codes(mask_fn: Callable[[np.ndarray], np.ndarray], dtype: str) -> np.ndarray | None:
    """`mask_fn` of every value of an 8- or 16-bit unsigned mask asset (a table for `kernels.mask_lookup`), or
    None for other dtypes."""
    if dtype not in ("uint8", "uint16"):
        return None
    return np.ascontiguousarray(mask_fn(np.arange(np.iinfo(dtype).max + 1, dtype=dtype)), dtype=bool)


@dataclass(frozen=True)
class Source:
    """One item of one sensor in a build: where its bands and mask are, how its values are scaled."""

    item_id: str
    time_bin: int
    keys: tuple[str, ...]  # band asset keys, bands read for the spectral cloud test only, then the mask asset key
    hrefs: tuple[str, ...]
    scale: np.ndarray  # (bands read,) float32
    offset: np.ndarray  # (bands read,) float32
    enl: float = S1_ENL
    spectral: tuple[int, ...] = ()  # the bands read that are SPECTRAL_BANDS, when masked by the spectral test


@dataclass(frozen=True)
class SensorPlan:
    """What one sensor contributes to a build: its sources per bin and its options."""

    sensor: Sensor
    bands: list[str]
    sources: list[Source]
    n_bins: int
    scl_dilation: int = 0
    speckle_window: int = 0
    sign: Callable[[str], str] | None = None  # makes an href readable now (e.g. a fresh Planetary Computer token)

    @property
    def halo(self) -> int:
        """Pixels read around a block so dilation and speckle filtering are the same whatever the block."""
        return max(self.scl_dilation, self.speckle_window // 2)

    def in_bin(self, b: int) -> list[Source]:
        return [s for s in self.sources if s.time_bin == b]


class BadAssets:
    """Assets that could not be read after retries: each recorded once (item id, asset key, error), thread-safe;
    `items`: the ids of the items they belong to."""

    def __init__(self, known: dict[str, dict] | None = None) -> None:
        self.found: dict[str, dict] = dict(known or {})
        self.items = {record["item"] for record in self.found.values()}
        self._lock = threading.Lock()

    def add(self, item_id: str, key: str, error: str) -> None:
        with self._lock:
            self.found.setdefault(f"{item_id}/{key}", {"item": item_id, "asset": key, "error": error})
            self.items.add(item_id)


def read_source(
    plan: SensorPlan,
    source: Source,
    grid: Grid,
    block: Block,
    bad: BadAssets,
    datasets: Datasets,
    out: np.ndarray,
    valid: np.ndarray,
    retry_delay: float = 0.5,
) -> bool:
    """Scaled `(bands, h, w)` float32 values of one item on `block` into `out`, and where they are valid into
    `valid` `(h, w)`; values where not valid are undefined (NaN for SAR).

    The mask asset (SCL, QA_PIXEL) is read first: where it leaves no valid pixel on the block (a cloudy scene, or
    one with no data there), the bands are not decoded at all. False when an asset cannot be read after
    `READ_RETRIES` retries: the scene counts as no-data (recorded in `bad`).
    """
    if source.item_id in bad.items:  # an asset of it failed before: the scene is no-data throughout
        return False
    sensor, halo = plan.sensor, plan.halo
    outer = block.grown(halo)
    crop = (slice(halo, halo + block.shape[0]), slice(halo, halo + block.shape[1]))
    n = len(source.scale)  # the cube's bands, then those read for the spectral cloud test only
    values = out if halo == 0 and n == len(plan.bands) else np.empty((n, *outer.shape), dtype=np.float32)
    missing = np.zeros(outer.shape, dtype=bool)
    dilated = plan.scl_dilation and sensor.name == "s2"  # SCL's clouds grown: its classes are needed on the grid
    for j in [n, *range(n)] if len(source.keys) > n else range(n):  # the mask asset first, when there is one
        key, href = source.keys[j], source.hrefs[j]
        is_mask = j == n
        nodata = (1 if sensor.name == "landsat" else 0) if is_mask else 0
        raw, table = None, None  # a mask's codes on the grid when not looked up on reading; the table of its codes
        for attempt in range(READ_RETRIES + 1):
            try:
                readable = plan.sign(href) if plan.sign else href
                with datasets.open(readable) as src:
                    if not is_mask:
                        read_band(src, grid, outer, nodata, source.scale[j], source.offset[j], values[j], missing)
                    elif (table := _valid_codes(sensor.mask_fn, src.dtype.name)) is not None and not dilated:
                        read_mask(src, grid, outer, nodata, table, missing)
                    else:
                        raw, _ = read_window(src, grid, outer, Resampling.nearest, nodata)
                break
            except (RasterioError, OSError, ValueError) as exc:
                if attempt == READ_RETRIES:
                    log.warning("%s: asset %s unreadable (%s); the scene counts as no-data", source.item_id, key, exc)
                    bad.add(source.item_id, key, str(exc).splitlines()[0][:300])
                    return False
                forget_failed_reads(href)  # unsigned: a prefix of every signed name of the asset
                time.sleep(retry_delay * 2**attempt)
        if raw is not None:
            if table is not None:
                _look_up(raw, table, missing)
            else:
                missing |= ~np.asarray(sensor.mask_fn(raw))
            if dilated:
                missing |= dilate(np.isin(raw, SCL_CLOUDS), plan.scl_dilation)
        if is_mask and missing[crop].all():  # nothing valid on the block: no band to decode
            valid[...] = False
            return True
    if source.spectral:  # clouds and shadows by reflectance alone; no-data pixels (NaN) are clear, never grown
        reflectance = np.where(missing, np.float32(np.nan), values[list(source.spectral)])
        missing |= spectral_mask(np.moveaxis(reflectance, 0, -1), dilation=plan.scl_dilation) != CLEAR
    values = values[: len(plan.bands)]
    if not sensor.mask_asset:  # SAR: no-data, border noise and speckle
        missing |= ~(values >= S1_FLOOR).all(axis=0)
        np.copyto(values, np.float32(np.nan), where=missing)
        if plan.speckle_window > 1:
            values = np.stack([lee_filter(v, plan.speckle_window, source.enl) for v in values])
    if values is not out:
        out[...] = values[(slice(None), *crop)]
    np.logical_not(missing[crop], out=valid)
    return True


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An array of `shape` and `dtype` in the calling thread's own buffer `name`, reused by its next calls (grown
    when too small): what one thread reads and composites at a time (`composite_block`)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.size < nbytes:
        buffer = memory.empty(nbytes, np.uint8)
        setattr(_SCRATCH, name, buffer)
    return buffer[:nbytes].view(dtype).reshape(shape)


def composite_block(
    plan: SensorPlan,
    grid: Grid,
    block: Block,
    pool: ThreadPoolExecutor,
    bad: BadAssets,
    datasets: Datasets,
    values: np.ndarray,
    fraction: np.ndarray,
) -> list[Future[int]]:
    """The composite of valid observations per bin into `values` `(time, band, h, w)`, as the cube stores it
    (`_storage`), and the fraction of valid acquisitions into `fraction` `(time, h, w)`: one task of `pool` per bin,
    each giving the number of values it clipped by packing.

    Each task reads its bin's items and composites them, so decoding and compositing share the threads and at most
    one bin per thread is held in memory. Reflectance takes the median, packed row by row as it is taken
    (`kernels.nan_median`); SAR is averaged in linear power, then converted to decibels. The caller reuses `values`
    and `fraction` from block to block, and each thread its own scratch (`_scratch`), because fresh memory is
    faulted in and zeroed by the system each time: at 1024 px the medians took 2.1 CPU-s into fresh arrays, 0.18 s
    into a reused one.
    """
    h, w = block.shape
    bands = len(plan.bands)

    def one_bin(b: int) -> int:
        sources = plan.in_bin(b)
        n = len(sources)
        stack = _scratch("stack", (n, bands, h, w), np.float32)
        valid = _scratch("valid", (n, h, w), bool)
        read = 0
        for source in sources:  # each read into the next free slot
            read += read_source(plan, source, grid, block, bad, datasets, stack[read], valid[read])
        kernels.valid_fraction(valid[:read], n, fraction[b])
        out = values[b]
        if plan.sensor.eo:
            p = REFLECTANCE_PACKING
            if read:
                return kernels.nan_median(
                    stack[:read], valid[:read], p["scale_factor"], p["add_offset"], p["_FillValue"], out
                )
            out[...] = p["_FillValue"]
        elif read:
            kernels.nan_mean(stack[:read], valid[:read], out)
            with np.errstate(divide="ignore", invalid="ignore"):  # linear power to decibels
                np.log10(out, out=out)
            out *= 10
        else:
            out[...] = np.nan
        return 0

    return [pool.submit(one_bin, b) for b in range(plan.n_bins)]


# ------------------------------------------------------------------------------------------------ planning


def check_s2_cloud_mask(value: str) -> str:
    """`value` when it is one of `S2_CLOUD_MASKS`, else an error naming them."""
    if value not in S2_CLOUD_MASKS:
        raise CropflowError(
            f"s2_cloud_mask={value!r}; choose one of {', '.join(S2_CLOUD_MASKS)} (auto: SCL where an item has it, "
            "else the spectral test; scl: SCL only, items without it refused; spectral: the test for all)."
        )
    return value


def plan_sensor(
    name: str,
    items: list[dict],
    bins: list[date],
    bin_days: int,
    bands: list[str] | None = None,
    scl_dilation: int = 0,
    s1_orbit: str = "both",
    speckle_window: int = 5,
    s2_cloud_mask: str = "auto",
) -> SensorPlan:
    """The sources of one sensor: items in the season (S1: of the chosen orbit direction), their assets and scaling.

    Without `bands`, the sensor's bands that every item has (with a warning naming those left out); a band asked
    for, or the mask asset, missing from an item is an error. S2 items are masked as `s2_cloud_mask` says (one of
    `S2_CLOUD_MASKS`); those masked by the spectral test also read the `SPECTRAL_BANDS` the cube does not hold.
    """
    if name not in SENSORS:
        raise CropflowError(f"unknown sensor {name!r}; valid sensors: {', '.join(SENSORS)}.")
    check_s2_cloud_mask(s2_cloud_mask)
    sensor = SENSORS[name]
    if bands is not None:
        unknown = [b for b in bands if b not in sensor.bands]
        if unknown or not bands:
            raise CropflowError(f"unknown {name} band(s) {unknown or bands}; valid bands: {', '.join(sensor.bands)}.")
    chosen = bands or sensor.bands
    keys = [k for k, band in sensor.assets.items() if band in chosen]
    chosen = [sensor.assets[k] for k in keys]
    if s1_orbit not in ORBITS:
        raise CropflowError(f"s1_orbit={s1_orbit!r}; choose one of {', '.join(ORBITS)}.")
    if name == "s1" and s1_orbit != "both":
        items = [it for it in items if it["properties"].get("sat:orbit_state") == s1_orbit]
    if not items:
        orbit = f" on {s1_orbit} orbits" if name == "s1" and s1_orbit != "both" else ""
        raise CropflowError(f"no {name} items{orbit} to build the cube from; widen the season or the region.")
    start, end = bins[0], bins[-1] + timedelta(days=bin_days)
    in_season = [it for it in items if start <= item_date(it) < end]
    if len(in_season) < len(items):
        log.warning("%s: %d item(s) outside the season %s..%s left out", name, len(items) - len(in_season), start, end)
    if not in_season:
        raise CropflowError(f"no {name} items inside the season {start}..{end}; check the dates of the search.")
    if bands is None:  # the sensor's bands that every item has (e.g. only the 20 m ones of some extractions)
        shared = [k for k in keys if all(k in it["assets"] for it in in_season)]
        if shared and len(shared) < len(keys):
            absent = [sensor.assets[k] for k in keys if k not in shared]
            log.warning("%s: band(s) %s missing from some items; the cube holds %s", name, absent, shared)
            keys, chosen = shared, [sensor.assets[k] for k in shared]
    by_band = {band: key for key, band in sensor.assets.items()}
    spectral_keys = [by_band[b] for b in SPECTRAL_BANDS] if name == "s2" else []
    sources = []
    for it in in_season:
        spectral = name == "s2" and (
            s2_cloud_mask == "spectral" or (s2_cloud_mask == "auto" and sensor.mask_asset not in it["assets"])
        )
        read = [*keys, *(k for k in spectral_keys if k not in keys)] if spectral else keys
        all_keys = read if spectral or not sensor.mask_asset else [*keys, sensor.mask_asset]
        missing = [k for k in all_keys if k not in it["assets"]]
        for_test = [k for k in missing if k not in keys] if spectral else []  # bands read for the test only
        if for_test:
            raise CropflowError(
                f"{name} item {it['id']} has no SCL asset and no asset(s) {', '.join(for_test)} for the spectral "
                f"cloud test (it reads {', '.join(SPECTRAL_BANDS)}); give items with SCL or these bands, or leave "
                "the item out."
            )
        if missing:
            hint = " (s2_cloud_mask='auto' masks items without SCL by a spectral test)" if "SCL" in missing else ""
            raise CropflowError(
                f"{name} item {it['id']} has no asset(s) {', '.join(missing)}; is it {sensor.collection}?{hint}"
            )
        scale, offset = scale_offset([it], read, name)
        sources.append(
            Source(
                item_id=it["id"],
                time_bin=(item_date(it) - start).days // bin_days,
                keys=tuple(all_keys),
                hrefs=tuple(it["assets"][k]["href"] for k in all_keys),
                scale=scale[0].astype(np.float32),
                offset=offset[0].astype(np.float32),
                enl=float(it["properties"].get("sar:looks_equivalent_number", S1_ENL)),
                spectral=tuple(read.index(k) for k in spectral_keys) if spectral else (),
            )
        )
    spectral_count = sum(1 for s in sources if s.spectral)
    if spectral_count:
        log.info("%s: %d of %d item(s) masked by the spectral cloud test", name, spectral_count, len(sources))
    return SensorPlan(
        sensor=sensor,
        bands=chosen,
        sources=sources,
        n_bins=len(bins),
        scl_dilation=scl_dilation if name == "s2" else 0,
        speckle_window=speckle_window if name == "s1" else 0,
    )


def _z_order(row: int, col: int) -> int:
    """Position of block (`row`, `col`) on the Z-order curve (bits of the two indices interleaved)."""
    return sum(((row >> i & 1) << (2 * i + 1)) | ((col >> i & 1) << (2 * i)) for i in range(max(row, col).bit_length()))


def blocks_of(shape: tuple[int, int], size: int) -> list[Block]:
    """Blocks of `size` x `size` pixels covering a grid of `shape`, in Z order.

    Consecutive blocks are neighbours, so the source tiles that a block's resampling margin shares with the next
    ones are still in GDAL's block cache when those are read, whatever the width of the region.
    """
    h, w = shape
    cells = sorted(
        ((r, c) for r in range(math.ceil(h / size)) for c in range(math.ceil(w / size))), key=lambda rc: _z_order(*rc)
    )
    return [Block(r * size, min((r + 1) * size, h), c * size, min((c + 1) * size, w)) for r, c in cells]


def _software() -> dict[str, str]:
    import rasterio as rio

    return {
        "cropflow": cropflow_version(),
        "rasterio": rio.__version__,
        "gdal": rio.__gdal_version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


def _storage(plan: SensorPlan) -> dict:
    """How a sensor's values are stored: reflectance packed (`REFLECTANCE_PACKING`), SAR as float32 with NaN."""
    if plan.sensor.eo:
        return dict(REFLECTANCE_PACKING)
    return {"_FillValue": np.float32(np.nan), "fill_value": np.float32(np.nan)}


def _create_store(
    path: Path, grid: Grid, bins: list[date], bin_days: int, plans: dict[str, SensorPlan], chunk: int, attrs: dict
) -> None:
    """An empty cube store (metadata and coordinates only) following docs/architecture.md."""
    h, w = grid.shape
    t = len(bins)
    res = grid.resolution
    data_vars, coords = {}, {}
    for name, plan in plans.items():
        band_dim = "band" if name == "s2" else f"{name}_band"
        coords[band_dim] = np.array(plan.bands, dtype=object)
        c = len(plan.bands)
        data_vars[name] = (
            ("time", band_dim, "y", "x"),
            da.empty((t, c, h, w), chunks=(t, c, chunk, chunk), dtype=np.float32),
        )
        data_vars[f"{name}_valid"] = (
            ("time", "y", "x"),
            da.empty((t, h, w), chunks=(t, chunk, chunk), dtype=np.float32),
        )
    ds = xr.Dataset(
        data_vars,
        coords={
            **coords,
            "time": np.array(bins, dtype="datetime64[D]").astype("datetime64[ns]"),
            "doy": ("time", np.array([b.timetuple().tm_yday + bin_days // 2 for b in bins], dtype="int16")),
            "y": grid.bounds[3] - res * (np.arange(h) + 0.5),
            "x": grid.bounds[0] + res * (np.arange(w) + 0.5),
        },
        attrs=attrs,
    )
    encoding = {name: {**_storage(plan), "compressors": CUBE_COMPRESSORS} for name, plan in plans.items()} | {
        f"{name}_valid": {"_FillValue": None, "compressors": CUBE_COMPRESSORS} for name in plans
    }
    with warnings.catch_warnings():
        # consolidated metadata is a zarr-python convention for v3 stores; it spares readers one request per array
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(
            storage.zarr_store(path), zarr_format=3, mode="w", compute=False, consolidated=True, encoding=encoding
        )


def _write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (a reader sees the old file or the new one, never half of one)."""
    with storage.output_file(path) as tmp:
        tmp.write_text(json.dumps(obj))


def partial_path(out_path: Path) -> Path:
    """Where a build of `out_path` keeps its unfinished store and its record of completed blocks."""
    return out_path.with_name(f"{out_path.name}.partial")


@dataclass(frozen=True)
class CubeJob:
    """A prepared build: its grid, bins and sensor plans, and the unfinished store that block builders write into.

    Blocks are independent (each reads its own margin), so any set of them can be built by any process that sees
    the store, in any order: in one process (`build_cube`) or as tiles on Dask workers (`flows/cube.py`).
    """

    out_path: Path
    grid: Grid
    plans: dict[str, SensorPlan]
    blocks: list[Block]  # every block, in Z order
    done: frozenset[str]  # blocks completed by an earlier, interrupted build
    bad: dict[str, dict]  # assets those blocks found unreadable (not read again: they count as no-data)

    @property
    def partial(self) -> Path:
        return partial_path(self.out_path)

    @property
    def todo(self) -> list[Block]:
        return [b for b in self.blocks if b.name not in self.done]

    def tiles(self, n: int) -> list[list[Block]]:
        """The blocks still to build in at most `n` runs of neighbouring blocks (Z order keeps a run compact)."""
        todo = self.todo
        size = max(1, math.ceil(len(todo) / max(1, n)))
        return [todo[i : i + size] for i in range(0, len(todo), size)]


def prepare_cube(
    items_by_sensor: dict[str, list[dict]],
    epsg: int,
    bounds: Bounds,
    start: date,
    end: date,
    out_path: Path,
    resolution: float = 10.0,
    bin_days: int = 10,
    chunk: int = 256,
    attrs: dict | None = None,
    *,
    bands: dict[str, list[str]] | None = None,
    scl_dilation: int = 0,
    s1_orbit: str = "both",
    speckle_window: int = 5,
    s2_cloud_mask: str = "auto",
    block: int = 256,
    query: dict | None = None,
    catalog: Catalog | None = None,
) -> CubeJob:
    """Plan the cube of every sensor in `items_by_sensor` on one grid and create its unfinished store beside
    `out_path` (or find the one an interrupted build left: with the same arguments its completed blocks are kept,
    with others it starts over).

    `bounds` (in `epsg`) are snapped outward to `resolution`. Bins of `bin_days` from `start`; each sensor's
    `bands` (default: those every item has); S2 masks by SCL with cloud/shadow/cirrus grown by `scl_dilation`
    pixels, or by the spectral test (`tasks.cloudmask.spectral_mask`, grown alike) as `s2_cloud_mask` says: "auto"
    (SCL where an item has it, else the test), "scl" (items without SCL refused) or "spectral"; S1 of `s1_orbit`
    ("both", "ascending", "descending"), Lee-filtered over `speckle_window` pixels (0: none). Blocks of `block`
    pixels (a multiple of the `chunk` of the store); hrefs are signed for `catalog` right before each read
    (Planetary Computer tokens expire during long builds).
    """
    out_path = storage.location(out_path)
    grid = Grid(int(epsg), snap_bounds(bounds, resolution), float(resolution))
    bins = time_bins(start, end, bin_days)
    if not items_by_sensor:
        raise CropflowError("no sensors to build the cube from; give items for at least one sensor.")
    bands = bands or {}
    unknown = [s for s in bands if s not in items_by_sensor]
    if unknown:
        raise CropflowError(f"bands given for sensor(s) {unknown} without items; sensors: {list(items_by_sensor)}.")
    plans = {
        name: plan_sensor(
            name, items, bins, bin_days, bands.get(name), scl_dilation, s1_orbit, speckle_window, s2_cloud_mask
        )
        for name, items in items_by_sensor.items()
    }
    if catalog is not None and catalog.signing is not None:
        plans = {name: replace(plan, sign=partial(sign_href, catalog=catalog)) for name, plan in plans.items()}
    chunk = max(1, min(chunk, max(grid.shape)))
    block = max(chunk, block // chunk * chunk)
    options = {
        "scl_dilation": scl_dilation,
        "s1_orbit": s1_orbit,
        "speckle_window": speckle_window,
        "s2_cloud_mask": s2_cloud_mask,
    }
    spectral = [s.item_id for plan in plans.values() for s in plan.sources if s.spectral]
    items_per_bin = {
        name: [[s.item_id for s in plan.in_bin(b)] for b in range(len(bins))] for name, plan in plans.items()
    }
    store_attrs = {
        "crs": grid.crs,
        "transform": list(grid.transform)[:6],
        "resolution": grid.resolution,
        "bin_days": bin_days,
        "season": [start.isoformat(), end.isoformat()],
        "items": json.dumps({k: [s.item_id for s in p.sources] for k, p in plans.items()}),
        "items_per_bin": json.dumps(items_per_bin),
        "query": json.dumps(query or {}, default=str),
        "options": json.dumps(options),
        "spectral_masked_count": len(spectral),
        "spectral_masked_items": json.dumps(spectral),
        "software": json.dumps(_software()),
        "cropflow_version": cropflow_version(),
        **(attrs or {}),
    }
    params = {
        "grid": [grid.epsg, list(grid.bounds), grid.resolution],
        "bins": [start.isoformat(), end.isoformat(), bin_days],
        "sources": {k: [[s.item_id, *s.hrefs] for s in p.sources] for k, p in plans.items()},
        "bands": {k: p.bands for k, p in plans.items()},
        "layout": [chunk, block],
        "storage": {k: _storage(p) for k, p in plans.items()},
        "options": options,
        "attrs": store_attrs,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()

    partial = partial_path(out_path)
    record = partial / "params.json"
    if partial.exists() and (not record.exists() or json.loads(record.read_text()).get("digest") != digest):
        log.info("%s: parameters changed since the interrupted build; starting over", partial)
        atomic.remove(partial)
    if not record.exists():
        storage.make_folder(partial)
        _create_store(partial / "cube.zarr", grid, bins, bin_days, plans, chunk, store_attrs)
        storage.make_folder(partial / "blocks")
        _write_json(record, {"digest": digest})
    records = {p.stem: json.loads(p.read_text()) for p in (partial / "blocks").glob("*.json")}
    done, bad = frozenset(records), {k: v for rec in records.values() for k, v in rec["bad"].items()}
    # a chunk whose write was killed leaves a scratch file, named as zarr names them whether zarr or `infra.chunks`
    # wrote it; its block is redone
    if storage.is_local(partial):
        for scratch in (partial / "cube.zarr").rglob("*.partial"):
            scratch.unlink()
    job = CubeJob(out_path, grid, plans, blocks_of(grid.shape, block), done, bad)
    log.info("cube %s: %d of %d blocks to build", out_path.name, len(job.todo), len(job.blocks))
    return job


def _tiles_needed(job: CubeJob, blocks: list[Block]) -> Callable[[Raster, int], bool]:
    """`needed(src, i)`: whether a block after the `i`-th of `blocks`, or one of the job's other blocks still to
    build, reads any of the tiles `src` has cached (True as well when `src` is not on the grid's pixels, or its tiles
    lie outside the grid: another build's, in a process that runs several).

    GDAL's block cache is one LRU for all datasets. Tiles no block reads again (a 10 m band's, once the Z-order group
    of blocks that shares it is built) pushed out those that later blocks read again (the 20 m bands' margins): a
    2048 px build decoded 40 % more than its COGs hold; 14 % with the dead tiles dropped (measured)."""
    size = max(job.blocks[0].shape)
    order = np.full((math.ceil(job.grid.shape[0] / size), math.ceil(job.grid.shape[1] / size)), -1)
    for blk in job.todo:  # built by another call (another Dask tile): needed throughout this one
        order[blk.r0 // size, blk.c0 // size] = len(blocks)
    for j, blk in enumerate(blocks):
        order[blk.r0 // size, blk.c0 // size] = j
    halo = max(plan.halo for plan in job.plans.values())

    @functools.lru_cache(maxsize=1024)  # a build's assets share a few geometries: the bands of a resolution, alike
    def read_after(placed: tuple[int, tuple[int, int]], cached: tuple[int, ...], tile: tuple[int, int], i: int) -> bool:
        factor, (row, col) = placed
        reach = halo + (factor if factor > 1 else 0)  # how far around itself a block reads: upsampled, one more
        (t0, t1, u0, u1), (th, tw) = cached, tile
        r0, r1 = max((t0 * th * factor - row - reach) // size, 0), -(-(t1 * th * factor - row + reach) // size)
        c0, c1 = max((u0 * tw * factor - col - reach) // size, 0), -(-(u1 * tw * factor - col + reach) // size)
        later = order[r0:r1, c0:c1]
        return later.size == 0 or int(later.max()) > i

    def needed(src: Raster, i: int) -> bool:
        placed = _on_grid(src, job.grid)
        return placed is None or read_after(placed, src.cached, src.tile, i)

    return needed


def _write_block(array: zarr.Array, direct: chunks.DirectChunks | None, blk: Block, data: np.ndarray) -> None:
    """`data`, every time step (and band) of `blk`, into `array`: by `direct`, chunk by chunk (the array chunked whole
    along time and bands, `blk` on chunk edges, as `prepare_cube` makes them), else through zarr."""
    if direct is None:
        array[..., blk.r0 : blk.r1, blk.c0 : blk.c1] = data
        return
    rows, cols = array.chunks[-2:]
    for r in range(blk.r0 // rows, -(-blk.r1 // rows)):
        for c in range(blk.c0 // cols, -(-blk.c1 // cols)):
            part = data[..., r * rows - blk.r0 : (r + 1) * rows - blk.r0, c * cols - blk.c0 : (c + 1) * cols - blk.c0]
            direct.write((0,) * (array.ndim - 2) + (r, c), part)


def build_blocks(
    job: CubeJob,
    blocks: list[Block],
    threads: int | None = None,
    on_block: Callable[[Block], None] | None = None,
) -> None:
    """Build `blocks` of a prepared cube into its store, each recorded once written (so a rerun skips it).

    `threads` read and composite a block's scenes (GDAL releases the GIL); the bins of the next block are queued
    behind those of the block being built, so the readers never wait for a block's last bin, and each block is
    written in the background while the next ones are read. `on_block` is called after each completed block. The
    assets stay open (with their decoded tiles) in the process's pool for the next call, e.g. the next tile on a Dask
    worker: whoever runs the build closes them at its end (`close_datasets`).
    """
    done_dir = job.partial / "blocks"
    group = zarr.open_group(storage.zarr_store(job.partial / "cube.zarr"), mode="r+", zarr_format=3)
    bad = BadAssets(job.bad)
    # buffers per sensor (values as stored, fractions), one pair per block in flight: two blocks are being built (the
    # last bins of one, the first of the next) while those before them wait for the writer (so the readers wait for it
    # only when it falls more than `WRITES_QUEUED` blocks behind); on small pages (`infra.memory`), as the scratch
    largest = max(math.prod(b.shape) for b in blocks) if blocks else 0
    buffers = {
        n: [
            (
                memory.empty(p.n_bins * len(p.bands) * largest, _storage(p).get("dtype", np.float32)),  # packed, or not
                memory.empty(p.n_bins * largest, np.float32),
            )
            for _ in range(WRITES_QUEUED + 2)
        ]
        for n, p in job.plans.items()
    }

    failed = threading.Event()  # set by a write that failed: the writes queued after it are skipped
    # cube chunks are rarely all no-data: writing every one spares comparing each with the fill value
    arrays = {
        n: group[n].with_config({"write_empty_chunks": True}) for name in job.plans for n in (name, f"{name}_valid")
    }

    def whole_chunks(array: zarr.Array) -> bool:  # chunked whole along time and bands, blocks on chunk edges
        rows, cols = array.chunks[-2:]
        return array.chunks[:-2] == array.shape[:-2] and all(b.r0 % rows == b.c0 % cols == 0 for b in blocks)

    # in a local store, whole chunks go straight to their files, past the page cache (`infra.chunks`)
    direct = {n: chunks.direct_chunks(a) if whole_chunks(a) else None for n, a in arrays.items()}

    def write(
        blk: Block,
        composites: dict[str, tuple[np.ndarray, np.ndarray]],
        clipped: dict[str, int],
        new_bad: dict[str, dict],
    ) -> None:
        """Write a block's composites, then its record (so a resumed build never skips an unwritten block); nothing
        once a write before it failed."""
        if failed.is_set():
            return
        try:
            for name, (values, fraction) in composites.items():
                _write_block(arrays[name], direct[name], blk, values)
                _write_block(arrays[f"{name}_valid"], direct[f"{name}_valid"], blk, fraction)
            valid_sum = {name: float(fraction.sum(dtype=np.float64)) for name, (_, fraction) in composites.items()}
            _write_json(done_dir / f"{blk.name}.json", {"bad": new_bad, "valid_sum": valid_sum, "clipped": clipped})
            if on_block is not None:
                on_block(blk)
        except BaseException:
            failed.set()
            raise

    needed = _tiles_needed(job, blocks)
    readers = threads or min(16, 2 * (os.cpu_count() or 1))
    with (
        gdal_env({"GDAL_CACHEMAX": GDAL_CACHE_BYTES}),
        ThreadPoolExecutor(readers, thread_name_prefix="cube-read") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="cube-write") as writer,
    ):
        pending: deque[Future] = deque()

        def finish(i: int, blk: Block, bins: dict[str, list[Future[int]]], composites: dict, before: set) -> None:
            """Once the bins of the `i`-th block are built: queue its write, and drop the tiles no later block reads
            (from the idle datasets: none is read meanwhile)."""
            counts = {name: sum(f.result() for f in futures) for name, futures in bins.items()}  # every bin built
            clipped = {name: n for name, n in counts.items() if job.plans[name].sensor.eo}  # of the packed sensors
            new_bad = {k: bad.found[k] for k in set(bad.found) - before}  # (maybe some the next block found: kept)
            pending.append(writer.submit(write, blk, composites, clipped, new_bad))
            DATASETS.drop_cached(partial(needed, i=i))

        building = None  # the block whose bins are queued, and what `finish` needs of it
        for i, blk in enumerate(blocks):
            # a failed write stops the build at the next block; the oldest block's buffers are those this one fills
            while pending and (pending[0].done() or len(pending) > WRITES_QUEUED):
                pending.popleft().result()
            before = set(bad.found)
            h, w = blk.shape
            composites, bins = {}, {}
            for name, plan in job.plans.items():
                values, fraction = buffers[name][i % len(buffers[name])]
                values = values[: plan.n_bins * len(plan.bands) * h * w].reshape(plan.n_bins, len(plan.bands), h, w)
                fraction = fraction[: plan.n_bins * h * w].reshape(plan.n_bins, h, w)
                bins[name] = composite_block(plan, job.grid, blk, pool, bad, DATASETS, values, fraction)
                composites[name] = values, fraction
            if building is not None:
                finish(*building)
            building = i, blk, bins, composites, before
        if building is not None:
            finish(*building)
        for future in pending:
            future.result()


def _valid_fraction(job: CubeJob, records: dict[str, dict], group: zarr.Group) -> dict[str, float]:
    """Mean of each sensor's `<sensor>_valid` over the whole cube, from the sums the block records hold (a block
    recorded by an older build without them is summed from the store)."""
    totals = dict.fromkeys(job.plans, 0.0)
    for blk in job.blocks:  # in Z order, whichever process recorded them: the same sums for the same cube
        record = records[blk.name]
        for sensor in job.plans:
            if sensor in record.get("valid_sum", {}):
                totals[sensor] += record["valid_sum"][sensor]
            else:
                window = group[f"{sensor}_valid"][:, blk.r0 : blk.r1, blk.c0 : blk.c1]
                totals[sensor] += float(np.asarray(window).sum(dtype=np.float64))
    return {sensor: total / math.prod(group[f"{sensor}_valid"].shape) for sensor, total in totals.items()}


def publish_cube(job: CubeJob) -> Path:
    """Publish a cube whose blocks are all built: record unreadable assets in its attrs, then move it into place."""
    store, done_dir = job.partial / "cube.zarr", job.partial / "blocks"
    records = {p.stem: json.loads(p.read_text()) for p in done_dir.glob("*.json")}
    missing = [b.name for b in job.blocks if b.name not in records]
    if missing:
        raise CropflowError(
            f"cube {job.out_path}: {len(missing)} block(s) not built yet ({missing[:3]}...); build them first."
        )
    found = {k: v for rec in records.values() for k, v in rec["bad"].items()}
    bad_list = sorted(found.values(), key=lambda r: (r["item"], r["asset"]))
    if bad_list:
        log.warning(
            "cube %s: %d unreadable asset(s) counted as no-data: %s", job.out_path.name, len(bad_list), bad_list
        )
    clipped = {name: sum(rec.get("clipped", {}).get(name, 0) for rec in records.values()) for name in job.plans}
    if any(clipped.values()):
        log.warning(
            "cube %s: reflectance values beyond what the cube stores (%.1f to %.4f), clipped to it: %s",
            job.out_path.name,
            *PACKED_RANGE,
            clipped,
        )
    group = zarr.open_group(storage.zarr_store(store), mode="r+", zarr_format=3)
    group.attrs.update(
        {
            "clipped_values": json.dumps(clipped),
            "bad_assets": json.dumps(bad_list),
            "bad_asset_count": len(bad_list),
            "bad_scene_count": len({r["item"] for r in bad_list}),
            "valid_fraction": json.dumps(_valid_fraction(job, records, group)),
        }
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(storage.zarr_store(store), zarr_format=3)
    atomic.publish(store, job.out_path)
    atomic.remove(job.partial)
    log.info("cube written to %s", job.out_path)
    return job.out_path


def build_cube(
    items_by_sensor: dict[str, list[dict]],
    *args: Any,
    threads: int | None = None,
    on_block: Callable[[Block], None] | None = None,
    **options: Any,
) -> Path:
    """Build the cube of every sensor in `items_by_sensor` in this process and publish it atomically: `prepare_cube`
    (same arguments), then every block with `threads` readers (`on_block` called after each), then `publish_cube`.
    A rerun with the same arguments resumes an interrupted build; with other arguments it starts over."""
    job = prepare_cube(items_by_sensor, *args, **options)
    try:
        build_blocks(job, job.todo, threads, on_block)
    finally:
        close_datasets()
    return publish_cube(job)


def fill_cube_gaps(cube_path: Path, out_path: Path) -> Path:
    """A copy of the cube whose sensor variables have their NaN gaps filled linearly in time (per pixel and band).

    The `*_valid` fractions are copied unchanged, so models still see which bins were observed; the store's attrs
    gain `gap_filled: true`. Written chunk by chunk (all time steps of a spatial chunk at once), atomically.
    """
    ds = storage.open_zarr(cube_path)
    sensors = [name for name in ds.data_vars if f"{name}_valid" in ds.data_vars]
    filled = ds.copy()
    for name in sensors:
        var = ds[name]
        if var.dims[0] != "time" or var.chunks is None or len(var.chunks[0]) != 1:
            raise CropflowError(f"{cube_path}: {name} must be chunked with all time steps together to fill gaps.")
        filled[name] = var.copy(data=var.data.map_blocks(fill_time_gaps, dtype=np.float32))
    filled.attrs = {**ds.attrs, "gap_filled": True}
    for var in filled.variables.values():
        packing = REFLECTANCE_PACKING if "scale_factor" in var.encoding else {}  # packed as the cube was
        var.encoding = {k: v for k, v in var.encoding.items() if k in ("chunks", "_FillValue", "fill_value")} | packing
    with storage.output_store(out_path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        filled.to_zarr(tmp, zarr_format=3, mode="w", consolidated=True)
    return storage.location(out_path)


@task(name="fill-cube-gaps")
def fill_cube_gaps_task(cube_path: Path, out_path: Path) -> Path:
    return fill_cube_gaps(cube_path, out_path)


prepare_cube_task = task(name="prepare-cube", cache_policy=NO_CACHE)(prepare_cube)


@task(name="build-cube-tile", cache_policy=NO_CACHE, retries=1)
def build_cube_tile_task(job: CubeJob, tile: list[Block], threads: int = 1) -> int:
    """Build one tile (a run of neighbouring blocks) of a prepared cube; the number of blocks built."""
    build_blocks(job, tile, threads)
    return len(tile)


publish_cube_task = task(name="publish-cube", cache_policy=NO_CACHE)(publish_cube)
