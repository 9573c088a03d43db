"""STAC metadata of the simulated sample region, following the Planetary Computer item schemas.

Items mirror what Planetary Computer serves for `sentinel-2-l2a`, `landsat-c2-l2` and `sentinel-1-rtc` (ids,
asset keys, `eo:bands`, `raster:bands`, projection, `sat:*`, `sar:*`, `s2:*`, `landsat:*`), with two additions
that real readers rely on: per-asset `proj:shape`/`proj:transform`/`proj:bbox`, and `raster:bands` scale/offset
on Sentinel-2 bands so that readers applying them get surface reflectance.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from affine import Affine
from pyproj import Transformer

EXTENSIONS = {
    "eo": "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
    "sat": "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "proj": "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "sar": "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
    "view": "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v1.0.0/schema.json",
    "sci": "https://stac-extensions.github.io/scientific/v1.0.0/schema.json",
    "landsat": "https://landsat.usgs.gov/stac/landsat-extension/v1.1.1/schema.json",
    "item_assets": "https://stac-extensions.github.io/item-assets/v1.0.0/schema.json",
}
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
STAC_VERSION = "1.0.0"

S2_TILE = "31UFS"
S2_RELATIVE_ORBIT = 51
S2_BASELINE = "05.10"
S2_SCALE, S2_OFFSET = 0.0001, -0.1
WRS2_PATHS, WRS2_ROWS = 233, 248  # Landsat WRS-2 paths 001-233, rows 001-248
LANDSAT_SCALE, LANDSAT_OFFSET = 2.75e-05, -0.2
S1_NODATA = -32768.0

# name, common name, description, centre wavelength, FWHM (um): as in Planetary Computer sentinel-2-l2a.
S2_EO_BANDS = {
    "B01": ("coastal", "Coastal aerosol", 0.443, 0.027),
    "B02": ("blue", "Blue", 0.49, 0.098),
    "B03": ("green", "Green", 0.56, 0.045),
    "B04": ("red", "Red", 0.665, 0.038),
    "B05": ("rededge", "Vegetation red edge 1", 0.704, 0.019),
    "B06": ("rededge", "Vegetation red edge 2", 0.74, 0.018),
    "B07": ("rededge", "Vegetation red edge 3", 0.783, 0.028),
    "B08": ("nir", "NIR", 0.842, 0.145),
    "B8A": ("rededge", "Vegetation red edge 4", 0.865, 0.033),
    "B09": (None, "Water vapor", 0.945, 0.026),
    "B11": ("swir16", "SWIR (1.6)", 1.61, 0.143),
    "B12": ("swir22", "SWIR (2.2)", 2.19, 0.242),
}
# fmt: off
SCL_CLASSES = (
    (0, "no_data"), (1, "saturated_or_defective"), (2, "dark_area_pixels"), (3, "cloud_shadows"),
    (4, "vegetation"), (5, "not_vegetated"), (6, "water"), (7, "unclassified"), (8, "cloud_medium_probability"),
    (9, "cloud_high_probability"), (10, "thin_cirrus"), (11, "snow"),
)
# fmt: on
# asset key: (OLI band, SR file band, title, description, centre wavelength, FWHM), as in PC landsat-c2-l2.
LANDSAT_EO_BANDS = {
    "coastal": ("OLI_B1", "SR_B1", "Coastal/Aerosol Band", "Coastal/Aerosol", 0.44, 0.02),
    "blue": ("OLI_B2", "SR_B2", "Blue Band", "Visible blue", 0.48, 0.06),
    "green": ("OLI_B3", "SR_B3", "Green Band", "Visible green", 0.56, 0.06),
    "red": ("OLI_B4", "SR_B4", "Red Band", "Visible red", 0.65, 0.04),
    "nir08": ("OLI_B5", "SR_B5", "Near Infrared Band 0.8", "Near infrared", 0.87, 0.03),
    "swir16": ("OLI_B6", "SR_B6", "Short-wave Infrared Band 1.6", "Short-wave infrared", 1.61, 0.09),
    "swir22": ("OLI_B7", "SR_B7", "Short-wave Infrared Band 2.2", "Short-wave infrared", 2.2, 0.19),
}
# Landsat Collection 2 QA_PIXEL: (name, offset, length, description, [(class name, value, description)]).
# fmt: off
QA_PIXEL_BITFIELDS = (
    ("fill", 0, 1, "Image or fill data", [("not_fill", 0, "Image data"), ("fill", 1, "Fill data")]),
    ("dilated_cloud", 1, 1, "Dilated cloud",
     [("not_dilated", 0, "Cloud is not dilated or no cloud"), ("dilated", 1, "Cloud dilation")]),
    ("cirrus", 2, 1, "Cirrus mask",
     [("not_cirrus", 0, "Cirrus confidence is not high"), ("cirrus", 1, "High confidence cirrus")]),
    ("cloud", 3, 1, "Cloud mask",
     [("not_cloud", 0, "Cloud confidence is not high"), ("cloud", 1, "High confidence cloud")]),
    ("cloud_shadow", 4, 1, "Cloud shadow mask",
     [("not_shadow", 0, "Cloud shadow confidence is not high"), ("shadow", 1, "High confidence cloud shadow")]),
    ("snow", 5, 1, "Snow/Ice mask",
     [("not_snow", 0, "Snow/Ice confidence is not high"), ("snow", 1, "High confidence snow cover")]),
    ("clear", 6, 1, "Clear mask",
     [("not_clear", 0, "Cloud or dilated cloud bits are set"),
      ("clear", 1, "Cloud and dilated cloud bits are not set")]),
    ("water", 7, 1, "Water mask", [("not_water", 0, "Land or cloud"), ("water", 1, "Water")]),
    ("cloud_confidence", 8, 2, "Cloud confidence levels",
     [("not_set", 0, "No confidence level set"), ("low", 1, "Low confidence cloud"),
      ("medium", 2, "Medium confidence cloud"), ("high", 3, "High confidence cloud")]),
    ("cloud_shadow_confidence", 10, 2, "Cloud shadow confidence levels",
     [("not_set", 0, "No confidence level set"), ("low", 1, "Low confidence cloud shadow"),
      ("reserved", 2, "Reserved - value not used"), ("high", 3, "High confidence cloud shadow")]),
    ("snow_confidence", 12, 2, "Snow/Ice confidence levels",
     [("not_set", 0, "No confidence level set"), ("low", 1, "Low confidence snow/ice"),
      ("reserved", 2, "Reserved - value not used"), ("high", 3, "High confidence snow/ice")]),
    ("cirrus_confidence", 14, 2, "Cirrus confidence levels",
     [("not_set", 0, "No confidence level set"), ("low", 1, "Low confidence cirrus"),
      ("reserved", 2, "Reserved - value not used"), ("high", 3, "High confidence cirrus")]),
)
# fmt: on


@dataclass(frozen=True)
class Grid:
    """A raster grid in the region's CRS: `shape` (rows, cols) and GDAL-order affine `transform`."""

    shape: tuple[int, int]
    transform: Affine

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in metres."""
        t = self.transform
        return (t.c, t.f + t.e * self.shape[0], t.c + t.a * self.shape[1], t.f)

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    def proj(self) -> dict:
        """Projection-extension fields of an asset on this grid."""
        return {
            "proj:shape": list(self.shape),
            "proj:transform": [float(v) for v in list(self.transform)[:6]],
            "proj:bbox": [float(v) for v in self.bounds],
        }


@dataclass(frozen=True)
class Asset:
    """A written raster file: its absolute `file://` href and its grid."""

    href: str
    grid: Grid


def lonlat_footprint(bounds: tuple[float, float, float, float], epsg: int) -> tuple[list[float], dict]:
    """Lon/lat bbox (densified edges) and GeoJSON polygon (corners, counter-clockwise) of projected `bounds`."""
    transformer = Transformer.from_crs(epsg, 4326, always_xy=True)
    bbox = [round(v, 7) for v in transformer.transform_bounds(*bounds, densify_pts=21)]
    xmin, ymin, xmax, ymax = bounds
    lon, lat = transformer.transform([xmin, xmax, xmax, xmin, xmin], [ymin, ymin, ymax, ymax, ymin])
    ring = [[round(x, 7), round(y, 7)] for x, y in zip(lon, lat, strict=True)]
    return bbox, {"type": "Polygon", "coordinates": [ring]}


def region_tag(*parts: object) -> int:
    """Stable small integer from the region's identity, to keep item ids of different regions apart."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _s2_generation_time(when: datetime, tag: int) -> datetime:
    return when + timedelta(hours=2, seconds=tag % 3600)


