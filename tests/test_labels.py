"""Class map and label reading, and rasterizing parcels onto the cube grid."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from shapely.geometry import box

from infra.errors import CropflowError
from tasks.labels import cube_grid, rasterize_labels, read_classes, read_labels

CLASSES = [
    {"id": 0, "name": "wheat", "color": "#e6c229"},
    {"id": 1, "name": "maize", "color": "#f17105"},
    {"id": 2, "name": "grass", "color": "#1a8fe3"},
]
# 20 x 20 px grid of 10 m pixels, upper-left corner at (600000, 5650000) in UTM 31N
ORIGIN = (600_000.0, 5_650_000.0)
TRANSFORM = Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1])
SHAPE = (20, 20)


def px_box(col0: int, row0: int, col1: int, row1: int):
    """Polygon covering pixel columns col0..col1-1 and rows row0..row1-1 of the test grid."""
    x0, y0 = ORIGIN
    return box(x0 + 10 * col0, y0 - 10 * row1, x0 + 10 * col1, y0 - 10 * row0)


def parcels() -> gpd.GeoDataFrame:
    """Three parcels: two adjacent (train wheat 8x8, val maize 8x8) and one apart (test grass 5x6)."""
    return gpd.GeoDataFrame(
        {"parcel_id": [1, 2, 3], "class_id": [0, 1, 2], "split": ["train", "val", "test"]},
        geometry=[px_box(0, 0, 8, 8), px_box(8, 0, 16, 8), px_box(2, 12, 7, 18)],
        crs="EPSG:32631",
    )


def write_classes(path, classes=CLASSES, **extra):
    path.write_text(json.dumps({"nodata": 255, "classes": classes, **extra}))
    return path


def test_read_classes_sorted_and_checked(tmp_path):
    classes = read_classes(write_classes(tmp_path / "c.json", list(reversed(CLASSES))))
    assert [c["id"] for c in classes] == [0, 1, 2]
    assert classes[1] == CLASSES[1]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([{"id": 0, "name": "a", "color": "#000000"}, {"id": 2, "name": "b", "color": "#ffffff"}], r"must be 0\.\.1"),
        ([{"id": 0, "name": "a", "color": "#000000"}, {"id": 0, "name": "b", "color": "#ffffff"}], r"must be 0\.\.1"),
        ([{"id": 0, "name": "a", "color": "#000000"}, {"id": 1, "name": "a", "color": "#ffffff"}], "more than once"),
        ([{"id": 0, "name": "", "color": "#000000"}], "no name"),
        ([{"id": 0, "name": "a", "color": "red"}], "#rrggbb"),
        ([{"id": "0", "name": "a", "color": "#000000"}], "must be integers"),
        ([{"id": 0, "name": "a"}], "needs"),
        ([], 'no "classes" list'),
    ],
)
def test_read_classes_errors(tmp_path, classes, message):
    with pytest.raises(CropflowError, match=message):
        read_classes(write_classes(tmp_path / "c.json", classes))


def test_read_classes_missing_and_invalid_json(tmp_path):
    with pytest.raises(CropflowError, match=r"c\.json not found"):
        read_classes(tmp_path / "c.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CropflowError, match="not valid JSON"):
        read_classes(tmp_path / "bad.json")


@pytest.mark.parametrize("suffix", [".parquet", ".gpkg", ".shp"])
def test_read_labels_formats(tmp_path, suffix):
    path = tmp_path / f"labels{suffix}"
    gdf = parcels()
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    labels = read_labels(path, CLASSES)
    assert labels["class_id"].tolist() == [0, 1, 2]
    assert labels["split"].tolist() == ["train", "val", "test"]
    assert labels.crs.to_epsg() == 32631


def test_read_labels_errors(tmp_path):
    path = tmp_path / "labels.parquet"
    with pytest.raises(CropflowError, match=r"labels\.parquet not found"):
        read_labels(path, CLASSES)

    parcels().iloc[:0].to_parquet(path)
    with pytest.raises(CropflowError, match=r"labels\.parquet hold no parcel"):
        read_labels(path, CLASSES)

    parcels().set_crs(None, allow_override=True).to_parquet(path)
    with pytest.raises(CropflowError, match=r"labels\.parquet have no CRS; set it"):
        read_labels(path, CLASSES)

    parcels().drop(columns=["split"]).to_parquet(path)
    with pytest.raises(CropflowError, match=r"lack column\(s\) \['split'\]"):
        read_labels(path, CLASSES)

    parcels().drop(columns=["class_id", "split"]).to_parquet(path)
    with pytest.raises(CropflowError, match=r"lack column\(s\) \['class_id', 'split'\]"):
        read_labels(path, CLASSES)

    parcels().assign(class_id=[0, 5, 7]).to_parquet(path)
    with pytest.raises(CropflowError, match=r"class ids \[5, 7\] are not in the class map"):
        read_labels(path, CLASSES)

    parcels().assign(split=["train", "validation", "test"]).to_parquet(path)
    with pytest.raises(CropflowError, match=r"split values \['validation'\]"):
        read_labels(path, CLASSES)

    (tmp_path / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(CropflowError, match=r"junk\.gpkg could not be read"):
        read_labels(tmp_path / "junk.gpkg", CLASSES)


def test_rasterize_counts_borders_and_splits():
    target, split = rasterize_labels(parcels(), TRANSFORM, SHAPE, "EPSG:32631", border_px=1)
    assert target.dtype == np.int16 and split.dtype == np.uint8 and target.shape == SHAPE
    # without borders every parcel pixel carries its class and split
    full, _ = rasterize_labels(parcels(), TRANSFORM, SHAPE, "EPSG:32631", border_px=0)
    assert [(full == k).sum() for k in (0, 1, 2)] == [64, 64, 30]
    assert (full == -1).sum() == 400 - 158
    # split covers each whole parcel, borders included
    assert [(split == v).sum() for v in (1, 2, 3)] == [64, 64, 30]
    assert (split[full == -1] == 0).all()
    # 1-px borders: wheat (cols 0-7, rows 0-7) loses its row 7 and column 7 (next to unlabelled land and to
    # maize), not its outer edge on the grid boundary; maize loses column 8, row 7 and column 15; grass its ring
    assert (target == 0).sum() == 7 * 7
    assert (target == 1).sum() == 6 * 7
    assert (target == 2).sum() == 3 * 4
    assert target[7, 3] == -1 and target[3, 7] == -1 and target[3, 8] == -1 and target[0, 0] == 0
    assert target[14, 4] == 2 and target[12, 4] == -1
    # wider borders remove more
    wide, _ = rasterize_labels(parcels(), TRANSFORM, SHAPE, "EPSG:32631", border_px=2)
    assert (wide == 2).sum() == 1 * 2


def test_rasterize_reprojects_labels():
    in_utm, _ = rasterize_labels(parcels(), TRANSFORM, SHAPE, "EPSG:32631")
    lonlat = parcels().to_crs("EPSG:4326")
    assert lonlat.total_bounds[0] < 10  # degrees: the labels really are in another CRS
    reprojected, split = rasterize_labels(lonlat, TRANSFORM, SHAPE, "EPSG:32631")
    np.testing.assert_array_equal(reprojected, in_utm)
    assert (split == 1).sum() == 64


def test_rasterize_accepts_transform_numbers_and_cube_grid():
    import xarray as xr

    x = ORIGIN[0] + 5 + 10 * np.arange(SHAPE[1])
    y = ORIGIN[1] - 5 - 10 * np.arange(SHAPE[0])
    ds = xr.Dataset(coords={"x": x, "y": y}, attrs={"crs": "EPSG:32631", "resolution": 10.0})
    transform, shape, crs = cube_grid(ds)
    assert transform == TRANSFORM and shape == SHAPE and crs == "EPSG:32631"
    a, _ = rasterize_labels(parcels(), list(TRANSFORM)[:6], SHAPE, "EPSG:32631")
    b, _ = rasterize_labels(parcels(), TRANSFORM, SHAPE, "EPSG:32631")
    np.testing.assert_array_equal(a, b)


def test_rasterize_refuses_labels_outside_cube():
    far = parcels().translate(xoff=50_000)
    with pytest.raises(CropflowError, match="do not overlap the cube extent"):
        rasterize_labels(far, TRANSFORM, SHAPE, "EPSG:32631")
