"""The region catalog (`flows/regions.yaml`): a region's grid, crop calendar, labels, class map and schedules by
name; and regions given as a GeoJSON file or a lon/lat bbox, and seasons given as a year or a date range."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from infra.errors import CropflowError
from infra.settings import Settings
from tasks.grid import check_bbox, region_grid

CATALOG = Path(__file__).with_name("regions.yaml")
FIELDS = (  # of a catalog entry
    "description",
    "sample",
    "bbox",
    "geometry",
    "labels",
    "classes",
    "epsg",
    "resolution",
    "season",
    "calendar",
    "schedules",
)


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
    season: tuple[date, date] | None
    labels: Path | None
    classes: Path | None
    source_dir: Path | None = None
    sample: dict | None = None
    calendar: tuple[str, str] = ("01-01", "12-31")
    schedules: tuple[dict, ...] = ()

    def season_of(self, year: int) -> tuple[date, date]:
        """The season of `year` by the crop calendar; a calendar ending before it starts (e.g. winter wheat,
        10-01 to 07-31) runs from the previous year into `year`."""
        (sm, sd), (em, ed) = (map(int, md.split("-")) for md in self.calendar)
        start_year = year - 1 if (em, ed) < (sm, sd) else year
        return date(start_year, sm, sd), date(year, em, ed)

    def season_dates(self, season: int | str | None, today: date | None = None) -> tuple[date, date]:
        """`(start, end)` of `season`: None = the catalog's season; a year (2024) = that year's season by the crop
        calendar; a date range `YYYY-MM-DD..YYYY-MM-DD`; `current` = the latest season started, until today;
        `last` = the latest season ended."""
        today = today or date.today()
        text = str(season).strip() if season is not None else ""
        if not text:
            if self.season is None:
                raise CropflowError(f"region {self.name!r} has no default season; give a season (e.g. 2024).")
            return self.season
        if re.fullmatch(r"\d{4}", text):
            return self.season_of(int(text))
        if text == "current":  # the latest season started by today, up to today
            year = today.year + 1
            while self.season_of(year)[0] > today:
                year -= 1
            start, end = self.season_of(year)
            return start, min(end, today)
        if text == "last":  # the latest season over
            year = today.year
            while self.season_of(year)[1] >= today:
                year -= 1
            return self.season_of(year)
        start, sep, end = text.partition("..")
        if sep:
            first, last = _date(start, "season start", self.name), _date(end, "season end", self.name)
            if last < first:
                raise CropflowError(f"season {text!r} ends before it starts; give START..END with START first.")
            return first, last
        raise CropflowError(
            f"season {text!r} is not a season; give a year (2024), a date range (2024-03-01..2024-10-31), "
            "'current' or 'last'."
        )


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


def _calendar(entry: dict, season: tuple[date, date], name: str) -> tuple[str, str]:
    """The crop calendar `(MM-DD, MM-DD)`: the entry's `calendar`, else the month-days of its season."""
    cal = entry.get("calendar") or {"start": season[0].strftime("%m-%d"), "end": season[1].strftime("%m-%d")}
    for key in ("start", "end"):
        if not re.fullmatch(r"\d{2}-\d{2}", str(cal.get(key, ""))):
            raise CropflowError(f"region {name!r}: calendar.{key}={cal.get(key)!r} is not a month-day; use MM-DD.")
        _date(f"2000-{cal[key]}", f"calendar.{key}", name)
    return str(cal["start"]), str(cal["end"])


