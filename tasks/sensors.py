"""What each sensor contributes to a cube: its collection, assets, how pixels are masked and scaled.

Band names are harmonised to Sentinel-2 names so optical sensors can be compared and combined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from rasterio.enums import Resampling

# Sentinel-2 scene classification codes that are not clear land/water observations:
# 0 no data, 1 saturated/defective, 3 cloud shadow, 8 cloud medium probability, 9 cloud high probability,
# 10 thin cirrus, 11 snow/ice.
SCL_INVALID = (0, 1, 3, 8, 9, 10, 11)
# Landsat Collection 2 QA_PIXEL bits that invalidate a pixel: fill, dilated cloud, cirrus, cloud, shadow, snow.
QA_PIXEL_INVALID_BITS = (0, 1, 2, 3, 4, 5)


def scl_valid(scl: xr.DataArray) -> xr.DataArray:
    """True where the Sentinel-2 SCL code is a clear observation."""
    return ~scl.isin(SCL_INVALID)


def qa_pixel_valid(qa: xr.DataArray) -> xr.DataArray:
    """True where no invalidating Landsat C2 QA_PIXEL bit is set."""
    mask = sum(1 << b for b in QA_PIXEL_INVALID_BITS)
    return (qa.astype("uint16") & mask) == 0


def positive_valid(values: xr.DataArray) -> xr.DataArray:
    """True where every band is a finite, positive backscatter value (SAR border noise and no-data are 0/NaN)."""
    return (values > 0).all("band")


@dataclass(frozen=True)
class Sensor:
    """How to turn one collection into a masked, scaled stack.

    `assets` maps catalog asset keys to harmonised band names. `mask_asset` (optional) is read with nearest
    resampling and turned into a validity mask by `mask_fn`; without it, `mask_fn` gets the data itself.
    """

    name: str
    collection: str
    assets: dict[str, str]
    mask_fn: Callable[[xr.DataArray], xr.DataArray]
    mask_asset: str | None = None
    mask_dtype: str = "uint8"
    composite: str = "median"
    eo: bool = True
    properties: tuple[str, ...] = field(default=())

    @property
    def bands(self) -> list[str]:
        return list(self.assets.values())

    @property
    def resampling(self) -> Resampling:
        return Resampling.bilinear


S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

SENSORS: dict[str, Sensor] = {
    "s2": Sensor(
        name="s2",
        collection="sentinel-2-l2a",
        assets={b: b for b in S2_BANDS},
        mask_asset="SCL",
        mask_fn=scl_valid,
        properties=("s2:processing_baseline",),
    ),
    "landsat": Sensor(
        name="landsat",
        collection="landsat-c2-l2",
        assets={"blue": "B02", "green": "B03", "red": "B04", "nir08": "B08", "swir16": "B11", "swir22": "B12"},
        mask_asset="qa_pixel",
        mask_dtype="uint16",
        mask_fn=qa_pixel_valid,
    ),
    "s1": Sensor(
        name="s1",
        collection="sentinel-1-rtc",
        assets={"vv": "VV", "vh": "VH"},
        mask_fn=positive_valid,
        composite="mean",
        eo=False,
    ),
}


def get_sensor(name: str) -> Sensor:
    """The sensor called `name`, or a message listing the valid names."""
    try:
        return SENSORS[name]
    except KeyError:
        raise ValueError(f"unknown sensor {name!r}; valid sensors: {', '.join(SENSORS)}") from None


def scale_offset(items: list[dict], assets: list[str], sensor: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-item, per-asset `(scale, offset)` turning stored values into physical ones, shape `(T, C)`.

    Taken from each asset's `raster:bands`. Sentinel-2 assets without it hold raw digital numbers:
    reflectance = DN / 10000, minus 0.1 from processing baseline 04.00 on (the BOA_ADD_OFFSET of -1000
    that ESA introduced in January 2022) unless the catalog already removed it.
    """
    scale = np.ones((len(items), len(assets)), dtype="float64")
    offset = np.zeros((len(items), len(assets)), dtype="float64")
    for i, item in enumerate(items):
        for j, key in enumerate(assets):
            bands = item["assets"].get(key, {}).get("raster:bands") or [{}]
            if "scale" in bands[0] or "offset" in bands[0]:
                scale[i, j] = bands[0].get("scale", 1.0)
                offset[i, j] = bands[0].get("offset", 0.0)
            elif sensor == "s2":
                scale[i, j] = 1e-4
                baseline = str(item["properties"].get("s2:processing_baseline", "00.00"))
                offset[i, j] = -0.1 if float(baseline) >= 4.0 else 0.0
    return scale, offset
