"""Class map and labelled parcels or points: read and check them, then burn them onto the cube grid.

Labels are parcel polygons or points (GeoParquet, plain Parquet with a WKB `geometry` column, GeoPackage,
Shapefile). Their class column holds either class ids of the class map or source codes (e.g. WorldCereal
`ewoc_code`) that the class map translates (`"codes"` of each class). Without a `split` column a spatially blocked
split is drawn (`assign_blocked_split`). `rasterize_labels` gives `target` (int16 class id, -1 = unlabelled or
parcel border) and `split` (uint8: 0 none, 1 train, 2 val, 3 test) on the cube's pixel grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
import xarray as xr
from affine import Affine
from pyproj import CRS
from rasterio import features
from scipy import ndimage

from infra.errors import CropflowError

CLASS_NODATA = 255  # class rasters (labels, maps): the value of pixels without a class

SPLITS = {"train": 1, "val": 2, "test": 3}
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


def read_classes(path: Path) -> list[dict]:
    """Classes of `classes.json` (`{"classes": [{"id", "name", "color"}, ...]}`) sorted by id.

    Ids must be the integers 0..K-1 (each once), names non-empty and unique, colours `#rrggbb`. A class may list
    `"codes"`: the label codes (e.g. WorldCereal `ewoc_code`) it gathers, each in one class only.
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
        entry_out = {"id": cid, "name": name, "color": color}
        if "codes" in entry:
            codes = entry["codes"]
            if not isinstance(codes, list) or not codes or not all(isinstance(c, int | str) for c in codes):
                raise CropflowError(
                    f"class map {path}: class {cid} ({name}) has codes {codes!r}; give a list of codes."
                )
            entry_out["codes"] = [str(c) for c in codes]
        classes.append(entry_out)
    codes = [code for c in classes for code in c.get("codes", [])]
    repeated = sorted({code for code in codes if codes.count(code) > 1})
    if repeated:
        raise CropflowError(f"class map {path}: codes {repeated} belong to more than one class; give each one class.")
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
            if b"geo" in (pq.read_schema(path).metadata or {}):
                return gpd.read_parquet(path)
            frame = pd.read_parquet(path)  # plain Parquet (e.g. WorldCereal extractions): WKB geometry, no CRS
            if "geometry" not in frame.columns:
                raise ValueError("no 'geometry' column of WKB geometries")
            return gpd.GeoDataFrame(frame, geometry=shapely.from_wkb(frame["geometry"].to_numpy()))
        return gpd.read_file(path)
    except Exception as exc:
        raise CropflowError(
            f"labels {path} could not be read ({type(exc).__name__}: {exc}); "
            "give a GeoParquet, GeoPackage or Shapefile of parcel polygons or points."
        ) from None


def _class_ids(gdf: gpd.GeoDataFrame, column: str, classes: list[dict], path: Path) -> gpd.GeoDataFrame:
    """Rows whose `column` maps to a class, with an int `class_id`: ids as such, or codes through `"codes"`."""
    if column == "class_id":
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
        return gdf.assign(class_id=class_id.astype(int).to_numpy())
    id_of = {code: c["id"] for c in classes for code in c.get("codes", [])}
    if not id_of:
        raise CropflowError(
            f"labels {path}: class column {column!r} holds label codes but no class of the class map lists "
            '"codes"; add the codes each class gathers to classes.json.'
        )
    codes = gdf[column].astype(str)
    mapped = codes.map(id_of)
    if mapped.isna().all():
        common = codes.value_counts().index[:5].tolist()
        raise CropflowError(
            f"labels {path}: no {column} value is a code of the class map (most common: {common}); "
            "the labels and classes.json do not fit: add their codes to the classes."
        )
    keep = mapped.notna().to_numpy()
    return gdf[keep].assign(class_id=mapped[keep].astype(int).to_numpy())


