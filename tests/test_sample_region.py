"""Tests of the simulated sample region: determinism, STAC items, COGs, clouds/SCL, QA bits, SAR, labels."""

from __future__ import annotations

import inspect
import json
import re
from datetime import date, datetime
from pathlib import Path
from urllib.parse import urlparse

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.extensions.sar import Polarization, SarExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.features import rasterize
from region_helpers import file_bytes, region_items
from scipy import ndimage

from infra.errors import CropflowError
from tasks import sample_phenology as ph
from tasks import sample_region as sr
from tasks import sample_stac as st

COLLECTIONS = ("sentinel-2-l2a", "landsat-c2-l2", "sentinel-1-rtc")
SHORT_SEASON = ("2024-06-01", "2024-06-20")


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px region over the default season."""
    return sr.generate_region(tmp_path_factory.mktemp("r") / "r64", size=64, seed=0)


@pytest.fixture(scope="module")
def wide_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A region larger than one COG tile, not a multiple of 6 px (partial 20/30/60 m pixels), short season."""
    return sr.generate_region(
        tmp_path_factory.mktemp("r") / "r298", size=298, seed=3, season=("2024-06-01", "2024-06-10")
    )


def read(href: str) -> np.ndarray:
    with rasterio.open(href) as src:
        return src.read(1)


def s2_reflectance(item: dict, band: str) -> np.ndarray:
    rb = item["assets"][band]["raster:bands"][0]
    return read(item["assets"][band]["href"]).astype(np.float64) * rb["scale"] + rb["offset"]


def landsat_reflectance(item: dict, key: str) -> np.ndarray:
    rb = item["assets"][key]["raster:bands"][0]
    return read(item["assets"][key]["href"]).astype(np.float64) * rb["scale"] + rb["offset"]


