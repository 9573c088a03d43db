"""`cropflow bench scale`: how the cube step and tiled inference grow with the region's area and the workers.

Sample regions of 1x, 4x and 16x the default area (512, 1024, 2048 px a side at 10 m):

- cube: the Sentinel-2 cube (10 bands + SCL, one season) built as tiles on a fresh Dask LocalCluster of 1 or 2
  single-threaded worker processes (`tasks.cube.prepare_cube` -> `build_blocks` per tile on the workers ->
  `publish_cube`, as `flows/cube.py` runs it). Time is from the first tile submitted to the last one done (cluster
  start and imports excluded); peak memory is each worker's peak resident set.
- inference: tiled inference of the same cube (fcn3d at the CPU widths, random weights, saved as a checkpoint
  that each worker reads) in parts on a fresh LocalCluster of 1 or 2 single-threaded worker processes, one part
  per worker (the whole region, or two vertical strips; `tasks.predict.create_output` -> `predict_part` per part
  on the workers, one torch thread each -> publish, as `flows/predict.py` runs it). Time from the first part
  submitted to the last one done; peak memory per worker; `windows`: windows run by all parts (those straddling
  two parts run in both).

Both report the CPU time (user + system) the workers used while timed and `cores used` = CPU time / wall time:
on a machine shared with other jobs, 2 workers that get less than 2 cores cannot run 2x faster.

Dask's INFO logs are silenced (`distributed` at WARNING, in the workers too).

Targets (issue 8): time linear in area (within 20 %), flat peak memory per worker, 2 workers >= 1.6x faster than 1
on the cube step. The table says, per row, the time per km² relative to the 1x region of the same setting.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.bench_common import CacheOption, bench_cache, max_rss_mb
from flows.params import listed

if TYPE_CHECKING:
    from distributed import Client

SIZES = (512, 1024, 2048)
WORKERS = (1, 2)
console = Console(width=160)


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_usage(client: Client, baseline: dict, cpu: dict) -> dict:
    """Peak RSS per worker, its growth over `baseline`, and the CPU seconds all workers used since `cpu`."""
    peaks, now = client.run(max_rss_mb), client.run(cpu_seconds)
    return {
        "peak_rss_mb": max(peaks.values()),
        "growth_mb": max(peaks[w] - baseline[w] for w in peaks),
        "cpu_seconds": sum(now[w] - cpu[w] for w in now),
    }


@contextmanager
def local_cluster(workers: int, module: str) -> Iterator[Client]:
    """A client of a fresh LocalCluster of `workers` single-threaded processes that have imported `module` (imports
    are not part of the timings), with distributed's loggers at WARNING here and in the workers."""
    from distributed import Client

    from infra.dask_cluster import DaskSettings, cluster_kwargs

    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"  # read by the worker processes as they start
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster_class, kwargs = cluster_kwargs(DaskSettings("local", workers, threads=1))
    with cluster_class(**kwargs) as local, Client(local) as client:
        client.run(importlib.import_module, module)
        yield client


def cube_on_workers(region: Path, workers: int, scratch: Path) -> dict:
    """Build the region's S2 cube as tiles on a fresh LocalCluster of `workers` single-threaded processes (one
    reader thread each); time and memory."""
    from flows.bench import read_region
    from flows.cube import run_tiles
    from tasks.cube import build_cube_tile_task, prepare_cube, publish_cube

    meta, items, start, end = read_region(region)
    with local_cluster(workers, "tasks.cube") as client:
        baseline = client.run(max_rss_mb)
        job = prepare_cube({"s2": items}, meta["epsg"], tuple(meta["bounds"]), start, end, scratch / "cube.zarr")
        cpu, t0 = client.run(cpu_seconds), time.perf_counter()
        run_tiles(client, job, lambda tile: client.submit(build_cube_tile_task.fn, job, tile, pure=False))
        seconds = time.perf_counter() - t0
        usage = worker_usage(client, baseline, cpu)
    publish_cube(job)
    return {"seconds": seconds, "pixel_dates": meta["size"] ** 2 * len(items), **usage}


