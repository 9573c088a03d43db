"""The `cropflow` command: run flows, manage the local STAC API, generate sample regions."""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from flows import commands
from flows.bench import app as bench_app
from flows.commands import print_outputs
from infra.errors import CropflowError
from infra.settings import get_settings

app = typer.Typer(help="Regional crop maps from satellite image time series.", no_args_is_help=True)
stac_app = typer.Typer(help="The local STAC API (PostgreSQL + pgstac + stac-fastapi) on 127.0.0.1.")
app.add_typer(stac_app, name="stac")
app.add_typer(bench_app, name="bench")
commands.register(app)
console = Console()
# a full disk, a quota, a file size limit, a read-only or forbidden output location
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


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


@app.command()
def demo(
    region: Annotated[str, typer.Option(help="sample region to map")] = "sample",
    time_budget: Annotated[float, typer.Option(help="training time budget in seconds")] = 480.0,
) -> None:
    """Everything on the embedded sample region: STAC API up, region generated and loaded, crop_map run."""
    from flows.crop_map import crop_map
    from flows.demo import ensure_sample
    from flows.params import ModelSpec
    from infra import stac_api

    t0 = time.perf_counter()
    stac_api.up(get_settings())
    ensure_sample(region)
    outputs = crop_map(region=region, model=ModelSpec(time_budget_s=time_budget))
    print_outputs(outputs, time.perf_counter() - t0)


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, without a traceback."""
    try:
        app(standalone_mode=False)
    except CropflowError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # "[west, ...]" is not markup
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        console.print(
            f"[bold red]error:[/] cannot write {escape(str(exc.filename or 'an output'))}: {exc.strerror}. Free "
            "space or choose another --outputs; outputs published before are left as they were.",
            highlight=False,
        )
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
