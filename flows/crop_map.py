"""The `crop_map` flow: STAC search -> cloud-masked cube in Zarr -> train -> tiled inference -> map, report.

It reads like the process it runs: the subflows `build_cube`, `train` and `predict` (flows/steps.py), whose tasks
keep the names of the steps (search-items, build-cube, train-model, predict-region, export-map, evaluate-map), then
the optional robustness report and the run's artifacts (flows/report.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.params import DEFAULT_SENSORS, ModelSpec, Run, Season, check_writable, labelled, resolve_runs
from flows.policy import cached, step_key
from flows.report import publish_report
from flows.steps import build_cube, check_sensors, file_digest, predict, train
from infra.errors import CropflowError
from infra.storage import location
from tasks.cube import check_s2_cloud_mask
from tasks.labels import labels_on_grid, read_classes, read_labels
from tasks.robustness import robustness_report_task
from tasks.train import SAR_SENSOR, needs_sar


def check_request(
    region: str,
    seasons: list[int | str | None],
    sensors: list[str],
    catalog: str = "local",
    labels: Path | None = None,
    classes: Path | None = None,
    outputs: str | Path | None = None,
    model: ModelSpec | None = None,
    s2_cloud_mask: str = "auto",
) -> list[Run]:
    """Validate a request before any long work and return its run for each of `seasons`: the region, catalog and
    sensors, the model's teacher and inputs, labels and class map once (a backfill's seasons share them), then each
    season's dates and run folder. `s2_cloud_mask` as in `crop_map`."""
    check_s2_cloud_mask(s2_cloud_mask)
    runs = resolve_runs(region, seasons, outputs, labels, classes)
    check_sensors(sensors, catalog)
    if model is not None:
        check_model_inputs(model, sensors)
    check_labels(runs[0])  # the same region, labels and class map for every season
    for run in runs:
        check_writable(run.out)
    return runs


_LABELS_FIT: set[tuple] = set()  # (grid, labels and class map files with their size and mtime) checked here


def check_labels(run: Run) -> None:
    """The run's labels read against its class map and reprojected onto its region, or a `CropflowError`; once per
    process for the same files, unchanged, and grid (a backfill's seasons, a flow the CLI checked, its subflows)."""
    labels_path, classes_path = labelled(run)
    key = (run.region.epsg, run.region.bounds, *(_file_stamp(p) for p in (labels_path, classes_path)))
    if key in _LABELS_FIT:
        return
    parcels = read_labels(labels_path, read_classes(classes_path))
    labels_on_grid(parcels, f"EPSG:{run.region.epsg}", run.region.bounds)
    _LABELS_FIT.add(key)


def _file_stamp(path: Path) -> tuple:
    """`path` with its size and modification time (None when it cannot be read: its reader says why)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return (str(path), None)
    return (str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns)


def check_model_inputs(model: ModelSpec, sensors: list[str]) -> None:
    """Refuse a teacher checkpoint that does not exist and a model of S2 + S1 without `s1` among the sensors."""
    if model.teacher is not None and not location(model.teacher).is_file():
        raise CropflowError(
            f"teacher {model.teacher} not found; give the model.pt of a trained optical run (cropflow train)."
        )
    if needs_sar(model.name) and SAR_SENSOR not in sensors:
        raise CropflowError(
            f"model {model.name!r} takes the S2 and S1 series: add {SAR_SENSOR} to the sensors (e.g. --sensors s2,s1)."
        )


@flow(name="crop_map", log_prints=True)
def crop_map(
    region: str = "sample",
    season: Season = None,
    sensors: list[str] = list(DEFAULT_SENSORS),  # noqa: B006 (Prefect parameters are copied per run)
    catalog: str = "local",
    stac_url: str | None = None,
    max_cloud_cover: float | None = None,
    model: ModelSpec = ModelSpec(),  # noqa: B008 (frozen)
    labels: Path | None = None,
    classes: Path | None = None,
    outputs: str | Path | None = None,
    robustness: bool = False,
    s2_cloud_mask: str = "auto",
) -> dict[str, str]:
    """Make the crop map of `region` for one season and return the paths of every output.

    `region`: a name of the region catalog, a GeoJSON file or a bbox `west,south,east,north` (then give `labels`
    and `classes`); `season`: a year (by the region's crop calendar), `START..END`, `current` (the season so far)
    or `last` (the latest season ended), default the catalog's; `catalog` names a STAC catalog (tasks/catalogs.yaml,
    CROPFLOW_CATALOGS) or is a STAC API URL, `stac_url` points it at another address; outputs go to
    `<outputs>/<region>/<start>_<end>/` (default `$CROPFLOW_HOME/outputs`). `model`: the model, its training budget
    and method (`pretrain_epochs`, `teacher`; see `flows.steps.train`). `robustness` adds the report of test
    metrics against missing dates. `s2_cloud_mask`: how the cube masks Sentinel-2 clouds, "auto" (SCL where an item
    has it, else a spectral test), "scl" or "spectral".
    """
    [run] = check_request(region, [season], sensors, catalog, labels, classes, outputs, model, s2_cloud_mask)
    dates = f"{run.start}..{run.end}"  # the subflows get the dates: `current` moves with the clock
    common = {"region": region, "season": dates, "outputs": outputs}
    cube = build_cube(
        **common,
        sensors=sensors,
        catalog=catalog,
        stac_url=stac_url,
        max_cloud_cover=max_cloud_cover,
        s2_cloud_mask=s2_cloud_mask,
    )
    trained = train(**common, model=model, labels=labels, classes=classes)
    paths = predict(**common, labels=labels, classes=classes)
    if robustness:
        labels_path, classes_path = labelled(run)
        key = step_key("robustness", run, cube=cube.fingerprint, model=file_digest(trained.checkpoint))
        cached(robustness_report_task, key, [run.out / "robustness.json"])(
            cube.path, trained.checkpoint, labels_path, classes_path, run.out, seed=model.seed
        )
        paths["robustness"] = str(run.out / "robustness.json")
    metrics = json.loads(location(paths["metrics"]).read_text())
    publish_report(run, cube, model, metrics, paths)
    return paths
