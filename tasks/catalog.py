"""STAC catalogs and the search of their items with pystac-client.

Catalogs come by name: the presets in `tasks/catalogs.yaml` (`local`, `planetary-computer`, `earth-search`), plus
the entries of the YAML file named by `CROPFLOW_CATALOGS`. Search results are item dicts ready for the cube: asset
keys renamed to the sensor's own (`tasks/sensors.py`), `proj:epsg` and `proj:code` both set, one item per
acquisition. Hrefs stay unsigned: `sign_href` and `sign_items` sign them right before a read, as Planetary Computer
tokens expire within about 45 minutes and long builds outlive them.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import pystac_client
import yaml
from prefect import task
from pystac_client.errors import ClientTypeError
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO

from infra.errors import CropflowError
from infra.retry import RETRY_STATUSES, HttpRetry
from infra.settings import get_settings
from tasks.sensors import AssetKeys, Sensor, get_sensor, s2_processing_baseline

log = logging.getLogger(__name__)

Bbox = tuple[float, float, float, float]
PRESETS = Path(__file__).with_name("catalogs.yaml")
SIGNING = ("planetary-computer",)


@dataclass(frozen=True)
class Catalog:
    """A STAC API and, per sensor it serves, the collection and the asset keys of that sensor's bands."""

    name: str
    url: str
    collections: dict[str, str]
    asset_keys: dict[str, AssetKeys]
    signing: str | None = None

    def sensor(self, name: str) -> Sensor:
        """The sensor `name`, or a message naming the sensors this catalog serves."""
        if name not in self.collections:
            raise CropflowError(
                f"catalog {self.name!r} has no collection for sensor {name!r}; it serves "
                f"{', '.join(self.collections)}. Choose those sensors (--sensors) or another catalog (--catalog)."
            )
        return get_sensor(name)


