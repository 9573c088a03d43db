"""Import real WorldCereal training patches (netCDF) as COGs and Planetary-Computer-like STAC items.

A patch folder holds one netCDF file per product (`S2_L2A_10m_*.nc`, `S2_L2A_20m_*.nc`,
`S1_GRD-ASCENDING_20m_*.nc`, `L8_SR_10m_*.nc`, `L8_L2-ST_10m_*.nc`, ...), dimensions `timestamp`, `y`, `x`, file
attributes `epsg`, `bounds` and `resolution`. `import_patch` writes, per patch, the layout of a sample region
(`region.json`, `collections/<id>.json`, `items/<id>.ndjson`, `cogs/...` with absolute `file://` hrefs) so that
`infra.stac_api.load` serves it and `tasks.cube.build_cube` reads it with the standard sensor definitions:

- `sentinel-2-l2a`: 10 m B02 B03 B04 B08 (when the patch has them), 20 m B05 B06 B07 B8A B11 B12 and SCL, uint16
  reflectance x 10000 as stored, `raster:bands` scale 0.0001 and offset 0 (these acquisitions predate processing
  baseline 04.00, so they carry no -1000 offset; the items say so with their baseline).
- `sentinel-1-rtc`: VV and VH converted from int32 dB x 10000 to float32 linear power, no-data -32768.
- `landsat-c2-l2`: Landsat 8 surface reflectance of `L8_SR` (Collection 1, int16 x 10000, stored in the netCDF as
  uint16, so negative reflectance reads as values near 65535: reinterpreted as int16) as blue green red nir08
  swir16 swir22, with the Collection 2 `QA-PIXEL` of `L8_L2-ST` as `qa_pixel`, for the days both files have.

Source fill values (0) are the COGs' no-data values. Item ids carry the patch's location id, so patches whose
acquisitions coincide can share one catalog.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine

from infra.atomic import atomic_path
from infra.errors import CropflowError
from tasks import sample_stac as st
from tasks.sample_region import AssetWriter, write_collection

log = logging.getLogger(__name__)

S2_10M_BANDS = ("B02", "B03", "B04", "B08")
S2_20M_BANDS = ("B05", "B06", "B07", "B8A", "B11", "B12")
# Every acquisition of these patches (2017-2019) predates baseline 04.00 (January 2022), which added the -1000
# offset; the files do not record the exact baseline, so the items carry the last one without the offset.
S2_BASELINE = "03.01"
# Landsat 8 band numbers of the L8_SR file -> Planetary Computer landsat-c2-l2 asset keys.
LANDSAT_ASSETS = {"B02": "blue", "B03": "green", "B04": "red", "B05": "nir08", "B06": "swir16", "B07": "swir22"}
LANDSAT_SR_SCALE = 0.0001  # Collection 1 surface reflectance
QA_PIXEL_CLOUD_BITS = (1 << 1) | (1 << 2) | (1 << 3)  # dilated cloud, cirrus, cloud

PROVIDERS = [
    {"name": "ESA", "roles": ["producer", "licensor"], "url": "https://sentinel.esa.int"},
    {"name": "USGS", "roles": ["producer", "licensor"], "url": "https://www.usgs.gov/landsat-missions"},
    {
        "name": "WorldCereal",
        "roles": ["processor"],
        "url": "https://github.com/WorldCereal/worldcereal-classification",
    },
    {"name": "cropflow", "roles": ["processor", "host"]},
]
_META = {"license": "various", "keywords": ["WorldCereal", "Belgium", "Satellite"], "providers": PROVIDERS}
COLLECTIONS = {
    "sentinel-2-l2a": {
        **_META,
        "title": "Sentinel-2 Level-2A (WorldCereal patches)",
        "description": "Real Sentinel-2 L2A surface reflectance and scene classification (SCL) of WorldCereal "
        "training patches, as cloud-optimized GeoTIFFs at 10 and 20 m.",
        "extensions": ["item_assets", "eo", "raster"],
        "summaries": {"instruments": ["msi"], "constellation": ["Sentinel 2"], "gsd": [10, 20]},
    },
    "sentinel-1-rtc": {
        **_META,
        "title": "Sentinel-1 GRD backscatter (WorldCereal patches)",
        "description": "Real Sentinel-1 IW GRD ascending backscatter (VV, VH) of WorldCereal training patches, "
        "as linear power in cloud-optimized GeoTIFFs at 20 m.",
        "extensions": ["item_assets", "sar", "sat", "raster"],
        "summaries": {
            "constellation": ["Sentinel-1"],
            "sar:polarizations": ["VV", "VH"],
            "sat:orbit_state": ["ascending"],
        },
    },
    "landsat-c2-l2": {
        **_META,
        "title": "Landsat 8 surface reflectance (WorldCereal patches)",
        "description": "Real Landsat 8 surface reflectance with the Collection 2 QA_PIXEL band of WorldCereal "
        "training patches, resampled to 10 m, as cloud-optimized GeoTIFFs.",
        "extensions": ["item_assets", "eo", "raster"],
        "summaries": {"platform": ["landsat-8"], "instruments": ["oli", "tirs"], "gsd": [10]},
    },
}


@dataclass(frozen=True)
class Patch:
    """An imported patch: its folder, grid (`epsg`, `bounds` in metres), season and item count per collection."""

    location_id: str
    folder: Path
    epsg: int
    bounds: tuple[float, float, float, float]
    season: tuple[str, str]
    counts: dict[str, int]


def open_product(patch_dir: Path, product: str) -> xr.Dataset | None:
    """The patch's `<product>_*.nc` read into memory without decoding (fill 0), or None when it has none."""
    paths = sorted(Path(patch_dir).glob(f"{product}_*.nc"))
    if len(paths) > 1:
        raise CropflowError(
            f"{patch_dir} has {len(paths)} {product} files ({', '.join(p.name for p in paths)}); expected at most one."
        )
    if not paths:
        return None
    with xr.open_dataset(paths[0], mask_and_scale=False) as ds:
        return ds.load()


