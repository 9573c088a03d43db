"""Deterministic simulated sample region: real formats (COGs, STAC items, GeoParquet labels), simulated pixels.

The region is a `size` x `size` grid at 10 m in UTM 31N (Belgium). Voronoi parcels carry crop classes whose
phenology drives Sentinel-2 L2A (every 5 days), Landsat 8/9 C2 L2 (every 8 days) and Sentinel-1 RTC (every 6 days)
observations with clouds, cloud shadows and speckle. The layout on disk is fixed by docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from prefect import task
from rasterio.features import rasterize
from scipy import ndimage

from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.gdal import gdal_env
from tasks import sample_phenology as ph
from tasks import sample_stac as st
from tasks.labels import CLASS_NODATA

log = logging.getLogger(__name__)

EPSG = 32631
RESOLUTION = 10
ORIGIN = (600000.0, 5650000.0)  # default upper-left corner (UTM 31N), east of Brussels
# origins differ from ORIGIN by multiples of 60 m, so the 10/20/30/60 m grids of all regions align (ORIGIN
# itself is not a multiple of 60 m: 5650000 = 40 mod 60, so the lattice is anchored on it, not on 0)
ORIGIN_STEP = 60
UTM_EASTING = (166000.0, 834000.0)  # valid UTM 31N eastings (m)
UTM_NORTHING = (0.0, 9330000.0)  # valid UTM 31N northings, northern hemisphere (m)
MIN_SIZE = 32
PIXELS_PER_PARCEL = 2000
MIN_PARCELS_PER_CLASS = 4
SPLIT_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))
CLASSES_NODATA = CLASS_NODATA

S2_EVERY, LANDSAT_EVERY, S1_EVERY = 5, 8, 6
S2_TIME, LANDSAT_TIME = time(10, 46, 19, 24000), time(10, 33, 41, 512000)
S1_PASSES = (("descending", 37, time(5, 50, 12, 436706)), ("ascending", 88, time(17, 24, 31, 118203)))
S2_10M = ("B02", "B03", "B04", "B08")
S2_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
S2_60M = ("B01", "B09")
BAND_INDEX = {b: i for i, b in enumerate(ph.S2_BANDS_ALL)}
SENSOR_NOISE = 0.004  # reflectance, per pixel


@dataclass(frozen=True)
class Scene:
    """Everything static about the region: grids, parcels, classes and per-pixel surface properties.

    Surface arrays cover a padded square of `n_pad` (a multiple of 6) pixels at 10 m from the region's upper-left
    corner, so that 20, 30 and 60 m grids are whole block averages; the region is the top-left `size` pixels.
    """

    size: int
    n_pad: int
    seed: int
    tag: int
    origin: tuple[float, float]  # upper-left corner (UTM 31N, m)
    start: date
    end: date
    parcels: np.ndarray  # (n_pad, n_pad) parcel index
    pheno: ph.ParcelPhenology
    vigor: np.ndarray  # (n_pad, n_pad) multiplies green cover
    soil_brightness: np.ndarray  # (n_pad, n_pad) multiplies soil abundance
    urban_texture: np.ndarray  # (n_pad, n_pad) multiplies built-up abundance
    moisture: np.ndarray  # daily soil moisture from `start`
    labels: gpd.GeoDataFrame
    center_lonlat: tuple[float, float]

    def grid(self, resolution: int) -> st.Grid:
        """The region's grid at `resolution` m (ceil(size x 10 / resolution) pixels a side)."""
        n = math.ceil(self.size * RESOLUTION / resolution)
        x0, y1 = self.origin
        return st.Grid((n, n), Affine(resolution, 0.0, x0, 0.0, -resolution, y1))

    def day(self, when: datetime) -> float:
        """Day of the harvest year (the year the season ends; 1 = 1 January)."""
        return float((when.date() - date(self.end.year, 1, 1)).days + 1)


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Independent generator for one component, so results do not depend on the order of computation."""
    return np.random.default_rng([seed, *stream])


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over non-overlapping k x k blocks of the last two axes (sizes must be multiples of k)."""
    *lead, h, w = a.shape
    return a.reshape(*lead, h // k, k, w // k, k).mean(axis=(-3, -1))


def upsample(a: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour k x k upsampling of the last two axes."""
    return np.repeat(np.repeat(a, k, axis=-2), k, axis=-1)


def smooth_field(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Spatially coherent standard-normal noise with correlation length ~`scale_px` (filtered on a coarse grid)."""
    factor = max(1, int(scale_px // 3))
    coarse = (shape[0] // factor + 3, shape[1] // factor + 3)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse), scale_px / factor, mode="wrap")
    field = ndimage.zoom(field, factor, order=1)[: shape[0], : shape[1]]
    return ((field - field.mean()) / max(field.std(), 1e-9)).astype(np.float32)


def solar_position(when: datetime, lon: float, lat: float) -> tuple[float, float]:
    """Sun zenith and azimuth (degrees, azimuth clockwise from north) at UTC `when` (NOAA approximation)."""
    doy = when.timetuple().tm_yday
    hours = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hours - 12) / 24)
    eqtime = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    decl = (
        0.006918
        - 0.399912 * math.cos(g)
        + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g)
        + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    hour_angle = math.radians((hours * 60 + eqtime + 4 * lon) / 4 - 180)
    phi = math.radians(lat)
    cos_zenith = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    zenith = math.degrees(math.acos(max(-1.0, min(1.0, cos_zenith))))
    azimuth = math.degrees(
        math.atan2(math.sin(hour_angle), math.cos(hour_angle) * math.sin(phi) - math.tan(decl) * math.cos(phi))
    )
    return zenith, (azimuth + 180.0) % 360.0


# ---------------------------------------------------------------------------------------------- parcels, labels


def _parcel_polygons(
    n_pad: int, rng: np.random.Generator, origin: tuple[float, float] = ORIGIN
) -> list[shapely.Polygon]:
    """Voronoi cells of random seeds, clipped to the padded square (~PIXELS_PER_PARCEL pixels each)."""
    extent = n_pad * RESOLUTION
    n = max(round(n_pad * n_pad / PIXELS_PER_PARCEL), MIN_PARCELS_PER_CLASS * len(ph.CLASSES))
    x0, y1 = origin
    points = rng.uniform(0.0, extent, (n, 2)) + np.array([x0, y1 - extent])
    box = shapely.box(x0, y1 - extent, x0 + extent, y1)
    cells = shapely.voronoi_polygons(shapely.MultiPoint(points), extend_to=box, ordered=True)
    return [cell.intersection(box) for cell in cells.geoms]


def _block_splits(
    size: int, centroids: np.ndarray, rng: np.random.Generator, origin: tuple[float, float] = ORIGIN
) -> np.ndarray:
    """Split name of each parcel from the square block (128 px, fewer for small regions) holding its centroid.

    Blocks are shuffled and dealt 60/20/20 to train/val/test; the deal is redrawn until every split has a parcel.
    """
    block = min(128, max(16, size // 4))
    n_side = math.ceil(size / block)
    col = ((centroids[:, 0] - origin[0]) // (block * RESOLUTION)).astype(int)
    row = ((origin[1] - centroids[:, 1]) // (block * RESOLUTION)).astype(int)
    block_of = np.clip(row, 0, n_side - 1) * n_side + np.clip(col, 0, n_side - 1)
    n_blocks = n_side * n_side
    n_train = round(SPLIT_SHARES[0][1] * n_blocks)
    n_val = max(1, round(SPLIT_SHARES[1][1] * n_blocks))
    names = np.array([name for name, _ in SPLIT_SHARES])
    for _ in range(1000):
        order = rng.permutation(n_blocks)
        split_of_block = np.empty(n_blocks, dtype=int)
        split_of_block[order[:n_train]] = 0
        split_of_block[order[n_train : n_train + n_val]] = 1
        split_of_block[order[n_train + n_val :]] = 2
        splits = split_of_block[block_of]
        if len(np.unique(splits)) == 3:
            return names[splits]
    raise CropflowError(f"a {size} px region is too small to hold parcels in train, val and test blocks")


def _weights() -> np.ndarray:
    """Class shares (normalised `weight` of each class)."""
    w = np.array([c.weight for c in ph.CLASSES])
    return w / w.sum()


def _assign_classes(splits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class ids drawn by class weight; each split with enough parcels holds every class at least once."""
    k = len(ph.CLASSES)
    classes = rng.choice(k, size=len(splits), p=_weights())
    for name, _ in SPLIT_SHARES:
        members = np.flatnonzero(splits == name)
        if len(members) >= k:
            classes[rng.permutation(members)[:k]] = np.arange(k)
    return classes


def _build_labels(
    polygons: list[shapely.Polygon], size: int, rng: np.random.Generator, origin: tuple[float, float] = ORIGIN
) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """Labelled parcels (clipped to the region, with split and class) and the class of every polygon."""
    x0, y1 = origin
    extent = size * RESOLUTION
    region = shapely.box(x0, y1 - extent, x0 + extent, y1)
    clipped = shapely.intersection(np.array(polygons, dtype=object), region)
    inside = np.flatnonzero(shapely.area(clipped) >= RESOLUTION * RESOLUTION)
    centroids = shapely.get_coordinates(shapely.centroid(clipped[inside]))
    splits = _block_splits(size, centroids, rng, origin)
    class_ids = rng.choice(len(ph.CLASSES), size=len(polygons), p=_weights())
    class_ids[inside] = _assign_classes(splits, rng)
    labels = gpd.GeoDataFrame(
        {
            "parcel_id": (inside + 1).astype("int64"),
            "class_id": class_ids[inside].astype("int64"),
            "class_name": [ph.CLASSES[c].name for c in class_ids[inside]],
            "split": splits,
        },
        geometry=list(clipped[inside]),
        crs=f"EPSG:{EPSG}",
    )
    return labels, class_ids


def build_scene(size: int, seed: int, start: date, end: date, tag: int, origin: tuple[float, float] = ORIGIN) -> Scene:
    """Parcels, classes, phenology and static surface fields of the region (deterministic in `seed`).

    `origin` only moves the region: the same seed gives the same parcels and pixels at any origin.
    """
    n_pad = 6 * math.ceil(size / 6)
    x0, y1 = origin
    polygons = _parcel_polygons(n_pad, rng_for(seed, 1), origin)
    labels, class_ids = _build_labels(polygons, size, rng_for(seed, 2), origin)
    transform = Affine(RESOLUTION, 0.0, x0, 0.0, -RESOLUTION, y1)
    # the Voronoi cells tile the square, so every pixel centre falls in exactly one of them
    parcels = rasterize(
        ((poly, i) for i, poly in enumerate(polygons)), out_shape=(n_pad, n_pad), transform=transform, dtype="int32"
    )
    pheno = ph.draw_parcel_phenology(class_ids, rng_for(seed, 3))
    rng = rng_for(seed, 4)
    shape = (n_pad, n_pad)
    brightness = rng.uniform(0.8, 1.2, len(polygons))[parcels]
    vigor = 1.0 + 0.06 * smooth_field(shape, 6.0, rng)
    soil = brightness * (1.0 + 0.04 * smooth_field(shape, 3.0, rng))
    urban = rng.uniform(0.6, 1.4, shape).astype(np.float32)
    moisture = ph.soil_moisture((end - start).days + 1, rng_for(seed, 5))
    center = st.lonlat_footprint(_bounds(origin, size), EPSG)[0]
    return Scene(
        size=size,
        n_pad=n_pad,
        seed=seed,
        tag=tag,
        origin=(float(x0), float(y1)),
        start=start,
        end=end,
        parcels=parcels,
        pheno=pheno,
        vigor=vigor.astype(np.float32),
        soil_brightness=soil.astype(np.float32),
        urban_texture=urban,
        moisture=moisture,
        labels=labels,
        center_lonlat=((center[0] + center[2]) / 2, (center[1] + center[3]) / 2),
    )


# ---------------------------------------------------------------------------------------------- surface, clouds


def pixel_fractions(scene: Scene, when: datetime, rng: np.random.Generator) -> np.ndarray:
    """Effective endmember abundances (N_ENDMEMBERS, n_pad, n_pad) on `when`, with within-parcel variation.

    Green cover varies with a static vigour field and per-date noise (sd 0.02); soil and built-up abundances
    carry per-parcel brightness and texture.
    """
    per_parcel = ph.parcel_fractions(scene.pheno, scene.day(when)).astype(np.float32)
    frac = per_parcel.T[:, scene.parcels]
    room = frac[ph.GREEN] + frac[ph.SOIL]
    green = np.clip(frac[ph.GREEN] * scene.vigor + rng.normal(0.0, 0.02, room.shape).astype(np.float32), 0.0, room)
    frac[ph.GREEN] = green
    frac[ph.SOIL] = (room - green) * scene.soil_brightness
    frac[ph.URBAN] *= scene.urban_texture
    return frac


def mix(frac: np.ndarray, spectra: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reflectance (bands, h, w) = abundances x spectra (N_ENDMEMBERS, bands), plus sensor noise."""
    e, h, w = frac.shape
    refl = (spectra.T @ frac.reshape(e, h * w)).reshape(-1, h, w)
    return refl + rng.normal(0.0, SENSOR_NOISE, refl.shape).astype(np.float32)


def cloud_fractions(n: int, rng: np.random.Generator) -> np.ndarray:
    """Cloud cover of each acquisition: 25 % clear, 15 % overcast, the rest Beta(0.9, 1.6); with 4 or more
    acquisitions at least one is clear and one overcast."""
    u = rng.random(n)
    cover = np.where(u < 0.25, 0.0, np.where(u < 0.4, 1.0, rng.beta(0.9, 1.6, n)))
    if n >= 4:
        order = rng.permutation(n)
        if not (cover == 0.0).any():
            cover[order[0]] = 0.0
        if not (cover == 1.0).any():
            cover[order[1] if cover[order[1]] != 0.0 else order[2]] = 1.0
    return cover


@dataclass(frozen=True)
class Clouds:
    """Cloud layer of one acquisition on a sensor grid: masks are disjoint (cloud > shadow > cirrus)."""

    cloud: np.ndarray  # bool
    opacity: np.ndarray  # float32, 0 outside clouds
    shadow: np.ndarray  # bool
    cirrus: np.ndarray  # bool

    def apply(self, refl: np.ndarray, bands: list[int], k: int = 1) -> np.ndarray:
        """Draw clouds, shadows and cirrus on reflectance (len(bands), h*k, w*k) of the S2 `bands` indices."""
        cloud, opacity, shadow, cirrus = (
            upsample(a, k) if k > 1 else a for a in (self.cloud, self.opacity, self.shadow, self.cirrus)
        )
        b = np.array(bands)
        out = np.where(cirrus, 0.7 * refl + 0.3 * ph.CIRRUS_SPECTRUM[b, None, None], refl)
        out = np.where(shadow, out * ph.SHADOW_TRANSMISSION[b, None, None], out)
        return np.where(cloud, (1.0 - opacity) * out + opacity * ph.CLOUD_SPECTRUM[b, None, None], out)


def draw_clouds(
    shape: tuple[int, int],
    region: int,
    resolution: int,
    cover: float,
    sun: tuple[float, float],
    rng: np.random.Generator,
) -> Clouds:
    """Clouds covering exactly `cover` of the top-left `region` x `region` pixels of a grid of `shape`.

    A smooth noise field (400 m and 100 m scales) is thresholded at its (1 - cover) quantile over the region;
    opacity grows from 0.55 at cloud edges to 1 inside. Shadows are the cloud cores displaced away from the sun by
    cloud height (0.8-3 km) x tan(zenith), computed on a margin so clouds outside the grid cast shadows into it.
    On 20 % of partly cloudy acquisitions a thin cirrus veil covers 10-50 %.
    """
    zenith, azimuth = sun
    length = rng.uniform(800.0, 3000.0) * math.tan(math.radians(min(zenith, 80.0))) / resolution
    d_row = round(math.cos(math.radians(azimuth)) * length)
    d_col = round(-math.sin(math.radians(azimuth)) * length)
    m = max(abs(d_row), abs(d_col)) + 1
    big = (shape[0] + 2 * m, shape[1] + 2 * m)
    field = 0.8 * smooth_field(big, 400.0 / resolution, rng) + 0.35 * smooth_field(big, 100.0 / resolution, rng)
    inner = field[m : m + region, m : m + region]
    if cover >= 1.0:
        threshold = float(inner.min()) - 1e-3
    elif cover <= 0.0:
        threshold = float(field.max()) + 1.0
    else:
        threshold = float(np.quantile(inner, 1.0 - cover))
    cloudy = field > threshold
    rows, cols = slice(m, m + shape[0]), slice(m, m + shape[1])
    cloud = cloudy[rows, cols]
    opacity = np.where(cloud, np.clip(0.55 + 0.45 * (field[rows, cols] - threshold) / 0.6, 0.55, 1.0), 0.0)
    thick = field > threshold + 0.3  # cloud cores (opacity >= 0.775) cast the shadows
    shadow = thick[m - d_row : m - d_row + shape[0], m - d_col : m - d_col + shape[1]] & ~cloud
    cirrus = np.zeros(shape, dtype=bool)
    if 0.0 < cover < 1.0 and rng.random() < 0.2:
        veil = smooth_field(shape, 800.0 / resolution, rng)
        cirrus = (veil > np.quantile(veil[:region, :region], 1.0 - rng.uniform(0.1, 0.5))) & ~cloud & ~shadow
    return Clouds(cloud, opacity.astype(np.float32), shadow, cirrus)


# ---------------------------------------------------------------------------------------------- writing


def _blocksize(shape: tuple[int, int]) -> int:
    """COG tile size: a power of two near a quarter of the raster, within GDAL's 128 to 512 range for COGs.

    Rasters larger than one tile get overviews (down to one tile); smaller ones are a single tile.
    """
    return int(np.clip(2 ** math.floor(math.log2(max(min(shape) / 4, 1))), 128, 512))


def write_cog(
    path: Path, data: np.ndarray, grid: st.Grid, nodata: float, resampling: str = "average", epsg: int = EPSG
) -> None:
    """Write one band as a Cloud-Optimized GeoTIFF (DEFLATE with predictor, tiled, internal overviews)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "COG",
        "width": grid.shape[1],
        "height": grid.shape[0],
        "count": 1,
        "dtype": data.dtype.name,
        "crs": f"EPSG:{epsg}",
        "transform": grid.transform,
        "nodata": nodata,
        "compress": "DEFLATE",
        "predictor": "YES",
        "level": 1,
        "blocksize": _blocksize(grid.shape),
        "overview_resampling": resampling,
    }
    with gdal_env(), rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


class AssetWriter:
    """Writes assets under `tmp/cogs/` (in CRS `epsg`) while giving them hrefs into the final folder."""

    def __init__(self, tmp: Path, final: Path, epsg: int = EPSG) -> None:
        self.tmp, self.final, self.epsg = tmp, final, epsg

    def asset(
        self,
        collection: str,
        item_id: str,
        key: str,
        data: np.ndarray,
        grid: st.Grid,
        nodata: float,
        resampling: str = "average",
    ) -> st.Asset:
        rel = Path("cogs") / collection / item_id / f"{key}.tif"
        write_cog(self.tmp / rel, data, grid, nodata, resampling, self.epsg)
        return st.Asset((self.final / rel).as_uri(), grid)

    def collection_href(self, collection: str) -> str:
        return (self.final / "collections" / f"{collection}.json").as_uri()


def _dates(scene: Scene, every: int, offset: int, at: time) -> Iterator[tuple[int, datetime]]:
    when = datetime.combine(scene.start, at) + timedelta(days=offset)
    i = 0
    while when.date() <= scene.end:
        yield i, when
        i += 1
        when += timedelta(days=every)


def _s2_dn(refl: np.ndarray) -> np.ndarray:
    """Reflectance to L2A digital numbers with the baseline 04.00+ offset (DN = 10000 x refl + 1000; 0 = nodata)."""
    return np.clip(np.rint(refl * 10000.0 + 1000.0), 1, 65535).astype(np.uint16)


def _landsat_dn(refl: np.ndarray) -> np.ndarray:
    """Reflectance to Collection 2 Level-2 digital numbers (refl = DN x 2.75e-5 - 0.2; 0 = nodata)."""
    return np.clip(np.rint((refl - st.LANDSAT_OFFSET) / st.LANDSAT_SCALE), 1, 65535).astype(np.uint16)


def simulate_s2(scene: Scene, writer: AssetWriter) -> list[dict]:
    """Sentinel-2 L2A acquisitions every 5 days: 10/20/60 m bands and SCL as COGs, and their items."""
    dates = list(_dates(scene, S2_EVERY, 0, S2_TIME))
    covers = cloud_fractions(len(dates), rng_for(scene.seed, 10))
    g10, g20, g60 = scene.grid(10), scene.grid(20), scene.grid(60)
    n20 = scene.n_pad // 2
    idx10 = [BAND_INDEX[b] for b in S2_10M]
    items = []
    for i, when in dates:
        rng = rng_for(scene.seed, 11, i)
        platform = "Sentinel-2A" if i % 2 == 0 else "Sentinel-2B"
        item_id = st.s2_item_id(when, platform, scene.tag)
        sun = solar_position(when, *scene.center_lonlat)
        spectra = ph.spectra_for(scene.moisture[(when.date() - scene.start).days])
        gain = np.float32(rng.normal(1.0, 0.02))
        frac10 = pixel_fractions(scene, when, rng)
        refl10 = mix(frac10, spectra[:, idx10], rng) * gain
        frac20 = block_mean(frac10, 2)
        refl20 = mix(frac20, spectra, rng) * gain  # all bands at 20 m: 20 m bands, 60 m source, SCL classes
        clouds = draw_clouds((n20, n20), g20.shape[0], 20, float(covers[i]), sun, rng)
        ndvi = (refl20[BAND_INDEX["B08"]] - refl20[BAND_INDEX["B04"]]) / (
            refl20[BAND_INDEX["B08"]] + refl20[BAND_INDEX["B04"]] + 1e-6
        )
        scl = np.select(
            [
                clouds.cloud & (clouds.opacity >= 0.85),
                clouds.cloud,
                clouds.shadow,
                clouds.cirrus,
                frac20[ph.WATER] >= 0.5,
                ndvi > 0.4,
            ],
            [9, 8, 3, 10, 6, 4],
            5,
        ).astype(np.uint8)
        refl10 = clouds.apply(refl10, idx10, k=2)
        refl20 = clouds.apply(refl20, list(range(len(ph.S2_BANDS_ALL))))
        refl60 = block_mean(refl20[[BAND_INDEX[b] for b in S2_60M]], 3)
        assets: dict[str, st.Asset] = {}
        s10, s20, s60 = g10.shape[0], g20.shape[0], g60.shape[0]
        for band in ph.S2_BANDS_ALL:
            if band in S2_10M:
                data, grid = refl10[S2_10M.index(band), :s10, :s10], g10
            elif band in S2_20M:
                data, grid = refl20[BAND_INDEX[band], :s20, :s20], g20
            else:
                data, grid = refl60[S2_60M.index(band), :s60, :s60], g60
            assets[band] = writer.asset("sentinel-2-l2a", item_id, band, _s2_dn(data), grid, 0)
        scl_region = scl[:s20, :s20]
        assets["SCL"] = writer.asset("sentinel-2-l2a", item_id, "SCL", scl_region, g20, 0, "mode")
        counts = np.bincount(scl_region.ravel(), minlength=12)
        items.append(
            st.s2_item(when, platform, assets, counts, sun, scene.tag, writer.collection_href("sentinel-2-l2a"), EPSG)
        )
    return items


def landsat_qa(clouds: Clouds, water: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collection 2 QA_PIXEL bit flags and the dilated-cloud ring (2 pixels around clouds)."""
    dilated = ndimage.binary_dilation(clouds.cloud, iterations=2) & ~clouds.cloud
    qa = np.full(clouds.cloud.shape, (1 << 8) | (1 << 10) | (1 << 12) | (1 << 14), dtype=np.uint16)
    qa |= np.where(dilated, 1 << 1, 0).astype(np.uint16)
    qa |= np.where(clouds.cirrus, (1 << 2) | (3 << 14), 0).astype(np.uint16)
    qa |= np.where(clouds.cloud, (1 << 3) | (3 << 8), 0).astype(np.uint16)
    qa |= np.where(clouds.shadow, (1 << 4) | (3 << 10), 0).astype(np.uint16)
    qa |= np.where(~(clouds.cloud | dilated), 1 << 6, 0).astype(np.uint16)
    qa |= np.where(water & ~clouds.cloud, 1 << 7, 0).astype(np.uint16)
    return qa, dilated


def simulate_landsat(scene: Scene, writer: AssetWriter) -> list[dict]:
    """Landsat 8/9 (alternating) C2 L2 surface reflectance and QA_PIXEL every 8 days at 30 m."""
    dates = list(_dates(scene, LANDSAT_EVERY, 2, LANDSAT_TIME))
    covers = cloud_fractions(len(dates), rng_for(scene.seed, 20))
    g30 = scene.grid(30)
    n30, s30 = scene.n_pad // 3, g30.shape[0]
    bands = [BAND_INDEX[b] for b in ph.LANDSAT_TO_S2.values()]
    items = []
    for i, when in dates:
        rng = rng_for(scene.seed, 21, i)
        platform = "landsat-8" if i % 2 == 0 else "landsat-9"
        item_id = st.landsat_item_id(when, platform, scene.tag)
        sun = solar_position(when, *scene.center_lonlat)
        spectra = ph.spectra_for(scene.moisture[(when.date() - scene.start).days])[:, bands]
        frac30 = block_mean(pixel_fractions(scene, when, rng), 3)
        refl = mix(frac30, spectra, rng) * np.float32(rng.normal(1.0, 0.02))
        clouds = draw_clouds((n30, n30), s30, 30, float(covers[i]), sun, rng)
        qa, dilated = landsat_qa(clouds, frac30[ph.WATER] >= 0.5)
        refl = clouds.apply(refl, bands)
        refl = np.where(dilated, 0.9 * refl + 0.1 * ph.CLOUD_SPECTRUM[bands, None, None], refl)
        assets = {
            key: writer.asset("landsat-c2-l2", item_id, key, _landsat_dn(refl[j, :s30, :s30]), g30, 0)
            for j, key in enumerate(ph.LANDSAT_TO_S2)
        }
        assets["qa_pixel"] = writer.asset("landsat-c2-l2", item_id, "qa_pixel", qa[:s30, :s30], g30, 1, "nearest")
        region = clouds.cloud[:s30, :s30] | clouds.cirrus[:s30, :s30]
        items.append(
            st.landsat_item(
                when,
                platform,
                assets,
                100.0 * float(region.mean()),
                sun,
                scene.tag,
                writer.collection_href("landsat-c2-l2"),
                EPSG,
            )
        )
    return items


def simulate_s1(scene: Scene, writer: AssetWriter) -> list[dict]:
    """Sentinel-1A RTC gamma0 (VV, VH, linear) every 6 days, alternating descending/ascending passes."""
    g10 = scene.grid(10)
    n = g10.shape[0]
    crop = (slice(0, n), slice(0, n))
    parcels = scene.parcels[crop]
    a_vv, a_vh, tau = (p[parcels].astype(np.float32) for p in (scene.pheno.a_vv, scene.pheno.a_vh, scene.pheno.tau))
    roughness = scene.pheno.roughness[parcels].astype(np.float32)
    items = []
    for i, when in _dates(scene, S1_EVERY, 1, time(0)):
        orbit_state, relative_orbit, at = S1_PASSES[i % 2]
        when = datetime.combine(when.date(), at)
        rng = rng_for(scene.seed, 31, i)
        frac = pixel_fractions(scene, when, rng)[(slice(None), *crop)]
        moisture = scene.moisture[(when.date() - scene.start).days]
        soil_vv = 0.02 * (0.5 + moisture) * roughness
        vv, vh = ph.backscatter(frac, a_vv, a_vh, tau, soil_vv, 0.003 * rng.uniform(0.5, 3.0))
        incidence = 0.92 if orbit_state == "ascending" else 1.0
        speckle = rng.gamma(4.4, 1.0 / 4.4, (2, n, n)).astype(np.float32)
        item_id = st.s1_item_id(when, relative_orbit, scene.tag)
        assets = {
            key: writer.asset(
                "sentinel-1-rtc", item_id, key, (value * incidence * speckle[j]).astype(np.float32), g10, st.S1_NODATA
            )
            for j, (key, value) in enumerate((("vv", vv), ("vh", vh)))
        }
        items.append(
            st.s1_item(
                when, orbit_state, relative_orbit, assets, scene.tag, writer.collection_href("sentinel-1-rtc"), EPSG
            )
        )
    return items


# ---------------------------------------------------------------------------------------------- public API


def _parse_season(season: tuple[str, str]) -> tuple[date, date]:
    try:
        start, end = (date.fromisoformat(str(s)) for s in season)
    except (TypeError, ValueError) as exc:
        raise CropflowError(f"season must be two ISO dates (YYYY-MM-DD, YYYY-MM-DD), got {season!r}") from exc
    if end <= start:
        raise CropflowError(f"season end {end} must come after its start {start}")
    if (end - start).days > 400:
        raise CropflowError(f"season {start}..{end} is longer than 400 days; simulate one growing season")
    return start, end


def _bounds(origin: tuple[float, float], size: int) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) in metres of a `size` px region with upper-left corner `origin`."""
    x0, y1 = origin
    return (x0, y1 - size * RESOLUTION, x0 + size * RESOLUTION, y1)


def _parse_origin(origin: object, size: int) -> tuple[float, float]:
    """Validated upper-left corner: two finite numbers on the ORIGIN_STEP m lattice through ORIGIN, with the
    whole region inside UTM 31N."""
    try:
        x0, y1 = origin  # type: ignore[misc]
    except (TypeError, ValueError):
        raise CropflowError(f"origin must be two numbers (easting, northing) in metres, got {origin!r}") from None
    for v in (x0, y1):
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating) or not math.isfinite(v):
            raise CropflowError(f"origin must be two finite numbers (easting, northing) in metres, got {origin!r}")
    x0, y1 = float(x0), float(y1)
    if (x0 - ORIGIN[0]) % ORIGIN_STEP or (y1 - ORIGIN[1]) % ORIGIN_STEP:
        raise CropflowError(
            f"origin {origin!r} is off the {ORIGIN_STEP} m lattice of the sample regions: easting and northing must "
            f"differ from the default origin {ORIGIN} by multiples of {ORIGIN_STEP} m (i.e. easting "
            f"{ORIGIN[0] % ORIGIN_STEP:.0f} mod {ORIGIN_STEP}, northing {ORIGIN[1] % ORIGIN_STEP:.0f} mod "
            f"{ORIGIN_STEP}), so that the 10/20/30/60 m grids of all regions align"
        )
    xmin, ymin, xmax, ymax = _bounds((x0, y1), size)
    if xmin < UTM_EASTING[0] or xmax > UTM_EASTING[1] or ymin < UTM_NORTHING[0] or ymax > UTM_NORTHING[1]:
        raise CropflowError(
            f"a {size} px region at origin {origin!r} spans eastings {xmin:.0f}..{xmax:.0f} and northings "
            f"{ymin:.0f}..{ymax:.0f}; it must lie within UTM 31N (EPSG:{EPSG}): eastings "
            f"{UTM_EASTING[0]:.0f}..{UTM_EASTING[1]:.0f}, northings {UTM_NORTHING[0]:.0f}..{UTM_NORTHING[1]:.0f}"
        )
    return x0, y1


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_collection(folder: Path, collection: dict, items: list[dict]) -> None:
    """Write `collections/<id>.json` and `items/<id>.ndjson` (one item per line) of `collection` into `folder`."""
    (folder / "items").mkdir(parents=True, exist_ok=True)
    with open(folder / "items" / f"{collection['id']}.ndjson", "w") as f:
        f.writelines(json.dumps(item, separators=(",", ":")) + "\n" for item in items)
    _write_json(folder / "collections" / f"{collection['id']}.json", collection)


def _write_region(
    tmp: Path,
    final: Path,
    size: int,
    seed: int,
    start: date,
    end: date,
    name: str,
    origin: tuple[float, float] = ORIGIN,
) -> None:
    """Write the whole region into `tmp`, with hrefs pointing into `final`."""
    # the default origin is left out of the tag so that regions generated before origins existed keep their ids
    tag = st.region_tag(name, seed, size, start, end, *(() if origin == ORIGIN else origin))
    scene = build_scene(size, seed, start, end, tag, origin)
    bounds = list(_bounds(origin, size))
    _write_json(
        tmp / "region.json",
        {
            "name": name,
            "epsg": EPSG,
            "origin": list(origin),
            "bounds": bounds,
            "bbox": st.lonlat_footprint(tuple(bounds), EPSG)[0],
            "resolution": RESOLUTION,
            "size": size,
            "season": [start.isoformat(), end.isoformat()],
            "seed": seed,
        },
    )
    _write_json(
        tmp / "classes.json",
        {
            "nodata": CLASSES_NODATA,
            "classes": [{"id": i, "name": c.name, "color": c.color} for i, c in enumerate(ph.CLASSES)],
        },
    )
    scene.labels.to_parquet(tmp / "labels.parquet", index=False)
    writer = AssetWriter(tmp, final)
    for collection_id, simulate in (
        ("sentinel-2-l2a", simulate_s2),
        ("landsat-c2-l2", simulate_landsat),
        ("sentinel-1-rtc", simulate_s1),
    ):
        items = simulate(scene, writer)
        write_collection(tmp, st.collection(collection_id, items), items)
        log.info("%s: %d items", collection_id, len(items))


def generate_region(
    out_dir: Path,
    size: int = 512,
    seed: int = 0,
    season: tuple[str, str] = ("2024-03-01", "2024-10-31"),
    name: str = "sample",
    *,
    origin: tuple[float, float] = ORIGIN,
    overwrite: bool = False,
) -> Path:
    """Generate the sample region into `out_dir` atomically (written beside it, then renamed) and return it.

    `origin` is the upper-left corner (easting, northing) in UTM 31N metres; give regions that share a STAC
    catalog origins far enough apart that their footprints do not overlap.

    Raises CropflowError for a size below 32 px, a negative seed, a bad season, an origin that is not two
    multiples of 60 m or puts the region outside UTM 31N, or an existing non-empty `out_dir` (unless
    `overwrite`, which replaces it only once the new region is complete).
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise CropflowError(f"region size must be an integer of at least {MIN_SIZE} px, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CropflowError(f"seed must be a non-negative integer, got {seed!r}")
    start, end = _parse_season(season)
    x0, y1 = _parse_origin(origin, int(size))
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CropflowError(f"{out} already exists; remove it, pick another folder, or pass overwrite=True")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        _write_region(tmp, out, int(size), int(seed), start, end, name, (x0, y1))
    log.info("sample region %r (%d px, seed %d, origin %.0f, %.0f) written to %s", name, size, seed, x0, y1, out)
    return out


@task(name="generate-region")
def generate_region_task(
    out_dir: Path,
    size: int = 512,
    seed: int = 0,
    season: tuple[str, str] = ("2024-03-01", "2024-10-31"),
    name: str = "sample",
    origin: tuple[float, float] = ORIGIN,
    overwrite: bool = False,
) -> Path:
    """Prefect task wrapper of `generate_region`."""
    return generate_region(out_dir, size=size, seed=seed, season=season, name=name, origin=origin, overwrite=overwrite)