def s2_item_id(when: datetime, platform: str, tag: int) -> str:
    """Planetary Computer style id, e.g. S2B_MSIL2A_20240419T104619_R051_T31UFS_20240419T125932."""
    generated = _s2_generation_time(when, tag)
    return f"S2{platform[-1]}_MSIL2A_{when:%Y%m%dT%H%M%S}_R{S2_RELATIVE_ORBIT:03d}_T{S2_TILE}_{generated:%Y%m%dT%H%M%S}"


def landsat_wrs(tag: int) -> tuple[str, str]:
    """WRS-2 (path, row), zero-padded, drawn from the region tag so that regions do not share Landsat item ids.

    Planetary Computer Landsat ids carry no processing time, so the path/row is the only field that can tell two
    regions' acquisitions on the same day apart (one of 233 x 248 = 57,784 scenes, like the S2/S1 tag fields).
    """
    return f"{1 + tag % WRS2_PATHS:03d}", f"{1 + tag // WRS2_PATHS % WRS2_ROWS:03d}"


def landsat_item_id(when: datetime, platform: str, tag: int) -> str:
    """Planetary Computer style id, e.g. LC09_L2SP_198025_20240417_02_T1 (WRS-2 path/row from the region tag)."""
    return f"LC0{platform[-1]}_L2SP_{''.join(landsat_wrs(tag))}_{when:%Y%m%d}_02_T1"


