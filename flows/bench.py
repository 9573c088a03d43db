"""`cropflow bench cube`: cube-building throughput and peak memory of cropflow against common alternatives.

Each variant runs in a fresh Python process (so its peak resident memory is its own) on the same Sentinel-2 items
(10 bands + SCL, one season) of a generated sample region, with the same number of threads:

- `cropflow`: `tasks.cube.build_cube` (block by block, numpy, resumable Zarr writes);
- `stackstac`: stackstac.stack -> SCL mask -> scale/offset -> 10-day median (xarray resample) -> `to_zarr`;
- `odc-stac`: odc.stac.load -> the same masking and binning -> `to_zarr`;
- `rasterio`: decoding every asset of every item once, in threads, and nothing else (the practical limit).

Throughput is in pixel-dates per second: cube pixels times acquisitions, divided by the wall time of the variant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.bench_accuracy import bench_accuracy
from flows.bench_common import CacheOption, ChildFailed, bench_cache, max_rss_mb, run_child
from flows.bench_infer import bench_infer
from flows.bench_scale import bench_scale
from flows.bench_train import bench_train
from flows.params import listed
from flows.reliability import bench_reliability
from infra.errors import CropflowError

app = typer.Typer(help="Benchmarks: programs that print tables (not timed tests).", no_args_is_help=True)
app.command("accuracy")(bench_accuracy)
app.command("infer")(bench_infer)
app.command("train")(bench_train)
app.command("scale")(bench_scale)
app.command("reliability")(bench_reliability)
console = Console()

VARIANTS = ("cropflow", "stackstac", "odc-stac", "rasterio")
COLLECTION = "sentinel-2-l2a"
SIZES = (512, 1024, 2048)


def read_region(region_dir: Path) -> tuple[dict, list[dict], date, date]:
    """A sample region's `region.json`, its Sentinel-2 items and its season's first and last day."""
    from infra.stac_api import read_items

    meta = json.loads((region_dir / "region.json").read_text())
    items = read_items(region_dir / "items" / f"{COLLECTION}.ndjson")
    start, end = (date.fromisoformat(d) for d in meta["season"])
    return meta, items, start, end


def _masked_binned(values, scl, items: list[dict], start: date, out: Path) -> None:
    """Shared tail of the xarray variants: SCL mask, scale/offset, 10-day median from `start`, to Zarr."""
    import numpy as np
    import pandas as pd
    import xarray as xr

    from tasks.sensors import S2_BANDS, scale_offset, scl_valid

    scale, offset = scale_offset(items, list(S2_BANDS), "s2")
    valid = scl_valid(scl) & (values > 0).all("band")
    reflectance = values.astype("float32") * xr.DataArray(scale.astype("float32"), dims=("time", "band")) + (
        xr.DataArray(offset.astype("float32"), dims=("time", "band"))
    )
    reflectance = reflectance.where(valid).chunk(time=-1)
    binned = reflectance.resample(time="10D", origin=pd.Timestamp(start)).median()
    fraction = valid.astype("float32").resample(time="10D", origin=pd.Timestamp(start)).mean()
    ds = xr.Dataset({"s2": binned.astype("float32"), "s2_valid": fraction.astype("float32")})
    ds = ds.drop_vars([c for c in ds.coords if c not in ("time", "band", "x", "y")])
    ds = ds.assign_coords(band=np.array(S2_BANDS, dtype=object))
    for var in ds.variables.values():
        var.attrs, var.encoding = {}, {}
    ds.attrs = {}
    ds.to_zarr(out, zarr_format=3, mode="w", consolidated=False)


def run_variant(variant: str, region_dir: Path, out: Path, threads: int) -> dict:
    """Run one variant in this process; its wall time, pixel-dates and peak memory."""
    import dask
    import numpy as np

    from tasks.sensors import S2_BANDS

    meta, items, start, end = read_region(region_dir)
    xmin, ymin, xmax, ymax = meta["bounds"]
    res = float(meta["resolution"])
    n_pixels = round((xmax - xmin) / res) * round((ymax - ymin) / res)
    if variant == "stackstac":
        import stackstac  # imported before the clock starts
    elif variant == "odc-stac":
        import odc.stac
        import pystac
    elif variant == "cropflow":
        from tasks.cube import build_cube
    baseline = max_rss_mb()
    t0 = time.perf_counter()
    dask.config.set(scheduler="threads", num_workers=threads)
    if variant == "cropflow":
        build_cube({"s2": items}, meta["epsg"], tuple(meta["bounds"]), start, end, out, threads=threads)
    elif variant == "stackstac":
        from rasterio.enums import Resampling

        common = {"epsg": meta["epsg"], "bounds": tuple(meta["bounds"]), "resolution": res, "chunksize": 512}
        common |= {"xy_coords": "center", "snap_bounds": False, "rescale": False, "properties": False}
        values = stackstac.stack(
            items,
            assets=list(S2_BANDS),
            resampling=Resampling.bilinear,
            dtype="uint16",
            fill_value=np.uint16(0),
            **common,
        )
        scl = stackstac.stack(
            items, assets=["SCL"], resampling=Resampling.nearest, dtype="uint8", fill_value=np.uint8(0), **common
        ).isel(band=0, drop=True)
        _masked_binned(values, scl, items, start, out)
    elif variant == "odc-stac":
        stac_items = [pystac.Item.from_dict(it) for it in items]
        ds = odc.stac.load(
            stac_items,
            bands=[*S2_BANDS, "SCL"],
            crs=f"EPSG:{meta['epsg']}",
            resolution=res,
            x=(xmin, xmax),
            y=(ymin, ymax),
            resampling={"SCL": "nearest", "*": "bilinear"},
            chunks={"x": 512, "y": 512, "time": 1},
            pool=threads,
        )
        values = ds[list(S2_BANDS)].to_dataarray("band")
        _masked_binned(values, ds["SCL"], items, start, out)
    elif variant == "rasterio":
        import rasterio

        hrefs = [it["assets"][k]["href"] for it in items for k in (*S2_BANDS, "SCL")]

        def decode(href: str) -> int:
            with rasterio.open(href) as src:
                return int(np.asarray(src.read(1)).size)

        with ThreadPoolExecutor(threads) as pool:
            sum(pool.map(decode, hrefs))
    else:
        raise CropflowError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}.")
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "seconds": seconds,
        "pixel_dates": n_pixels * len(items),
        "peak_rss_mb": max_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def ensure_bench_region(size: int, cache: Path) -> Path:
    """The sample region of `size` px used by the benchmark, generated into `cache` if missing."""
    from tasks.sample_region import generate_region

    folder = cache / f"sample-{size}"
    if not (folder / "region.json").exists():
        console.print(f"generating the {size} px sample region in {folder} (once)")
        generate_region(folder, size=size, seed=0, name=f"bench-{size}")
    return folder


@app.command("cube")
def bench_cube(
    sizes: Annotated[str, typer.Option(help="comma-separated region sizes in pixels")] = ",".join(map(str, SIZES)),
    variants: Annotated[str, typer.Option(help="comma-separated variants")] = ",".join(VARIANTS),
    threads: Annotated[int, typer.Option(help="reader threads of every variant")] = os.cpu_count() or 2,
    cache: CacheOption = None,
) -> None:
    """Build a Sentinel-2 cube of the sample region with each variant and print throughput and peak memory."""
    import shutil
    import tempfile

    size_list = [int(s) for s in listed(sizes)]
    variant_list = listed(variants)
    unknown = [v for v in variant_list if v not in VARIANTS]
    if unknown:
        raise CropflowError(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}.")
    cache = bench_cache(cache)
    table = Table(title=f"cube build, Sentinel-2 10 bands + SCL, one season, {threads} threads")
    for col in ("size", "variant", "items", "seconds", "Mpx-dates/s", "peak RSS MB", "RSS growth MB", "vs cropflow"):
        table.add_column(col, justify="right")
    for size in size_list:
        region = ensure_bench_region(size, cache)
        results = {}
        for variant in variant_list:
            scratch = Path(tempfile.mkdtemp(prefix="cropflow-bench-", dir=cache))
            args = [variant, str(region), str(scratch / "cube.zarr"), str(threads)]
            try:
                results[variant] = run_child("flows.bench", args)
            except ChildFailed as exc:
                results[variant] = {"variant": variant, "error": str(exc)}
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        ours = results.get("cropflow", {})
        for variant, r in results.items():
            if "error" in r:
                table.add_row(str(size), variant, "", "", "", "", "", "failed")
                console.print(f"{size} px {variant} failed: {r['error']}", highlight=False)
                continue
            rate = r["pixel_dates"] / r["seconds"]
            ratio = f"{(ours['pixel_dates'] / ours['seconds']) / rate:.2f}x" if "seconds" in ours else ""
            table.add_row(
                str(size),
                variant,
                str(r["pixel_dates"] // (size * size)),
                f"{r['seconds']:.2f}",
                f"{rate / 1e6:.2f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}",
                ratio,
            )
    console.print(table)


@app.command("models")
def bench_models_cmd(
    models: Annotated[str | None, typer.Option(help="comma-separated names (default: gradient-trained ones)")] = None,
    batch: Annotated[int, typer.Option(help="samples per step")] = 4,
    dates: Annotated[int, typer.Option(help="T, dates per sample")] = 24,
    bands: Annotated[int, typer.Option(help="C, bands per date")] = 10,
    size: Annotated[int, typer.Option(help="height and width in pixels")] = 64,
    steps: Annotated[int, typer.Option(help="timed steps (after 2 warm-up steps)")] = 5,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cpu, and cuda when available)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's)")] = None,
) -> None:
    """Parameters, forward+backward time per sample and peak memory of every model (see flows/bench_models.py)."""
    from flows.bench_models import BenchSize, bench_models, table

    bench_size = BenchSize(batch=batch, t=dates, c=bands, size=size)
    names = listed(models) if models else None
    rows = bench_models(names, bench_size, [device] if device else None, steps=steps, threads=threads)
    console.print(table(rows, bench_size))


if __name__ == "__main__":
    name, region_arg, out_arg, threads_arg = sys.argv[1:5]
    print(json.dumps(run_variant(name, Path(region_arg), Path(out_arg), int(threads_arg))))
