"""Catalogs and search: presets and user catalogs, asset mapping, scale/offset, proj keys, de-duplication, retries.

Items are the real ones that Planetary Computer, Earth Search and USGS serve (`<real data>/stac-items/`); catalogs
are a small STAC API served on 127.0.0.1 by this module (no test reaches the internet), or the local pgstac API.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pystac
import pytest
import stackstac
from region_helpers import region_items

from infra.errors import CropflowError
from infra.retry import HttpRetry
from infra.settings import Settings, get_settings, real_data_dir
from tasks.catalog import (
    deduplicate,
    get_catalog,
    harmonise_assets,
    load_catalogs,
    normalise_proj,
    search_items,
    sign_href,
    sign_items,
)
from tasks.sensors import S2_BANDS, get_sensor, s2_processing_baseline, scale_offset

FAST = HttpRetry(retries=2, backoff=0.01, jitter=0.0, timeout=5.0)
SEASON = (date(2019, 1, 1), date(2024, 12, 31))
LANDSAT_KEYS = ["blue", "green", "red", "nir08", "swir16", "swir22"]


# ---------------------------------------------------------------------------------------------------------------------
# Real items


@pytest.fixture(scope="module")
def real_items() -> Path:
    data = real_data_dir()
    if data is None or not (data / "stac-items").is_dir():
        pytest.skip("real STAC items not found: set CROPFLOW_REAL_DATA to the shared data folder (with stac-items/)")
    return data / "stac-items"


def load(folder: Path, name: str) -> list[dict]:
    """Items of a file: a JSON list, a FeatureCollection or one Feature."""
    doc = json.loads((folder / name).read_text())
    if isinstance(doc, list):
        return doc
    return doc["features"] if doc.get("type") == "FeatureCollection" else [doc]


def earth_search_v1(item: dict, *, applied: bool) -> dict:
    """The real Earth Search v0 item as Earth Search v1 lists it: assets by common name, raster:bands with the
    -0.1 offset, baseline 05.00 and `earthsearch:boa_offset_applied`."""
    keys = get_sensor("s2").asset_keys("earth-search")
    rename = {band: key for key, band in keys.bands.items()} | {"SCL": "scl"}
    out = copy.deepcopy(item)
    out["assets"] = {rename.get(k, k): v for k, v in item["assets"].items()}
    for key in keys.bands:
        out["assets"][key]["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]
    out["properties"] |= {"s2:processing_baseline": "05.00", "earthsearch:boa_offset_applied": applied}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# A STAC API on 127.0.0.1: landing page, collections, paginated POST /search; `script` makes /search misbehave.


class StacServer:
    """Serves `collections` (id -> items) like a STAC API, `page_size` items per page.

    Each entry of `script` answers one /search request: an int is an HTTP status sent instead of results, a float
    is a stall (seconds) before the results. `searches` records the JSON bodies of the /search requests.
    """

    def __init__(self, collections: dict[str, list[dict]], page_size: int = 100) -> None:
        self.collections = collections
        self.page_size = page_size
        self.script: list[int | float] = []
        self.searches: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def landing(self) -> dict:
        return {
            "type": "Catalog",
            "id": "test-api",
            "description": "STAC API of tests/test_catalog.py",
            "stac_version": "1.0.0",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core",
                "https://api.stacspec.org/v1.0.0/collections",
                "https://api.stacspec.org/v1.0.0/item-search",
                "https://api.stacspec.org/v1.0.0/item-search#filter",
                "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
                "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
            ],
            "links": [
                {"rel": "self", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "data", "href": f"{self.url}/collections", "type": "application/json"},
                {"rel": "search", "href": f"{self.url}/search", "type": "application/geo+json", "method": "POST"},
            ],
        }

    def collection(self, cid: str) -> dict:
        return {
            "type": "Collection",
            "id": cid,
            "stac_version": "1.0.0",
            "description": cid,
            "license": "proprietary",
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
            "links": [{"rel": "self", "href": f"{self.url}/collections/{cid}"}],
        }

    def search(self, body: dict) -> dict:
        start, end = body["datetime"].split("/")
        found = [
            item
            for cid in body["collections"]
            for item in self.collections.get(cid, [])
            if start[:10] <= item["properties"]["datetime"][:10] <= end[:10]
        ]
        if "filter" in body:  # the one CQL2 filter cropflow sends: eo:cloud_cover <= value
            found = [i for i in found if i["properties"].get("eo:cloud_cover", 0) <= body["filter"]["args"][1]]
        first = int(body.get("token", 0))
        page = {"type": "FeatureCollection", "features": found[first : first + self.page_size], "links": []}
        if first + self.page_size < len(found):
            next_body = {**body, "token": str(first + self.page_size)}
            page["links"].append({"rel": "next", "href": f"{self.url}/search", "method": "POST", "body": next_body})
        return page

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0].rstrip("/")
                if path == "":
                    self._send(200, server.landing())
                elif path == "/collections":
                    self._send(200, {"collections": [server.collection(c) for c in server.collections], "links": []})
                elif path.startswith("/collections/") and path.split("/")[2] in server.collections:
                    self._send(200, server.collection(path.split("/")[2]))
                else:
                    self._send(404, {"code": "NotFound", "description": f"{path} not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.searches.append(body)
                step = server.script.pop(0) if server.script else None
                if isinstance(step, int):
                    self._send(step, {"code": "Scripted", "description": f"scripted HTTP {step}"})
                    return
                if isinstance(step, float):
                    time.sleep(step)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client may have given up
                    self._send(200, server.search(body))

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(real_items: Path) -> Iterator[StacServer]:
    srv = StacServer(
        {
            "sentinel-2-l2a": load(real_items, "sentinel-2-l2a-pc.json"),
            "sentinel-1-rtc": load(real_items, "sentinel-1-rtc-pc.json"),
            "landsat-c2-l2": load(real_items, "landsat-c2-l2-pc.json"),
            "sentinel-2-site": load(real_items, "site2-2020_jun_jul-35MNM.geojson"),
            "sentinel-s2-l2a-cogs": load(real_items, "S2A_28QCH_20200714_0_L2A.json"),
        },
        page_size=2,
    )
    yield srv
    srv.close()


def use_catalogs(monkeypatch: pytest.MonkeyPatch, folder: Path, catalogs: dict) -> None:
    """Make `catalogs` the user's catalog config (CROPFLOW_CATALOGS)."""
    path = folder / "catalogs.yaml"
    path.write_text(json.dumps({"catalogs": catalogs}))  # JSON is YAML
    monkeypatch.setenv("CROPFLOW_CATALOGS", str(path))