def _s1_datatake(absolute: int, tag: int) -> int:
    return zlib.crc32(f"{tag}:{absolute}".encode()) & 0xFFFFF


def s1_item_id(when: datetime, relative_orbit: int, tag: int) -> str:
    """Planetary Computer style id, e.g. S1A_IW_GRDH_1SDV_20240419T055006_20240419T055018_053500_067DF2_rtc."""
    absolute = s1_absolute_orbit(when, relative_orbit)
    start, end = when - timedelta(seconds=6), when + timedelta(seconds=6)
    return (
        f"S1A_IW_GRDH_1SDV_{start:%Y%m%dT%H%M%S}_{end:%Y%m%dT%H%M%S}_{absolute:06d}"
        f"_{_s1_datatake(absolute, tag):06X}_rtc"
    )


def base_item(
    item_id: str,
    collection: str,
    when: datetime,
    assets: dict[str, Asset],
    extensions: list[str],
    properties: dict,
    collection_href: str,
    epsg: int,
) -> dict:
    """Item skeleton: footprint from the union of asset grids, links to its collection and licence."""
    bounds = np.array([a.grid.bounds for a in assets.values()])
    union = (bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())
    bbox, geometry = lonlat_footprint(union, epsg)
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EXTENSIONS[e] for e in extensions],
        "id": item_id,
        "collection": collection,
        "bbox": bbox,
        "geometry": geometry,
        "properties": {"datetime": _iso(when), **properties, "proj:epsg": epsg},
        "links": [
            {"rel": "collection", "type": "application/json", "href": collection_href},
            {"rel": "parent", "type": "application/json", "href": collection_href},
        ],
        "assets": {},
    }


