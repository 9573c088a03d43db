"""`cropflow` commands of the flows and their orchestration: build-cube, train, predict, crop-map, backfill, deploy,
server up|down|status. `flows/cli.py` registers them (`register(app)`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from flows.params import START_TIMEOUT_S, ModelSpec, listed, parse_seasons
from infra.errors import CropflowError
from infra.settings import get_settings
from infra.storage import location
from tasks.evaluate import headline

console = Console()
server_app = typer.Typer(help="The local Prefect server and UI on 127.0.0.1 (SQLite by default).")

Region = Annotated[
    str, typer.Option(help="a region of flows/regions.yaml, a GeoJSON file, or a bbox 'west,south,east,north'")
]
SeasonOpt = Annotated[
    str | None,
    typer.Option(help="a year (by the crop calendar), START..END dates, 'current' or 'last'; default the region's"),
]
Sensors = Annotated[str, typer.Option(help="comma-separated: s2,s1,landsat")]
CatalogOpt = Annotated[
    str, typer.Option(help="STAC catalog: local, planetary-computer, earth-search, one from CROPFLOW_CATALOGS, a URL")
]
StacUrl = Annotated[str | None, typer.Option(help="STAC API URL of the catalog (default: the catalog's)")]
CloudOpt = Annotated[float | None, typer.Option(help="keep items with eo:cloud_cover <= this")]
CloudMaskOpt = Annotated[
    str,
    typer.Option(
        help="Sentinel-2 cloud mask: auto (SCL where an item has it, else a spectral test), scl (items without SCL "
        "refused) or spectral (the test for every item)"
    ),
]
RobustnessOpt = Annotated[bool, typer.Option(help="also report test metrics against 0-80 % missing dates")]
ModelOpt = Annotated[str, typer.Option(help="model name (models/registry.py)")]
Epochs = Annotated[int, typer.Option(help="maximum training epochs")]
Budget = Annotated[float, typer.Option(help="training time budget in seconds")]
PretrainOpt = Annotated[
    int, typer.Option(help="stcln: epochs of masked pre-training on every cube pixel before fine-tuning")
]
TeacherOpt = Annotated[
    str | None,
    typer.Option(
        help="model.pt of an optical model to distill: joint_reconstruction (incomplete series) or "
        "modality_distillation (S2 + S1 of the cube)"
    ),
]
ParamsOpt = Annotated[
    str | None,
    typer.Option(
        help="the model's settings over its defaults: inline JSON, e.g. '{\"widths\": [8, 16, 32, 64]}', or a YAML or "
        "JSON file"
    ),
]
LabelsOpt = Annotated[Path | None, typer.Option(help="labels file (default: the region's)")]
ClassesOpt = Annotated[Path | None, typer.Option(help="class map classes.json (default: the region's)")]
Outputs = Annotated[
    str | None,
    typer.Option(
        help="root of the run folders: a folder or an s3://, gs://, az:// URL (default: $CROPFLOW_HOME/outputs)"
    ),
]


def read_params(text: str | None) -> dict | None:
    """The model settings of `--params`: inline JSON (text starting with `{`) or the path of a YAML or JSON file."""
    if text is None:
        return None
    hint = "give inline JSON such as '{\"widths\": [8, 16, 32, 64]}' or the path of a YAML or JSON file"
    if text.lstrip().startswith("{"):
        try:
            params = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CropflowError(f"--params {text!r} is not valid JSON ({exc}); {hint}.") from None
    else:
        try:
            params = yaml.safe_load(Path(text).read_text())
        except OSError as exc:
            raise CropflowError(f"--params file {text} cannot be read ({exc.strerror}); {hint}.") from None
        except yaml.YAMLError as exc:
            raise CropflowError(f"--params file {text} is not valid YAML or JSON ({exc}); {hint}.") from None
    if not isinstance(params, dict) or not all(isinstance(key, str) for key in params):
        raise CropflowError(f"--params {text} is not a mapping of setting names to values; {hint}.")
    return params


def model_spec(
    name: str, epochs: int, time_budget: float, params: str | None, pretrain_epochs: int = 0, teacher: str | None = None
) -> ModelSpec:
    """The model options as the flows' `ModelSpec`, checked (`--params` read by `read_params`) before any work."""
    return ModelSpec(
        name=name,
        params=read_params(params),
        epochs=epochs,
        time_budget_s=time_budget,
        pretrain_epochs=pretrain_epochs,
        teacher=teacher,
    )


