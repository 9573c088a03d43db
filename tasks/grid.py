"""The cube grid: one UTM grid for all sensors, chosen from the region's lon/lat bbox and snapped to the resolution."""

from __future__ import annotations

import math
from dataclasses import dataclass

from affine import Affine
from pyproj import Transformer

from infra.errors import CropflowError

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """A north-up grid: `epsg`, `bounds` (xmin, ymin, xmax, ymax in metres, multiples of `resolution`)."""

    epsg: int
    bounds: Bounds
    resolution: float

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        xmin, ymin, xmax, ymax = self.bounds
        return round((ymax - ymin) / self.resolution), round((xmax - xmin) / self.resolution)

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.bounds[0], 0.0, -self.resolution, self.bounds[3])

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"


def check_bbox(value: object, what: str = "bbox") -> Bounds:
    """A lon/lat bbox `[west, south, east, north]`, or a message saying what is wrong with it."""
    try:
        west, south, east, north = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise CropflowError(f"{what} must be four numbers [west, south, east, north] in degrees.") from None
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90):
        raise CropflowError(f"{what} {[west, south, east, north]} is outside longitude -180..180 / latitude -90..90.")
    if west >= east or south >= north:
        raise CropflowError(
            f"{what} {[west, south, east, north]} is inverted or empty; need west < east, south < north."
        )
    return west, south, east, north


def check_bounds(bounds: object, what: str = "cube bounds") -> Bounds:
    """Projected `(xmin, ymin, xmax, ymax)`, or a message when they are not four numbers or empty/inverted."""
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in bounds)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise CropflowError(f"{what} must be four numbers (xmin, ymin, xmax, ymax) in metres.") from None
    if not (xmax > xmin and ymax > ymin):
        raise CropflowError(f"{what} {bounds} are empty or inverted; expected xmin < xmax and ymin < ymax.")
    return xmin, ymin, xmax, ymax


def utm_epsg(bbox: Bounds) -> int:
    """EPSG code of the UTM zone of the bbox centroid (even when the region straddles zones)."""
    west, south, east, north = check_bbox(bbox)
    lon, lat = (west + east) / 2, (south + north) / 2
    zone = min(int((lon + 180) // 6) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def snap_bounds(bounds: Bounds, resolution: float) -> Bounds:
    """`bounds` grown outward to multiples of `resolution`."""
    if resolution <= 0:
        raise CropflowError(f"resolution={resolution} must be a positive number of metres.")
    xmin, ymin, xmax, ymax = check_bounds(bounds)
    return (
        math.floor(xmin / resolution) * resolution,
        math.floor(ymin / resolution) * resolution,
        math.ceil(xmax / resolution) * resolution,
        math.ceil(ymax / resolution) * resolution,
    )


def projected_bounds(bbox: Bounds, epsg: int, resolution: float) -> Bounds:
    """The lon/lat `bbox` in `epsg` (edges densified), grown outward to a multiple of `resolution`."""
    transformer = Transformer.from_crs(4326, epsg, always_xy=True)
    return snap_bounds(transformer.transform_bounds(*check_bbox(bbox), densify_pts=21), resolution)


def region_grid(bbox: Bounds, resolution: float = 10.0, epsg: int | None = None) -> Grid:
    """The cube grid of a lon/lat bbox: UTM zone of its centroid unless `epsg` is given, snapped bounds."""
    epsg = epsg or utm_epsg(bbox)
    return Grid(epsg, projected_bounds(bbox, epsg, resolution), float(resolution))