def s2_item(
    when: datetime,
    platform: str,
    assets: dict[str, Asset],
    scl_counts: np.ndarray,
    sun: tuple[float, float],
    tag: int,
    collection_href: str,
    epsg: int,
) -> dict:
    """Sentinel-2 L2A item; `scl_counts` (bincount of SCL codes) gives `eo:cloud_cover` and `s2:*_percentage`."""
    sat = platform[-1]
    generated = _s2_generation_time(when, tag)
    sensing, gen = when.strftime("%Y%m%dT%H%M%S"), generated.strftime("%Y%m%dT%H%M%S")
    anchor_time, anchor_orbit = (
        (datetime(2024, 4, 19, 10, 50), 46082) if sat == "A" else (datetime(2024, 4, 19, 9, 55, 49), 37185)
    )
    absolute = anchor_orbit + round((when - anchor_time).total_seconds() / 86400 * 14.3)
    total = int(scl_counts.sum())
    valid = max(total - int(scl_counts[0]), 1)

    def pct(*codes: int) -> float:
        return round(100.0 * float(sum(scl_counts[c] for c in codes)) / valid, 6)

    doy = when.timetuple().tm_yday
    properties = {
        "platform": platform,
        "instruments": ["msi"],
        "constellation": "Sentinel 2",
        "eo:cloud_cover": pct(8, 9, 10),
        "sat:orbit_state": "descending",
        "sat:relative_orbit": S2_RELATIVE_ORBIT,
        "s2:mgrs_tile": S2_TILE,
        "s2:granule_id": f"S2{sat}_OPER_MSI_L2A_TL_MSFT_{gen}_A{absolute:06d}_T{S2_TILE}_N{S2_BASELINE}",
        "s2:datatake_id": f"GS2{sat}_{sensing}_{absolute:06d}_N{S2_BASELINE}",
        "s2:product_uri": f"S2{sat}_MSIL2A_{sensing}_N{S2_BASELINE.replace('.', '')}_R{S2_RELATIVE_ORBIT:03d}"
        f"_T{S2_TILE}_{gen}.SAFE",
        "s2:datastrip_id": f"S2{sat}_OPER_MSI_L2A_DS_MSFT_{gen}_S{sensing}_N{S2_BASELINE}",
        "s2:product_type": "S2MSI2A",
        "s2:datatake_type": "INS-NOBS",
        "s2:generation_time": _iso(generated),
        "s2:processing_baseline": S2_BASELINE,
        "s2:mean_solar_zenith": round(sun[0], 6),
        "s2:mean_solar_azimuth": round(sun[1], 6),
        "s2:reflectance_conversion_factor": round(1.0 / (1.0 - 0.01673 * np.cos(0.0172 * (doy - 4))) ** 2, 9),
        "s2:high_proba_clouds_percentage": pct(9),
        "s2:medium_proba_clouds_percentage": pct(8),
        "s2:thin_cirrus_percentage": pct(10),
        "s2:cloud_shadow_percentage": pct(3),
        "s2:vegetation_percentage": pct(4),
        "s2:not_vegetated_percentage": pct(5),
        "s2:water_percentage": pct(6),
        "s2:unclassified_percentage": pct(7),
        "s2:dark_features_percentage": pct(2),
        "s2:snow_ice_percentage": pct(11),
        "s2:saturated_defective_pixel_percentage": pct(1),
        "s2:degraded_msi_data_percentage": 0.0,
        "s2:nodata_pixel_percentage": round(100.0 * float(scl_counts[0]) / max(total, 1), 6),
    }
    item = base_item(
        s2_item_id(when, platform, tag),
        "sentinel-2-l2a",
        when,
        assets,
        ["eo", "sat", "proj", "raster", "classification"],
        properties,
        collection_href,
        epsg,
    )
    for key, asset in assets.items():
        item["assets"][key] = s2_asset(key, asset)
    return item


def s2_asset(key: str, asset: Asset, offset: float = S2_OFFSET) -> dict:
    """Sentinel-2 L2A asset entry: `SCL`, or a band with `eo:bands` and `raster:bands` (scale 0.0001, `offset`)."""
    gsd = asset.grid.resolution
    entry = {"href": asset.href, "type": COG, "roles": ["data"], "gsd": gsd, **asset.grid.proj()}
    if key == "SCL":
        entry["title"] = "Scene classfication map (SCL)"
        entry["raster:bands"] = [{"nodata": 0, "data_type": "uint8", "spatial_resolution": gsd}]
        entry["classification:classes"] = [{"value": v, "name": n} for v, n in SCL_CLASSES]
        return entry
    common, description, center, fwhm = S2_EO_BANDS[key]
    band = {
        "name": key,
        "description": f"Band {key[1:].lstrip('0')} - {description}",
        "center_wavelength": center,
        "full_width_half_max": fwhm,
    }
    if common:
        band["common_name"] = common
    entry["title"] = f"Band {key[1:].lstrip('0')} - {description} - {gsd:.0f}m"
    entry["eo:bands"] = [band]
    entry["raster:bands"] = [
        {
            "nodata": 0,
            "data_type": "uint16",
            "bits_per_sample": 15,
            "spatial_resolution": gsd,
            "scale": S2_SCALE,
            "offset": offset,
        }
    ]
    return entry