def product_grid(ds: xr.Dataset) -> tuple[int, st.Grid]:
    """EPSG code and grid of a product from its `epsg`, `bounds` and `resolution` attributes, checked against x/y."""
    epsg = int(ds.attrs["epsg"])
    bounds = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", str(ds.attrs["bounds"]))]
    resolution = float(ds.attrs["resolution"])
    xmin, ymin, xmax, ymax = bounds
    grid = st.Grid((ds.sizes["y"], ds.sizes["x"]), Affine(resolution, 0.0, xmin, 0.0, -resolution, ymax))
    x_centres = xmin + resolution * (np.arange(ds.sizes["x"]) + 0.5)
    y_centres = ymax - resolution * (np.arange(ds.sizes["y"]) + 0.5)
    if grid.bounds != (xmin, ymin, xmax, ymax) or not (
        np.allclose(ds["x"].values, x_centres) and np.allclose(ds["y"].values, y_centres)
    ):
        raise CropflowError(f"{ds.attrs.get('name')}: bounds {bounds} at {resolution} m do not match its x/y pixels.")
    return epsg, grid


def acquisition_times(ds: xr.Dataset) -> list[datetime]:
    """Acquisition times (UTC) from the `timestamp` coordinate (datetimes, or dates as strings)."""
    return list(pd.DatetimeIndex(pd.to_datetime(ds["timestamp"].values)).to_pydatetime())