def parcel_classes(root: Path, resolution: int = 10) -> np.ndarray:
    """Class id on the region grid (-1 outside labelled parcels)."""
    meta = json.loads((root / "region.json").read_text())
    labels = gpd.read_parquet(root / "labels.parquet")
    n = -(-meta["size"] * 10 // resolution)
    transform = Affine(resolution, 0.0, meta["bounds"][0], 0.0, -resolution, meta["bounds"][3])
    return rasterize(zip(labels.geometry, labels.class_id, strict=True), (n, n), transform=transform, fill=-1)


# ---------------------------------------------------------------------------------------------- inputs, atomicity


@pytest.mark.parametrize("size", [31, 0, -64])
def test_refuses_small_regions(tmp_path: Path, size: int) -> None:
    with pytest.raises(CropflowError, match="at least 32"):
        sr.generate_region(tmp_path / "r", size=size)
    assert list(tmp_path.iterdir()) == []


def test_refuses_negative_seed(tmp_path: Path) -> None:
    with pytest.raises(CropflowError, match="seed"):
        sr.generate_region(tmp_path / "r", size=32, seed=-1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("season", [("2024-10-01", "2024-03-01"), ("2024-03-01", "2024-13-01"), ("x", "y")])
def test_refuses_bad_seasons(tmp_path: Path, season: tuple[str, str]) -> None:
    with pytest.raises(CropflowError, match="season"):
        sr.generate_region(tmp_path / "r", size=32, season=season)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("origin", "match"),
    [
        ((600010.0, 5650000.0), "60 m lattice"),
        ((600000.0, 5649970.0), "60 m lattice"),
        ((600000.0, 5640000.0), "60 m lattice"),  # a round number, but 10000 m is not a multiple of 60 m
        ((100020.0, 5650000.0), "within UTM 31N"),  # west of the zone
        ((833940.0, 5650000.0), "within UTM 31N"),  # the 320 m wide region ends east of 834000
        ((600000.0, 9330040.0), "within UTM 31N"),  # north of the zone
        ((600000.0, 220.0), "within UTM 31N"),  # the region reaches below the equator
        ((600000.0, float("nan")), "finite numbers"),
        ((True, 5650000.0), "finite numbers"),
        (("600000", "5650000"), "finite numbers"),
        ((600000.0,), "two numbers"),
        (None, "two numbers"),
    ],
)
def test_refuses_bad_origins(tmp_path: Path, origin: object, match: str) -> None:
    with pytest.raises(CropflowError, match=match):
        sr.generate_region(tmp_path / "r", size=32, season=SHORT_SEASON, origin=origin)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_regions_at_other_origins_do_not_mix(tmp_path: Path) -> None:
    """Two regions in one STAC catalog: a search over one's bbox must not find the other's items, and no item id
    may be shared (upserts would overwrite) -- even for the same name, seed, size and season."""
    a = sr.generate_region(tmp_path / "a", size=32, season=SHORT_SEASON)
    origin = (612000.0, 5640040.0)  # on the 60 m lattice through sr.ORIGIN
    b = sr.generate_region(tmp_path / "b", size=32, season=SHORT_SEASON, origin=origin)
    meta_a, meta_b = (json.loads((r / "region.json").read_text()) for r in (a, b))
    assert meta_a["origin"] == list(sr.ORIGIN) and meta_b["origin"] == list(origin)
    assert meta_b["bounds"] == [612000.0, 5639720.0, 612320.0, 5640040.0]

    def overlap(p: list[float], q: list[float]) -> bool:
        return p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]

    assert not overlap(meta_a["bbox"], meta_b["bbox"])
    for collection in COLLECTIONS:
        items_a, items_b = region_items(a, collection), region_items(b, collection)
        assert len(items_a) == len(items_b) > 0
        assert {it["id"] for it in items_a}.isdisjoint(it["id"] for it in items_b), collection
        for it in items_b:
            assert not overlap(it["bbox"], meta_a["bbox"]) and overlap(it["bbox"], meta_b["bbox"])
            for asset in it["assets"].values():
                t = asset["proj:transform"]
                assert (t[2], t[5]) == origin
                with rasterio.open(asset["href"]) as src:
                    assert (src.transform.c, src.transform.f) == origin
        for it in items_a:
            assert not overlap(it["bbox"], meta_b["bbox"])
    wrs = {
        (it["properties"]["landsat:wrs_path"], it["properties"]["landsat:wrs_row"])
        for it in region_items(b, "landsat-c2-l2")
    }
    assert len(wrs) == 1 and region_items(b, "landsat-c2-l2")[0]["id"][10:16] == "".join(wrs.pop())
    # the origin only moves the region: same parcels (shifted) and the same pixels
    labels_a, labels_b = (gpd.read_parquet(r / "labels.parquet") for r in (a, b))
    assert labels_b.total_bounds == pytest.approx(meta_b["bounds"], abs=1e-6)
    shifted = labels_a.translate(origin[0] - sr.ORIGIN[0], origin[1] - sr.ORIGIN[1])
    assert shifted.geom_equals_exact(labels_b.geometry, tolerance=1e-6).all()
    assert (labels_a[["class_id", "split"]] == labels_b[["class_id", "split"]]).all().all()
    b02_a, b02_b = (read(region_items(r, "sentinel-2-l2a")[0]["assets"]["B02"]["href"]) for r in (a, b))
    assert np.array_equal(b02_a, b02_b)


def test_item_ids_of_the_catalog_sample_regions_differ() -> None:
    """`sample` and `sample-tiny` (flows/regions.yaml) share dates; their ids must differ in every collection."""
    start, end = date(2024, 3, 1), date(2024, 10, 31)
    tags = [st.region_tag("sample", 0, 512, start, end), st.region_tag("sample-tiny", 1, 96, start, end)]
    when = datetime(2024, 6, 1, 10, 33, 41)
    assert len({st.landsat_item_id(when, "landsat-8", t) for t in tags}) == 2
    assert len({st.s2_item_id(when, "Sentinel-2A", t) for t in tags}) == 2
    assert len({st.s1_item_id(when, 37, t) for t in tags}) == 2
    for tag in (0, 232, 233, 2**32 - 1):
        path, row = st.landsat_wrs(tag)
        assert 1 <= int(path) <= 233 and 1 <= int(row) <= 248 and len(path) == len(row) == 3


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> list[dict]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sr, "simulate_s1", broken)  # fails after S2 and Landsat COGs are written
    with pytest.raises(RuntimeError, match="disk full"):
        sr.generate_region(tmp_path / "r", size=32, season=SHORT_SEASON)
    assert list(tmp_path.iterdir()) == []