def hrefs(items: list[dict]) -> set[str]:
    return {a["href"] for item in items for a in item["assets"].values()}


# ---------------------------------------------------------------------------------------------------------------------
# Catalog presets and user catalogs


def test_presets() -> None:
    catalogs = load_catalogs()
    assert {"local", "planetary-computer", "earth-search"} <= set(catalogs)
    assert catalogs["local"].url == get_settings().stac_url
    pc, es = catalogs["planetary-computer"], catalogs["earth-search"]
    assert pc.url == "https://planetarycomputer.microsoft.com/api/stac/v1" and pc.signing == "planetary-computer"
    assert pc.collections == {"s2": "sentinel-2-l2a", "s1": "sentinel-1-rtc", "landsat": "landsat-c2-l2"}
    assert es.url == "https://earth-search.aws.element84.com/v1" and es.signing is None
    assert es.collections == {"s2": "sentinel-2-l2a", "landsat": "landsat-c2-l2"}
    assert es.asset_keys["s2"].mask == "scl" and es.asset_keys["s2"].bands["nir08"] == "B8A"
    assert pc.asset_keys["s2"].bands == {b: b for b in S2_BANDS} and pc.asset_keys["s2"].mask == "SCL"
    with pytest.raises(CropflowError, match=r"no collection for sensor 's1'.*serves s2, landsat"):
        es.sensor("s1")


