"""The three steps of a crop map as flows, each runnable alone (`cropflow build-cube|train|predict`, a deployment)
or as a subflow of `crop_map`: `build_cube` (STAC search -> cloud-masked cube in Zarr), `train` (a model on the
cube and the region's labels), `predict` (tiled inference -> map COG, preview, STAC item -> accuracy).

A step reads what the step before wrote in the run folder `<outputs>/<region>/<start>_<end>/`; its tasks are cached
(`flows.policy`), so a step run again with nothing changed recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.concurrency.sync import rate_limit

from flows.cube import build_cube_task
from flows.params import DEFAULT_SENSORS, ModelSpec, Run, Season, labelled, resolve_run
from flows.policy import CATALOG_RATE_LIMIT, cached, digest, limit_exists, step_key
from flows.predict import predict_parts_task
from flows.report import CubeInfo, emit_cube_ready, emit_map_published
from infra.dask_cluster import DaskSettings
from infra.errors import CropflowError
from infra.storage import location, open_zarr
from tasks.catalog import Catalog, get_catalog, search_items_task
from tasks.cube import check_s2_cloud_mask
from tasks.distill import distill_incomplete_task, distill_modalities_task
from tasks.evaluate import HEADLINE, evaluate_map_task
from tasks.export import export_map_task
from tasks.predict import predict_region_task
from tasks.pretrain import PRETRAIN_OPTIONS, pretrain_model_task
from tasks.sensors import get_sensor
from tasks.train import TrainOptions, TrainResult, device_defaults, resolve_device, train_model_task


def check_sensors(sensors: list[str], catalog: str, stac_url: str | None = None) -> Catalog:
    """The catalog, once the sensors are known and served by it (S2 is the model input, so it is required)."""
    if not sensors or "s2" not in sensors:
        raise CropflowError("sensors must include 's2' (the model input); e.g. --sensors s2,s1,landsat.")
    for s in sensors:
        try:
            get_sensor(s)
        except ValueError as exc:
            raise CropflowError(str(exc)) from None
    stac = get_catalog(catalog, url=stac_url)
    for s in sensors:
        stac.sensor(s)
    return stac


def file_digest(path: Path) -> str:
    """A digest of a file's bytes."""
    return hashlib.sha256(location(path).read_bytes()).hexdigest()[:16]


def cube_fingerprint(cube: Path) -> str:
    """A digest of what a cube was built from (its query, items, options and code version), read from its attrs."""
    attrs = open_zarr(cube).attrs
    return digest({k: attrs.get(k) for k in ("items", "query", "options", "cropflow_version", "bin_days")})


def _existing(path: Path, step: str) -> Path:
    if not path.exists():
        raise CropflowError(f"{path} does not exist; run 'cropflow {step}' for this region and season first.")
    return path


def _mean_cloud_cover(items: list[dict]) -> float | None:
    covers = [it["properties"]["eo:cloud_cover"] for it in items if "eo:cloud_cover" in it["properties"]]
    return sum(covers) / len(covers) if covers else None


def cube_key(run: Run, query: dict, items: dict[str, list[str]], s2_cloud_mask: str) -> str:
    """The cache key of a cube: the query, the ids of the items found, the region's bounds and the cloud mask."""
    return step_key("cube", run, query=query, items=items, bounds=run.region.bounds, s2_cloud_mask=s2_cloud_mask)


