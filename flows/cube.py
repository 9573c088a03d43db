"""The cube step on a Dask cluster: `build-cube` runs `prepare-cube`, then one `build-cube-tile` task per run of
neighbouring blocks on the cluster's workers (prefect-dask's `DaskTaskRunner`), then `publish-cube`.

Every worker writes its blocks straight into the unfinished store, so the store must be reachable from all of them
(a local folder for a LocalCluster, an object-store URL for a remote cluster). The blocks are the same whoever
builds them, so the cube is the same, bit for bit, as one built in a single process (`tasks.cube.build_cube`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from dask import annotate
from distributed import Client
from prefect import get_run_logger, task

from infra.dask_cluster import DaskSettings, task_runner
from tasks.cube import (
    Block,
    CubeJob,
    build_cube_tile_task,
    close_datasets,
    prepare_cube_task,
    publish_cube_task,
)
from tasks.grid import Bounds

TILES_PER_WORKER = 4  # a few tiles per worker thread keep the workers busy to the end of the build


def tiles_by_worker(job: CubeJob, nthreads: Mapping[str, int]) -> list[tuple[str, list[Block]]]:
    """The blocks still to build in `TILES_PER_WORKER` tiles per worker thread, each with the worker it should run
    on: a run of consecutive tiles (neighbouring blocks) per worker, in proportion to its threads. The source tiles
    that a block's resampling margin shares with its neighbours are then decoded by one worker (in its GDAL cache),
    not by each: handed out in turn, tiles cost 2 workers 19 % more CPU time than 1 at 1024 px."""
    tiles = job.tiles(sum(nthreads.values()) * TILES_PER_WORKER)
    owners = [address for address, n in sorted(nthreads.items()) for _ in range(n * TILES_PER_WORKER)]
    return [(owners[i * len(owners) // len(tiles)], tile) for i, tile in enumerate(tiles)]


def run_tiles(client: Client, job: CubeJob, submit: Callable[[list[Block]], Any]) -> int:
    """Submit every tile of `job` with `submit(tile)` (a future whose result is the tile's block count) on the Dask
    cluster of `client`, each preferring its worker of `tiles_by_worker` (idle workers still take over), and wait
    for them; then close the datasets each worker kept open from tile to tile. The blocks built."""
    futures = []
    for address, tile in tiles_by_worker(job, client.nthreads()):
        with annotate(workers=[address], allow_other_workers=True):
            futures.append(submit(tile))
    try:
        return sum(future.result() for future in futures)
    finally:
        client.run(close_datasets)


def build_cube_tiles(
    items_by_sensor: dict[str, list[dict]],
    epsg: int,
    bounds: Bounds,
    start: date,
    end: date,
    out_path: Path,
    *,
    dask: DaskSettings | None = None,
    **options: object,
) -> Path:
    """Build a cube with its tiles on the Dask cluster of `dask` (default: `CROPFLOW_DASK`, a LocalCluster unless
    set; see `infra/dask_cluster.py`) and publish it. Call it inside a flow: `prepare-cube` and `publish-cube` run in
    the flow (or task: `build_cube_task`), each `build-cube-tile` on a worker, all of them task runs of that run.

    `options` as `tasks.cube.prepare_cube`. A rerun after an interruption builds only the blocks still missing.
    """
    logger = get_run_logger()
    dask = dask or DaskSettings.from_env()  # a bad CROPFLOW_DASK fails before the unfinished store is made
    job = prepare_cube_task(items_by_sensor, epsg, bounds, start, end, out_path, **options)
    if job.todo:
        with task_runner(dask) as runner:
            threads = sum(runner.client.nthreads().values())  # each tile task reads with one thread
            logger.info("cube %s: %d blocks on %d Dask threads", job.out_path.name, len(job.todo), threads)
            built = run_tiles(
                runner.client, job, lambda tile: runner.submit(build_cube_tile_task, {"job": job, "tile": tile})
            )
        logger.info("cube %s: %d blocks built", job.out_path.name, built)
    return publish_cube_task(job)


build_cube_task = task(name="build-cube")(build_cube_tiles)
