"""Deliverables of a crop map: class and confidence COGs, a PNG preview with legend, and a STAC item.

Every file is written atomically (beside its target, then renamed). Rasters are streamed from the probabilities
store in row strips, so memory does not grow with the region.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path

import numpy as np
import pystac
import rasterio
import rasterio.shutil
import xarray as xr
from affine import Affine
from prefect import task
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds, transform_geom
from rasterio.windows import Window

from infra.gdal import gdal_env
from infra.storage import location, open_raster, open_zarr, output_file
from tasks.figures import png_figure
from tasks.labels import CLASS_NODATA, cube_grid, read_classes

NODATA = CLASS_NODATA
COG_BLOCK = 512
THUMBNAIL = 256  # overviews go down until the smallest fits in this many pixels
MAP_COLLECTION = "cropflow-crop-maps"  # STAC collection of the maps loaded into a STAC API
MEDIA_TYPES = {".tif": pystac.MediaType.COG, ".png": pystac.MediaType.PNG, ".zarr": "application/vnd+zarr"}


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """`"#rrggbb"` -> `(r, g, b)`."""
    c = color.lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", c):
        raise ValueError(f"colour {color!r} is not of the form #rrggbb")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def class_colormap(classes: list[dict]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table of the classes; no-data (255) is transparent."""
    cmap = {int(c["id"]): (*hex_to_rgb(c["color"]), 255) for c in classes}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


def overview_count(height: int, width: int) -> int:
    """Overview levels (halvings) until the largest side fits in `THUMBNAIL` pixels; at least one."""
    return max(1, math.ceil(math.log2(max(height, width, 2) / THUMBNAIL)))


def _write_cog(
    ds: xr.Dataset,
    name: str,
    out_tif: Path,
    nodata: float,
    resampling: str,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    description: str = "",
) -> Path:
    """Stream the 2-D variable `name` of `ds` into a tiled GeoTIFF, then copy it to a COG with overviews."""
    arr = ds[name]
    h, w = arr.shape
    transform, _, crs = cube_grid(ds)
    strip = int((arr.encoding.get("chunks") or (COG_BLOCK,))[0])
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": arr.dtype.name, "crs": crs,
        "transform": transform, "nodata": nodata, "tiled": True, "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK,
        "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }  # fmt: skip
    out_tif = location(out_tif)
    with output_file(out_tif) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".stage-") as stage_dir:
        stage = Path(stage_dir) / "stage.tif"
        with gdal_env(), rasterio.open(stage, "w", **profile) as dst:
            for y0 in range(0, h, strip):
                y1 = min(h, y0 + strip)
                dst.write(arr[y0:y1].values, 1, window=Window(0, y0, w, y1 - y0))
            if colormap:
                dst.write_colormap(1, colormap)
            dst.set_band_description(1, description)
        rasterio.shutil.copy(
            stage, tmp, driver="COG", BLOCKSIZE=COG_BLOCK, COMPRESS="DEFLATE", PREDICTOR="YES",
            OVERVIEW_COUNT=overview_count(h, w), RESAMPLING=resampling, BIGTIFF="IF_SAFER",
        )  # fmt: skip
    return out_tif


def write_class_cog(probs_zarr: Path, classes: list[dict], out_tif: Path) -> Path:
    """The class map as a uint8 COG: colour table from the class colours, no-data 255, mode-resampled overviews."""
    ds = open_zarr(probs_zarr, chunks=None)
    return _write_cog(ds, "class", out_tif, NODATA, "MODE", class_colormap(classes), "crop class id")


def write_confidence_cog(probs_zarr: Path, out_tif: Path) -> Path:
    """The confidence (probability of the mapped class) as a float32 COG, no-data NaN, averaged overviews."""
    ds = open_zarr(probs_zarr, chunks=None)
    return _write_cog(ds, "confidence", out_tif, float("nan"), "AVERAGE", description="confidence")


def _read_preview(path: Path, max_size: int) -> tuple[np.ndarray, Affine, str]:
    """The class map decimated (mode, from the COG overviews) to at most `max_size` pixels on its long side."""
    with open_raster(path) as src:
        f = max(1, math.ceil(max(src.height, src.width) / max_size))
        shape = (math.ceil(src.height / f), math.ceil(src.width / f))
        data = src.read(1, out_shape=shape, resampling=Resampling.mode)
        transform = src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0])
        return data, transform, src.crs.to_string()


