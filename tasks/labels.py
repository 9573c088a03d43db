"""Class map and labelled parcels: read and check them, then burn them onto the cube grid.

`rasterize_labels` gives `target` (int16 class id, -1 = unlabelled or parcel border) and `split`
(uint8: 0 none, 1 train, 2 val, 3 test) on the cube's pixel grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine
from pyproj import CRS
from rasterio import features
from scipy import ndimage

from infra.errors import CropflowError

SPLITS = {"train": 1, "val": 2, "test": 3}
REQUIRED_COLUMNS = ("class_id", "split")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


def read_classes(path: Path) -> list[dict]:
    """Classes of `classes.json` (`{"classes": [{"id", "name", "color"}, ...]}`) sorted by id.

    Ids must be the integers 0..K-1 (each once), names non-empty and unique, colours `#rrggbb`.
    """
    path = Path(path)
    if not path.is_file():
        raise CropflowError(f"class map {path} not found; give the path of a classes.json file.")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CropflowError(f"class map {path} is not valid JSON ({exc}); fix or regenerate the file.") from None
    entries = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CropflowError(
            f'class map {path} has no "classes" list; expected {{"classes": [{{"id", "name", "color"}}, ...]}}.'
        )
    classes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"id", "name", "color"} <= entry.keys():
            raise CropflowError(f'class map {path}: entry {i} needs "id", "name" and "color"; got {entry!r}.')
        cid, name, color = entry["id"], entry["name"], entry["color"]
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise CropflowError(f"class map {path}: entry {i} has id {cid!r}; ids must be integers.")
        if not isinstance(name, str) or not name.strip():
            raise CropflowError(f"class map {path}: class {cid} has no name; give every class a non-empty name.")
        if not isinstance(color, str) or not _COLOR.match(color):
            raise CropflowError(f"class map {path}: class {cid} ({name}) has colour {color!r}; use '#rrggbb'.")
        classes.append({"id": cid, "name": name, "color": color})
    classes.sort(key=lambda c: c["id"])
    ids = [c["id"] for c in classes]
    if ids != list(range(len(ids))):
        raise CropflowError(f"class map {path}: ids {ids} must be 0..{len(ids) - 1}, each once; renumber the classes.")
    names = [c["name"] for c in classes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise CropflowError(f"class map {path}: class names {duplicated} appear more than once; make them unique.")
    return classes


def _read_vector(path: Path) -> gpd.GeoDataFrame:
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return gpd.read_parquet(path)
        return gpd.read_file(path)
    except Exception as exc:
        raise CropflowError(
            f"labels {path} could not be read ({type(exc).__name__}: {exc}); "
            "give a GeoParquet, GeoPackage or Shapefile with parcel polygons."
        ) from None


def read_labels(path: Path, classes: list[dict]) -> gpd.GeoDataFrame:
    """Labelled parcels of a GeoParquet, GeoPackage or Shapefile, checked against the class map.

    Needs a CRS, an integer `class_id` column with ids of `classes` and a `split` column of `train`/`val`/`test`.
    Rows without geometry are dropped. Returns the frame with `class_id` as int and `split` as str.
    """
    path = Path(path)
    if not path.exists():
        raise CropflowError(f"labels {path} not found; give the path of a GeoParquet/GeoPackage/Shapefile of parcels.")
    gdf = _read_vector(path)
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if gdf.empty:
        raise CropflowError(f"labels {path} hold no parcel geometry; add labelled polygons to the file.")
    if gdf.crs is None:
        raise CropflowError(
            f"labels {path} have no CRS; set it (e.g. GeoDataFrame.set_crs('EPSG:32631')) and save the file again."
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in gdf.columns]
    if missing:
        raise CropflowError(
            f"labels {path} lack column(s) {missing} (have {[c for c in gdf.columns if c != gdf.geometry.name]}); "
            "add an integer 'class_id' and a 'split' of train/val/test per parcel."
        )
    class_id = pd.to_numeric(gdf["class_id"], errors="coerce")
    if class_id.isna().any() or (class_id != class_id.round()).any():
        bad = gdf.loc[class_id.isna() | (class_id != class_id.round()), "class_id"].unique()[:10].tolist()
        raise CropflowError(f"labels {path}: class_id values {bad} are not integers; give every parcel a class id.")
    known = {c["id"] for c in classes}
    unknown = sorted(set(class_id.astype(int)) - known)
    if unknown:
        raise CropflowError(
            f"labels {path}: class ids {unknown} are not in the class map (ids {sorted(known)}); "
            "add them to classes.json or fix the labels."
        )
    split = gdf["split"].astype(str).str.strip().str.lower()
    bad_splits = sorted(set(split) - SPLITS.keys())
    if bad_splits:
        raise CropflowError(f"labels {path}: split values {bad_splits} are not one of {list(SPLITS)}; fix the column.")
    return gdf.assign(class_id=class_id.astype(int).to_numpy(), split=split.to_numpy())


def cube_grid(ds: xr.Dataset) -> tuple[Affine, tuple[int, int], str]:
    """`(transform, (H, W), crs)` of a cube, from its pixel-centre `x`/`y` coordinates and `crs` attribute."""
    x, y = ds["x"].values, ds["y"].values
    res_x = float(x[1] - x[0]) if x.size > 1 else float(ds.attrs["resolution"])
    res_y = float(y[1] - y[0]) if y.size > 1 else -float(ds.attrs["resolution"])
    transform = Affine(res_x, 0.0, float(x[0]) - res_x / 2, 0.0, res_y, float(y[0]) - res_y / 2)
    return transform, (y.size, x.size), str(ds.attrs["crs"])


def rasterize_labels(
    labels: gpd.GeoDataFrame,
    transform: Affine | Sequence[float],
    shape: tuple[int, int],
    crs: str | CRS,
    border_px: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Burn parcels onto a grid: `target` int16 `(H, W)` class id (-1 = none) and `split` uint8 `(H, W)`.

    `transform` is an `Affine` or its 6 numbers `(a, b, c, d, e, f)`; labels are reprojected to `crs` if needed.
    A pixel belongs to the parcel holding its centre (later rows win where parcels overlap). Pixels within
    `border_px` pixels (8-neighbourhood) of another parcel or of unlabelled land get target -1, their split is kept.
    """
    transform = transform if isinstance(transform, Affine) else Affine(*transform[:6])
    h, w = shape
    if labels.crs is None:
        raise CropflowError("labels have no CRS; set one before rasterizing.")
    labels = labels if CRS.from_user_input(labels.crs) == CRS.from_user_input(crs) else labels.to_crs(crs)
    parcel = np.zeros((h, w), dtype=np.int32)
    if len(labels):
        features.rasterize(
            zip(labels.geometry, range(1, len(labels) + 1), strict=True),
            out=parcel,
            transform=transform,
            all_touched=False,
        )
    if not parcel.any():
        x0, y0 = transform @ (0, 0)
        x1, y1 = transform @ (w, h)
        lb = labels.total_bounds.round(1).tolist() if len(labels) else []
        raise CropflowError(
            f"the labels (bounds {lb} in {crs}) do not overlap the cube extent "
            f"[{min(x0, x1):.1f}, {min(y0, y1):.1f}, {max(x0, x1):.1f}, {max(y0, y1):.1f}]; "
            "check that the labels and the region are the same place."
        )
    class_of = np.concatenate([[-1], labels["class_id"].to_numpy(dtype=np.int16)])
    split_of = np.concatenate([[0], labels["split"].map(SPLITS).to_numpy(dtype=np.uint8)])
    target = class_of[parcel].astype(np.int16)
    split = split_of[parcel].astype(np.uint8)
    if border_px > 0:
        size = 2 * border_px + 1
        border = ndimage.maximum_filter(parcel, size=size, mode="nearest") != ndimage.minimum_filter(
            parcel, size=size, mode="nearest"
        )
        target[border] = -1
    return target, split