@flow(name="build_cube", log_prints=True)
def build_cube(
    region: str = "sample",
    season: Season = None,
    sensors: list[str] = list(DEFAULT_SENSORS),  # noqa: B006 (Prefect parameters are copied per run)
    catalog: str = "local",
    stac_url: str | None = None,
    max_cloud_cover: float | None = None,
    outputs: str | Path | None = None,
    s2_cloud_mask: str = "auto",
) -> CubeInfo:
    """Search the catalog for every sensor over the region and season, then build the cloud-masked Zarr cube.

    `region`: a name of the region catalog, a GeoJSON file or a bbox `west,south,east,north`; `season`: a year,
    `START..END`, `current` or `last`; `catalog`: a name (tasks/catalogs.yaml, CROPFLOW_CATALOGS) or a STAC API URL,
    `stac_url` another address for it; `outputs`: the root of the run folders (default `$CROPFLOW_HOME/outputs`);
    `s2_cloud_mask`: "auto" (SCL where an item has it, else a spectral test), "scl" or "spectral"
    (`tasks.cube.prepare_cube`).
    """
    logger = get_run_logger()
    check_s2_cloud_mask(s2_cloud_mask)
    run = resolve_run(region, season, outputs)
    stac = check_sensors(sensors, catalog, stac_url)
    items, limited = {}, limit_exists(CATALOG_RATE_LIMIT)
    for s in sensors:
        if limited:
            rate_limit(CATALOG_RATE_LIMIT)
        items[s] = search_items_task(stac, s, run.region.bbox, run.start, run.end, max_cloud_cover)
    if not items["s2"]:
        raise CropflowError(
            f"no Sentinel-2 items for region {run.region.name!r} between {run.start} and {run.end} in catalog "
            f"{stac.name!r} ({stac.url}); check the season, the region, or load the region into the catalog "
            "(cropflow stac load)."
        )
    items = {s: found for s, found in items.items() if found}
    logger.info("items per sensor: %s", {s: len(v) for s, v in items.items()})

    query = {"catalog": stac.name, "url": stac.url, "bbox": run.region.bbox, "season": [run.start, run.end]}
    query |= {"sensors": list(items), "max_cloud_cover": max_cloud_cover}
    ids = {s: [it["id"] for it in found] for s, found in items.items()}
    out = run.out / "cube.zarr"
    cube = cached(build_cube_task, cube_key(run, query, ids, s2_cloud_mask), [out])(
        items,
        run.region.epsg,
        run.region.bounds,
        run.start,
        run.end,
        out,
        attrs={"region": run.region.name},
        catalog=stac,
        query=query,
        s2_cloud_mask=s2_cloud_mask,
    )
    clear = json.loads(open_zarr(cube).attrs["valid_fraction"])["s2"]  # summed block by block while it was built
    info = CubeInfo(
        path=cube,
        items={s: len(v) for s, v in items.items()},
        cloud_cover={s: _mean_cloud_cover(v) for s, v in items.items()},
        clear_fraction=clear,
        fingerprint=cube_fingerprint(cube),
    )
    emit_cube_ready(run, info)
    return info


def train_key(run: Run, model: ModelSpec) -> str:
    """The cache key of a training run: the cube, the model spec and the defaults of this machine's device (fcn3d
    is wider on a GPU), labels, classes and the teacher's bytes."""
    labels, classes = labelled(run)
    cube = _existing(run.out / "cube.zarr", "build-cube")
    return step_key(
        "train",
        run,
        cube=cube_fingerprint(cube),
        model=model.model_dump(),
        device_defaults=device_defaults(model.name, resolve_device("auto")),
        labels=file_digest(labels),
        classes=file_digest(classes),
        teacher=file_digest(model.teacher) if model.teacher and location(model.teacher).is_file() else None,
    )