def write_preview_png(
    class_map: Path | np.ndarray,
    classes: list[dict],
    out_png: Path,
    title: str = "",
    transform: Affine | None = None,
    crs: str = "",
    max_size: int = 2048,
) -> Path:
    """A PNG of the class map with a legend of class names and colours; axes in km when the grid is known.

    `class_map` is a class COG (its grid is read from it) or a `(H, W)` array with an optional `transform`/`crs`.
    No-data pixels are left white.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    if isinstance(class_map, np.ndarray):
        data = class_map
    else:
        data, transform, crs = _read_preview(class_map, max_size)
    ids = sorted(int(c["id"]) for c in classes)
    colours = {int(c["id"]): np.array(hex_to_rgb(c["color"])) / 255 for c in classes}
    lut = [colours.get(i, (0.5, 0.5, 0.5)) for i in range(ids[-1] + 1)]
    cmap = ListedColormap(lut).with_extremes(bad=(1, 1, 1, 0))
    norm = BoundaryNorm(np.arange(len(lut) + 1) - 0.5, len(lut))
    h, w = data.shape
    extent = None
    if transform is not None:
        x0, y0 = transform @ (0, 0)
        x1, y1 = transform @ (w, h)
        extent = (x0 / 1000, x1 / 1000, y1 / 1000, y0 / 1000)
    savefig = {"bbox_inches": "tight", "facecolor": "white"}
    size = (8, float(np.clip(8 * h / w, 3, 16)))
    with png_figure(out_png, savefig, figsize=size, dpi=110, facecolor="white") as (_, ax):
        ax.imshow(np.ma.masked_equal(data, NODATA), cmap=cmap, norm=norm, interpolation="nearest", extent=extent)
        ax.ticklabel_format(useOffset=False, style="plain")
        unit = f"km, {crs}" if crs else "km"
        ax.set_xlabel(f"easting ({unit})" if extent else "column (pixels)")
        ax.set_ylabel(f"northing ({unit})" if extent else "row (pixels)")
        ax.set_title(title)
        handles = [Patch(facecolor=colours[int(c["id"])], edgecolor="0.3", label=c["name"]) for c in classes]
        if (data == NODATA).any():
            handles.append(Patch(facecolor="white", edgecolor="0.3", label="no data"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="class")
    return location(out_png)


def _slug(name: str) -> str:
    """Machine-readable class name (letters, digits, `-`, `_`) as the classification extension requires."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name.strip()).strip("_") or "class"


def write_map_item(
    cog_path: Path,
    classes: list[dict],
    region: str,
    season: tuple[date, date],
    out_json: Path,
    assets: dict[str, Path] | None = None,
    derived_from: Sequence[str] = (),
) -> pystac.Item:
    """A STAC item for the class COG: footprint, season as datetime range, projection, classes, no-data.

    The `crop_map` asset carries `classification:classes` and `raster:bands`; `assets` adds more files
    (key -> path, e.g. confidence, preview); `derived_from` adds links to the inputs. Asset hrefs are relative to
    `out_json`, which is written atomically.
    """
    cog_path, out_json = location(cog_path).resolve(), location(out_json).resolve()
    start, end = (date.fromisoformat(str(d)) for d in season)
    with open_raster(cog_path) as src:
        crs, bounds, shape, transform = src.crs, src.bounds, src.shape, src.transform
    corners = [(bounds.left, bounds.bottom), (bounds.right, bounds.bottom), (bounds.right, bounds.top),
               (bounds.left, bounds.top), (bounds.left, bounds.bottom)]  # fmt: skip
    geometry = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [corners]}, precision=7)
    item = pystac.Item(
        id=f"{region}-crop-map-{start}-{end}",
        geometry=geometry,
        bbox=[round(v, 7) for v in transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)],
        datetime=None,
        start_datetime=datetime.combine(start, time.min, tzinfo=UTC),
        end_datetime=datetime.combine(end, time.max.replace(microsecond=0), tzinfo=UTC),
        properties={
            "title": f"Crop map of {region}, {start} to {end}",
            "description": "Crop type per pixel predicted from a satellite image time series by cropflow.",
        },
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(code=crs.to_string(), shape=list(shape), transform=list(transform)[:6], bbox=list(bounds))
    asset = pystac.Asset(href=str(cog_path), media_type=pystac.MediaType.COG, roles=["data"], title="crop class")
    item.add_asset("crop_map", asset)
    ClassificationExtension.ext(asset, add_if_missing=True).classes = [
        Classification.create(
            value=int(c["id"]), name=_slug(c["name"]), title=c["name"], description=c["name"],
            color_hint=c["color"].lstrip("#").upper(),
        )
        for c in classes
    ] + [Classification.create(value=NODATA, name="nodata", title="no data", nodata=True)]  # fmt: skip
    RasterExtension.ext(asset, add_if_missing=True).bands = [
        RasterBand.create(nodata=NODATA, data_type=DataType.UINT8, spatial_resolution=abs(transform.a))
    ]
    for key, path in (assets or {}).items():
        path = location(path).resolve()
        roles = ["overview"] if path.suffix == ".png" else ["data"]
        item.add_asset(key, pystac.Asset(href=str(path), media_type=MEDIA_TYPES.get(path.suffix), roles=roles))
    for href in derived_from:
        item.add_link(pystac.Link("derived_from", href, media_type=pystac.MediaType.GEOJSON))
    item.set_self_href(str(out_json))
    item.make_asset_hrefs_relative()
    with output_file(out_json) as tmp:
        tmp.write_text(json.dumps(item.to_dict(include_self_link=False), indent=2) + "\n")
    return item


