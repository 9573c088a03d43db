"""The `cropflow` command: run flows, manage the local STAC API, generate sample regions."""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.bench import app as bench_app
from infra.errors import CropflowError
from infra.settings import get_settings

app = typer.Typer(help="Regional crop maps from satellite image time series.", no_args_is_help=True)
stac_app = typer.Typer(help="The local STAC API (PostgreSQL + pgstac + stac-fastapi) on 127.0.0.1.")
app.add_typer(stac_app, name="stac")
app.add_typer(bench_app, name="bench")
console = Console()


def _parse_date(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CropflowError(f"{option} {value!r} is not a date; use YYYY-MM-DD, e.g. 2024-03-01.") from None


@stac_app.command("up")
def stac_up() -> None:
    """Start PostgreSQL and the STAC API (idempotent); wait until they answer."""
    from infra import stac_api

    settings = get_settings()
    stac_api.up(settings)
    console.print(f"STAC API ready at {settings.stac_url}")


@stac_app.command("down")
def stac_down() -> None:
    """Stop what `cropflow stac up` started."""
    from infra import stac_api

    stac_api.down(get_settings())
    console.print("STAC API stopped")


@stac_app.command("status")
def stac_status() -> None:
    """Say whether PostgreSQL and the STAC API run, and which collections they serve."""
    from infra import stac_api

    for key, value in stac_api.status(get_settings()).items():
        console.print(f"{key}: {value}")


@stac_app.command("load")
def stac_load(region_dir: Annotated[Path, typer.Argument(help="a region folder with collections/ and items/")]) -> None:
    """Load a region's collections and items into the local STAC API (upsert)."""
    from infra import stac_api

    if not (region_dir / "items").is_dir():
        raise CropflowError(f"{region_dir} has no items/ folder; give a folder written by 'cropflow sample'.")
    counts = stac_api.load(get_settings(), region_dir)
    for collection, n in counts.items():
        console.print(f"{collection}: {n} items")


@app.command()
def sample(
    name: Annotated[str, typer.Argument(help="sample region name from the region catalog")] = "sample",
    size: Annotated[int | None, typer.Option(help="side in pixels (10 m); default from the catalog")] = None,
    force: Annotated[bool, typer.Option(help="regenerate even if present")] = False,
) -> None:
    """Generate a sample region (simulated pixels, real formats) and load it into the local STAC API."""
    from flows.demo import ensure_sample

    folder = ensure_sample(name, size=size, force=force)
    console.print(f"sample region {name!r} in {folder}")


@app.command("import-worldcereal")
def import_worldcereal(
    src: Annotated[Path, typer.Argument(help="folder of WorldCereal patch folders (netCDF files)")],
    out: Annotated[Path, typer.Argument(help="output folder: one region-like folder per patch")],
) -> None:
    """Convert real WorldCereal patches into COGs and STAC items; load each with 'cropflow stac load OUT/<patch>'."""
    from tasks.worldcereal import import_patches

    for patch in import_patches(src, out):
        counts = ", ".join(f"{n} {c}" for c, n in patch.counts.items())
        console.print(f"{patch.location_id}: {counts} in {patch.folder}")


@app.command("crop-map")
def crop_map_cmd(
    region: Annotated[str, typer.Option(help="region name from flows/regions.yaml")] = "sample",
    start: Annotated[str | None, typer.Option(help="season start YYYY-MM-DD (default: region's)")] = None,
    end: Annotated[str | None, typer.Option(help="season end YYYY-MM-DD (default: region's)")] = None,
    sensors: Annotated[str, typer.Option(help="comma-separated: s2,s1,landsat")] = "s2,s1,landsat",
    catalog: Annotated[
        str, typer.Option(help="STAC catalog: local, planetary-computer, earth-search, one from CROPFLOW_CATALOGS")
    ] = "local",
    stac_url: Annotated[str | None, typer.Option(help="STAC API URL of the catalog (default: the catalog's)")] = None,
    max_cloud_cover: Annotated[float | None, typer.Option(help="keep items with eo:cloud_cover <= this")] = None,
    model: Annotated[str, typer.Option(help="model name")] = "fcn3d",
    epochs: Annotated[int, typer.Option(help="maximum training epochs")] = 40,
    time_budget: Annotated[float, typer.Option(help="training time budget in seconds")] = 480.0,
    out_dir: Annotated[Path | None, typer.Option(help="output folder")] = None,
    robustness: Annotated[bool, typer.Option(help="also report test metrics against 0-80 % missing dates")] = False,
) -> None:
    """Run the crop_map flow: search, cube, train, predict, export, evaluate."""
    from flows.crop_map import check_request, crop_map

    sensor_list = [s.strip() for s in sensors.split(",") if s.strip()]
    start_d, end_d = _parse_date(start, "--start"), _parse_date(end, "--end")
    check_request(region, start_d, end_d, sensor_list, catalog)
    t0 = time.perf_counter()
    outputs = crop_map(
        region=region,
        start=start_d,
        end=end_d,
        sensors=sensor_list,
        catalog=catalog,
        stac_url=stac_url,
        max_cloud_cover=max_cloud_cover,
        model=model,
        epochs=epochs,
        time_budget_s=time_budget,
        out_dir=out_dir,
        robustness=robustness,
    )
    _print_outputs(outputs, time.perf_counter() - t0)


@app.command()
def demo(
    region: Annotated[str, typer.Option(help="sample region to map")] = "sample",
    time_budget: Annotated[float, typer.Option(help="training time budget in seconds")] = 480.0,
) -> None:
    """Everything on the embedded sample region: STAC API up, region generated and loaded, crop_map run."""
    from flows.crop_map import crop_map
    from flows.demo import ensure_sample
    from infra import stac_api

    t0 = time.perf_counter()
    stac_api.up(get_settings())
    ensure_sample(region)
    outputs = crop_map(region=region, time_budget_s=time_budget)
    _print_outputs(outputs, time.perf_counter() - t0)


def _print_outputs(outputs: dict[str, str], seconds: float) -> None:
    import json

    table = Table(title=f"crop_map outputs ({seconds / 60:.1f} min)")
    table.add_column("output")
    table.add_column("path", overflow="fold")
    for key, path in outputs.items():
        table.add_row(key, path)
    console.print(table)
    metrics = json.loads(Path(outputs["metrics"]).read_text())
    console.print(
        "test parcels: overall accuracy {overall_accuracy:.3f}, kappa {kappa:.3f}, macro-F1 {macro_f1:.3f}, "
        "mIoU {miou:.3f}".format(**metrics)
    )


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, without a traceback."""
    try:
        app(standalone_mode=False)
    except CropflowError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors (unknown option, bad value) carry their own exit code
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