@flow(name="train", log_prints=True)
def train(
    region: str = "sample",
    season: Season = None,
    model: ModelSpec = ModelSpec(),  # noqa: B008 (frozen)
    labels: Path | None = None,
    classes: Path | None = None,
    outputs: str | Path | None = None,
) -> TrainResult:
    """Train `model` on the cube of the region and season (`build_cube` first) and the region's labels and class
    map (`labels`, `classes` override the catalog's; required for a GeoJSON or bbox region).

    With `model.teacher`, distill that optical checkpoint: `joint_reconstruction` (incomplete series) or
    `modality_distillation` (the cube's S2 + S1; auxiliary students in `optical_student/`, `sar_student/`), the
    student taking the teacher's backbone and starting from its weights; `model.params` are then the student's own
    settings (reconstruction branch, or `embed_dim`, `temperature`, `tau`, loss weights). With
    `model.pretrain_epochs`, pre-train STCLN's encoder first."""
    run = resolve_run(region, season, outputs, labels, classes)
    key = train_key(run, model)
    labels_path, classes_path = labelled(run)
    cube = run.out / "cube.zarr"
    budget = {"seed": model.seed, "time_budget_s": model.time_budget_s}
    if model.teacher is not None:  # distillation from a trained optical teacher
        teacher = location(model.teacher)
        written = [run.out, run.out / "optical_student", run.out / "sar_student"]
        if teacher.absolute() in [(folder / "model.pt").absolute() for folder in written]:
            raise CropflowError(
                f"the teacher {teacher} is a model this run writes; copy it elsewhere (e.g. teacher.pt) first."
            )
        options = TrainOptions(epochs=model.epochs, **budget)
        inputs = (cube, labels_path, classes_path, run.out)
        if model.name == "modality_distillation":  # optical + SAR, auxiliary students in sub-folders
            stages = cached(distill_modalities_task, key, [run.out / "model.pt"])(
                *inputs, teacher=teacher, target_config=model.params, options=options
            )
            return stages["target"]
        return cached(distill_incomplete_task, key, [run.out / "model.pt"])(
            *inputs, teacher, student_config=model.params, options=options
        )
    init_from = None
    if model.pretrain_epochs:  # STCLN: masked pre-training of the encoder on every pixel, then fine-tuning
        pretrained = run.out / "pretrain"
        options = replace(PRETRAIN_OPTIONS, epochs=model.pretrain_epochs, **budget)
        cached(pretrain_model_task, f"{key}-pretrain", [pretrained / "model.pt"])(
            cube, pretrained, model.params, options=options
        )
        init_from = pretrained / "model.pt"
    return cached(train_model_task, key, [run.out / "model.pt"])(
        cube,
        labels_path,
        classes_path,
        run.out,
        model_name=model.name,
        model_config=model.params,
        epochs=model.epochs,
        init_from=init_from,
        **budget,
    )


@flow(name="predict", log_prints=True)
def predict(
    region: str = "sample",
    season: Season = None,
    labels: Path | None = None,
    classes: Path | None = None,
    outputs: str | Path | None = None,
) -> dict[str, str]:
    """Map the region and season with the model `train` left in the run folder: probabilities, class and
    confidence COGs, preview, STAC item, and the accuracy on the held-out labels. Returns the output paths.

    With `CROPFLOW_DASK` set, the tiled inference runs in parts on that Dask cluster's workers (`flows/predict.py`);
    otherwise in this process, on the GPU when there is one."""
    run = resolve_run(region, season, outputs, labels, classes)
    labels_path, classes_path = labelled(run)
    cube = _existing(run.out / "cube.zarr", "build-cube")
    checkpoint = _existing(run.out / "model.pt", "train")
    depends = {"cube": cube_fingerprint(cube), "model": file_digest(checkpoint), "classes": file_digest(classes_path)}
    probs_key = step_key("predict", run, **depends)
    on_dask = DaskSettings.configured() is not None  # CROPFLOW_DASK set: parts on the cluster's workers
    probs = cached(predict_parts_task if on_dask else predict_region_task, probs_key, [run.out / "probabilities.zarr"])(
        cube, checkpoint, run.out / "probabilities.zarr", classes_path
    )
    export_key = step_key("export", run, after=probs_key)
    exported = cached(export_map_task, export_key, [run.out / "crop_map.tif", run.out / "stac"])(
        probs, classes_path, run.region.name, (run.start, run.end), run.out
    )
    evaluate_key = step_key("evaluate", run, after=export_key, labels=file_digest(labels_path))
    metrics = cached(evaluate_map_task, evaluate_key, [run.out / "metrics.json"])(
        exported["crop_map"], cube, labels_path, classes_path, run.out
    )
    paths = {
        "cube": str(cube),
        "model": str(checkpoint),
        "probabilities": str(probs),
        **{k: str(v) for k, v in exported.items()},
        "metrics": str(run.out / "metrics.json"),
        "confusion_matrix": str(run.out / "confusion_matrix.png"),
    }
    emit_map_published(run, paths, metrics)
    get_run_logger().info("metrics: %s", json.dumps({k: metrics[k] for k in HEADLINE}))
    return paths