def print_outputs(outputs: dict[str, str], seconds: float) -> None:
    """The output paths of a crop map run and its headline metrics."""
    table = Table(title=f"crop_map outputs ({seconds / 60:.1f} min)")
    table.add_column("output")
    table.add_column("path", overflow="fold")
    for key, path in outputs.items():
        table.add_row(key, path)
    console.print(table)
    metrics = json.loads(location(outputs["metrics"]).read_text())
    console.print(f"test parcels: {headline(metrics)}")


def crop_map_cmd(
    region: Region = "sample",
    season: SeasonOpt = None,
    sensors: Sensors = "s2,s1,landsat",
    catalog: CatalogOpt = "local",
    stac_url: StacUrl = None,
    max_cloud_cover: CloudOpt = None,
    model: ModelOpt = "fcn3d",
    epochs: Epochs = 40,
    time_budget: Budget = 480.0,
    labels: LabelsOpt = None,
    classes: ClassesOpt = None,
    outputs: Outputs = None,
    robustness: RobustnessOpt = False,
    pretrain_epochs: PretrainOpt = 0,
    teacher: TeacherOpt = None,
    params: ParamsOpt = None,
    s2_cloud_mask: CloudMaskOpt = "auto",
) -> None:
    """Run the crop_map flow: search, cube, train, predict, export, evaluate, report."""
    from flows.crop_map import check_request, crop_map

    spec = model_spec(model, epochs, time_budget, params, pretrain_epochs, teacher)
    check_request(region, [season], listed(sensors), catalog, labels, classes, outputs, spec, s2_cloud_mask)
    t0 = time.perf_counter()
    paths = crop_map(
        region=region,
        season=season,
        sensors=listed(sensors),
        catalog=catalog,
        stac_url=stac_url,
        max_cloud_cover=max_cloud_cover,
        model=spec,
        labels=labels,
        classes=classes,
        outputs=outputs,
        robustness=robustness,
        s2_cloud_mask=s2_cloud_mask,
    )
    print_outputs(paths, time.perf_counter() - t0)


def build_cube_cmd(
    region: Region = "sample",
    season: SeasonOpt = None,
    sensors: Sensors = "s2,s1,landsat",
    catalog: CatalogOpt = "local",
    stac_url: StacUrl = None,
    max_cloud_cover: CloudOpt = None,
    outputs: Outputs = None,
    s2_cloud_mask: CloudMaskOpt = "auto",
) -> None:
    """Run the build_cube flow: STAC search and the cloud-masked Zarr cube of a region and season."""
    from flows.steps import build_cube
    from tasks.cube import check_s2_cloud_mask

    check_s2_cloud_mask(s2_cloud_mask)
    cube = build_cube(region, season, listed(sensors), catalog, stac_url, max_cloud_cover, outputs, s2_cloud_mask)
    console.print(f"cube {cube.path}: items {cube.items}, clear-sky fraction {cube.clear_fraction:.1%}")