def _s2_items(s10: xr.Dataset | None, s20: xr.Dataset, writer: AssetWriter, patch: str, epsg: int) -> list[dict]:
    """One item per acquisition: 10 m bands when the patch has them, 20 m bands and SCL."""
    if s10 is not None and not np.array_equal(s10["timestamp"].values, s20["timestamp"].values):
        raise CropflowError(f"{patch}: the 10 m and 20 m Sentinel-2 files have different acquisitions.")
    grids = {20: product_grid(s20)[1], 10: product_grid(s10)[1] if s10 is not None else None}
    tile = str(s20.attrs.get("tile", ""))
    href = writer.collection_href("sentinel-2-l2a")
    items = []
    for i, when in enumerate(acquisition_times(s20)):
        item_id = f"S2_MSIL2A_{when:%Y%m%dT%H%M%S}_T{tile}_{patch}"
        bands = [(b, s10, grids[10]) for b in S2_10M_BANDS if s10 is not None] + [
            (b, s20, grids[20]) for b in S2_20M_BANDS
        ]
        assets = {
            band: writer.asset("sentinel-2-l2a", item_id, band, ds[band].values[i], grid, 0) for band, ds, grid in bands
        }
        scl = s20["SCL"].values[i]
        assets["SCL"] = writer.asset("sentinel-2-l2a", item_id, "SCL", scl, grids[20], 0, "mode")
        counts = np.bincount(scl.ravel(), minlength=12)
        clear = max(int(counts.sum() - counts[0]), 1)
        properties = {
            "constellation": "Sentinel 2",
            "instruments": ["msi"],
            "eo:cloud_cover": round(100.0 * float(counts[8] + counts[9] + counts[10]) / clear, 6),
            "s2:mgrs_tile": tile,
            "s2:product_type": "S2MSI2A",
            "s2:processing_baseline": S2_BASELINE,
            "s2:nodata_pixel_percentage": round(100.0 * float(counts[0]) / scl.size, 6),
        }
        if "sunZenithAngles" in s20:
            properties["s2:mean_solar_zenith"] = float(s20["sunZenithAngles"].values[i])
            properties["s2:mean_solar_azimuth"] = float(s20["sunAzimuthAngles"].values[i])
        item = st.base_item(
            item_id,
            "sentinel-2-l2a",
            when,
            assets,
            ["eo", "sat", "proj", "raster", "classification"],
            properties,
            href,
            epsg,
        )
        item["assets"] = {key: st.s2_asset(key, asset, offset=0.0) for key, asset in assets.items()}
        items.append(item)
    return items


def s1_linear(db_x10000: np.ndarray) -> np.ndarray:
    """int32 dB x 10000 (0 = no data) to float32 linear power, no data -> `sample_stac.S1_NODATA`."""
    linear = np.power(10.0, db_x10000 / 100000.0).astype(np.float32)
    return np.where(db_x10000 == 0, np.float32(st.S1_NODATA), linear)


def _s1_items(s1: xr.Dataset, writer: AssetWriter, patch: str, epsg: int) -> list[dict]:
    """One item per acquisition with `vv` and `vh` in linear power."""
    grid = product_grid(s1)[1]
    href = writer.collection_href("sentinel-1-rtc")
    items = []
    for i, when in enumerate(acquisition_times(s1)):
        item_id = f"S1_IW_GRDH_{when:%Y%m%dT%H%M%S}_{patch}_rtc"
        assets = {
            key: writer.asset("sentinel-1-rtc", item_id, key, s1_linear(s1[key.upper()].values[i]), grid, st.S1_NODATA)
            for key in ("vv", "vh")
        }
        properties = {
            "constellation": "Sentinel-1",
            "sar:instrument_mode": "IW",
            "sar:product_type": "GRD",
            "sar:polarizations": ["VV", "VH"],
            "sar:frequency_band": "C",
            "sat:orbit_state": "ascending",
        }
        item = st.base_item(
            item_id, "sentinel-1-rtc", when, assets, ["sar", "sat", "proj", "raster"], properties, href, epsg
        )
        item["assets"] = {key: st.s1_asset(key, asset) for key, asset in assets.items()}
        items.append(item)
    return items


