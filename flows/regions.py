"""The region catalog (`flows/regions.yaml`): a region's grid, season, labels and class map by name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from infra.errors import CropflowError
from infra.settings import Settings
from tasks.grid import check_bbox, region_grid

CATALOG = Path(__file__).with_name("regions.yaml")


def catalog_path() -> Path:
    """The region catalog in use: `CROPFLOW_REGIONS` if set, else the one shipped in `flows/regions.yaml`."""
    env = os.environ.get("CROPFLOW_REGIONS")
    return Path(env) if env else CATALOG


@dataclass(frozen=True)
class Region:
    """Everything a flow needs to know about where it maps."""

    name: str
    epsg: int
    bounds: tuple[float, float, float, float]
    bbox: tuple[float, float, float, float]
    season: tuple[date, date]
    labels: Path
    classes: Path
    source_dir: Path | None = None
    sample: dict | None = None


def load_catalog(path: Path | None = None) -> dict[str, dict]:
    """Region entries by name."""
    path = path or catalog_path()
    if not path.is_file():
        raise CropflowError(f"region catalog {path} does not exist; set CROPFLOW_REGIONS to a YAML region catalog.")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    regions = doc.get("regions")
    if not isinstance(regions, dict):
        raise CropflowError(f"{path}: expected a top-level 'regions:' mapping of region names to entries.")
    return regions


def _date(value: object, field: str, name: str) -> date:
    try:
        return value if isinstance(value, date) else date.fromisoformat(str(value))
    except ValueError:
        raise CropflowError(f"region {name!r}: {field}={value!r} is not a date; use YYYY-MM-DD.") from None


def resolve_region(name: str, settings: Settings, catalog: Path | None = None) -> Region:
    """The region called `name`; a sample region must have been generated (see `flows.demo.ensure_sample`)."""
    catalog = catalog or catalog_path()
    regions = load_catalog(catalog)
    if name not in regions:
        raise CropflowError(f"unknown region {name!r}; regions in {catalog.name}: {', '.join(sorted(regions))}.")
    entry = regions[name]
    season = entry.get("season") or {}
    if "start" not in season or "end" not in season:
        raise CropflowError(f"region {name!r} in {catalog.name} needs season.start and season.end (YYYY-MM-DD).")
    start, end = _date(season["start"], "season.start", name), _date(season["end"], "season.end", name)
    if "sample" in entry:
        folder = settings.regions_dir / name
        meta_path = folder / "region.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is None:
            raise CropflowError(f"sample region {name!r} is not generated yet; run 'cropflow sample {name}'.")
        return Region(
            name=name,
            epsg=int(meta["epsg"]),
            bounds=tuple(meta["bounds"]),
            bbox=tuple(meta["bbox"]),
            season=(start, end),
            labels=folder / "labels.parquet",
            classes=folder / "classes.json",
            source_dir=folder,
            sample=entry["sample"],
        )
    missing = [k for k in ("bbox", "labels", "classes") if k not in entry]
    if missing:
        raise CropflowError(f"region {name!r} in {catalog.name} is missing field(s): {', '.join(missing)}.")
    bbox = check_bbox(entry["bbox"], f"region {name!r}: bbox")
    grid = region_grid(bbox, float(entry.get("resolution", 10.0)), int(entry["epsg"]) if entry.get("epsg") else None)
    base = catalog.parent
    return Region(
        name=name,
        epsg=grid.epsg,
        bounds=grid.bounds,
        bbox=bbox,
        season=(start, end),
        labels=(base / entry["labels"]).resolve(),
        classes=(base / entry["classes"]).resolve(),
    )
