"""The `backfill` flow: one `crop_map` run per season of a region.

With a Prefect server where the deployment `crop_map/backfill` exists (`cropflow deploy`), the seasons are
submitted to it with `run_deployment` and run on the workers, as many at once as its concurrency limit allows;
otherwise they run here, one after the other, as subflows. Without a worker on the deployment's work pool nothing is
submitted, and runs that none of the workers starts in `start_timeout_s` are cancelled: the flow fails saying how
to start a worker or run here. Either way the tasks are cached (`flows.policy`), so a
backfill run twice recomputes nothing the second time and a backfill killed midway resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.deployments import run_deployment
from prefect.states import Cancelled

from flows.crop_map import check_request, crop_map
from flows.params import DEFAULT_SENSORS, START_TIMEOUT_S, ModelSpec, parse_seasons
from flows.policy import on_server
from infra.errors import CropflowError

BACKFILL_DEPLOYMENT = "crop_map/backfill"
POLL_S = 5.0


def _start_hint(pool: str) -> str:
    return (
        f"start a worker (prefect worker start --pool {pool}) or run the seasons in this process "
        "(cropflow backfill --here; deployment=None in Python)"
    )


def _served_pool(client: SyncPrefectClient, deployment: str) -> str:
    """The work pool of `deployment`, when a worker serves it (online, pool not paused); else a `CropflowError`."""
    pool = client.read_deployment_by_name(deployment).work_pool_name
    if pool is None or client.read_work_pool(pool).status != WorkPoolStatus.READY:
        raise CropflowError(f"no worker serves work pool {pool} of deployment {deployment}: {_start_hint(pool)}.")
    return pool


def _wait(client: SyncPrefectClient, runs: dict[UUID, str], pool: str, start_timeout_s: float) -> list[str]:
    """The final state names of the flow runs `runs` (id: season), once all are final.

    While none of them runs and none finishes for `start_timeout_s`, some waiting to start (Scheduled, Pending), no
    worker is taking them: the waiting runs are cancelled and a `CropflowError` says so."""
    progress, finished = time.monotonic(), 0
    while True:
        states = {i: client.read_flow_run(i).state for i in runs}
        if all(s is not None and s.is_final() for s in states.values()):
            return [s.name for s in states.values()]
        done = sum(s is not None and s.is_final() for s in states.values())
        if done > finished or any(s is not None and s.is_running() for s in states.values()):
            progress, finished = time.monotonic(), done
        waiting = {i: s for i, s in states.items() if s is None or s.is_scheduled() or s.is_pending()}
        if waiting and time.monotonic() - progress > start_timeout_s:
            for i in waiting:
                client.set_flow_run_state(i, Cancelled(message="backfill: no worker started it"), force=True)
            seasons = ", ".join(f"{runs[i]} ({s.name if s else 'no state'})" for i, s in waiting.items())
            raise CropflowError(
                f"backfill: the runs of season(s) {seasons} did not start within {start_timeout_s:.0f} s on work "
                f"pool {pool} and were cancelled; {_start_hint(pool)}, or allow more time (start_timeout_s)."
            )
        time.sleep(min(POLL_S, start_timeout_s))


@flow(name="backfill", log_prints=True)
def backfill(
    region: str = "sample",
    seasons: str | list[int | str] = "2024",
    sensors: list[str] = list(DEFAULT_SENSORS),  # noqa: B006 (Prefect parameters are copied per run)
    catalog: str = "local",
    stac_url: str | None = None,
    max_cloud_cover: float | None = None,
    model: ModelSpec = ModelSpec(),  # noqa: B008 (frozen)
    labels: Path | None = None,
    classes: Path | None = None,
    outputs: str | Path | None = None,
    robustness: bool = False,
    deployment: str | None = BACKFILL_DEPLOYMENT,
    start_timeout_s: float = START_TIMEOUT_S,
    s2_cloud_mask: str = "auto",
) -> dict[str, str]:
    """Map `region` for every season of `seasons` (`2019..2024`, `2023,2024`, date ranges `START..END`, or a list);
    returns the final state of each season's run. `deployment` (None: always here) receives the runs when it
    exists; it fails at once when no worker serves its work pool, and when its runs wait `start_timeout_s` with
    none of them running. Every season is checked before any runs; the flow fails if any season's run failed.
    `s2_cloud_mask` as in `crop_map`."""
    logger = get_run_logger()
    wanted = parse_seasons(seasons)
    runs = check_request(region, wanted, sensors, catalog, labels, classes, outputs, model, s2_cloud_mask)
    params = {
        "region": region,
        "sensors": sensors,
        "catalog": catalog,
        "stac_url": stac_url,
        "max_cloud_cover": max_cloud_cover,
        "model": model,
        "labels": labels,
        "classes": classes,
        "outputs": outputs,
        "robustness": robustness,
        "s2_cloud_mask": s2_cloud_mask,
    }
    seasons_dates = [f"{r.start}..{r.end}" for r in runs]
    if deployment and on_server(lambda client: client.read_deployment_by_name(deployment)):
        with get_client(sync_client=True) as client:
            pool = _served_pool(client, deployment)
            logger.info("submitting %d seasons to deployment %s (work pool %s)", len(runs), deployment, pool)
            submitted = {
                run_deployment(deployment, parameters={**params, "season": s}, timeout=0, tags=["backfill"]).id: s
                for s in seasons_dates
            }
            states = _wait(client, submitted, pool, start_timeout_s)
    else:
        logger.info("running %d seasons in this process", len(runs))
        states = [crop_map(**params, season=s, return_state=True).name for s in seasons_dates]
    results = dict(zip(seasons_dates, states, strict=True))
    failed = [s for s, state in results.items() if state != "Completed"]
    if failed:
        raise RuntimeError(f"backfill of {region}: the runs of season(s) {', '.join(failed)} did not complete.")
    return results