def landsat_item(
    when: datetime,
    platform: str,
    assets: dict[str, Asset],
    cloud_cover: float,
    sun: tuple[float, float],
    tag: int,
    collection_href: str,
    epsg: int,
) -> dict:
    """Landsat 8/9 Collection 2 Level-2 item (surface reflectance assets and QA_PIXEL)."""
    number = platform[-1]
    path, row = landsat_wrs(tag)
    grid = assets["qa_pixel"].grid
    properties = {
        "gsd": 30,
        "created": _iso(when + timedelta(days=1, hours=9)),
        "sci:doi": "10.5066/P9OGBGM6",
        "platform": platform,
        "description": "Landsat Collection 2 Level-2",
        "instruments": ["oli", "tirs"],
        "eo:cloud_cover": round(cloud_cover, 2),
        "proj:shape": list(grid.shape),
        "proj:transform": grid.proj()["proj:transform"],
        "view:off_nadir": 0,
        "landsat:wrs_row": row,
        "landsat:scene_id": f"LC{number}{path}{row}{when.year}{when.timetuple().tm_yday:03d}LGN00",
        "landsat:wrs_path": path,
        "landsat:wrs_type": "2",
        "view:sun_azimuth": round(sun[1], 8),
        "landsat:correction": "L2SP",
        "view:sun_elevation": round(90.0 - sun[0], 8),
        "landsat:cloud_cover_land": round(cloud_cover, 2),
        "landsat:collection_number": "02",
        "landsat:collection_category": "T1",
    }
    item = base_item(
        landsat_item_id(when, platform, tag),
        "landsat-c2-l2",
        when,
        assets,
        ["raster", "eo", "view", "proj", "landsat", "classification", "sci"],
        properties,
        collection_href,
        epsg,
    )
    for key, asset in assets.items():
        item["assets"][key] = landsat_asset(key, asset)
    return item


def landsat_asset(
    key: str,
    asset: Asset,
    scale: float = LANDSAT_SCALE,
    offset: float = LANDSAT_OFFSET,
    data_type: str = "uint16",
    qa_nodata: int = 1,
) -> dict:
    """Landsat Collection 2 Level-2 asset entry: `qa_pixel` (bit fields) or a reflectance band (`raster:bands`)."""
    entry: dict = {"href": asset.href, "type": COG, **asset.grid.proj()}
    gsd = round(asset.grid.resolution)
    if key == "qa_pixel":
        entry.update(
            {
                "roles": ["cloud", "cloud-shadow", "snow-ice", "water-mask"],
                "title": "Pixel Quality Assessment Band",
                "description": "Collection 2 Level-1 Pixel Quality Assessment Band (QA_PIXEL)",
                "classification:bitfields": [
                    {
                        "name": name,
                        "offset": bit,
                        "length": length,
                        "description": description,
                        "classes": [{"name": n, "value": v, "description": d} for n, v, d in classes],
                    }
                    for name, bit, length, description, classes in QA_PIXEL_BITFIELDS
                ],
                "raster:bands": [
                    {"unit": "bit index", "nodata": qa_nodata, "data_type": "uint16", "spatial_resolution": gsd}
                ],
            }
        )
        return entry
    oli, sr, title, description, center, fwhm = LANDSAT_EO_BANDS[key]
    entry.update(
        {
            "roles": ["data", "reflectance"],
            "title": title,
            "description": f"Collection 2 Level-2 {title.replace(' Band', '')} Band ({sr}) Surface Reflectance",
            "eo:bands": [
                {
                    "name": oli,
                    "common_name": key,
                    "description": description,
                    "center_wavelength": center,
                    "full_width_half_max": fwhm,
                }
            ],
            "raster:bands": [
                {"scale": scale, "nodata": 0, "offset": offset, "data_type": data_type, "spatial_resolution": gsd}
            ],
        }
    )
    return entry