def write_map_catalog(item_json: Path, out_dir: Path, collection_id: str = MAP_COLLECTION) -> Path:
    """A folder that `infra.stac_api.load` takes: the map item of `item_json` in `collection_id`.

    Writes `collections/<collection_id>.json` (extent of the map) and `items/<collection_id>.ndjson` (the item, its
    asset hrefs as absolute `file://` URLs like the sample regions'), atomically, and returns `out_dir`. Loading
    another map's folder upserts the same collection with that map's extent.
    """
    item_json = location(item_json).resolve()
    item = pystac.Item.from_dict(json.loads(item_json.read_text()))
    item.set_self_href(str(item_json))
    for asset in item.assets.values():
        asset.href = location(asset.get_absolute_href()).as_uri()
    out_dir = location(out_dir)
    collection_json = out_dir / "collections" / f"{collection_id}.json"
    collection = pystac.Collection(
        id=collection_id,
        title="cropflow crop maps",
        description="Crop type maps predicted from satellite image time series by cropflow.",
        extent=pystac.Extent(
            pystac.SpatialExtent([item.bbox]),
            pystac.TemporalExtent([[item.common_metadata.start_datetime, item.common_metadata.end_datetime]]),
        ),
        license="other",
    )
    item.collection_id = collection_id
    item.add_link(pystac.Link("collection", collection_json.resolve().as_uri(), pystac.MediaType.JSON))
    for path, text in (
        (collection_json, json.dumps(collection.to_dict(include_self_link=False), indent=2) + "\n"),
        (out_dir / "items" / f"{collection_id}.ndjson", json.dumps(item.to_dict(include_self_link=False)) + "\n"),
    ):
        with output_file(path) as tmp:
            tmp.write_text(text)
    return out_dir


@task(name="export-map")
def export_map_task(
    probs_zarr: Path,
    classes_path: Path,
    region: str,
    season: tuple[date, date],
    out_dir: Path,
    derived_from: Sequence[str] = (),
) -> dict[str, Path]:
    """Class and confidence COGs, PNG preview and STAC item of a probabilities store, written into `out_dir`; the
    item also as a folder `out_dir/stac` loadable into the local STAC API (`cropflow stac load OUT_DIR/stac`)."""
    classes = read_classes(classes_path)
    out_dir = location(out_dir)
    start, end = season
    outputs = {
        "crop_map": write_class_cog(probs_zarr, classes, out_dir / "crop_map.tif"),
        "confidence": write_confidence_cog(probs_zarr, out_dir / "confidence.tif"),
    }
    outputs["preview"] = write_preview_png(
        outputs["crop_map"], classes, out_dir / "crop_map.png", title=f"Crop map of {region}, {start} to {end}"
    )
    write_map_item(
        outputs["crop_map"], classes, region, season, out_dir / "crop_map.stac.json",
        assets={"confidence": outputs["confidence"], "preview": outputs["preview"], "probabilities": probs_zarr},
        derived_from=derived_from,
    )  # fmt: skip
    outputs["stac_item"] = out_dir / "crop_map.stac.json"
    outputs["stac_catalog"] = write_map_catalog(outputs["stac_item"], out_dir / "stac")
    return outputs
