"""Search STAC catalogs with pystac-client, exactly as against Planetary Computer or Earth Search."""

from __future__ import annotations

import logging
from datetime import date

import pystac_client
from prefect import task
from pystac_client.exceptions import APIError

from infra.errors import CropflowError
from infra.retry import retry_unless_user_error

log = logging.getLogger(__name__)


def cloud_cover_filter(max_cloud_cover: float) -> dict:
    """CQL2-JSON filter keeping items with `eo:cloud_cover <= max_cloud_cover`."""
    return {"op": "<=", "args": [{"property": "eo:cloud_cover"}, max_cloud_cover]}


def search_items(
    stac_url: str,
    collection: str,
    bbox: tuple[float, float, float, float],
    start: date,
    end: date,
    max_cloud_cover: float | None = None,
) -> list[dict]:
    """Items of `collection` intersecting `bbox` (lon/lat) between `start` and `end` (inclusive), as dicts.

    Dicts, not pystac Items: pystac 1.15 rewrites `proj:epsg` to `proj:code`, which stackstac 0.5 cannot read.
    """
    try:
        client = pystac_client.Client.open(stac_url)
    except Exception as exc:  # connection refused, bad URL, not a STAC API
        raise CropflowError(
            f"cannot open the STAC API at {stac_url}: {exc}. Start the local one with 'cropflow stac up' "
            "or pass the URL of a reachable catalog."
        ) from exc
    collections = {c.id for c in client.get_collections()}
    if collection not in collections:
        raise CropflowError(
            f"collection {collection!r} is not in the catalog at {stac_url}; "
            f"available: {', '.join(sorted(collections)) or 'none (load a region with cropflow stac load)'}."
        )
    kwargs: dict = {
        "collections": [collection],
        "bbox": list(bbox),
        "datetime": f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z",
        "limit": 100,
    }
    if max_cloud_cover is not None:
        kwargs["filter"] = cloud_cover_filter(max_cloud_cover)
        kwargs["filter_lang"] = "cql2-json"
    try:
        items = list(client.search(**kwargs).items_as_dicts())
    except APIError as exc:
        raise CropflowError(f"search of {collection!r} at {stac_url} failed: {exc}") from exc
    items.sort(key=lambda it: (it["properties"]["datetime"], it["id"]))
    log.info("%s: %d items", collection, len(items))
    return items


@task(
    name="search-items",
    retries=3,
    retry_delay_seconds=[2, 8, 30],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_user_error,
)
def search_items_task(
    stac_url: str,
    collection: str,
    bbox: tuple[float, float, float, float],
    start: date,
    end: date,
    max_cloud_cover: float | None = None,
) -> list[dict]:
    return search_items(stac_url, collection, bbox, start, end, max_cloud_cover)