def s1_absolute_orbit(when: datetime, relative_orbit: int) -> int:
    """Sentinel-1A absolute orbit of a pass on `relative_orbit` near `when` (175 orbits per 12-day cycle)."""
    estimate = 53498 + round((when - datetime(2024, 4, 19, 4, 59, 10)).total_seconds() / 86400 * 175 / 12)
    delta = (relative_orbit - 1 - (estimate - 73)) % 175
    return estimate + (delta - 175 if delta > 87 else delta)


def s1_item(
    when: datetime,
    orbit_state: str,
    relative_orbit: int,
    assets: dict[str, Asset],
    tag: int,
    collection_href: str,
    epsg: int,
) -> dict:
    """Sentinel-1 IW GRD radiometrically terrain corrected (RTC) item with VV and VH gamma0."""
    absolute = s1_absolute_orbit(when, relative_orbit)
    datatake = _s1_datatake(absolute, tag)
    start, end = when - timedelta(seconds=6), when + timedelta(seconds=6)
    grid = assets["vv"].grid
    properties = {
        "platform": "SENTINEL-1A",
        "s1:shape": [grid.shape[1], grid.shape[0]],
        "proj:bbox": [float(v) for v in grid.bounds],
        "proj:shape": list(grid.shape),
        "end_datetime": _iso(end),
        "constellation": "Sentinel-1",
        "s1:resolution": "high",
        "proj:transform": grid.proj()["proj:transform"],
        "s1:datatake_id": str(datatake),
        "start_datetime": _iso(start),
        "s1:orbit_source": "RESORB",
        "s1:slice_number": "5",
        "s1:total_slices": "9",
        "sar:looks_range": 5,
        "sat:orbit_state": orbit_state,
        "sar:product_type": "GRD",
        "sar:looks_azimuth": 1,
        "sar:polarizations": ["VV", "VH"],
        "sar:frequency_band": "C",
        "sat:absolute_orbit": absolute,
        "sat:relative_orbit": relative_orbit,
        "s1:processing_level": "1",
        "sar:instrument_mode": "IW",
        "sar:center_frequency": 5.405,
        "sar:resolution_range": 20,
        "s1:product_timeliness": "Fast-24h",
        "sar:resolution_azimuth": 22,
        "sar:pixel_spacing_range": 10,
        "sar:observation_direction": "right",
        "sar:pixel_spacing_azimuth": 10,
        "sar:looks_equivalent_number": 4.4,
        "s1:instrument_configuration_ID": "7",
        "sat:platform_international_designator": "2014-016A",
    }
    item = base_item(
        s1_item_id(when, relative_orbit, tag),
        "sentinel-1-rtc",
        when,
        assets,
        ["sar", "sat", "proj", "raster"],
        properties,
        collection_href,
        epsg,
    )
    for key, asset in assets.items():
        item["assets"][key] = s1_asset(key, asset)
    return item


def s1_asset(key: str, asset: Asset) -> dict:
    """Sentinel-1 RTC asset entry (`vv` or `vh`): float32 linear gamma naught, no-data -32768."""
    tx, rx = {"vv": ("vertical", "vertical"), "vh": ("vertical", "horizontal")}[key]
    return {
        "href": asset.href,
        "type": COG,
        "roles": ["data"],
        "title": f"{key.upper()}: {tx} transmit, {rx} receive",
        "description": f"Terrain-corrected gamma naught values of signal transmitted with {tx} polarization "
        f"and received with {rx} polarization with radiometric terrain correction applied.",
        "raster:bands": [{"nodata": S1_NODATA, "data_type": "float32", "spatial_resolution": asset.grid.resolution}],
        **asset.grid.proj(),
    }