def test_unknown_catalog_lists_known_ones() -> None:
    with pytest.raises(CropflowError, match="unknown catalog 'pc'; known catalogs: local, planetary-computer"):
        get_catalog("pc")


def test_url_catalogs_and_mirrors() -> None:
    adhoc = get_catalog("http://127.0.0.1:9/stac/")
    assert adhoc.url == "http://127.0.0.1:9/stac" and adhoc.collections == load_catalogs()["local"].collections
    mirror = get_catalog("earth-search", url="http://127.0.0.1:9")
    assert mirror.url == "http://127.0.0.1:9" and mirror.asset_keys == load_catalogs()["earth-search"].asset_keys


def test_user_catalog_from_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bands = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir1": "B11", "swir2": "B12"}
    use_catalogs(
        monkeypatch,
        tmp_path,
        {
            "mine": {
                "url": "https://stac.example.org/v1",
                "sensors": {"landsat": {"collection": "ls-sr", "assets": bands, "mask_asset": "qa"}},
            }
        },
    )
    mine = get_catalog("mine")
    assert mine.collections == {"landsat": "ls-sr"}
    assert mine.asset_keys["landsat"].bands == bands and mine.asset_keys["landsat"].mask == "qa"
    assert "planetary-computer" in load_catalogs()  # presets stay


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"sensors": {"s2": {"collection": "x"}}}, "'url' must be an http"),
        ({"url": "https://x.org", "sensors": {"s3": {"collection": "x"}}}, "unknown sensor 's3'"),
        ({"url": "https://x.org", "sensors": {"s2": {"assets": "earth-search"}}}, "needs 'collection"),
        ({"url": "https://x.org", "sensors": {"s2": {"collection": "x", "assets": "gee"}}}, "no asset-key scheme"),
        (
            {"url": "https://x.org", "sensors": {"s2": {"collection": "x", "assets": {"blue": "B02", "red": "B4"}}}},
            "unknown bands: B4, missing bands: B03, B04",
        ),
        ({"url": "https://x.org", "signing": "s3", "sensors": {"s2": "x"}}, "unknown signing 's3'"),
    ],
)
def test_bad_user_catalog_is_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, entry: dict, message: str
) -> None:
    use_catalogs(monkeypatch, tmp_path, {"bad": entry})
    with pytest.raises(CropflowError, match=message):
        get_catalog("bad")


# ---------------------------------------------------------------------------------------------------------------------
# Asset mapping, scale/offset and metadata of real items


def test_planetary_computer_s2_assets_and_offset(real_items: Path) -> None:
    s2 = get_sensor("s2")
    keys = load_catalogs()["planetary-computer"].asset_keys["s2"]
    items = [harmonise_assets(i, s2, keys) for i in load(real_items, "sentinel-2-l2a-pc.json")]
    for item in items:
        assert set(s2.assets) | {"SCL"} <= set(item["assets"])
        assert item["properties"]["s2:processing_baseline"] == "05.10"
    scale, offset = scale_offset(items, list(s2.assets), "s2")
    assert np.allclose(scale, 1e-4) and np.allclose(offset, -0.1)  # baseline >= 04.00: the -1000 DN offset
    old = load(real_items, "S2B_MSIL2A_20190629T212529_R043_T06VVN_20201006T080531_raster_ext.json")
    assert old[0]["assets"]["B04"]["raster:bands"] == [{"nodata": 0, "data_type": "uint16"}]  # no scale in it
    scale, offset = scale_offset(old, list(s2.assets), "s2")
    assert np.allclose(scale, 1e-4) and np.allclose(offset, 0.0)  # baseline 02.12: no offset


