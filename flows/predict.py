"""Tiled inference on a Dask cluster: `predict-region` splits the region into parts (a grid of tiles of whole output
chunks, `tasks.predict.region_parts`), one per Dask thread, and runs each as a `predict-part` task on the cluster's
workers (prefect-dask's `DaskTaskRunner`), all writing into one output store made beforehand and published once
every part is done.

A worker reads the checkpoint from its path (`torch.load(weights_only=True)` through `tasks.train.load_for_cube`) and
runs its part with one torch thread (Dask starts worker processes with OMP_NUM_THREADS=1), so a worker runs as many
parts at once as it has Dask threads (`CROPFLOW_DASK_THREADS`) without oversubscribing its cores. The output store must
be reachable from every worker (a local folder for a LocalCluster, an object-store URL for a remote cluster). Windows
straddling two parts run in both, so the map is the one `tasks.predict.predict_region` writes in one process.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed, wait

from infra.atomic import atomic_path
from infra.dask_cluster import DaskSettings, task_runner
from infra.storage import location
from tasks.predict import create_output, load_model, predict_part_task, region_parts


def predict_parts(
    cube_path: Path,
    checkpoint: Path,
    out_path: Path,
    classes_path: Path | None = None,
    *,
    dask: DaskSettings | None = None,
    **options: object,
) -> Path:
    """Predict the cube at `cube_path` with the checkpoint in parts on the Dask cluster of `dask` (default:
    `CROPFLOW_DASK`, see `infra/dask_cluster.py`) into the probabilities store at `out_path`, published atomically.
    Call it inside a flow or task run; a progress artifact follows the parts as they finish.

    `options` (`window`, `overlap`, `batch_size`, `device`) as `tasks.predict.predict_part`; the checkpoint is
    checked against the cube (bands, classes) before the cluster starts. When a part fails, the parts still running
    (a Dask task cannot be interrupted) are waited for, so none writes into the store after it is discarded.
    """
    logger = get_run_logger()
    dask = dask or DaskSettings.from_env()
    _, ckpt = load_model(cube_path, checkpoint, classes_path)
    name = location(cube_path).name
    with atomic_path(location(out_path)) as store:
        create_output(cube_path, ckpt, store, str(ckpt["model_name"]))
        with task_runner(dask) as runner:  # closed before a failed store is discarded
            parts = region_parts(cube_path, ckpt, sum(runner.client.nthreads().values()))
            logger.info("predict %s: %d parts (y0, y1, x0, x1) %s on the Dask cluster", name, len(parts), parts)
            common = {"cube_path": cube_path, "checkpoint": checkpoint, "store": store, "classes_path": classes_path}
            futures = [runner.submit(predict_part_task, common | options | {"part": part}) for part in parts]
            progress = create_progress_artifact(0.0, description=f"predict {name}: parts done")
            windows = 0
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    windows += future.result()
                    update_progress_artifact(progress, 100.0 * done / len(parts))
            except BaseException:
                wait(futures)  # a running part cannot be stopped: the others end before the store is discarded
                raise
    logger.info("predict %s: %d windows run in %d parts, published at %s", name, windows, len(parts), out_path)
    return location(out_path)


predict_parts_task = task(name="predict-region")(predict_parts)