_COLLECTIONS = {
    "sentinel-2-l2a": {
        "title": "Sentinel-2 Level-2A",
        "description": "Simulated Sentinel-2 L2A surface reflectance (processing baseline 05.10, BOA offset -1000) "
        "with scene classification (SCL), as cloud-optimized GeoTIFFs at native resolution.",
        "license": "proprietary",
        "keywords": ["Sentinel", "Copernicus", "ESA", "Satellite", "Reflectance", "Simulated"],
        "providers": [
            {
                "name": "ESA",
                "roles": ["producer", "licensor"],
                "url": "https://sentinel.esa.int/web/sentinel/missions/sentinel-2",
            },
            {"name": "cropflow", "roles": ["processor", "host"]},
        ],
        "extensions": ["item_assets", "eo", "raster"],
        "summaries": {
            "platform": ["Sentinel-2A", "Sentinel-2B"],
            "instruments": ["msi"],
            "constellation": ["Sentinel 2"],
            "gsd": [10, 20, 60],
        },
    },
    "landsat-c2-l2": {
        "title": "Landsat Collection 2 Level-2",
        "description": "Simulated Landsat 8 and 9 OLI Collection 2 Level-2 surface reflectance with the QA_PIXEL "
        "band, as cloud-optimized GeoTIFFs at 30 m.",
        "license": "proprietary",
        "keywords": ["Landsat", "USGS", "NASA", "Satellite", "Reflectance", "Simulated"],
        "providers": [
            {"name": "NASA", "roles": ["producer", "licensor"], "url": "https://landsat.gsfc.nasa.gov/"},
            {
                "name": "USGS",
                "roles": ["producer", "processor", "licensor"],
                "url": "https://www.usgs.gov/landsat-missions/landsat-collection-2-level-2-science-products",
            },
            {"name": "cropflow", "roles": ["processor", "host"]},
        ],
        "extensions": ["item_assets", "eo", "raster", "view", "sci"],
        "summaries": {"platform": ["landsat-8", "landsat-9"], "instruments": ["oli", "tirs"], "gsd": [30]},
    },
    "sentinel-1-rtc": {
        "title": "Sentinel 1 Radiometrically Terrain Corrected (RTC)",
        "description": "Simulated Sentinel-1 IW GRD radiometrically terrain corrected gamma naught (linear power, "
        "VV and VH) with speckle, as cloud-optimized GeoTIFFs at 10 m.",
        "license": "CC-BY-4.0",
        "keywords": ["ESA", "Copernicus", "Sentinel", "C-Band", "SAR", "RTC", "Simulated"],
        "providers": [
            {
                "name": "ESA",
                "roles": ["producer", "licensor"],
                "url": "https://sentinel.esa.int/web/sentinel/missions/sentinel-1",
            },
            {"name": "cropflow", "roles": ["processor", "host"]},
        ],
        "extensions": ["item_assets", "sar", "sat", "raster"],
        "summaries": {
            "platform": ["SENTINEL-1A"],
            "constellation": ["Sentinel-1"],
            "sar:instrument_mode": ["IW"],
            "sar:polarizations": ["VV", "VH"],
            "sar:frequency_band": ["C"],
            "sat:orbit_state": ["ascending", "descending"],
        },
    },
}


def collection(collection_id: str, items: list[dict], meta: dict | None = None) -> dict:
    """Collection document for `items`: spatial/temporal extent from the items, `item_assets` from the first.

    `meta` (title, description, license, keywords, providers, extensions, summaries) defaults to that of the
    simulated sample collections.
    """
    meta = meta or _COLLECTIONS[collection_id]
    bboxes = np.array([it["bbox"] for it in items])
    times = sorted(it["properties"]["datetime"] for it in items)
    item_assets = {
        key: {k: v for k, v in asset.items() if k not in ("href", "proj:shape", "proj:transform", "proj:bbox")}
        for key, asset in items[0]["assets"].items()
    }
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EXTENSIONS[e] for e in meta["extensions"]],
        "id": collection_id,
        "title": meta["title"],
        "description": meta["description"],
        "license": meta["license"],
        "keywords": meta["keywords"],
        "providers": meta["providers"],
        "extent": {
            "spatial": {
                "bbox": [
                    [
                        float(bboxes[:, 0].min()),
                        float(bboxes[:, 1].min()),
                        float(bboxes[:, 2].max()),
                        float(bboxes[:, 3].max()),
                    ]
                ]
            },
            "temporal": {"interval": [[times[0], times[-1]]]},
        },
        "summaries": meta["summaries"],
        "item_assets": item_assets,
        "links": [],
    }