def test_existing_region_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = sr.generate_region(tmp_path / "r", size=32, seed=1, season=SHORT_SEASON)
    with pytest.raises(CropflowError, match="already exists"):
        sr.generate_region(out, size=32, seed=2, season=SHORT_SEASON)
    assert json.loads((out / "region.json").read_text())["seed"] == 1
    sr.generate_region(out, size=32, seed=2, season=SHORT_SEASON, overwrite=True)
    assert json.loads((out / "region.json").read_text())["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    href = region_items(out, "sentinel-2-l2a")[0]["assets"]["B02"]["href"]
    assert Path(urlparse(href).path).is_file()


def test_deterministic_in_seed(tmp_path: Path) -> None:
    a = sr.generate_region(tmp_path / "a", size=64, seed=5, season=SHORT_SEASON)
    b = sr.generate_region(tmp_path / "b", size=64, seed=5, season=SHORT_SEASON)
    c = sr.generate_region(tmp_path / "c", size=64, seed=6, season=SHORT_SEASON)
    files_a, files_b, files_c = file_bytes(a), file_bytes(b), file_bytes(c)
    assert files_a.keys() == files_b.keys()
    cogs = [k for k in files_a if k.endswith(".tif")]
    assert len(cogs) > 50
    assert all(files_a[k] == files_b[k] for k in cogs)
    for collection in COLLECTIONS:
        text_a = (a / "items" / f"{collection}.ndjson").read_text().replace(a.as_uri(), "ROOT")
        text_b = (b / "items" / f"{collection}.ndjson").read_text().replace(b.as_uri(), "ROOT")
        assert text_a == text_b
    assert gpd.read_parquet(a / "labels.parquet").equals(gpd.read_parquet(b / "labels.parquet"))
    # another seed: other pixels, parcels and item ids
    b02_a = [v for k, v in files_a.items() if k.endswith("B02.tif")]
    b02_c = [v for k, v in files_c.items() if k.endswith("B02.tif")]
    assert len(b02_a) == len(b02_c) and all(x != y for x, y in zip(b02_a, b02_c, strict=True))
    assert not gpd.read_parquet(a / "labels.parquet").geometry.equals(gpd.read_parquet(c / "labels.parquet").geometry)
    ids_a = {it["id"] for it in region_items(a, "sentinel-2-l2a")}
    assert ids_a.isdisjoint(it["id"] for it in region_items(c, "sentinel-2-l2a"))


def test_prefect_task_wraps_generate_region() -> None:
    from prefect import Task

    assert isinstance(sr.generate_region_task, Task)
    assert sr.generate_region_task.name == "generate-region"
    assert inspect.signature(sr.generate_region_task.fn).parameters["origin"].default == sr.ORIGIN


# ---------------------------------------------------------------------------------------------- region, classes, labels


def test_region_json(region: Path) -> None:
    meta = json.loads((region / "region.json").read_text())
    assert meta["name"] == "sample" and meta["epsg"] == 32631 and meta["resolution"] == 10
    assert meta["size"] == 64 and meta["seed"] == 0 and meta["season"] == ["2024-03-01", "2024-10-31"]
    assert meta["origin"] == [600000.0, 5650000.0]
    xmin, ymin, xmax, ymax = meta["bounds"]
    assert [xmin, ymax] == meta["origin"]
    assert (xmax - xmin, ymax - ymin) == (640, 640) and xmin % 10 == 0 and ymax % 10 == 0
    expected = Transformer.from_crs(32631, 4326, always_xy=True).transform_bounds(*meta["bounds"])
    assert np.allclose(meta["bbox"], expected, atol=1e-5)
    lon0, lat0, lon1, lat1 = meta["bbox"]
    assert 2.5 < lon0 < lon1 < 6.5 and 49.5 < lat0 < lat1 < 51.5  # Belgium / northern France


def test_class_map(region: Path) -> None:
    cmap = json.loads((region / "classes.json").read_text())
    assert cmap["nodata"] == 255
    classes = cmap["classes"]
    assert [c["id"] for c in classes] == list(range(len(classes)))
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c["color"]) for c in classes)
    names = [c["name"] for c in classes]
    assert len(set(names)) == len(names) and len(set(c["color"] for c in classes)) == len(classes)
    assert {"grassland", "non_crop"} <= set(names)
    crops = set(names) - {"grassland", "non_crop"}
    assert len(crops) >= 6 and {"winter_wheat", "winter_barley", "maize"} <= crops