def infer_on_workers(region: Path, cube: Path, workers: int, scratch: Path) -> dict:
    """Predict the cube in one part per worker on a fresh LocalCluster of `workers` single-threaded processes
    (window 64 px, overlap 25 %, batch 16, CPU), the checkpoint read by each worker; time, windows and memory."""
    import torch

    from flows.bench_infer import bench_model
    from infra.atomic import atomic_path
    from infra.storage import open_zarr
    from tasks.predict import create_output, predict_part, region_parts

    _, ckpt = bench_model(cube, region / "classes.json", "cpu")
    checkpoint = scratch / "model.pt"
    torch.save(ckpt, checkpoint)
    parts = region_parts(cube, ckpt, workers)
    with local_cluster(workers, "tasks.predict") as client:
        baseline = client.run(max_rss_mb)
        with atomic_path(scratch / "probabilities.zarr") as store:
            create_output(cube, ckpt, store, "fcn3d")
            run = partial(predict_part, cube, checkpoint, store, window=64, batch_size=16, device="cpu")
            cpu, t0 = client.run(cpu_seconds), time.perf_counter()
            windows = sum(client.gather(client.map(run, parts, pure=False)))
            seconds = time.perf_counter() - t0
            usage = worker_usage(client, baseline, cpu)
    sizes = open_zarr(cube).sizes
    return {"seconds": seconds, "pixels": sizes["x"] * sizes["y"], "windows": windows, **usage}


def bench_scale(
    sizes: Annotated[str, typer.Option(help="comma-separated region sizes in pixels")] = ",".join(map(str, SIZES)),
    workers: Annotated[str, typer.Option(help="comma-separated worker counts")] = ",".join(map(str, WORKERS)),
    steps: Annotated[str, typer.Option(help="comma-separated: cube, infer")] = "cube,infer",
    cache: CacheOption = None,
) -> None:
    """Cube building and tiled inference on 1 and 2 Dask workers at 1x, 4x, 16x area: time, memory."""
    from flows.bench import ensure_bench_region
    from flows.bench_infer import ensure_bench_cube

    cache = bench_cache(cache)
    size_list = sorted(int(s) for s in listed(sizes))
    worker_list = [int(w) for w in listed(workers)]
    step_list = listed(steps)
    rows: list[dict] = []
    for step in step_list:
        for n in worker_list:
            for size in size_list:
                km2 = size**2 * 1e-4  # 10 m pixels
                if step == "cube":
                    region = ensure_bench_region(size, cache)
                    scratch = Path(tempfile.mkdtemp(prefix="cropflow-bench-scale-", dir=cache))
                    try:
                        r = cube_on_workers(region, n, scratch)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                    rate = f"{r['pixel_dates'] / r['seconds'] / 1e6:.2f} Mpx-dates/s"
                else:
                    region, cube = ensure_bench_cube(size, cache)
                    scratch = Path(tempfile.mkdtemp(prefix="cropflow-bench-scale-", dir=cache))
                    try:
                        r = infer_on_workers(region, cube, n, scratch)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                    rate = f"{r['pixels'] / r['seconds'] / 1e3:.1f} kpx/s"
                rows.append({"step": step, "workers": n, "size": size, "km2": km2, "rate": rate, **r})
                console.print(f"{step} {size} px, {n} worker(s): {r['seconds']:.1f} s", highlight=False)
    console.print(table(rows))
    console.print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def table(rows: list[dict]) -> Table:
    """The scaling table: per step and worker count, time per km² relative to the smallest region's."""
    out = Table(title="scaling with area and workers (Dask LocalCluster, worker processes of 1 thread)")
    for col in ("step", "workers", "size px", "km²", "seconds", "s/km²", "vs 1x area", "speed-up", "throughput"):
        out.add_column(col, justify="right")
    for col in ("CPU s", "cores used", "peak RSS MB / worker", "growth MB", "windows"):
        out.add_column(col, justify="right")
    for r in rows:
        same = [o for o in rows if o["step"] == r["step"] and o["workers"] == r["workers"]]
        first = min(same, key=lambda o: o["size"])
        one = [o for o in rows if o["step"] == r["step"] and o["size"] == r["size"] and o["workers"] == 1]
        per_km2 = r["seconds"] / r["km2"]
        out.add_row(
            r["step"],
            str(r["workers"]),
            str(r["size"]),
            f"{r['km2']:.1f}",
            f"{r['seconds']:.1f}",
            f"{per_km2:.2f}",
            f"{per_km2 / (first['seconds'] / first['km2']):.2f}x",
            f"{one[0]['seconds'] / r['seconds']:.2f}x" if one else "",
            r["rate"],
            f"{r['cpu_seconds']:.1f}",
            f"{r['cpu_seconds'] / r['seconds']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['growth_mb']:.0f}",
            str(r.get("windows", "")),
        )
    return out