def geojson_bbox(path: Path) -> tuple[float, float, float, float]:
    """The lon/lat bounds of every geometry in a GeoJSON file (FeatureCollection, Feature or geometry)."""
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    try:
        doc = json.loads(Path(path).read_text())
        features = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
        geoms = [shape(f["geometry"] if f.get("type") == "Feature" else f) for f in features]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CropflowError(f"{path} is not a readable GeoJSON file of lon/lat geometries ({exc}).") from None
    if not geoms:
        raise CropflowError(f"{path} holds no geometry.")
    for i, geom in enumerate(geoms):
        if not geom.is_valid:
            raise CropflowError(
                f"{path}: geometry {i} is not valid ({explain_validity(geom)}); fix it (e.g. shapely make_valid, "
                "QGIS 'Fix geometries') so that it does not cross itself."
            )
    bounds = [g.bounds for g in geoms]
    box = (min(b[0] for b in bounds), min(b[1] for b in bounds), max(b[2] for b in bounds), max(b[3] for b in bounds))
    return check_bbox(box, f"the bounds of {path}")


def _gridded(
    name: str, bbox: object, what: str, resolution: float = 10.0, epsg: int | None = None, **fields: object
) -> Region:
    box = check_bbox(bbox, what)
    grid = region_grid(box, resolution, epsg)
    return Region(name=name, epsg=grid.epsg, bounds=grid.bounds, bbox=box, **fields)


def resolve_region(
    name: str,
    settings: Settings,
    catalog: Path | None = None,
    labels: Path | None = None,
    classes: Path | None = None,
) -> Region:
    """The region `name`: an entry of the region catalog (a sample region must have been generated, see
    `flows.demo.ensure_sample`), a GeoJSON file, or a lon/lat bbox `west,south,east,north`.

    `labels` and `classes` override the catalog's; a GeoJSON or bbox region has only those, and no default season.
    """
    catalog = catalog or catalog_path()
    regions = load_catalog(catalog)
    if name not in regions:
        if name.lower().endswith((".geojson", ".json")) and Path(name).is_file():
            return _gridded(
                Path(name).stem, geojson_bbox(Path(name)), name, labels=labels, classes=classes, season=None
            )
        if re.fullmatch(r"\s*-?[\d.]+(\s*,\s*-?[\d.]+){3}\s*", name):
            box = [float(v) for v in name.split(",")]
            label = "bbox_" + "_".join(f"{v:.4f}" for v in box)
            return _gridded(label, box, f"region bbox {name!r}", labels=labels, classes=classes, season=None)
        raise CropflowError(
            f"unknown region {name!r}; regions in {catalog.name}: {', '.join(sorted(regions))}; or give a GeoJSON "
            "file or a bbox 'west,south,east,north' in degrees."
        )
    entry = regions[name]
    unknown = sorted(set(entry) - set(FIELDS)) if isinstance(entry, dict) else ["(not a mapping)"]
    if unknown:
        raise CropflowError(
            f"region {name!r} in {catalog.name} has unknown field(s) {', '.join(unknown)}; valid fields: "
            f"{', '.join(FIELDS)}."
        )
    season = entry.get("season") or {}
    if "start" not in season or "end" not in season:
        raise CropflowError(f"region {name!r} in {catalog.name} needs season.start and season.end (YYYY-MM-DD).")
    start, end = _date(season["start"], "season.start", name), _date(season["end"], "season.end", name)
    common = {
        "season": (start, end),
        "calendar": _calendar(entry, (start, end), name),
        "schedules": tuple(entry.get("schedules") or ()),
    }
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
            labels=labels or folder / "labels.parquet",
            classes=classes or folder / "classes.json",
            source_dir=folder,
            sample=entry["sample"],
            **common,
        )
    base = catalog.parent
    missing = [k for k in ("labels", "classes") if k not in entry] + (
        [] if {"bbox", "geometry"} & set(entry) else ["bbox"]
    )
    if missing:
        raise CropflowError(f"region {name!r} in {catalog.name} is missing field(s): {', '.join(missing)}.")
    bbox = geojson_bbox(base / entry["geometry"]) if "geometry" in entry else entry["bbox"]
    return _gridded(
        name,
        bbox,
        f"region {name!r}: bbox",
        float(entry.get("resolution", 10.0)),
        int(entry["epsg"]) if entry.get("epsg") else None,
        labels=labels or (base / entry["labels"]).resolve(),
        classes=classes or (base / entry["classes"]).resolve(),
        **common,
    )
