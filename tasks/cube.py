"""Build cloud-masked, temporally regular datacubes from STAC items with stackstac, and store them in Zarr v3.

Steps (each a plain function): `load_sensor` (stackstac -> masked, scaled stack) -> `composite_bins`
(fixed bins of `bin_days`, median or mean of valid observations, plus a per-bin validity fraction) ->
`build_cube` (all sensors on one grid, written atomically to Zarr).
"""

from __future__ import annotations

import json
import logging
import warnings
from datetime import date, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dask
import numpy as np
import stackstac
import xarray as xr
from prefect import task
from rasterio.enums import Resampling

from infra.atomic import atomic_path
from infra.errors import CropflowError
from tasks.sensors import Sensor, get_sensor, scale_offset

log = logging.getLogger(__name__)

Bounds = tuple[float, float, float, float]


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


def load_sensor(
    items: list[dict],
    sensor: Sensor,
    epsg: int,
    bounds: Bounds,
    resolution: float,
    chunk: int = 1024,
) -> tuple[xr.DataArray, xr.DataArray]:
    """Masked, scaled `(time, band, y, x)` float32 stack (NaN = invalid) and its `(time, y, x)` validity.

    Reflectance is read with bilinear resampling; mask assets (SCL, QA_PIXEL) with nearest. Source no-data
    pixels become NaN, then `raster:bands` scale/offset are applied per item and band.
    """
    common = {
        "epsg": epsg,
        "bounds": bounds,
        "resolution": resolution,
        "chunksize": chunk,
        "xy_coords": "center",
        "properties": False,
        "band_coords": False,
        "snap_bounds": False,
    }
    values = stackstac.stack(
        items,
        assets=list(sensor.assets),
        resampling=Resampling.bilinear,
        dtype=np.dtype("float32"),
        fill_value=np.float32(np.nan),
        rescale=False,  # stackstac refuses float32 with scales like 0.0001; applied below per item and band
        **common,
    )
    scale, offset = scale_offset(items, list(sensor.assets), sensor.name)
    values = values.assign_coords(band=sensor.bands)
    values = values * xr.DataArray(scale.astype("float32"), dims=("time", "band")) + xr.DataArray(
        offset.astype("float32"), dims=("time", "band")
    )
    if sensor.mask_asset:
        mask_raw = stackstac.stack(
            items,
            assets=[sensor.mask_asset],
            resampling=Resampling.nearest,
            dtype=np.dtype(sensor.mask_dtype),
            fill_value=np.array(0, dtype=sensor.mask_dtype)[()],
            rescale=False,
            **common,
        ).isel(band=0, drop=True)
        valid = sensor.mask_fn(mask_raw)
    else:
        valid = sensor.mask_fn(values)
    valid = valid & values.notnull().all("band")
    return values.where(valid).astype("float32"), valid


def composite_bins(
    values: xr.DataArray, valid: xr.DataArray, bins: list[date], bin_days: int, method: str = "median"
) -> tuple[xr.DataArray, xr.DataArray]:
    """Per-bin composite `(time, band, y, x)` of valid observations and the fraction of valid acquisitions.

    Bins without acquisitions are all-NaN with validity 0; models see the gaps through the validity.
    """
    times = values["time"].values.astype("datetime64[D]")
    starts = np.array(bins, dtype="datetime64[D]")
    index = ((times - starts[0]).astype(int) // bin_days).astype(int)
    values = values.chunk({"time": -1})
    composites, fractions = [], []
    empty = xr.full_like(values.isel(time=0, drop=True), np.nan)
    for b in range(len(bins)):
        sel = np.flatnonzero(index == b)
        if sel.size == 0:
            composites.append(empty)
            fractions.append(xr.zeros_like(valid.isel(time=0, drop=True), dtype="float32"))
            continue
        group = values.isel(time=sel)
        reduced = group.median("time", skipna=True) if method == "median" else group.mean("time", skipna=True)
        composites.append(reduced)
        fractions.append(valid.isel(time=sel).mean("time").astype("float32"))
    time = xr.DataArray(starts.astype("datetime64[ns]"), dims="time")
    return (
        xr.concat(composites, dim=time).astype("float32"),
        xr.concat(fractions, dim=time).astype("float32"),
    )


def build_cube(
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
) -> Path:
    """Build the cube of every sensor in `items_by_sensor` on one grid and write it atomically to Zarr v3."""
    bins = time_bins(start, end, bin_days)
    xmin, ymin, xmax, ymax = bounds
    if not (xmax > xmin and ymax > ymin):
        raise CropflowError(f"cube bounds {bounds} are empty or inverted; expected xmin < xmax and ymin < ymax.")
    data_vars: dict[str, xr.DataArray] = {}
    for name, items in items_by_sensor.items():
        if not items:
            raise CropflowError(f"no {name} items to build the cube from; widen the season or the region.")
        sensor = get_sensor(name)
        values, valid = load_sensor(items, sensor, epsg, bounds, resolution)
        binned, fraction = composite_bins(values, valid, bins, bin_days, sensor.composite)
        if sensor.composite == "mean":  # SAR: average in linear power, then decibels
            binned = (10 * np.log10(binned)).astype("float32")
        data_vars[name] = binned.rename(band=f"{name}_band") if name != "s2" else binned
        data_vars[f"{name}_valid"] = fraction
    ds = xr.Dataset(data_vars).drop_vars(["epsg"], errors="ignore")
    ds = ds.assign_coords(
        {dim: ds[dim].values.astype(object) for dim in ds.dims if dim.endswith("band")}  # vlen strings in Zarr
    ).assign_coords(
        doy=("time", np.array([b.timetuple().tm_yday + bin_days // 2 for b in bins], dtype="int16")),
        x=ds["x"].values.astype("float64"),
        y=ds["y"].values.astype("float64"),
    )
    x0, y0 = float(ds["x"][0]) - resolution / 2, float(ds["y"][0]) + resolution / 2
    ds.attrs = {
        "crs": f"EPSG:{epsg}",
        "transform": [resolution, 0.0, x0, 0.0, -resolution, y0],
        "resolution": resolution,
        "bin_days": bin_days,
        "season": [start.isoformat(), end.isoformat()],
        "items": json.dumps({k: [it["id"] for it in v] for k, v in items_by_sensor.items()}),
        "cropflow_version": cropflow_version(),
        **(attrs or {}),
    }
    chunks = {d: -1 for d in ds.dims} | {"y": chunk, "x": chunk}
    ds = ds.chunk(chunks)
    for var in ds.variables.values():  # stackstac attrs (RasterSpec, ...) are not JSON: keep only ours
        var.encoding, var.attrs = {}, {}
    with atomic_path(out_path) as tmp, dask.config.set(scheduler="threads"), warnings.catch_warnings():
        # consolidated metadata is a zarr-python convention for v3 stores; it spares readers one request per array
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(tmp, zarr_format=3, mode="w", consolidated=True)
    log.info("cube written to %s", out_path)
    return out_path


@task(name="build-cube")
def build_cube_task(
    items_by_sensor: dict[str, list[dict]],
    epsg: int,
    bounds: Bounds,
    start: date,
    end: date,
    out_path: Path,
    resolution: float = 10.0,
    bin_days: int = 10,
    attrs: dict | None = None,
) -> Path:
    return build_cube(items_by_sensor, epsg, bounds, start, end, out_path, resolution, bin_days, attrs=attrs)
