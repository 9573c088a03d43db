"""`cropflow bench infer`: tiled inference throughput, its overhead over the bare model forward, and peak memory.

For each region size, in a fresh Python process (so that its peak resident memory is its own):
`tasks.predict.predict_region` over a Sentinel-2 cube of the sample region (generated and built once into the
cache), with the demo's default model (`fcn3d` at the device's default widths, random weights: speed does not
depend on them), then the bare forward on random windows of the same shape, batch and precision.

- overlap factor = windows run / windows of a non-overlapping tiling (the overlap's own cost);
- overhead = tiled time / (bare time per window x windows run) - 1: what reading, gap filling, blending and
  writing add beyond the windows' own forward (target: at most 15%). It is given in wall time and in CPU time
  of the process (all threads): on a machine shared with other jobs, wall times of the two measurements see
  different loads, CPU times much less so.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.bench_common import CacheOption, ChildFailed, bench_cache, max_rss_mb, run_child
from flows.params import listed
from infra.errors import CropflowError

if TYPE_CHECKING:
    from torch import nn

SIZES = (512, 1024, 2048)
COLUMNS = (
    "size",
    "seconds",
    "px/s",
    "km²/h",
    "windows",
    "overlap factor",
    "bare ms/window",
    "overhead (wall)",
    "overhead (CPU)",
    "peak RSS MB",
    "RSS growth MB",
)
console = Console(width=160)


def ensure_bench_cube(size: int, cache: Path) -> tuple[Path, Path]:
    """The sample region of `size` px and its Sentinel-2 cube in `cache`, generated and built once."""
    from flows.bench import ensure_bench_region, read_region
    from tasks.cube import build_cube

    region = ensure_bench_region(size, cache)
    cube = cache / f"cube-s2-{size}.zarr"
    if not cube.exists():
        console.print(f"building the Sentinel-2 cube of the {size} px region in {cube} (once)")
        meta, items, start, end = read_region(region)
        build_cube({"s2": items}, meta["epsg"], tuple(meta["bounds"]), start, end, cube)
    return region, cube


def bench_model(cube: Path, classes_path: Path, device_type: str) -> tuple[nn.Module, dict]:
    """The demo's `fcn3d` at the device type's default widths with random weights (seed 0), and its checkpoint dict
    (format, config, weights, the cube's bands, the classes, normalisation of the cube's first 256 px)."""
    import torch

    from infra.storage import open_zarr
    from models.registry import build_model
    from tasks.labels import read_classes
    from tasks.preprocess import band_statistics
    from tasks.train import DEFAULT_MODEL_CONFIG, model_meta

    ds = open_zarr(cube, chunks=None)
    bands, classes = [str(b) for b in ds["band"].values], read_classes(classes_path)
    config = DEFAULT_MODEL_CONFIG[device_type]["fcn3d"] | {"in_channels": len(bands), "num_classes": len(classes)}
    torch.manual_seed(0)
    model = build_model("fcn3d", **config).eval()
    mean, std = band_statistics(ds["s2"][..., :256, :256].values)
    ckpt = model_meta("fcn3d", config, classes) | {"sensor": "s2", "bands": bands, "state_dict": model.state_dict()}
    return model, ckpt | {"norm": {"mean": mean.tolist(), "std": std.tolist()}}


def run_size(cube: Path, classes_path: Path, window: int, batch: int, device: str, bare_batches: int) -> dict:
    """Tiled inference over `cube` then the bare forward, in this process; timings, window counts, peak memory."""
    import torch

    from infra.storage import open_zarr
    from models.registry import example_inputs
    from tasks.predict import predict_region, window_starts
    from tasks.train import autocast, resolve_device

    dev = resolve_device(device)
    ds = open_zarr(cube, chunks=None)
    h, w, t = ds.sizes["y"], ds.sizes["x"], ds.sizes["time"]
    model, ckpt = bench_model(cube, classes_path, dev.type)
    model, config, bands = model.to(dev), ckpt["model_config"], ckpt["bands"]
    inputs = example_inputs(model, (batch, t, len(bands), window, window), dev)

    def bare(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode(), autocast(dev):
            for _ in range(n):
                model(**inputs).float().cpu()
        return time.perf_counter() - t0, time.process_time() - c0

    bare(1)  # warm-up (kernel selection, allocator)
    baseline = max_rss_mb()
    with tempfile.TemporaryDirectory(prefix="cropflow-bench-infer-", dir=Path(cube).parent) as scratch:
        t0, c0 = time.perf_counter(), time.process_time()
        predict_region(cube, model, ckpt, Path(scratch) / "p.zarr", window, 0.25, batch, str(dev), progress=False)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = max_rss_mb()
    bare_wall, bare_cpu = bare(bare_batches)
    ov = round(window * 0.25)
    windows = window_starts(h, window, ov).size * window_starts(w, window, ov).size
    return {
        "size": h,
        "pixels": h * w,
        "resolution": float(ds.attrs.get("resolution", 10.0)),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "windows": int(windows),
        "minimal_windows": math.ceil(h / window) * math.ceil(w / window),
        "bare_s_per_window": bare_wall / (bare_batches * batch),
        "bare_cpu_s_per_window": bare_cpu / (bare_batches * batch),
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "config": config,
        "dates": t,
    }


def run_in_child(
    cube: Path, classes: Path, window: int, batch: int, device: str, bare_batches: int, threads: int | None = None
) -> dict:
    """`run_size` in a fresh interpreter (its peak memory is its own), with `threads` torch threads if given."""
    args = [str(cube), str(classes), str(window), str(batch), device, str(bare_batches)]
    try:
        return run_child("flows.bench_infer", args, {"OMP_NUM_THREADS": str(threads)} if threads else None)
    except ChildFailed as exc:
        raise CropflowError(f"the inference benchmark of {cube} failed: {exc}") from None


def row(r: dict) -> list[str]:
    """One table row of a `run_size` result."""
    rate = r["pixels"] / r["seconds"]
    overhead = r["seconds"] / (r["bare_s_per_window"] * r["windows"]) - 1
    cpu_overhead = r["cpu_seconds"] / (r["bare_cpu_s_per_window"] * r["windows"]) - 1
    return [
        str(r["size"]),
        f"{r['seconds']:.1f}",
        f"{rate:,.0f}",
        f"{rate * 3600 * (r['resolution'] / 1000) ** 2:,.1f}",
        str(r["windows"]),
        f"{r['windows'] / r['minimal_windows']:.2f}",
        f"{1000 * r['bare_s_per_window']:.1f}",
        f"{100 * overhead:+.1f}%",
        f"{100 * cpu_overhead:+.1f}%",
        f"{r['peak_rss_mb']:.0f}",
        f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}",
    ]


def bench_infer(
    sizes: Annotated[str, typer.Option(help="comma-separated region sizes in pixels")] = ",".join(map(str, SIZES)),
    window: Annotated[int, typer.Option(help="window side in pixels (overlap 25%)")] = 64,
    batch: Annotated[int, typer.Option(help="windows per forward")] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA, else CPU), cpu or cuda")] = "auto",
    bare_batches: Annotated[int, typer.Option(help="batches timed for the bare forward")] = 8,
    cache: CacheOption = None,
) -> None:
    """Tiled inference over the sample region: pixels/s, km²/h, overhead over the bare forward, peak memory."""
    cache = bench_cache(cache)
    results = []
    for size in [int(s) for s in listed(sizes)]:
        region, cube = ensure_bench_cube(size, cache)
        results.append(run_in_child(cube, region / "classes.json", window, batch, device, bare_batches))
    first = results[0]
    table = Table(
        title=f"tiled inference, fcn3d {first['config'].get('widths')} (random weights), {first['dates']} dates, "
        f"window {window} px, overlap 25%, batch {batch}, {first['device']}, {first['threads']} threads"
    )
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(*row(r))
    console.print(table)
    console.print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    cube_arg, classes_arg, window_arg, batch_arg, device_arg, bare_arg = sys.argv[1:7]
    result = run_size(Path(cube_arg), Path(classes_arg), int(window_arg), int(batch_arg), device_arg, int(bare_arg))
    print(json.dumps(result))
