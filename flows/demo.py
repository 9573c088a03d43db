"""The sample region as the demo needs it: generated once, loaded into the local STAC API."""

from __future__ import annotations

from pathlib import Path

from flows.regions import load_catalog
from infra import stac_api
from infra.errors import CropflowError
from infra.settings import get_settings
from tasks.sample_region import ORIGIN, generate_region


def ensure_sample(name: str = "sample", size: int | None = None, force: bool = False) -> Path:
    """Generate sample region `name` if it is missing (or `force`), start the STAC API, load the region."""
    settings = get_settings()
    entry = load_catalog().get(name)
    if entry is None or "sample" not in entry:
        samples = [k for k, v in load_catalog().items() if "sample" in v]
        raise CropflowError(f"{name!r} is not a sample region; sample regions: {', '.join(samples)}.")
    folder = settings.regions_dir / name
    spec = entry["sample"]
    size = size or int(spec["size"])
    season = (str(entry["season"]["start"]), str(entry["season"]["end"]))
    if force or not (folder / "region.json").exists():
        origin = tuple(float(v) for v in spec.get("origin", ORIGIN))
        generate_region(
            folder, size=size, seed=int(spec.get("seed", 0)), season=season, name=name, origin=origin, overwrite=force
        )
    stac_api.up(settings)
    stac_api.load(settings, folder)
    return folder
