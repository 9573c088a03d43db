"""The `crop_map` flow: STAC search -> cloud-masked cube in Zarr -> train -> tiled inference -> map, report.

It reads like the process it runs; every step is a task from `tasks/` that can be found by its name.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger

from flows.regions import Region, resolve_region
from infra.errors import CropflowError
from infra.settings import get_settings
from tasks.catalog import get_catalog, search_items_task
from tasks.cube import build_cube_task
from tasks.evaluate import evaluate_map_task
from tasks.export import export_map_task
from tasks.labels import read_classes, read_labels
from tasks.predict import predict_region_task
from tasks.robustness import robustness_report_task
from tasks.sensors import get_sensor
from tasks.train import train_model_task

DEFAULT_SENSORS = ("s2", "s1", "landsat")


def check_request(
    region: str,
    start: date | None,
    end: date | None,
    sensors: tuple[str, ...] | list[str],
    catalog: str = "local",
) -> tuple[Region, date, date]:
    """Validate a request before any long work: region, season, catalog and sensors, labels and class map."""
    settings = get_settings()
    reg = resolve_region(region, settings)
    start = start or reg.season[0]
    end = end or reg.season[1]
    if end < start:
        raise CropflowError(f"the season ends ({end}) before it starts ({start}); give --start before --end.")
    if not sensors or "s2" not in sensors:
        raise CropflowError("sensors must include 's2' (the model input); e.g. --sensors s2,s1,landsat.")
    for s in sensors:
        try:
            get_sensor(s)
        except ValueError as exc:
            raise CropflowError(str(exc)) from None
    stac = get_catalog(catalog)
    for s in sensors:
        stac.sensor(s)
    classes = read_classes(reg.classes)
    read_labels(reg.labels, classes)
    return reg, start, end


@flow(name="crop_map", log_prints=True)
def crop_map(
    region: str = "sample",
    start: date | None = None,
    end: date | None = None,
    sensors: list[str] = list(DEFAULT_SENSORS),  # noqa: B006 (Prefect parameters are copied per run)
    catalog: str = "local",
    stac_url: str | None = None,
    max_cloud_cover: float | None = None,
    model: str = "fcn3d",
    model_params: dict | None = None,
    epochs: int = 40,
    time_budget_s: float | None = 480.0,
    seed: int = 0,
    out_dir: Path | None = None,
    robustness: bool = False,
) -> dict[str, str]:
    """Make the crop map of `region` for one season and return the paths of every output.

    `catalog` names a STAC catalog (tasks/catalogs.yaml, CROPFLOW_CATALOGS) or is a STAC API URL; `stac_url`
    points the catalog at another address. `robustness` adds the report of test metrics against missing dates.
    """
    logger = get_run_logger()
    reg, start, end = check_request(region, start, end, sensors, catalog)
    settings = get_settings()
    stac = get_catalog(catalog, url=stac_url)
    out = Path(out_dir) if out_dir else settings.outputs_dir / reg.name / f"{start}_{end}"

    items = {s: search_items_task(stac, s, reg.bbox, start, end, max_cloud_cover) for s in sensors}
    if not items["s2"]:
        raise CropflowError(
            f"no Sentinel-2 items for region {reg.name!r} between {start} and {end} in catalog {stac.name!r} "
            f"({stac.url}); "
            "check the season, the region, or load the region into the catalog (cropflow stac load)."
        )
    items = {s: found for s, found in items.items() if found}
    logger.info("items per sensor: %s", {s: len(v) for s, v in items.items()})

    query = {"catalog": stac.name, "url": stac.url, "bbox": reg.bbox, "season": [start, end]}
    query |= {"sensors": list(items), "max_cloud_cover": max_cloud_cover}
    cube = build_cube_task(
        items,
        reg.epsg,
        reg.bounds,
        start,
        end,
        out / "cube.zarr",
        attrs={"region": reg.name},
        catalog=stac,
        query=query,
    )
    trained = train_model_task(
        cube,
        reg.labels,
        reg.classes,
        out,
        model_name=model,
        model_config=model_params,
        epochs=epochs,
        seed=seed,
        time_budget_s=time_budget_s,
    )
    probabilities = predict_region_task(cube, trained.checkpoint, out / "probabilities.zarr", reg.classes)
    exported = export_map_task(probabilities, reg.classes, reg.name, (start, end), out)
    metrics = evaluate_map_task(out / "crop_map.tif", cube, reg.labels, reg.classes, out)

    outputs = {
        "cube": str(cube),
        "model": str(trained.checkpoint),
        "probabilities": str(probabilities),
        **{k: str(v) for k, v in exported.items()},
        "metrics": str(out / "metrics.json"),
    }
    if robustness:
        robustness_report_task(cube, trained.checkpoint, reg.labels, reg.classes, out, seed=seed)
        outputs["robustness"] = str(out / "robustness.json")
    logger.info("metrics: %s", json.dumps({k: metrics[k] for k in ("overall_accuracy", "kappa", "macro_f1", "miou")}))
    return outputs