def _landsat_items(sr: xr.Dataset, qa: xr.Dataset, writer: AssetWriter, patch: str, epsg: int) -> list[dict]:
    """One item per surface reflectance acquisition whose day has a QA_PIXEL layer (others are skipped)."""
    grid = product_grid(sr)[1]
    if product_grid(qa)[1] != grid:
        raise CropflowError(f"{patch}: the Landsat surface reflectance and QA_PIXEL files are on different grids.")
    qa_index = {when.date(): j for j, when in enumerate(acquisition_times(qa))}
    href = writer.collection_href("landsat-c2-l2")
    items, skipped = [], 0
    for i, when in enumerate(acquisition_times(sr)):
        j = qa_index.get(when.date())
        if j is None:
            skipped += 1
            continue
        item_id = f"LC08_L2SP_{when:%Y%m%dT%H%M%S}_{patch}"
        assets = {
            key: writer.asset("landsat-c2-l2", item_id, key, sr[band].values[i].view(np.int16), grid, 0)
            for band, key in LANDSAT_ASSETS.items()
        }
        qa_pixel = qa["QA-PIXEL"].values[j]
        assets["qa_pixel"] = writer.asset("landsat-c2-l2", item_id, "qa_pixel", qa_pixel, grid, 0, "nearest")
        properties = {
            "platform": "landsat-8",
            "instruments": ["oli", "tirs"],
            "eo:cloud_cover": round(100.0 * float(np.mean((qa_pixel & QA_PIXEL_CLOUD_BITS) > 0)), 2),
        }
        item = st.base_item(
            item_id, "landsat-c2-l2", when, assets, ["raster", "eo", "proj", "classification"], properties, href, epsg
        )
        item["assets"] = {
            key: st.landsat_asset(key, asset, scale=LANDSAT_SR_SCALE, offset=0.0, data_type="int16", qa_nodata=0)
            for key, asset in assets.items()
        }
        items.append(item)
    if skipped:
        log.info("%s: %d Landsat acquisitions without a QA_PIXEL layer skipped", patch, skipped)
    return items


def import_patch(patch_dir: Path, out_dir: Path) -> Patch:
    """Convert one WorldCereal patch folder into `out_dir/<location id>/` (replaced atomically if present)."""
    patch_dir = Path(patch_dir)
    s20 = open_product(patch_dir, "S2_L2A_20m")
    if s20 is None:
        raise CropflowError(f"{patch_dir} has no S2_L2A_20m_*.nc; give a WorldCereal patch folder.")
    patch = str(s20.attrs.get("location_id", patch_dir.name))
    epsg, grid20 = product_grid(s20)
    season = (str(s20.attrs["start_date"]), str(s20.attrs["end_date"]))
    final = (Path(out_dir) / patch).resolve()
    collections: dict[str, list[dict]] = {}
    with atomic_path(final) as tmp:
        writer = AssetWriter(tmp, final, epsg)
        collections["sentinel-2-l2a"] = _s2_items(open_product(patch_dir, "S2_L2A_10m"), s20, writer, patch, epsg)
        s1 = open_product(patch_dir, "S1_GRD-ASCENDING_20m")
        if s1 is not None:
            collections["sentinel-1-rtc"] = _s1_items(s1, writer, patch, epsg)
        sr, qa = open_product(patch_dir, "L8_SR_10m"), open_product(patch_dir, "L8_L2-ST_10m")
        if sr is not None and qa is not None:
            collections["landsat-c2-l2"] = _landsat_items(sr, qa, writer, patch, epsg)
        else:
            log.info("%s: no Landsat surface reflectance with QA_PIXEL; Landsat skipped", patch)
        for collection_id, items in collections.items():
            if items:
                write_collection(tmp, st.collection(collection_id, items, COLLECTIONS[collection_id]), items)
        bounds = grid20.bounds
        region = {
            "name": patch,
            "epsg": epsg,
            "bounds": list(bounds),
            "bbox": st.lonlat_footprint(bounds, epsg)[0],
            "resolution": 10,
            "size": round((bounds[2] - bounds[0]) / 10),
            "season": list(season),
        }
        (tmp / "region.json").write_text(json.dumps(region, indent=2) + "\n")
    counts = {c: len(items) for c, items in collections.items() if items}
    log.info("patch %s imported to %s: %s", patch, final, counts)
    return Patch(patch, final, epsg, bounds, season, counts)


def import_patches(src: Path, out_dir: Path) -> list[Patch]:
    """Convert every patch folder (one with an `S2_L2A_20m_*.nc`) under `src` into `out_dir/<location id>/`."""
    folders = sorted(p.parent for p in Path(src).glob("*/S2_L2A_20m_*.nc"))
    if not folders:
        raise CropflowError(f"{src} holds no WorldCereal patch folders (sub-folders with S2_L2A_20m_*.nc files).")
    return [import_patch(folder, out_dir) for folder in folders]