def test_labels(region: Path) -> None:
    labels = gpd.read_parquet(region / "labels.parquet")
    classes = json.loads((region / "classes.json").read_text())["classes"]
    assert list(labels.columns) == ["parcel_id", "class_id", "class_name", "split", "geometry"]
    assert labels.crs.to_epsg() == 32631
    assert labels["parcel_id"].dtype == np.int64 and labels["class_id"].dtype == np.int64
    assert labels["parcel_id"].is_unique
    assert (labels.geom_type == "Polygon").all() and labels.is_valid.all()
    assert dict(zip(labels.class_id, labels.class_name, strict=True)).items() <= {(c["id"], c["name"]) for c in classes}
    assert set(labels.split) == {"train", "val", "test"}
    assert set(labels.class_id[labels.split == "train"]) == {c["id"] for c in classes}
    # parcels tile the region without overlaps (slivers under one pixel are dropped)
    xmin, ymin, xmax, ymax = json.loads((region / "region.json").read_text())["bounds"]
    assert labels.total_bounds == pytest.approx([xmin, ymin, xmax, ymax], abs=1e-6)
    assert labels.area.sum() == pytest.approx(labels.union_all().area, rel=1e-9)
    assert labels.area.sum() == pytest.approx((xmax - xmin) * (ymax - ymin), rel=0.01)
    # spatially blocked: all parcels whose centroid lies in one 16 px block share its split
    block = 16 * 10
    key = (((ymax - labels.centroid.y) // block) * 100 + (labels.centroid.x - xmin) // block).astype(int)
    assert (labels.groupby(key)["split"].nunique() == 1).all()


def test_parcel_size_scales_with_area() -> None:
    for n_pad in (66, 300, 516):
        polygons = sr._parcel_polygons(n_pad, np.random.default_rng(0))
        mean_px = n_pad * n_pad / len(polygons)
        minimum = sr.MIN_PARCELS_PER_CLASS * len(ph.CLASSES)
        assert len(polygons) == minimum or 1500 <= mean_px <= 2500


def test_every_class_in_train_and_test_when_large_enough() -> None:
    rng = np.random.default_rng(0)
    splits = np.array(["train"] * 80 + ["val"] * 25 + ["test"] * 25)
    for _ in range(20):
        classes = sr._assign_classes(splits, rng)
        for name in ("train", "val", "test"):
            assert set(classes[splits == name]) == set(range(len(ph.CLASSES)))


# ---------------------------------------------------------------------------------------------- STAC metadata


REQUIRED = {
    "sentinel-2-l2a": {
        "extensions": ["eo", "sat", "proj", "raster"],
        "properties": [
            "platform",
            "constellation",
            "instruments",
            "eo:cloud_cover",
            "proj:epsg",
            "sat:orbit_state",
            "sat:relative_orbit",
            "s2:processing_baseline",
            "s2:mgrs_tile",
            "s2:mean_solar_zenith",
        ],
        "assets": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12", "SCL"],
        "id": r"S2[AB]_MSIL2A_\d{8}T\d{6}_R\d{3}_T\d{2}[A-Z]{3}_\d{8}T\d{6}",
    },
    "landsat-c2-l2": {
        "extensions": ["eo", "proj", "raster", "view", "landsat", "classification"],
        "properties": [
            "platform",
            "instruments",
            "eo:cloud_cover",
            "proj:epsg",
            "gsd",
            "view:sun_elevation",
            "landsat:wrs_path",
            "landsat:wrs_row",
            "landsat:collection_category",
        ],
        "assets": ["coastal", "blue", "green", "red", "nir08", "swir16", "swir22", "qa_pixel"],
        "id": r"LC0[89]_L2SP_\d{6}_\d{8}_02_T1",
    },
    "sentinel-1-rtc": {
        "extensions": ["sar", "sat", "proj", "raster"],
        "properties": [
            "platform",
            "constellation",
            "proj:epsg",
            "sar:polarizations",
            "sar:instrument_mode",
            "sar:frequency_band",
            "sar:product_type",
            "sat:orbit_state",
            "sat:relative_orbit",
            "sat:absolute_orbit",
            "start_datetime",
            "end_datetime",
        ],
        "assets": ["vv", "vh"],
        "id": r"S1A_IW_GRDH_1SDV_\d{8}T\d{6}_\d{8}T\d{6}_\d{6}_[0-9A-F]{6}_rtc",
    },
}


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_items_follow_the_planetary_computer_schemas(region: Path, collection: str) -> None:
    items = region_items(region, collection)
    req = REQUIRED[collection]
    offset, every = {"sentinel-2-l2a": (0, 5), "landsat-c2-l2": (2, 8), "sentinel-1-rtc": (1, 6)}[collection]
    assert len(items) == len(range(offset, (date(2024, 10, 31) - date(2024, 3, 1)).days + 1, every))
    validator = JsonSchemaSTACValidator()
    region_bbox = json.loads((region / "region.json").read_text())["bbox"]
    times = []
    for d in items:
        assert d["collection"] == collection and d["stac_version"] == "1.0.0"
        assert re.fullmatch(req["id"], d["id"])
        assert {st.EXTENSIONS[e] for e in req["extensions"]} <= set(d["stac_extensions"])
        assert set(req["properties"]) <= set(d["properties"])
        assert d["properties"]["proj:epsg"] == 32631
        assert set(req["assets"]) <= set(d["assets"])
        # bbox and geometry in lon/lat, covering the region
        lon0, lat0, lon1, lat1 = d["bbox"]
        assert lon0 <= region_bbox[0] + 1e-6 and lat0 <= region_bbox[1] + 1e-6
        assert lon1 >= region_bbox[2] - 1e-6 and lat1 >= region_bbox[3] - 1e-6
        ring = np.array(d["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        # pystac parses it, and the migrated item validates against the (offline) core item schema
        item = pystac.Item.from_dict(d)
        assert item.id == d["id"] and item.datetime is not None
        validator.validate_core(item.to_dict(transform_hrefs=False), pystac.STACObjectType.ITEM, "1.1.0")
        times.append(item.datetime)
        for asset in d["assets"].values():
            assert asset["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
            assert asset["href"].startswith("file:///") and Path(urlparse(asset["href"]).path).is_file()
            assert Path(urlparse(asset["href"]).path).is_relative_to(region / "cogs")
            assert {"proj:shape", "proj:transform", "proj:bbox", "raster:bands"} <= set(asset)
    assert times == sorted(times) and len({d["id"] for d in items}) == len(items)
    assert times[0].date() >= date(2024, 3, 1) and times[-1].date() <= date(2024, 10, 31)
    # the collection document
    coll = json.loads((region / "collections" / f"{collection}.json").read_text())
    parsed = pystac.Collection.from_dict(coll)
    validator.validate_core(parsed.to_dict(transform_hrefs=False), pystac.STACObjectType.COLLECTION, "1.1.0")
    assert parsed.id == collection and set(req["assets"]) <= set(coll["item_assets"])
    interval = coll["extent"]["temporal"]["interval"][0]
    assert interval == [items[0]["properties"]["datetime"], items[-1]["properties"]["datetime"]]
    assert all(
        link["href"] == (region / "collections" / f"{collection}.json").as_uri()
        for d in items
        for link in d["links"]
        if link["rel"] == "collection"
    )


def test_s2_band_metadata(region: Path) -> None:
    item = region_items(region, "sentinel-2-l2a")[0]
    assert item["properties"]["s2:processing_baseline"] == "05.10"
    for band, gsd in ph.S2_BAND_GSD.items():
        asset = item["assets"][band]
        assert asset["gsd"] == gsd and asset["eo:bands"][0]["name"] == band
        assert asset["raster:bands"] == [
            {
                "nodata": 0,
                "data_type": "uint16",
                "bits_per_sample": 15,
                "spatial_resolution": gsd,
                "scale": 0.0001,
                "offset": -0.1,
            }
        ]
        assert asset["proj:transform"] == [gsd, 0.0, 600000.0, 0.0, -gsd, 5650000.0]
    assert item["assets"]["B08"]["eo:bands"][0]["common_name"] == "nir"
    assert item["assets"]["SCL"]["raster:bands"][0] == {"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}
    # readable through pystac's extension API (pystac migrates proj:epsg to proj:code on load)
    parsed = pystac.Item.from_dict(item)
    assert EOExtension.ext(parsed.assets["B04"]).bands[0].common_name == "red"
    assert RasterExtension.ext(parsed.assets["B11"]).bands[0].offset == -0.1
    assert ProjectionExtension.ext(parsed).code == "EPSG:32631"
    assert ProjectionExtension.ext(parsed.assets["B05"]).shape == [32, 32]
    scl_classes = {c.value: c.name for c in ClassificationExtension.ext(parsed.assets["SCL"]).classes}
    assert scl_classes[3] == "cloud_shadows" and scl_classes[9] == "cloud_high_probability"


def test_landsat_and_s1_metadata(region: Path) -> None:
    landsat = region_items(region, "landsat-c2-l2")
    assert [it["properties"]["platform"] for it in landsat[:4]] == ["landsat-8", "landsat-9"] * 2
    blue = landsat[0]["assets"]["blue"]
    assert blue["raster:bands"][0] == {
        "scale": 2.75e-05,
        "nodata": 0,
        "offset": -0.2,
        "data_type": "uint16",
        "spatial_resolution": 30,
    }
    assert blue["eo:bands"][0]["name"] == "OLI_B2" and blue["proj:transform"][0] == 30.0
    bitfields = {
        b["name"]: (b["offset"], b["length"]) for b in landsat[0]["assets"]["qa_pixel"]["classification:bitfields"]
    }
    assert bitfields["fill"] == (0, 1) and bitfields["cloud"] == (3, 1) and bitfields["clear"] == (6, 1)
    assert bitfields["cloud_confidence"] == (8, 2)
    bits = ClassificationExtension.ext(pystac.Item.from_dict(landsat[0]).assets["qa_pixel"]).bitfields
    assert [(b.name, b.offset) for b in bits][:7] == [
        ("fill", 0), ("dilated_cloud", 1), ("cirrus", 2), ("cloud", 3), ("cloud_shadow", 4), ("snow", 5), ("clear", 6)
    ]  # fmt: skip
    s1 = region_items(region, "sentinel-1-rtc")
    assert [it["properties"]["sat:orbit_state"] for it in s1[:4]] == ["descending", "ascending"] * 2
    assert SarExtension.ext(pystac.Item.from_dict(s1[0])).polarizations == [Polarization.VV, Polarization.VH]
    for it in s1:
        p = it["properties"]
        assert (p["sat:absolute_orbit"] - 73) % 175 + 1 == p["sat:relative_orbit"]
        assert p["start_datetime"] < p["datetime"] < p["end_datetime"]
        assert it["assets"]["vv"]["raster:bands"][0]["data_type"] == "float32"


# ---------------------------------------------------------------------------------------------- COGs


def test_assets_are_cogs_on_their_declared_grid(wide_region: Path) -> None:
    shapes = {10: 298, 20: 149, 30: 100, 60: 50}
    n_checked = 0
    for collection in COLLECTIONS:
        for item in region_items(wide_region, collection):
            for key, asset in item["assets"].items():
                with rasterio.open(asset["href"]) as src:
                    structure = src.tags(ns="IMAGE_STRUCTURE")
                    assert structure["LAYOUT"] == "COG" and structure["COMPRESSION"] == "DEFLATE", key
                    assert src.profile["tiled"] and src.crs.to_epsg() == 32631
                    block = src.block_shapes[0]
                    assert block[0] == block[1] and block[0] % 16 == 0
                    assert bool(src.overviews(1)) == (max(src.shape) > block[0]), key
                    assert list(src.shape) == asset["proj:shape"]
                    assert list(src.transform)[:6] == asset["proj:transform"]
                    assert list(src.bounds) == asset["proj:bbox"]
                    assert src.shape[0] == shapes[round(src.transform.a)]
                    rb = asset["raster:bands"][0]
                    assert src.dtypes[0] == rb["data_type"] and src.nodata == rb["nodata"]
                n_checked += 1
    assert n_checked == 2 * 13 + 1 * 8 + 2 * 2
    with rasterio.open(region_items(wide_region, "sentinel-2-l2a")[0]["assets"]["B02"]["href"]) as src:
        assert src.overviews(1) == [2, 4]


# ---------------------------------------------------------------------------------------------- pixels


def test_scl_marks_exactly_the_drawn_clouds(region: Path) -> None:
    covers = []
    for item in region_items(region, "sentinel-2-l2a"):
        scl20 = read(item["assets"]["SCL"]["href"])
        assert set(np.unique(scl20)) <= {3, 4, 5, 6, 8, 9, 10}
        scl = scl20.repeat(2, 0).repeat(2, 1)
        b02 = s2_reflectance(item, "B02")
        # clouds are bright in blue, everything else is not: the cloud pixels are exactly those flagged 8/9
        assert np.array_equal(b02 > 0.2, np.isin(scl, (8, 9))), item["id"]
        cover = 100.0 * np.isin(scl20, (8, 9, 10)).mean()
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(cover, abs=1e-4)
        shadow = 100.0 * (scl20 == 3).mean()
        assert item["properties"]["s2:cloud_shadow_percentage"] == pytest.approx(shadow, abs=1e-4)
        covers.append(cover)
    covers = np.array(covers)
    assert covers.min() == 0.0 and covers.max() == 100.0
    assert ((covers > 0) & (covers < 100)).sum() >= len(covers) // 3


def test_cloud_shadows_are_dark(region: Path) -> None:
    items = region_items(region, "sentinel-2-l2a")
    nir = np.stack([s2_reflectance(it, "B08") for it in items])
    scl = np.stack([read(it["assets"]["SCL"]["href"]).repeat(2, 0).repeat(2, 1) for it in items])
    clear = np.isin(scl, (4, 5, 6))
    ratios = []
    for t in range(len(items)):
        for r, c in zip(*np.nonzero(scl[t] == 3), strict=True):
            dates = np.flatnonzero(clear[:, r, c] & (nir[:, r, c] > 0.05))  # land, not dark water
            if len(dates):
                nearest = dates[np.argmin(abs(dates - t))]
                if abs(nearest - t) <= 2:
                    ratios.append(nir[t, r, c] / nir[nearest, r, c])
    assert len(ratios) > 100
    assert np.median(ratios) < 0.5 and np.quantile(ratios, 0.95) < 0.8


def test_ndvi_follows_class_phenology(region: Path) -> None:
    items = region_items(region, "sentinel-2-l2a")
    classes = parcel_classes(region)
    names = [c.name for c in ph.CLASSES]
    mean_ndvi: dict[str, list[float]] = {}
    months: list[int] = []
    for it in items:
        scl = read(it["assets"]["SCL"]["href"]).repeat(2, 0).repeat(2, 1)
        if not np.isin(scl, (4, 5)).any():
            continue
        red, nir = s2_reflectance(it, "B04"), s2_reflectance(it, "B08")
        ndvi = (nir - red) / (nir + red)
        months.append(datetime.fromisoformat(it["properties"]["datetime"][:10]).month)
        for name in ("winter_wheat", "maize"):
            m = (classes == names.index(name)) & np.isin(scl, (4, 5))
            mean_ndvi.setdefault(name, []).append(float(ndvi[m].mean()) if m.any() else np.nan)
    months_arr = np.array(months)
    wheat, maize = np.array(mean_ndvi["winter_wheat"]), np.array(mean_ndvi["maize"])
    # winter wheat is green in spring while maize fields are bare; in August it is the other way round
    spring, august = np.isin(months_arr, (4, 5)), months_arr == 8
    assert np.nanmean(wheat[spring]) > 0.6 and np.nanmean(maize[spring]) < 0.3
    assert np.nanmean(maize[august]) > 0.6 and np.nanmean(wheat[august]) < 0.45


def test_landsat_qa_pixel_bits(region: Path) -> None:
    covers = []
    for item in region_items(region, "landsat-c2-l2"):
        qa = read(item["assets"]["qa_pixel"]["href"]).astype(np.int64)
        bit = {
            name: (qa >> offset) & 1 == 1
            for name, offset in (
                ("fill", 0),
                ("dilated", 1),
                ("cirrus", 2),
                ("cloud", 3),
                ("shadow", 4),
                ("snow", 5),
                ("clear", 6),
                ("water", 7),
            )
        }
        assert not bit["fill"].any() and not bit["snow"].any()
        assert np.array_equal(bit["clear"], ~(bit["cloud"] | bit["dilated"]))
        assert np.array_equal((qa >> 8) & 3 == 3, bit["cloud"])
        assert np.array_equal((qa >> 10) & 3 == 3, bit["shadow"])
        assert np.array_equal((qa >> 14) & 3 == 3, bit["cirrus"])
        assert not (bit["cloud"] & (bit["shadow"] | bit["dilated"] | bit["water"])).any()
        assert not (bit["dilated"] & ~ndimage.binary_dilation(bit["cloud"], iterations=2)).any()
        blue = landsat_reflectance(item, "blue")
        assert (blue[bit["cloud"]] > 0.2).all()
        assert (blue[bit["clear"] & ~bit["cirrus"]] < 0.2).all()
        cover = 100.0 * (bit["cloud"] | bit["cirrus"]).mean()
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(cover, abs=0.01)
        covers.append(cover)
    assert min(covers) == 0.0 and max(covers) == 100.0


def test_s1_backscatter(region: Path) -> None:
    items = region_items(region, "sentinel-1-rtc")
    classes = parcel_classes(region)
    maize = classes == [c.name for c in ph.CLASSES].index("maize")
    vh_maize: dict[int, list[float]] = {}
    for item in items:
        vv, vh = read(item["assets"]["vv"]["href"]), read(item["assets"]["vh"]["href"])
        assert vv.dtype == np.float32 and vh.dtype == np.float32
        assert np.isfinite(vv).all() and (vv > 0).all() and (vh > 0).all()
        assert 3 < np.median(vv / vh) < 30  # co-pol is stronger than cross-pol
        assert 1e-4 < np.median(vv) < 0.5  # linear power (about -40 to -3 dB), not dB
        month = int(item["properties"]["datetime"][5:7])
        vh_maize.setdefault(month, []).append(float(vh[maize].mean()))
    # the maize canopy raises cross-polarised volume scattering from spring (bare soil) to August
    assert np.mean(vh_maize[8]) > 2 * np.mean(vh_maize[4])
    # multiplicative speckle of a few looks: coefficient of variation ~ 1/sqrt(4.4) in a uniform parcel
    labels = gpd.read_parquet(region / "labels.parquet")
    biggest = labels.loc[labels.area.idxmax()]
    mask = rasterize([(biggest.geometry, 1)], classes.shape, transform=Affine(10, 0, 600000, 0, -10, 5650000))
    inner = ndimage.binary_erosion(mask == 1, iterations=1)
    vv = read(items[0]["assets"]["vv"]["href"])[inner]
    assert 0.3 < vv.std() / vv.mean() < 0.7


# ---------------------------------------------------------------------------------------------- phenology


def test_phenology_separates_classes_with_overlap() -> None:
    rng = np.random.default_rng(0)
    class_ids = np.repeat(np.arange(len(ph.CLASSES)), 40)
    pheno = ph.draw_parcel_phenology(class_ids, rng)
    days = np.arange(60, 305, 5)
    frac = np.stack([ph.parcel_fractions(pheno, float(d)) for d in days], axis=1)  # (parcels, days, endmembers)
    assert np.allclose(frac.sum(axis=2), 1.0) and (frac >= -1e-12).all()
    green = frac[..., ph.GREEN] + frac[..., ph.FOREST]
    # leave-one-out nearest class centroid on the green cover curves
    correct = 0
    for i in range(len(class_ids)):
        others = np.ones(len(class_ids), bool)
        others[i] = False
        centroids = np.stack([green[others & (class_ids == k)].mean(0) for k in range(len(ph.CLASSES))])
        correct += int(np.argmin(((centroids - green[i]) ** 2).sum(1)) == class_ids[i])
    assert correct / len(class_ids) > 0.9
    # parcels of a class are not identical, and the two winter cereals are close: barley ripens ~2-3 weeks earlier
    wheat, barley = (class_ids == [c.name for c in ph.CLASSES].index(n) for n in ("winter_wheat", "winter_barley"))
    assert green[wheat].std(axis=0).max() > 0.05
    half = [days[np.argmax(curve[np.argmax(curve) :] < curve.max() / 2) + np.argmax(curve)] for curve in green]
    gap = np.median(np.array(half)[wheat]) - np.median(np.array(half)[barley])
    assert 10 <= gap <= 30
