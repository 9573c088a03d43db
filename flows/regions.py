"""The region catalog (`flows/regions.yaml`): a region's grid, crop calendar, labels, class map and schedules (those
are read by `flows.deploy`) by name; and regions given as a GeoJSON file or a lon/lat bbox, and seasons given as a
year or a date range."""

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
SEASON_FORMS = "a year (2024), a date range (2024-03-01..2024-10-31), 'current' or 'last'"
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

    def season_of(self, year: int) -> tuple[date, date]:
        """The season of `year` by the crop calendar; a calendar ending before it starts (e.g. winter wheat,
        10-01 to 07-31) runs from the previous year into `year`."""
        (sm, sd), (em, ed) = (map(int, md.split("-")) for md in self.calendar)
        start_year = year - 1 if (em, ed) < (sm, sd) else year
        return date(start_year, sm, sd), date(year, em, ed)

    def season_dates(self, season: int | str | None, today: date | None = None) -> tuple[date, date]:
        """`(start, end)` of `season` (`parse_season`): None = the catalog's season; a year (2024) = that year's
        season by the crop calendar; a date range `YYYY-MM-DD..YYYY-MM-DD`; `current` = the latest season started,
        until today; `last` = the latest season ended."""
        today = today or date.today()
        parsed = parse_season(season)
        if parsed is None:
            if self.season is None:
                raise CropflowError(f"region {self.name!r} has no default season; give a season (e.g. 2024).")
            return self.season
        if isinstance(parsed, int):
            return self.season_of(parsed)
        if parsed == "current":  # the latest season started by today, up to today
            year = today.year + 1
            while self.season_of(year)[0] > today:
                year -= 1
            start, end = self.season_of(year)
            return start, min(end, today)
        if parsed == "last":  # the latest season over
            year = today.year
            while self.season_of(year)[1] >= today:
                year -= 1
            return self.season_of(year)
        return parsed


def parse_season(season: int | str | None) -> int | tuple[date, date] | str | None:
    """A season as written by a user, parsed: None (or blank) = the region's default; a year; `START..END` as two
    dates, START first; `current` or `last`. Anything else is a `CropflowError` saying what a season can be."""
    text = str(season).strip() if season is not None else ""
    if not text:
        return None
    if re.fullmatch(r"\d{4}", text):
        return int(text)
    if text in ("current", "last"):
        return text
    start, sep, end = text.partition("..")
    if not sep:
        raise CropflowError(f"season {text!r} is not a season; give {SEASON_FORMS}.")
    first, last = _date(start.strip(), f"season {text!r}: start"), _date(end.strip(), f"season {text!r}: end")
    if last < first:
        raise CropflowError(f"season {text!r} ends before it starts; give START..END with START first.")
    return first, last


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


def _date(value: object, field: str) -> date:
    """`value` as a date (a YAML date or `YYYY-MM-DD` text); `field` names it in the message otherwise."""
    if isinstance(value, date):
        return value
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(value)):
            return date.fromisoformat(str(value))
    except ValueError:
        pass
    raise CropflowError(f"{field}={str(value)!r} is not a date; use YYYY-MM-DD (e.g. 2024-03-01).")


def _every_year_day(text: str) -> bool:
    """Whether `text` is an `MM-DD` that every year has (2001 has no 29 February)."""
    try:
        return bool(re.fullmatch(r"\d{2}-\d{2}", text)) and bool(date.fromisoformat(f"2001-{text}"))
    except ValueError:
        return False


def _number(
    entry: dict, key: str, kind: type[int] | type[float], name: str, default: float | None = None
) -> float | None:
    """The entry's number `key` (`default` when absent), or a message naming the field."""
    value = entry.get(key)
    if value is None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer EPSG code (e.g. 32631)" if kind is int else "a number"
        raise CropflowError(f"region {name!r}: {key}={value!r} is not {what}.") from None


def _calendar(entry: dict, season: tuple[date, date], name: str) -> tuple[str, str]:
    """The crop calendar `(MM-DD, MM-DD)`: the entry's `calendar`, else the month-days of its season. Each must be
    a day of every year (not 02-29), as a year's season is built from it."""
    given = entry.get("calendar")
    if given is not None and not isinstance(given, dict):
        raise CropflowError(f"region {name!r}: calendar={given!r} must be {{start: MM-DD, end: MM-DD}}.")
    cal = given or {"start": season[0].strftime("%m-%d"), "end": season[1].strftime("%m-%d")}
    for key in ("start", "end"):
        if not _every_year_day(str(cal.get(key, ""))):
            field = f"calendar.{key}" if given else f"season.{key} (its month-day)"
            raise CropflowError(
                f"region {name!r}: {field}={cal.get(key)!r} is not a day of every year; use MM-DD from 01-01 to "
                "12-31, not 02-29 (e.g. 02-28 or 03-01)."
            )
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
            box = check_bbox(name.split(","), f"region bbox {name!r}")
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
    start, end = (_date(season[k], f"region {name!r}: season.{k}") for k in ("start", "end"))
    common = {
        "season": (start, end),
        "calendar": _calendar(entry, (start, end), name),
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
        _number(entry, "resolution", float, name, 10.0),
        _number(entry, "epsg", int, name),
        labels=labels or (base / entry["labels"]).resolve(),
        classes=classes or (base / entry["classes"]).resolve(),
        **common,
    )