def train_cmd(
    region: Region = "sample",
    season: SeasonOpt = None,
    model: ModelOpt = "fcn3d",
    epochs: Epochs = 40,
    time_budget: Budget = 480.0,
    labels: LabelsOpt = None,
    classes: ClassesOpt = None,
    outputs: Outputs = None,
    pretrain_epochs: PretrainOpt = 0,
    teacher: TeacherOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Run the train flow on the cube of `build-cube` and the region's labels (with STCLN pre-training or a
    teacher to distill, for the models that use them)."""
    from flows.steps import train

    spec = model_spec(model, epochs, time_budget, params, pretrain_epochs, teacher)
    trained = train(region, season, spec, labels, classes, outputs)
    console.print(f"model {trained.checkpoint}: best val mIoU {trained.best_val_miou:.3f} (epoch {trained.best_epoch})")


def predict_cmd(
    region: Region = "sample",
    season: SeasonOpt = None,
    labels: LabelsOpt = None,
    classes: ClassesOpt = None,
    outputs: Outputs = None,
) -> None:
    """Run the predict flow with the model of `train`: map COGs, preview, STAC item, accuracy."""
    from flows.steps import predict

    print_outputs(predict(region, season, labels, classes, outputs), 0.0)


def backfill_cmd(
    seasons: Annotated[str, typer.Option(help="2019..2024 (every year), 2023,2024, or START..END date ranges")],
    region: Region = "sample",
    sensors: Sensors = "s2,s1,landsat",
    catalog: CatalogOpt = "local",
    stac_url: StacUrl = None,
    max_cloud_cover: CloudOpt = None,
    model: ModelOpt = "fcn3d",
    epochs: Epochs = 40,
    time_budget: Budget = 480.0,
    labels: LabelsOpt = None,
    classes: ClassesOpt = None,
    outputs: Outputs = None,
    robustness: RobustnessOpt = False,
    pretrain_epochs: PretrainOpt = 0,
    teacher: TeacherOpt = None,
    params: ParamsOpt = None,
    s2_cloud_mask: CloudMaskOpt = "auto",
    here: Annotated[
        bool, typer.Option(help="run the seasons in this process even when the crop_map/backfill deployment exists")
    ] = False,
    start_timeout: Annotated[
        float, typer.Option(help="seconds the deployment's runs may wait for a worker before the backfill fails")
    ] = START_TIMEOUT_S,
) -> None:
    """Run the backfill flow: one crop_map run per season, cached, so a rerun or a resumed run redoes nothing."""
    from flows.backfill import BACKFILL_DEPLOYMENT, backfill
    from flows.crop_map import check_request

    spec = model_spec(model, epochs, time_budget, params, pretrain_epochs, teacher)
    # as crop-map does: a bad request fails here, before a flow run is created
    check_request(
        region, parse_seasons(seasons), listed(sensors), catalog, labels, classes, outputs, spec, s2_cloud_mask
    )
    results = backfill(
        region=region,
        seasons=seasons,
        sensors=listed(sensors),
        catalog=catalog,
        stac_url=stac_url,
        max_cloud_cover=max_cloud_cover,
        model=spec,
        labels=labels,
        classes=classes,
        outputs=outputs,
        robustness=robustness,
        s2_cloud_mask=s2_cloud_mask,
        deployment=None if here else BACKFILL_DEPLOYMENT,
        start_timeout_s=start_timeout,
    )
    for season, state in results.items():
        console.print(f"{region} {season}: {state}")


def deploy_cmd(
    gpus: Annotated[int | None, typer.Option(help="GPUs of the workers (default: those visible here)")] = None,
    backfill_limit: Annotated[int, typer.Option(help="backfill runs at once")] = 2,
    catalog_rate: Annotated[float, typer.Option(help="catalog searches per second")] = 2.0,
) -> None:
    """Create or update work pools, concurrency limits and deployments (schedules from flows/regions.yaml)."""
    from flows.deploy import CPU_POOL, GPU_POOL, DeployOptions, apply_deployments, gpu_count

    options = DeployOptions(gpu_count() if gpus is None else gpus, backfill_limit, catalog_rate)
    for name in apply_deployments(options):
        console.print(f"deployment {name}")
    pools = [CPU_POOL, GPU_POOL] if options.gpus else [CPU_POOL]
    console.print("start workers: " + "; ".join(f"prefect worker start --pool {p}" for p in pools))


@server_app.command("up")
def server_up(
    postgres: Annotated[bool, typer.Option(help="keep runs in the local PostgreSQL instead of SQLite")] = False,
) -> None:
    """Start the Prefect server and UI (idempotent); `cropflow` commands use it while it runs."""
    from infra import prefect_server

    url = prefect_server.up(get_settings(), postgres=postgres)
    console.print(f"Prefect UI at {url.removesuffix('/api')}; API {url} (other tools: export PREFECT_API_URL={url})")


@server_app.command("down")
def server_down() -> None:
    """Stop what `cropflow server up` started."""
    from infra import prefect_server

    prefect_server.down(get_settings())
    console.print("Prefect server stopped")


@server_app.command("status")
def server_status() -> None:
    """Say whether the Prefect server runs, where, and on which database."""
    from infra import prefect_server

    for key, value in prefect_server.status(get_settings()).items():
        console.print(f"{key}: {value}")


def register(app: typer.Typer) -> None:
    """Add these commands to the `cropflow` app."""
    app.command("crop-map")(crop_map_cmd)
    app.command("build-cube")(build_cube_cmd)
    app.command("train")(train_cmd)
    app.command("predict")(predict_cmd)
    app.command("backfill")(backfill_cmd)
    app.command("deploy")(deploy_cmd)
    app.add_typer(server_app, name="server")