def assign_blocked_split(
    labels: gpd.GeoDataFrame,
    block_m: float,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> np.ndarray:
    """`train`/`val`/`test` per row, drawn per square block of `block_m` metres (in the labels' UTM zone).

    Roberts et al. (2017), "Cross-validation strategies for data with temporal, spatial, hierarchical, or
    phylogenetic structure" (Ecography): whole blocks go to one split, so that neighbouring (spatially
    autocorrelated) pixels never sit on both sides. Blocks are shuffled with `seed`, then the first ones go to
    train until `fractions[0]` of the rows, the next to val, the rest to test.
    """
    centroids = labels.geometry.to_crs(labels.estimate_utm_crs()).centroid
    blocks = np.stack([np.floor(centroids.x / block_m), np.floor(centroids.y / block_m)], axis=1).astype(np.int64)
    unique, block_of = np.unique(blocks, axis=0, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    rows = np.bincount(block_of.ravel(), minlength=len(unique))[order]
    before = (np.cumsum(rows) - rows) / rows.sum()  # fraction of the rows in earlier blocks, in shuffled order
    split_of_block = np.empty(len(unique), dtype=object)
    split_of_block[order] = np.select(
        [before < fractions[0], before < fractions[0] + fractions[1]], ["train", "val"], "test"
    )
    return split_of_block[block_of.ravel()].astype(str)


def read_labels(
    path: Path,
    classes: list[dict],
    class_column: str = "class_id",
    crs: str | None = None,
    split_block_m: float | None = None,
    seed: int = 0,
) -> gpd.GeoDataFrame:
    """Labelled parcels (polygons) or points of a GeoParquet, Parquet, GeoPackage or Shapefile, checked against
    the class map.

    `class_column` holds class ids (`class_id`, the default) or source codes mapped by the classes' `"codes"` (rows
    with other codes are dropped). `crs` is assumed when the file has none. The `split` column (train/val/test)
    is required unless `split_block_m` is given: then a file without it gets `assign_blocked_split`. Rows without
    geometry and duplicates (same geometry, class and split, e.g. one row per date) are dropped. Returns the frame
    with `class_id` as int and `split` as str.
    """
    path = Path(path)
    if not path.exists():
        raise CropflowError(f"labels {path} not found; give the path of a GeoParquet/GeoPackage/Shapefile of parcels.")
    gdf = _read_vector(path)
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if gdf.empty:
        raise CropflowError(f"labels {path} hold no parcel geometry; add labelled polygons to the file.")
    if gdf.crs is None and crs is not None:
        gdf = gdf.set_crs(crs)
    if gdf.crs is None:
        raise CropflowError(
            f"labels {path} have no CRS; set it (e.g. GeoDataFrame.set_crs('EPSG:32631')) and save the file again."
        )
    needs_split = split_block_m is None or "split" in gdf.columns
    missing = [c for c in (class_column, "split") if c not in gdf.columns and (c != "split" or needs_split)]
    if missing:
        raise CropflowError(
            f"labels {path} lack column(s) {missing} (have {[c for c in gdf.columns if c != gdf.geometry.name]}); "
            f"add an integer 'class_id' (or the codes column named by class_column) and a 'split' of "
            "train/val/test per parcel (or give split_block_m to draw a blocked split)."
        )
    gdf = _class_ids(gdf, class_column, classes, path)
    if "split" not in gdf.columns:
        gdf = gdf.assign(split=assign_blocked_split(gdf, split_block_m, seed=seed))
    split = gdf["split"].astype(str).str.strip().str.lower()
    bad_splits = sorted(set(split) - SPLITS.keys())
    if bad_splits:
        raise CropflowError(f"labels {path}: split values {bad_splits} are not one of {list(SPLITS)}; fix the column.")
    gdf = gdf.assign(split=split.to_numpy())
    key = pd.Series(shapely.to_wkb(gdf.geometry.to_numpy()), index=gdf.index)
    return gdf[~pd.DataFrame({"g": key, "c": gdf["class_id"], "s": gdf["split"]}).duplicated().to_numpy()]


def cube_grid(ds: xr.Dataset) -> tuple[Affine, tuple[int, int], str]:
    """`(transform, (H, W), crs)` of a cube, from its pixel-centre `x`/`y` coordinates and `crs` attribute."""
    x, y = ds["x"].values, ds["y"].values
    res_x = float(x[1] - x[0]) if x.size > 1 else float(ds.attrs["resolution"])
    res_y = float(y[1] - y[0]) if y.size > 1 else -float(ds.attrs["resolution"])
    transform = Affine(res_x, 0.0, float(x[0]) - res_x / 2, 0.0, res_y, float(y[0]) - res_y / 2)
    return transform, (y.size, x.size), str(ds.attrs["crs"])


def labels_on_grid(
    labels: gpd.GeoDataFrame, crs: str | CRS, bounds: tuple[float, float, float, float]
) -> gpd.GeoDataFrame:
    """Labels reprojected to the cube's `crs`; a `CropflowError` if that fails or they miss the cube `bounds`."""
    if labels.crs is None:
        raise CropflowError("labels have no CRS; set one before rasterizing.")
    theirs, ours = CRS.from_user_input(labels.crs), CRS.from_user_input(crs)
    try:
        moved = labels if theirs == ours else labels.to_crs(ours)
    except Exception as exc:
        raise CropflowError(
            f"labels in {theirs.to_string()} cannot be reprojected to the cube's {crs} ({exc})."
        ) from None
    x0, y0, x1, y1 = bounds
    lb = moved.total_bounds
    if len(moved) and lb[0] < x1 and lb[2] > x0 and lb[1] < y1 and lb[3] > y0:
        return moved
    hint = ""
    raw = labels.total_bounds
    if theirs != ours and raw[0] < x1 and raw[2] > x0 and raw[1] < y1 and raw[3] > y0:
        hint = f" Their coordinates read as {crs} would fall on the cube: is their CRS ({theirs.to_string()}) wrong?"
    raise CropflowError(
        f"the labels (bounds {lb.round(1).tolist()} in {crs}, from {theirs.to_string()}) do not overlap the cube "
        f"extent [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]; check that the labels and the region are the same place."
        + hint
    )


def rasterize_labels(
    labels: gpd.GeoDataFrame,
    transform: Affine | Sequence[float],
    shape: tuple[int, int],
    crs: str | CRS,
    border_px: int = 1,
    point_buffer_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Burn parcels and points onto a grid: `target` int16 `(H, W)` class id (-1 = none), `split` uint8 `(H, W)`.

    `transform` is an `Affine` or its 6 numbers `(a, b, c, d, e, f)`; labels are reprojected to `crs` if needed.
    A pixel belongs to the parcel holding its centre (later rows win where parcels overlap). Pixels within
    `border_px` pixels (8-neighbourhood) of another parcel or of unlabelled land get target -1, their split is kept.
    Points label the pixel they fall in, or with `point_buffer_px > 0` the pixels whose centres lie within that
    many pixels of the point; they have no border and are burnt over the parcels.
    Raises `CropflowError` when the labels cannot be brought to `crs` or do not overlap the grid.
    """
    transform = transform if isinstance(transform, Affine) else Affine(*transform[:6])
    h, w = shape
    (xa, ya), (xb, yb) = transform @ (0, 0), transform @ (w, h)
    labels = labels_on_grid(labels, crs, (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
    is_point = labels.geometry.geom_type.isin(["Point", "MultiPoint"]).to_numpy()
    geometry = labels.geometry.to_numpy().copy()
    if point_buffer_px > 0:
        geometry[is_point] = shapely.buffer(geometry[is_point], point_buffer_px * abs(transform.a))
    ids = np.arange(1, len(labels) + 1)
    parcel, point = np.zeros((h, w), dtype=np.int32), np.zeros((h, w), dtype=np.int32)
    for out, rows in ((parcel, ~is_point), (point, is_point)):
        if rows.any():
            features.rasterize(zip(geometry[rows], ids[rows], strict=True), out=out, transform=transform)
    if not (parcel.any() or point.any()):
        raise CropflowError(
            f"no label covers a pixel centre of the cube grid ({h} x {w} px); the labels touch the cube only at "
            "its edges or between pixel centres: check that the labels and the region are the same place."
        )
    class_of = np.concatenate([[-1], labels["class_id"].to_numpy(dtype=np.int16)])
    split_of = np.concatenate([[0], labels["split"].map(SPLITS).to_numpy(dtype=np.uint8)])
    target = class_of[parcel].astype(np.int16)
    if border_px > 0:
        size = 2 * border_px + 1
        border = ndimage.maximum_filter(parcel, size=size, mode="nearest") != ndimage.minimum_filter(
            parcel, size=size, mode="nearest"
        )
        target[border] = -1
    labelled = np.where(point > 0, point, parcel)  # points over parcels, without border
    target = np.where(point > 0, class_of[point], target).astype(np.int16)
    split = split_of[labelled].astype(np.uint8)
    return target, split
