"""The `backfill` flow: one `crop_map` run per season of a region.

With a Prefect server where the deployment `crop_map/backfill` exists (`cropflow deploy`), the seasons are
submitted to it with `run_deployment` and run on the workers, as many at once as its concurrency limit allows;
otherwise they run here, one after the other, as subflows. Either way the tasks are cached (`flows.policy`), so a
backfill run twice recomputes nothing the second time and a backfill killed midway resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.deployments import run_deployment

from flows.crop_map import check_request, crop_map
from flows.params import DEFAULT_SENSORS, ModelSpec, parse_seasons
from flows.policy import on_server

BACKFILL_DEPLOYMENT = "crop_map/backfill"
POLL_S = 5.0


def _wait(flow_run_ids: list[UUID]) -> list[str]:
    """The final state names of flow runs, once all are final."""
    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(i).state for i in flow_run_ids]
            if all(s is not None and s.is_final() for s in states):
                return [s.name for s in states]
            time.sleep(POLL_S)


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
) -> dict[str, str]:
    """Map `region` for every season of `seasons` (`2019..2024`, `2023,2024`, date ranges `START..END`, or a list);
    returns the final state of each season's run. `deployment` (None: always here) receives the runs when it
    exists. Every season is checked before any runs; the flow fails if any season's run failed."""
    logger = get_run_logger()
    wanted = parse_seasons(seasons)
    runs = [check_request(region, s, sensors, catalog, labels, classes, outputs, model) for s in wanted]
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
    }
    seasons_dates = [f"{r.start}..{r.end}" for r in runs]
    if deployment and on_server(lambda client: client.read_deployment_by_name(deployment)):
        logger.info("submitting %d seasons to deployment %s", len(runs), deployment)
        submitted = [
            run_deployment(deployment, parameters={**params, "season": s}, timeout=0, tags=["backfill"])
            for s in seasons_dates
        ]
        states = _wait([fr.id for fr in submitted])
    else:
        logger.info("running %d seasons in this process", len(runs))
        states = [crop_map(**params, season=s, return_state=True).name for s in seasons_dates]
    results = dict(zip(seasons_dates, states, strict=True))
    failed = [s for s, state in results.items() if state != "Completed"]
    if failed:
        raise RuntimeError(f"backfill of {region}: the runs of season(s) {', '.join(failed)} did not complete.")
    return results