def _read_entries(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise CropflowError(f"catalog config {path} does not exist; point CROPFLOW_CATALOGS at a YAML file.")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    entries = doc.get("catalogs") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise CropflowError(f"{path}: expected a top-level 'catalogs:' mapping of catalog names to entries.")
    return {str(name): {**(entry or {}), "_source": path} for name, entry in entries.items()}


def _asset_keys(sensor: Sensor, spec: dict, where: str) -> AssetKeys:
    assets = spec.get("assets")
    if assets is None or isinstance(assets, str):
        keys = sensor.asset_keys(assets)
        return replace(keys, mask=spec["mask_asset"]) if "mask_asset" in spec else keys
    if not isinstance(assets, dict):
        raise CropflowError(f"{where}: 'assets' must be a scheme name or a mapping 'asset key: band name'.")
    bands = {str(k): str(v) for k, v in assets.items()}
    unknown = sorted(set(bands.values()) - set(sensor.bands))
    missing = [b for b in sensor.bands if b not in bands.values()]
    if unknown or missing:
        raise CropflowError(
            f"{where}: 'assets' must map one asset key to each band of {sensor.name} ({', '.join(sensor.bands)}); "
            f"unknown bands: {', '.join(unknown) or 'none'}, missing bands: {', '.join(missing) or 'none'}."
        )
    return AssetKeys(bands, spec.get("mask_asset", sensor.mask_asset))


ENTRY_FIELDS = ("url", "signing", "sensors", "_source")
SENSOR_FIELDS = ("collection", "assets", "mask_asset")


def _check_fields(spec: dict, fields: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        valid = ", ".join(f for f in fields if not f.startswith("_"))
        raise CropflowError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; valid fields: {valid}.")


def _parse_catalog(name: str, entry: dict) -> Catalog:
    where = f"catalog {name!r} in {entry['_source']}"
    _check_fields(entry, ENTRY_FIELDS, where)
    url = entry.get("url")
    if url == "local":
        url = get_settings().stac_url
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise CropflowError(f"{where}: 'url' must be an http(s) URL of a STAC API, or 'local'; got {url!r}.")
    signing = entry.get("signing")
    if signing is not None and signing not in SIGNING:
        raise CropflowError(f"{where}: unknown signing {signing!r}; known: {', '.join(SIGNING)}.")
    sensors = entry.get("sensors")
    if not isinstance(sensors, dict) or not sensors:
        raise CropflowError(f"{where}: 'sensors' must map sensor names to {{collection: <collection id>}}.")
    collections, asset_keys = {}, {}
    for sensor_name, spec in sensors.items():
        try:
            sensor = get_sensor(sensor_name)
        except ValueError as exc:
            raise CropflowError(f"{where}: {exc}") from None
        spec = {"collection": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("collection"), str):
            raise CropflowError(f"{where}: sensor {sensor_name!r} needs 'collection: <collection id>'.")
        _check_fields(spec, SENSOR_FIELDS, f"{where}, sensor {sensor_name!r}")
        collections[sensor_name] = spec["collection"]
        asset_keys[sensor_name] = _asset_keys(sensor, spec, f"{where}, sensor {sensor_name!r}")
    return Catalog(name, url.rstrip("/"), collections, asset_keys, signing)


def load_catalogs(path: Path | None = None) -> dict[str, Catalog]:
    """The presets, with the entries of `path` (default: the file named by `CROPFLOW_CATALOGS`, if set) added or
    replacing presets of the same name."""
    entries = _read_entries(PRESETS)
    user = path or (Path(os.environ["CROPFLOW_CATALOGS"]) if os.environ.get("CROPFLOW_CATALOGS") else None)
    if user is not None:
        entries |= _read_entries(user)
    return {name: _parse_catalog(name, entry) for name, entry in entries.items()}


def get_catalog(name: str, url: str | None = None) -> Catalog:
    """The catalog called `name`, or one at the STAC API URL `name` laid out like the local one.

    `url`, if given, points the catalog at another address (a mirror, or the local layout elsewhere).
    """
    catalogs = load_catalogs()
    if name.startswith(("http://", "https://")):
        return replace(catalogs["local"], name=name, url=name.rstrip("/"))
    if name not in catalogs:
        raise CropflowError(
            f"unknown catalog {name!r}; known catalogs: {', '.join(catalogs)}. Add one in a YAML file named by "
            "CROPFLOW_CATALOGS (layout in tasks/catalogs.yaml), or give a STAC API URL."
        )
    return replace(catalogs[name], url=url.rstrip("/")) if url else catalogs[name]


def sign_href(href: str, catalog: Catalog) -> str:
    """`href` readable now: with a fresh SAS token for a Planetary Computer catalog, unchanged otherwise.

    Give it the unsigned href of the search result: `planetary_computer` leaves hrefs that carry a token, even an
    expired one, as they are. Tokens are cached, so calling it per read costs little.
    """
    if catalog.signing != "planetary-computer":
        return href
    import planetary_computer

    return planetary_computer.sign(href)


def sign_items(items: list[dict], catalog: Catalog | str) -> list[dict]:
    """Copies of `items` whose asset hrefs are signed (`sign_href`); `items` itself for catalogs without signing.

    Call it right before reading, e.g. per block of a long build, never at search time: Planetary Computer tokens
    expire within about 45 minutes.
    """
    catalog = catalog if isinstance(catalog, Catalog) else get_catalog(catalog)
    if catalog.signing is None:
        return items
    return [
        {**item, "assets": {k: {**a, "href": sign_href(a["href"], catalog)} for k, a in item["assets"].items()}}
        for item in items
    ]


def harmonise_assets(item: dict, sensor: Sensor, keys: AssetKeys) -> dict:
    """A copy of `item` whose band and mask assets carry the sensor's own keys (`Sensor.assets`, `mask_asset`)."""
    own = {band: key for key, band in sensor.assets.items()}
    rename = {key: own[band] for key, band in keys.bands.items()}
    if keys.mask and sensor.mask_asset:
        rename[keys.mask] = sensor.mask_asset
    out = copy.deepcopy(item)
    out["assets"] = {rename.get(k, k): v for k, v in item.get("assets", {}).items()}
    return out


def normalise_proj(item: dict) -> dict:
    """`item` with `proj:epsg` set from `proj:code` ("EPSG:32631") and the reverse, on the item and its assets.

    pystac 1.15 writes only `proj:code`; stackstac 0.5 reads only `proj:epsg`.
    """
    for fields in [item["properties"], *item.get("assets", {}).values()]:
        code = fields.get("proj:code")
        if fields.get("proj:epsg") is None and isinstance(code, str) and code.upper().startswith("EPSG:"):
            fields["proj:epsg"] = int(code.split(":", 1)[1])
        elif fields.get("proj:epsg") is not None and "proj:code" not in fields:
            fields["proj:code"] = f"EPSG:{int(fields['proj:epsg'])}"
    return item


def _s2_tile(item: dict) -> str:
    props = item["properties"]
    if props.get("s2:mgrs_tile"):
        return str(props["s2:mgrs_tile"])
    if props.get("mgrs:utm_zone") is not None:  # Earth Search v1
        zone = int(props["mgrs:utm_zone"])
        return f"{zone:02d}{props.get('mgrs:latitude_band', '')}{props.get('mgrs:grid_square', '')}"
    found = re.search(r"(?:^|_)T?(\d{2}[C-X][A-Z]{2})(?:_|$)", item["id"])
    return found[1] if found else item["id"]


def _landsat_parts(item: dict) -> list[str] | None:
    parts = item["id"].split("_")  # LC08_L2SP_028030_20200114[_20200824]_02_T1[_SR]
    return parts if len(parts) >= 6 and re.fullmatch(r"\d{6}", parts[2]) and re.fullmatch(r"\d{8}", parts[3]) else None


def _acquisition(item: dict, sensor: str) -> tuple:
    """What identifies one acquisition: items sharing it are copies of one another."""
    props = item["properties"]
    if sensor == "s2":
        platform = str(props.get("platform") or item["id"][:3]).lower()
        return platform, str(props.get("datetime"))[:19], _s2_tile(item)
    if sensor == "landsat" and (parts := _landsat_parts(item)):
        return parts[0], parts[2], parts[3]  # sensor+satellite, path/row, acquisition date
    return (item["id"],)


def _newness(item: dict, sensor: str) -> tuple:
    """Orders copies of one acquisition: the newest processing last, ties broken by id."""
    props = item["properties"]
    if sensor == "s2":
        return s2_processing_baseline(item), str(props.get("s2:generation_time", "")), item["id"]
    if sensor == "landsat" and (parts := _landsat_parts(item)):
        processed = parts[4] if re.fullmatch(r"\d{8}", parts[4]) else ""
        return processed, item["id"]
    return (item["id"],)


def deduplicate(items: list[dict], sensor: str) -> list[dict]:
    """One item per acquisition, the same whatever the input order; logs how many were dropped.

    Sentinel-2: per platform, sensing time (to the second) and MGRS tile, the newest processing baseline, then the
    latest `s2:generation_time`, then the greatest id (Earth Search's `_1_` reprocessing over `_0_`). Landsat: per
    scene (satellite, path/row, date; whatever the receiving station), the latest processing date, then the greatest
    id. Other sensors: items with the same id. Tiles of one overpass are not copies: they cover other ground.
    """
    best: dict[tuple, dict] = {}
    for item in items:
        key = _acquisition(item, sensor)
        if key not in best or _newness(item, sensor) > _newness(best[key], sensor):
            best[key] = item
    dropped = len(items) - len(best)
    if dropped:
        log.info("%s: dropped %d duplicate item(s) of acquisitions already listed", sensor, dropped)
    return list(best.values())


def cloud_cover_filter(max_cloud_cover: float) -> dict:
    """CQL2-JSON filter keeping items with `eo:cloud_cover <= max_cloud_cover`."""
    return {"op": "<=", "args": [{"property": "eo:cloud_cover"}, max_cloud_cover]}


def _request_error(catalog: Catalog, what: str, exc: APIError, retry: HttpRetry) -> CropflowError:
    status = getattr(exc, "status_code", None)
    detail = " ".join(str(exc).split())[:300]
    if status is not None and status not in RETRY_STATUSES:
        return CropflowError(
            f"catalog {catalog.name!r} ({catalog.url}) refused the query ({what}) with HTTP {status}: {detail}. "
            "Check the collection, region and dates, and that the URL is a STAC API."
        )
    reason = f"HTTP {status}: {detail}" if status is not None else detail
    hint = " Start the local one with 'cropflow stac up'." if catalog.url == get_settings().stac_url else ""
    return CropflowError(
        f"catalog {catalog.name!r} ({catalog.url}) did not answer the query ({what}) after {retry.retries} "
        f"retries: {reason}. It may be down or limiting requests; try again later.{hint}"
    )


def search_items(
    catalog: Catalog | str,
    sensor: str,
    start: date,
    end: date,
    *,
    bbox: Bbox | None = None,
    intersects: dict | None = None,
    max_cloud_cover: float | None = None,
    retry: HttpRetry | None = None,
) -> list[dict]:
    """Items of `sensor` in `catalog` over a region (lon/lat `bbox` or GeoJSON geometry `intersects`) between
    `start` and `end` (inclusive), every page of them, one per acquisition, sorted by time and id.

    Dicts, not pystac Items: pystac 1.15 rewrites `proj:epsg` to `proj:code`, which stackstac 0.5 cannot read.
    Requests are retried on 429, 5xx and timeouts (`retry`); then a `CropflowError` names the catalog and query.
    """
    catalog = catalog if isinstance(catalog, Catalog) else get_catalog(catalog)
    retry = retry or HttpRetry()
    sensor_def = catalog.sensor(sensor)
    collection = catalog.collections[sensor]
    if (bbox is None) == (intersects is None):
        raise CropflowError("give the region of a search as either a bbox or a geometry (intersects), not both.")
    if end < start:
        raise CropflowError(f"the season ends ({end}) before it starts ({start}); give the dates in order.")
    query: dict = {
        "collections": [collection],
        "datetime": f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z",
        "limit": 100,  # per page; every page is read (max_items=None)
        "max_items": None,
    }
    if bbox is not None:
        query["bbox"] = list(bbox)
    else:
        query["intersects"] = intersects
    if max_cloud_cover is not None:
        query["filter"] = cloud_cover_filter(max_cloud_cover)
        query["filter_lang"] = "cql2-json"
    region = f"bbox {list(bbox)}" if bbox is not None else f"geometry {str(intersects)[:80]}"
    what = f"collection {collection!r}, {region}, datetime {query['datetime']}"
    stac_io = StacApiIO(max_retries=retry.urllib3())
    try:  # the timeout goes to open(): it resets the one of `stac_io`
        client = pystac_client.Client.open(catalog.url, stac_io=stac_io, timeout=retry.timeout)
    except (ClientTypeError, ValueError) as exc:  # JSON that is no STAC catalog, or no JSON
        raise CropflowError(
            f"catalog {catalog.name!r}: {catalog.url} is not the root of a STAC API ({exc}); check its URL."
        ) from exc
    except APIError as exc:
        raise _request_error(catalog, what, exc, retry) from exc
    try:
        if client.get_collection(collection) is None:
            available = sorted(c.id for c in client.get_collections())
            raise CropflowError(
                f"collection {collection!r} is not in catalog {catalog.name!r} ({catalog.url}); available: "
                f"{', '.join(available) or 'none (load a region with cropflow stac load)'}."
            )
        found = list(client.search(**query).items_as_dicts())
    except APIError as exc:
        raise _request_error(catalog, what, exc, retry) from exc
    keys = catalog.asset_keys[sensor]
    items = [normalise_proj(harmonise_assets(item, sensor_def, keys)) for item in found]
    absent = [k for k in sensor_def.assets if items and not any(k in item["assets"] for item in items)]
    if sensor_def.mask_asset and items and not any(sensor_def.mask_asset in item["assets"] for item in items):
        absent.append(sensor_def.mask_asset)
    if absent and set(absent) != set(sensor_def.assets) and sensor_def.mask_asset not in absent:
        # some bands exist nowhere (e.g. a product with the 20 m bands only): the cube uses the bands there are
        log.warning("%s at %s: no item has band(s) %s", collection, catalog.name, ", ".join(absent))
    elif sensor == "s2" and absent == [sensor_def.mask_asset]:  # the cube masks clouds by reflectance instead
        log.warning(
            "%s at %s: no item has the %s asset; the cube masks them by the spectral cloud test (s2_cloud_mask "
            "'auto' or 'spectral'; 'scl' refuses them)",
            collection,
            catalog.name,
            sensor_def.mask_asset,
        )
    elif absent:
        raise CropflowError(
            f"no {collection!r} item of catalog {catalog.name!r} has the asset(s) {', '.join(absent)} after renaming "
            f"({', '.join(f'{k}->{v}' for k, v in keys.bands.items())}); their assets are "
            f"{', '.join(items[0]['assets'])}. Give this catalog's asset keys in CROPFLOW_CATALOGS."
        )
    items = deduplicate(items, sensor)
    items.sort(key=lambda it: (it["properties"]["datetime"], it["id"]))
    log.info("%s (%s at %s): %d items", sensor, collection, catalog.name, len(items))
    return items


@task(name="search-items")  # HTTP retries with backoff happen inside (`HttpRetry`); what is left is final
def search_items_task(
    catalog: Catalog,
    sensor: str,
    bbox: Bbox,
    start: date,
    end: date,
    max_cloud_cover: float | None = None,
) -> list[dict]:
    return search_items(catalog, sensor, start, end, bbox=bbox, max_cloud_cover=max_cloud_cover)
