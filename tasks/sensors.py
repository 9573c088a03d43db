"""What each sensor contributes to a cube: its collection, assets, how pixels are masked and scaled.

Band names are harmonised to Sentinel-2 names so optical sensors can be compared and combined.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import xarray as xr
from rasterio.enums import Resampling

from infra.errors import CropflowError

# Sentinel-2 scene classification codes that are not clear land/water observations:
# 0 no data, 1 saturated/defective, 3 cloud shadow, 8 cloud medium probability, 9 cloud high probability,
# 10 thin cirrus, 11 snow/ice.
SCL_INVALID = (0, 1, 3, 8, 9, 10, 11)
# Landsat Collection 2 QA_PIXEL bits that invalidate a pixel: fill, dilated cloud, cirrus, cloud, shadow, snow.
QA_PIXEL_INVALID_BITS = (0, 1, 2, 3, 4, 5)
Pixels = TypeVar("Pixels", np.ndarray, xr.DataArray)


def scl_valid(scl: Pixels) -> Pixels:
    """True where the Sentinel-2 SCL code is a clear observation (numpy, or xarray and lazy with dask)."""
    return ~scl.isin(SCL_INVALID) if isinstance(scl, xr.DataArray) else ~np.isin(scl, SCL_INVALID)


def qa_pixel_valid(qa: Pixels) -> Pixels:
    """True where no invalidating Landsat C2 QA_PIXEL bit is set."""
    mask = sum(1 << b for b in QA_PIXEL_INVALID_BITS)
    return (qa.astype("uint16") & mask) == 0


def positive_valid(values: xr.DataArray) -> xr.DataArray:
    """True where every band is a finite, positive backscatter value (SAR border noise and no-data are 0/NaN)."""
    return (values > 0).all("band")


@dataclass(frozen=True)
class AssetKeys:
    """How one catalog names a sensor's assets: its key for each harmonised band (`bands`: key -> band), and `mask`."""

    bands: dict[str, str]
    mask: str | None = None


@dataclass(frozen=True)
class Sensor:
    """How to turn one collection into a masked, scaled stack.

    `assets` maps asset keys to harmonised band names (keys as on Planetary Computer and the local STAC API; search
    results from catalogs naming them otherwise, see `asset_schemes`, are renamed to these). `mask_asset`
    (optional) is read with nearest resampling and turned into a validity mask by `mask_fn`; without it, `mask_fn`
    gets the data itself. `eo`: reflectance, composited by the median and stored packed; else SAR backscatter,
    averaged in linear power and stored in decibels.
    """

    name: str
    collection: str
    assets: dict[str, str]
    mask_fn: Callable[[Pixels], Pixels]
    mask_asset: str | None = None
    mask_dtype: str = "uint8"
    eo: bool = True
    properties: tuple[str, ...] = field(default=())
    asset_schemes: dict[str, AssetKeys] = field(default_factory=dict)

    @property
    def bands(self) -> list[str]:
        return list(self.assets.values())

    def asset_keys(self, scheme: str | None = None) -> AssetKeys:
        """The asset keys of some catalogs' naming `scheme` (e.g. "earth-search"); None: `assets`, `mask_asset`."""
        if scheme is None:
            return AssetKeys(dict(self.assets), self.mask_asset)
        if scheme not in self.asset_schemes:
            known = ", ".join(self.asset_schemes) or "none"
            raise CropflowError(
                f"sensor {self.name!r} has no asset-key scheme {scheme!r} (known: {known}); give the catalog's "
                "asset keys as a mapping 'asset key: band name' instead."
            )
        return self.asset_schemes[scheme]

    @property
    def resampling(self) -> Resampling:
        return Resampling.bilinear


S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
# Earth Search v1 names Sentinel-2 assets by common name.
EARTH_SEARCH_S2 = AssetKeys(
    bands={
        "blue": "B02",
        "green": "B03",
        "red": "B04",
        "rededge1": "B05",
        "rededge2": "B06",
        "rededge3": "B07",
        "nir": "B08",
        "nir08": "B8A",
        "swir16": "B11",
        "swir22": "B12",
    },
    mask="scl",
)
# Item properties set by catalogs that removed the Sentinel-2 BOA offset from the pixels (Earth Search v1, v0).
BOA_OFFSET_APPLIED = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")
# Landsat Collection 2 Level-2 surface reflectance: reflectance = DN x 0.0000275 - 0.2.
LANDSAT_C2_SR_SCALE_OFFSET = (2.75e-5, -0.2)

SENSORS: dict[str, Sensor] = {
    "s2": Sensor(
        name="s2",
        collection="sentinel-2-l2a",
        assets={b: b for b in S2_BANDS},
        mask_asset="SCL",
        mask_fn=scl_valid,
        properties=("s2:processing_baseline",),
        asset_schemes={"earth-search": EARTH_SEARCH_S2},
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
        eo=False,
    ),
}


def get_sensor(name: str) -> Sensor:
    """The sensor called `name`, or a message listing the valid names."""
    try:
        return SENSORS[name]
    except KeyError:
        raise ValueError(f"unknown sensor {name!r}; valid sensors: {', '.join(SENSORS)}") from None


def s2_processing_baseline(item: dict) -> float:
    """A Sentinel-2 item's processing baseline (5.1 for "05.10"): its property, else the `_Nxxyy_` of its product id.

    0.0 when unknown.
    """
    props = item["properties"]
    for key in ("s2:processing_baseline", "sentinel:processing_baseline"):
        if props.get(key) is not None:
            return float(props[key])
    for key in ("s2:product_uri", "sentinel:product_id"):
        found = re.search(r"_N(\d{2})(\d{2})_", str(props.get(key, "")))
        if found:
            return float(f"{found[1]}.{found[2]}")
    return 0.0


def scale_offset(items: list[dict], assets: list[str], sensor: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-item, per-asset `(scale, offset)` turning stored values into physical ones, shape `(T, C)`.

    Taken from each asset's `raster:bands`. Without it, Sentinel-2 assets hold raw digital numbers:
    reflectance = DN / 10000, minus 0.1 from processing baseline 04.00 on (the BOA_ADD_OFFSET of -1000
    that ESA introduced in January 2022), and Landsat C2 L2 assets are DN x 0.0000275 - 0.2. Sentinel-2 items
    whose catalog already removed the offset from the pixels (`earthsearch:boa_offset_applied`) get no offset,
    whatever their `raster:bands` say.
    """
    scale = np.ones((len(items), len(assets)), dtype="float64")
    offset = np.zeros((len(items), len(assets)), dtype="float64")
    for i, item in enumerate(items):
        applied = sensor == "s2" and any(item["properties"].get(k) is True for k in BOA_OFFSET_APPLIED)
        for j, key in enumerate(assets):
            bands = item["assets"].get(key, {}).get("raster:bands") or [{}]
            if "scale" in bands[0] or "offset" in bands[0]:
                scale[i, j] = bands[0].get("scale", 1.0)
                offset[i, j] = bands[0].get("offset", 0.0)
            elif sensor == "s2":
                scale[i, j] = 1e-4
                offset[i, j] = -0.1 if s2_processing_baseline(item) >= 4.0 else 0.0
            elif sensor == "landsat":
                scale[i, j], offset[i, j] = LANDSAT_C2_SR_SCALE_OFFSET
            if applied:
                offset[i, j] = 0.0
    return scale, offset