def test_earth_search_s2_assets_and_applied_offset(real_items: Path) -> None:
    s2 = get_sensor("s2")
    v0 = load(real_items, "S2A_28QCH_20200714_0_L2A.json")
    assert "s2:processing_baseline" not in v0[0]["properties"]
    assert s2_processing_baseline(v0[0]) == 2.14  # from sentinel:product_id ..._N0214_...
    assert np.allclose(scale_offset(v0, list(s2.assets), "s2")[1], 0.0)

    keys = load_catalogs()["earth-search"].asset_keys["s2"]
    for applied, expected in ((True, 0.0), (False, -0.1)):
        item = harmonise_assets(earth_search_v1(v0[0], applied=applied), s2, keys)
        assert {"blue", "nir08", "scl"}.isdisjoint(item["assets"])
        assert item["assets"]["B8A"]["href"] == v0[0]["assets"]["B8A"]["href"]
        assert item["assets"]["SCL"]["href"] == v0[0]["assets"]["SCL"]["href"]
        scale, offset = scale_offset([item], list(s2.assets), "s2")
        assert np.allclose(scale, 1e-4) and np.allclose(offset, expected)


def test_landsat_c2_l2_scale_offset(real_items: Path) -> None:
    landsat = get_sensor("landsat")
    assert list(landsat.assets) == LANDSAT_KEYS and landsat.bands == ["B02", "B03", "B04", "B08", "B11", "B12"]
    pc = load(real_items, "landsat-c2-l2-pc.json")
    usgs = load(real_items, "LC08_L2SP_028030_20200114_20200824_02_T1_SR.json")
    assert "raster:bands" not in usgs[0]["assets"]["red"]  # USGS: the constants, not in the item
    for items in (pc, usgs):
        assert all(set(LANDSAT_KEYS) | {"qa_pixel"} <= set(i["assets"]) for i in items)
        scale, offset = scale_offset(items, LANDSAT_KEYS, "landsat")
        assert np.allclose(scale, 0.0000275) and np.allclose(offset, -0.2)


def test_sentinel1_rtc_metadata(real_items: Path) -> None:
    s1 = get_sensor("s1")
    keys = load_catalogs()["planetary-computer"].asset_keys["s1"]
    items = [harmonise_assets(i, s1, keys) for i in load(real_items, "sentinel-1-rtc-pc.json")]
    for item in items:
        props = item["properties"]
        assert set(s1.bands) <= set(props["sar:polarizations"])  # VV, VH: dual polarisation
        assert props["sat:orbit_state"] in ("ascending", "descending")
        assert props["sar:product_type"] == "GRD"
        assert set(s1.assets) <= set(item["assets"])
        assert item["assets"]["vv"]["raster:bands"][0]["nodata"] == -32768
    scale, offset = scale_offset(items, list(s1.assets), "s1")
    assert np.allclose(scale, 1.0) and np.allclose(offset, 0.0)  # linear power as stored


def test_proj_epsg_and_proj_code_both_work(real_items: Path) -> None:
    raw = [i for i in load(real_items, "sentinel-2-l2a-pc.json") if i["properties"]["proj:epsg"] == 32647]
    rewritten = [pystac.Item.from_dict(copy.deepcopy(i)).to_dict(transform_hrefs=False) for i in raw]
    assert rewritten[0]["properties"].get("proj:code") == "EPSG:32647"
    assert "proj:epsg" not in rewritten[0]["properties"]  # pystac 1.15
    with pytest.raises(ValueError):  # stackstac 0.5 reads only proj:epsg
        stackstac.stack(rewritten, assets=["B04"], resolution=10)
    for items in (rewritten, copy.deepcopy(raw)):
        items = [normalise_proj(i) for i in items]
        assert all(i["properties"]["proj:epsg"] == 32647 for i in items)
        assert all(i["properties"]["proj:code"] == "EPSG:32647" for i in items)
        stack = stackstac.stack(items, assets=["B04"], resolution=10)  # lazy: nothing is read
        assert stack.attrs["crs"] == "epsg:32647" and stack.shape[:2] == (len(items), 1)


# ---------------------------------------------------------------------------------------------------------------------
# De-duplication


def reprocessed_s2(item: dict) -> dict:
    """`item` as a later reprocessing lists it: newer baseline and generation time, its own id."""
    out = copy.deepcopy(item)
    out["id"] = item["id"].rsplit("_", 1)[0] + "_20240601T000000"
    out["properties"] |= {"s2:processing_baseline": "05.11", "s2:generation_time": "2024-06-01T00:00:00Z"}
    return out


