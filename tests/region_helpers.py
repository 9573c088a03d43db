"""Helpers of the tests that read region folders (the layout `tasks/sample_region.py` writes) and compare stores."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from infra.stac_api import read_items


def region_items(region_dir: Path, collection: str = "sentinel-2-l2a") -> list[dict]:
    """The STAC items of `collection` in a region folder (`items/<collection>.ndjson`)."""
    return read_items(region_dir / "items" / f"{collection}.ndjson")


def region_season(region_dir: Path) -> tuple[dict, date, date]:
    """`region.json` of a region folder and its season's first and last day."""
    meta = json.loads((region_dir / "region.json").read_text())
    start, end = (date.fromisoformat(d) for d in meta["season"])
    return meta, start, end


def file_bytes(folder: Path) -> dict[str, bytes]:
    """The bytes of every file under `folder`, by path relative to it: equal for identical trees (stores, regions)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
