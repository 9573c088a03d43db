"""The local STAC API against a real PostgreSQL + pgstac + stac-fastapi (fixture `stac_api` in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pystac
import pytest
from conftest import free_port
from pystac_client import Client

from infra import stac_api as stac
from infra.errors import CropflowError
from infra.settings import Settings

EO = "https://stac-extensions.github.io/eo/v1.0.0/schema.json"
WEST = (4.0, 50.0, 4.1, 50.1)
EAST = (5.0, 51.0, 5.1, 51.1)
# id: (collection, bbox, datetime, eo:cloud_cover)
ITEMS = {
    "a1": ("cropflow-test-a", WEST, "2024-04-01T10:30:00Z", 10.0),
    "a2": ("cropflow-test-a", WEST, "2024-05-15T10:30:00Z", 80.0),
    "a3": ("cropflow-test-a", EAST, "2024-06-10T10:30:00Z", 30.0),
    "a4": ("cropflow-test-a", EAST, "2024-09-01T10:30:00Z", 60.0),
    "b1": ("cropflow-test-b", WEST, "2024-04-02T10:30:00Z", 5.0),
}
BOTH = ["cropflow-test-a", "cropflow-test-b"]


def _collection(collection_id: str, items: list[pystac.Item]) -> dict:
    extent = pystac.Extent(
        pystac.SpatialExtent([[3.0, 49.0, 6.0, 52.0]]),
        pystac.TemporalExtent([[datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 12, 31, tzinfo=UTC)]]),
    )
    collection = pystac.Collection(
        collection_id,
        f"cropflow test collection {collection_id}",
        extent,
        license="CC-BY-4.0",
        stac_extensions=[EO],
    )
    return collection.to_dict(include_self_link=False, transform_hrefs=False)


def _item(item_id: str, collection_id: str, bbox: tuple, when: str, cloud: float) -> pystac.Item:
    xmin, ymin, xmax, ymax = bbox
    geometry = {
        "type": "Polygon",
        "coordinates": [[[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax], [xmin, ymin]]],
    }
    item = pystac.Item(
        item_id,
        geometry,
        list(bbox),
        datetime.fromisoformat(when),
        {"eo:cloud_cover": cloud},
        stac_extensions=[EO],
        collection=collection_id,
    )
    item.add_asset("B04", pystac.Asset(f"file:///data/{item_id}_B04.tif", media_type=pystac.MediaType.COG))
    return item


def write_region(folder: Path, items: dict[str, tuple]) -> Path:
    """A region folder in the `tasks/sample_region.py` layout: collections/<id>.json, items/<id>.ndjson."""
    (folder / "collections").mkdir(parents=True, exist_ok=True)
    (folder / "items").mkdir(parents=True, exist_ok=True)
    by_collection: dict[str, list[pystac.Item]] = {}
    for item_id, (collection_id, bbox, when, cloud) in items.items():
        by_collection.setdefault(collection_id, []).append(_item(item_id, collection_id, bbox, when, cloud))
    for collection_id, its in by_collection.items():
        (folder / "collections" / f"{collection_id}.json").write_text(json.dumps(_collection(collection_id, its)))
        lines = [json.dumps(i.to_dict(include_self_link=False, transform_hrefs=False)) for i in its]
        (folder / "items" / f"{collection_id}.ndjson").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def loaded(stac_api: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    region = write_region(tmp_path_factory.mktemp("region"), ITEMS)
    assert stac.load(stac_api, region) == {"cropflow-test-a": 4, "cropflow-test-b": 1}
    return region


def _ids(settings: Settings, **search: object) -> set[str]:
    client = Client.open(settings.stac_url)
    return {item["id"] for item in client.search(limit=100, **search).items_as_dicts()}


def test_search_by_collection(stac_api: Settings, loaded: Path) -> None:
    assert _ids(stac_api, collections=["cropflow-test-a"]) == {"a1", "a2", "a3", "a4"}
    assert _ids(stac_api, collections=["cropflow-test-b"]) == {"b1"}


def test_search_by_bbox(stac_api: Settings, loaded: Path) -> None:
    assert _ids(stac_api, collections=BOTH, bbox=[3.95, 49.95, 4.05, 50.05]) == {"a1", "a2", "b1"}
    assert _ids(stac_api, collections=BOTH, bbox=[5.05, 51.05, 5.5, 51.5]) == {"a3", "a4"}
    assert _ids(stac_api, collections=BOTH, bbox=[0.0, 0.0, 1.0, 1.0]) == set()


def test_search_by_datetime(stac_api: Settings, loaded: Path) -> None:
    assert _ids(stac_api, collections=BOTH, datetime="2024-05-01T00:00:00Z/2024-06-30T23:59:59Z") == {"a2", "a3"}
    assert _ids(stac_api, collections=BOTH, datetime="2024-04-01/2024-04-30") == {"a1", "b1"}


def test_search_by_cql2_cloud_cover(stac_api: Settings, loaded: Path) -> None:
    client = Client.open(stac_api.stac_url)
    conforms = client.to_dict()["conformsTo"]
    assert any(c.endswith("item-search#filter") for c in conforms)
    assert "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json" in conforms
    cloudy = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 50]}
    assert _ids(stac_api, collections=BOTH, filter=cloudy, filter_lang="cql2-json") == {"a1", "a3", "b1"}
    assert _ids(stac_api, collections=["cropflow-test-a"], filter=cloudy, filter_lang="cql2-json") == {"a1", "a3"}
    combined = _ids(
        stac_api,
        collections=BOTH,
        bbox=list(WEST),
        datetime="2024-03-01/2024-04-30",
        filter=cloudy,
        filter_lang="cql2-json",
    )
    assert combined == {"a1", "b1"}


def test_load_twice_does_not_duplicate(stac_api: Settings, loaded: Path) -> None:
    assert stac.load(stac_api, loaded) == {"cropflow-test-a": 4, "cropflow-test-b": 1}
    assert _ids(stac_api, collections=BOTH) == set(ITEMS)
    client = Client.open(stac_api.stac_url)
    found = list(client.search(collections=BOTH, limit=100).items_as_dicts())
    assert len(found) == len(ITEMS)


def test_reload_updates_items(stac_api: Settings, tmp_path: Path) -> None:
    cloudy = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 50]}
    search = {"collections": ["cropflow-test-upsert"], "filter": cloudy, "filter_lang": "cql2-json"}
    write_region(tmp_path, {"u1": ("cropflow-test-upsert", EAST, "2024-07-01T10:00:00Z", 90.0)})
    assert stac.load(stac_api, tmp_path) == {"cropflow-test-upsert": 1}
    assert _ids(stac_api, **search) == set()
    write_region(tmp_path, {"u1": ("cropflow-test-upsert", EAST, "2024-07-01T10:00:00Z", 20.0)})
    stac.load(stac_api, tmp_path)
    assert _ids(stac_api, **search) == {"u1"}
    assert _ids(stac_api, collections=["cropflow-test-upsert"]) == {"u1"}


def test_up_is_idempotent_and_fast(stac_api: Settings) -> None:
    api_pid = stac_api.stac_dir.joinpath("stac-api.pid").read_text()
    pg_pid = stac_api.stac_dir.joinpath("pgdata", "postmaster.pid").read_text().split()[0]
    t0 = time.perf_counter()
    stac.up(stac_api)
    assert time.perf_counter() - t0 < 2.0
    assert stac_api.stac_dir.joinpath("stac-api.pid").read_text() == api_pid
    assert stac_api.stac_dir.joinpath("pgdata", "postmaster.pid").read_text().split()[0] == pg_pid


def test_status(stac_api: Settings, loaded: Path, tmp_path: Path) -> None:
    report = stac.status(stac_api)
    assert report["postgres"] is True
    assert report["api"] is True
    assert report["url"] == stac_api.stac_url == f"http://127.0.0.1:{stac_api.stac_port}"
    assert set(BOTH) <= set(report["collections"])
    idle = Settings(home=tmp_path / "idle", stac_port=free_port(), pg_port=free_port())
    assert stac.status(idle) == {"postgres": False, "api": False, "url": idle.stac_url, "collections": []}
    stac.down(idle)  # nothing to stop: no error


def test_load_needs_running_database(tmp_path: Path) -> None:
    idle = Settings(home=tmp_path / "idle", stac_port=free_port(), pg_port=free_port())
    region = write_region(tmp_path / "region", {"x1": ("cropflow-test-x", WEST, "2024-04-01T10:00:00Z", 1.0)})
    with pytest.raises(CropflowError, match="cropflow stac up"):
        stac.load(idle, region)


def test_port_in_use_gives_clear_error(stac_api: Settings, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = Settings(home=tmp_path / "a", stac_port=free_port(), pg_port=port)
        with pytest.raises(CropflowError, match=rf"port {port}\b.*CROPFLOW_PG_PORT"):
            stac.up(other)
        other = Settings(home=tmp_path / "b", stac_port=port, pg_port=free_port())
        with pytest.raises(CropflowError, match=rf"port {port}\b.*CROPFLOW_STAC_PORT"):
            stac.up(other)
    # a second installation asking for the ports of the running one
    other = Settings(home=tmp_path / "c", stac_port=free_port(), pg_port=stac_api.pg_port)
    with pytest.raises(CropflowError, match="CROPFLOW_PG_PORT"):
        stac.up(other)
    assert not (tmp_path / "c" / "stac" / "pgdata").exists()


def _listeners(port: int) -> dict[str, list[str]]:
    """Local addresses listening on `port`, from /proc/net/tcp and /proc/net/tcp6 (state 0A = LISTEN)."""
    found: dict[str, list[str]] = {"tcp": [], "tcp6": []}
    for proto in found:
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                found[proto].append(address)
    return found


def test_services_listen_on_loopback_only(stac_api: Settings) -> None:
    for port in (stac_api.pg_port, stac_api.stac_port):
        listeners = _listeners(port)
        assert listeners["tcp"] == ["0100007F"], listeners  # 127.0.0.1, little-endian hex
        assert listeners["tcp6"] == [], listeners


def test_postgres_requires_password(stac_api: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    base = {"host": "127.0.0.1", "port": stac_api.pg_port, "user": stac.PG_USER, "dbname": "pgstac"}
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(**base, connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**base, password="not-the-password", connect_timeout=5)
    with psycopg.connect(**base, password=stac_api.pg_password(), connect_timeout=5) as conn:
        assert conn.execute("SELECT pgstac.get_version()").fetchone()[0]


def test_password_not_in_argv_or_logs(stac_api: Settings) -> None:
    password = stac_api.pg_password()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert password.encode() not in cmdline, f"password on the command line of pid {proc.name}"
    for log in (stac_api.stac_dir / "stac-api.log", stac_api.stac_dir / "postgresql.log"):
        assert password not in log.read_text(errors="replace")
    assert (stac_api.stac_dir / ".pgpass").stat().st_mode & 0o077 == 0