def test_dedupe_keeps_overlapping_tiles_of_one_overpass(real_items: Path) -> None:
    items = load(real_items, "sentinel-2-l2a-pc.json")
    assert len({i["properties"]["datetime"] for i in items}) == 1  # one overpass, four MGRS tiles
    assert {i["id"] for i in deduplicate(items, "s2")} == {i["id"] for i in items}


def test_dedupe_s2_keeps_newest_processing_whatever_the_order(
    real_items: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = load(real_items, "site2-2020_jun_jul-35MNM.geojson")
    newer = reprocessed_s2(items[4])
    listed = [*items, items[0], copy.deepcopy(items[7]), newer]  # same ids twice (pages), a reprocessing
    with caplog.at_level(logging.INFO, logger="tasks.catalog"):
        kept = deduplicate(listed, "s2")
    assert "dropped 3 duplicate" in caplog.text
    expected = {i["id"] for i in items} - {items[4]["id"]} | {newer["id"]}
    assert {i["id"] for i in kept} == expected and len(kept) == len(items)
    assert {i["id"] for i in deduplicate(listed[::-1], "s2")} == expected
    es = load(real_items, "S2A_28QCH_20200714_0_L2A.json")[0]  # Earth Search: sequence _0_, reprocessed _1_
    es_again = copy.deepcopy(es) | {"id": es["id"].replace("_0_", "_1_")}
    assert [i["id"] for i in deduplicate([es_again, es], "s2")] == [es_again["id"]]


def test_dedupe_landsat_by_scene(real_items: Path) -> None:
    pc = load(real_items, "landsat-c2-l2-pc.json")
    assert len(deduplicate(pc, "landsat")) == 4  # four path/rows of one overpass
    usgs = load(real_items, "LC08_L2SP_028030_20200114_20200824_02_T1_SR.json")[0]
    later = copy.deepcopy(usgs)
    later["id"] = usgs["id"].replace("_20200824_", "_20210105_")
    later["properties"]["landsat:scene_id"] = "LC80280302020014LGN01"  # another receiving station
    assert [i["id"] for i in deduplicate([later, usgs], "landsat")] == [later["id"]]
    assert [i["id"] for i in deduplicate([usgs, later], "landsat")] == [later["id"]]


def test_dedupe_s1_identical_ids_only(real_items: Path) -> None:
    items = load(real_items, "sentinel-1-rtc-pc.json")
    assert len(deduplicate([*items, *copy.deepcopy(items)], "s1")) == len(items)


# ---------------------------------------------------------------------------------------------------------------------
# Search against a STAC API on 127.0.0.1


def test_search_reads_every_page_and_filters(
    server: StacServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_catalogs(monkeypatch, tmp_path, {"site": {"url": server.url, "sensors": {"s2": "sentinel-2-site"}}})
    bbox = (25.0, -8.5, 26.0, -7.5)
    items = search_items("site", "s2", date(2020, 6, 1), date(2020, 7, 31), bbox=bbox, retry=FAST)
    assert len(items) == 13 and len(server.searches) == 7  # 2 per page: every page read
    assert [i["properties"]["datetime"] for i in items] == sorted(i["properties"]["datetime"] for i in items)
    assert server.searches[0]["bbox"] == list(bbox) and server.searches[0]["collections"] == ["sentinel-2-site"]
    assert server.searches[0]["datetime"] == "2020-06-01T00:00:00Z/2020-07-31T23:59:59Z"

    cloud = sorted(i["properties"]["eo:cloud_cover"] for i in items)[5]
    geometry = {"type": "Point", "coordinates": [25.5, -8.0]}
    clear = search_items(
        "site", "s2", date(2020, 6, 1), date(2020, 7, 31), intersects=geometry, max_cloud_cover=cloud, retry=FAST
    )
    assert len(clear) == 6 and all(i["properties"]["eo:cloud_cover"] <= cloud for i in clear)
    body = server.searches[-1]
    assert body["intersects"] == geometry and "bbox" not in body
    assert body["filter"] == {"op": "<=", "args": [{"property": "eo:cloud_cover"}, cloud]}
    assert body["filter-lang"] == "cql2-json"


def test_search_of_planetary_computer_items_stays_unsigned(
    server: StacServer, real_items: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    catalog = get_catalog("planetary-computer", url=server.url)  # the preset, served from 127.0.0.1
    assert catalog.signing == "planetary-computer"
    s2 = search_items(catalog, "s2", *SEASON, bbox=(90.0, 78.0, 110.0, 82.0), retry=FAST)
    landsat = search_items(catalog, "landsat", *SEASON, bbox=(140.0, -45.0, 155.0, -35.0), retry=FAST)
    s1 = search_items(catalog, "s1", *SEASON, bbox=(10.0, 29.0, 20.0, 36.0), retry=FAST)
    assert (len(s2), len(landsat), len(s1)) == (4, 4, 4)
    for found, name in ((s2, "sentinel-2-l2a-pc.json"), (landsat, "landsat-c2-l2-pc.json")):
        assert hrefs(found) == hrefs(load(real_items, name))  # signing waits for the read: no SAS token yet
    assert not any("sig=" in h for h in hrefs(s2 + landsat + s1))
    assert all(i["properties"]["proj:code"] == f"EPSG:{i['properties']['proj:epsg']}" for i in s2)

    href = s2[0]["assets"]["B04"]["href"]
    for other in (get_catalog("local"), get_catalog("earth-search"), get_catalog(server.url)):
        assert sign_items(s2, other) is s2 and sign_href(href, other) == href
    assert sign_items(s2, "earth-search") is s2


def test_search_earth_search_layout(
    server: StacServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v0 = server.collections["sentinel-s2-l2a-cogs"][0]
    server.collections["sentinel-2-l2a"] = [earth_search_v1(v0, applied=True)]
    es = (-17.0, 20.0, -16.0, 21.0)
    with pytest.raises(CropflowError, match=r"no 'sentinel-2-l2a' item .* has the asset\(s\) B02, .*SCL.*blue, green"):
        search_items(server.url, "s2", *SEASON, bbox=es, retry=FAST)  # Earth Search v1 read with the local layout
    items = search_items(get_catalog("earth-search", url=server.url), "s2", *SEASON, bbox=es, retry=FAST)
    assert set(S2_BANDS) | {"SCL"} <= set(items[0]["assets"])
    assert items[0]["assets"]["B08"]["href"] == v0["assets"]["B08"]["href"]
    assert np.allclose(scale_offset(items, list(S2_BANDS), "s2")[1], 0.0)  # offset applied by the catalog
    server.collections["sentinel-2-l2a"][0]["assets"].pop("scl")  # no cloud mask: the cube tests reflectance
    with caplog.at_level("WARNING", logger="tasks.catalog"):
        unmasked = search_items(get_catalog("earth-search", url=server.url), "s2", *SEASON, bbox=es, retry=FAST)
    assert "SCL" not in unmasked[0]["assets"] and "no item has the SCL asset" in caplog.text

    legacy = {"s2": {"collection": "sentinel-s2-l2a-cogs"}}  # Earth Search v0: B02.. keys as on PC
    use_catalogs(monkeypatch, tmp_path, {"es-v0": {"url": server.url, "sensors": legacy}})
    assert [i["id"] for i in search_items("es-v0", "s2", *SEASON, bbox=es, retry=FAST)] == [v0["id"]]


def test_unknown_collection_lists_available(
    server: StacServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_catalogs(monkeypatch, tmp_path, {"t": {"url": server.url, "sensors": {"s2": "sentinel-2-l2c"}}})
    with pytest.raises(CropflowError, match=r"'sentinel-2-l2c' is not in catalog 't'.*available: landsat-c2-l2"):
        search_items("t", "s2", *SEASON, bbox=(0.0, 0.0, 1.0, 1.0), retry=FAST)


# ---------------------------------------------------------------------------------------------------------------------
# Retries


def test_retries_429_5xx_and_timeouts_then_succeeds(server: StacServer) -> None:
    catalog = get_catalog("planetary-computer", url=server.url)
    bbox = (140.0, -45.0, 155.0, -35.0)
    server.script = [503, 429]
    assert len(search_items(catalog, "landsat", *SEASON, bbox=bbox, retry=FAST)) == 4
    assert len(server.searches) == 3 + 1  # two refused, then two pages
    server.searches.clear()
    server.script = [2.0]  # a stall longer than the timeout
    stall = HttpRetry(retries=2, backoff=0.01, jitter=0.0, timeout=0.5)
    assert len(search_items(catalog, "landsat", *SEASON, bbox=bbox, retry=stall)) == 4
    assert len(server.searches) == 2 + 1


def test_backoff_grows_and_last_error_names_catalog_and_query(server: StacServer) -> None:
    catalog = get_catalog("planetary-computer", url=server.url)
    server.script = [502] * 10
    retry = HttpRetry(retries=3, backoff=0.1, jitter=0.05, timeout=5.0)
    t0 = time.perf_counter()
    with pytest.raises(CropflowError) as info:
        search_items(catalog, "s2", date(2024, 4, 1), date(2024, 4, 30), bbox=(90.0, 78.0, 110.0, 82.0), retry=retry)
    waited = time.perf_counter() - t0
    assert len(server.searches) == 4  # the request and 3 retries
    assert 0.2 + 0.4 <= waited < 5  # no wait before the first retry, then 0.2 s, 0.4 s (+ jitter)
    message = str(info.value)
    for part in (
        "'planetary-computer'",
        server.url,
        "collection 'sentinel-2-l2a'",
        "bbox [90.0, 78.0, 110.0, 82.0]",
        "datetime 2024-04-01T00:00:00Z/2024-04-30T23:59:59Z",
        "after 3 retries",
        "HTTP 502",
    ):
        assert part in message


def test_user_errors_are_not_retried(server: StacServer) -> None:
    server.script = [400]
    with pytest.raises(CropflowError, match=r"refused the query .* with HTTP 400: .*scripted HTTP 400"):
        search_items(get_catalog(server.url), "s1", *SEASON, bbox=(10.0, 29.0, 20.0, 36.0), retry=FAST)
    assert len(server.searches) == 1


def test_unreachable_or_wrong_catalog_is_explained(server: StacServer) -> None:
    with pytest.raises(CropflowError, match=r"'http://127.0.0.1:9' .* did not answer .* after 1 retries"):
        search_items("http://127.0.0.1:9", "s2", *SEASON, bbox=(0.0, 0.0, 1.0, 1.0), retry=HttpRetry(retries=1))
    with pytest.raises(CropflowError, match=r"/collections is not the root of a STAC API"):
        search_items(f"{server.url}/collections", "s2", *SEASON, bbox=(0.0, 0.0, 1.0, 1.0), retry=FAST)


def test_bad_search_requests() -> None:
    with pytest.raises(CropflowError, match="either a bbox or a geometry"):
        search_items("local", "s2", *SEASON)
    with pytest.raises(CropflowError, match=r"ends .* before it starts"):
        search_items("local", "s2", date(2024, 5, 1), date(2024, 4, 1), bbox=(0.0, 0.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# The local STAC API (PostgreSQL + pgstac + stac-fastapi)


def test_search_local_catalog(stac_api: Settings, load_region, tiny_region: Path) -> None:
    load_region(tiny_region)
    region = json.loads((tiny_region / "region.json").read_text())
    season = tuple(date.fromisoformat(d) for d in region["season"])
    for sensor in ("s2", "s1", "landsat"):
        collection = get_sensor(sensor).collection
        items = search_items("local", sensor, *season, bbox=tuple(region["bbox"]), retry=FAST)
        assert sorted(i["id"] for i in items) == sorted(i["id"] for i in region_items(tiny_region, collection))
        assert sign_items(items, "local") is items
    clear = search_items("local", "s2", *season, bbox=tuple(region["bbox"]), max_cloud_cover=30.0, retry=FAST)
    assert clear and all(i["properties"]["eo:cloud_cover"] <= 30.0 for i in clear)
