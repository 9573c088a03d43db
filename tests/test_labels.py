"""Class map and label reading, and rasterizing parcels onto the cube grid."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from affine import Affine
from shapely.geometry import Point, box

from infra.errors import CropflowError
from infra.settings import real_data_dir
from tasks.labels import SPLITS, assign_blocked_split, cube_grid, rasterize_labels, read_classes, read_labels

CLASSES = [
    {"id": 0, "name": "wheat", "color": "#e6c229"},
    {"id": 1, "name": "maize", "color": "#f17105"},
    {"id": 2, "name": "grass", "color": "#1a8fe3"},
]
# 20 x 20 px grid of 10 m pixels, upper-left corner at (600000, 5650000) in UTM 31N
ORIGIN = (600_000.0, 5_650_000.0)
TRANSFORM = Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1])
SHAPE = (20, 20)
REAL = real_data_dir()


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


def points() -> gpd.GeoDataFrame:
    """Four labelled points at pixel centres of the test grid, one per split and one more train point."""
    pixels = [(3, 2, 0, "train"), (12, 5, 1, "val"), (4, 15, 2, "test"), (17, 17, 0, "train")]
    return gpd.GeoDataFrame(
        {"class_id": [p[2] for p in pixels], "split": [p[3] for p in pixels]},
        geometry=[Point(ORIGIN[0] + 10 * col + 5, ORIGIN[1] - 10 * row - 5) for col, row, _, _ in pixels],
        crs="EPSG:32631",
    )


@pytest.mark.parametrize("suffix", [".parquet", ".gpkg", ".shp"])
def test_points_round_trip_as_single_pixels(tmp_path, suffix):
    path = tmp_path / f"points{suffix}"
    points().to_parquet(path) if suffix == ".parquet" else points().to_file(path)
    labels = read_labels(path, CLASSES)
    target, split = rasterize_labels(labels, TRANSFORM, SHAPE, "EPSG:32631", border_px=1)
    assert (target >= 0).sum() == 4  # one pixel each, no border removed
    assert target[2, 3] == 0 and target[5, 12] == 1 and target[15, 4] == 2 and target[17, 17] == 0
    assert split[2, 3] == 1 and split[5, 12] == 2 and split[15, 4] == 3
    buffered, _ = rasterize_labels(labels, TRANSFORM, SHAPE, "EPSG:32631", point_buffer_px=1.5)
    assert (buffered == 1).sum() == 9 and (buffered[4:7, 11:14] == 1).all()  # centres within 1.5 px: a 3 x 3 square


def test_points_burn_over_parcels_without_border():
    mixed = gpd.GeoDataFrame(pd.concat([parcels(), points().iloc[[0]].assign(class_id=2)], ignore_index=True))
    target, _ = rasterize_labels(mixed, TRANSFORM, SHAPE, "EPSG:32631", border_px=1)
    assert target[2, 3] == 2  # the point inside the wheat parcel keeps its own class
    assert target[1, 3] == 0 and target[3, 3] == 0  # and its neighbours are not made a border


def test_wrong_label_crs_is_named(tmp_path):
    wrong = parcels().set_crs("EPSG:32630", allow_override=True)  # UTM 31N coordinates declared as zone 30
    with pytest.raises(CropflowError, match=r"do not overlap.*is their CRS \(EPSG:32630\) wrong\?"):
        rasterize_labels(wrong, TRANSFORM, SHAPE, "EPSG:32631")
    with pytest.raises(CropflowError, match="do not overlap the cube extent"):
        rasterize_labels(parcels().translate(yoff=-400), TRANSFORM, SHAPE, "EPSG:32631")


def test_codes_through_the_class_map(tmp_path):
    coded = [dict(c, codes=[f"{c['id']}00", f"{c['id']}01"]) for c in CLASSES]
    classes = read_classes(write_classes(tmp_path / "c.json", coded))
    assert classes[1]["codes"] == ["100", "101"]
    path = tmp_path / "labels.gpkg"
    parcels().assign(crop=["001", "101", "999"]).to_file(path)
    labels = read_labels(path, classes, class_column="crop")
    assert labels["class_id"].tolist() == [0, 1]  # code 999 belongs to no class: dropped
    with pytest.raises(CropflowError, match=r"no crop value is a code of the class map \(most common"):
        parcels().assign(crop=["7", "8", "9"]).to_file(path)
        read_labels(path, classes, class_column="crop")
    with pytest.raises(CropflowError, match='no class of the class map lists "codes"'):
        read_labels(path, CLASSES, class_column="crop")
    twice = [dict(c, codes=["5"]) for c in CLASSES[:2]]
    with pytest.raises(CropflowError, match=r"codes \['5'\] belong to more than one class"):
        read_classes(write_classes(tmp_path / "c.json", twice))


def test_blocked_split_keeps_blocks_whole():
    grid = gpd.GeoDataFrame(
        geometry=[Point(ORIGIN[0] + 100 * i + 5, ORIGIN[1] - 100 * j - 5) for i in range(20) for j in range(20)],
        crs="EPSG:32631",
    )
    split = assign_blocked_split(grid, block_m=500, seed=1)
    assert (split == assign_blocked_split(grid, block_m=500, seed=1)).all()
    blocks = [(int(p.x - ORIGIN[0]) // 500, int(ORIGIN[1] - p.y) // 500) for p in grid.geometry]
    per_block = pd.Series(split).groupby(pd.Series(blocks).astype(str)).nunique()
    assert (per_block == 1).all() and len(per_block) == 16
    shares = pd.Series(split).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.13) and {"val", "test"} <= set(shares.index)


@pytest.mark.skipif(not (REAL / "worldcereal-parcels").is_dir(), reason="real data not found; set CROPFLOW_REAL_DATA")
def test_real_worldcereal_points_on_a_cube_grid(tmp_path):
    """500 real LPIS points (plain Parquet, WKB in lon/lat, one row per date): mapped by ewoc_code, rasterized as
    single pixels on a 10 m grid placed over a cluster of them in UTM 30N."""
    path = REAL / "worldcereal-parcels" / "2023_FRA_LPIS_POLY_110.geoparquet"
    codes = {"maize": ["1201000010"], "wheat": ["1101060000"], "grassland": ["1115000000"]}
    entries = [{"id": i, "name": n, "color": "#000000", "codes": c} for i, (n, c) in enumerate(codes.items())]
    classes = read_classes(write_classes(tmp_path / "c.json", entries))
    labels = read_labels(path, classes, class_column="ewoc_code", crs="EPSG:4326", split_block_m=2000)
    rows = pd.read_parquet(path, columns=["sample_id", "ewoc_code"]).drop_duplicates("sample_id")
    expected = rows["ewoc_code"].astype(str).isin([c for cs in codes.values() for c in cs]).sum()
    assert len(labels) == labels["sample_id"].nunique() == expected > 100  # one row per point, not per date
    assert labels.geometry.geom_type.eq("Point").all() and set(labels["split"]) <= set(SPLITS)
    centre = gpd.GeoSeries([Point(-0.2083, 43.9095)], crs="EPSG:4326").to_crs("EPSG:32630").iloc[0]
    x0, y0 = 10 * round(centre.x / 10) - 3500, 10 * round(centre.y / 10) + 3500
    grid = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
    target, split = rasterize_labels(labels, grid, (700, 700), "EPSG:32630")
    inside = labels.to_crs("EPSG:32630").cx[x0 : x0 + 7000, y0 - 7000 : y0]
    assert (target >= 0).sum() == len(inside) > 20
    for point, class_id in zip(inside.geometry, inside["class_id"], strict=True):
        col, row = (int(v) for v in ~grid @ (point.x, point.y))
        assert target[row, col] == class_id and split[row, col] > 0
    with pytest.raises(CropflowError, match="do not overlap"):
        rasterize_labels(labels, grid, (700, 700), "EPSG:32631")
