"""Deployments of the flows, their schedules, work pools and concurrency limits (`cropflow deploy`).

Against the Prefect server of `PREFECT_API_URL` (`cropflow server up`), `apply_deployments` creates or updates:
- work pools `cropflow-cpu` and, when there are GPUs, `cropflow-gpu` (process pools: run `prefect worker start
  --pool NAME` where the code is installed); `train`, `predict` and `crop_map` go to the GPU pool when it exists;
- per flow a deployment `default` (no schedule, for runs from the UI or `run_deployment`), `crop_map/backfill`
  (what `backfill` submits to, at most `backfill_limit` runs at once, more queue), and for every region of the
  region catalog with `schedules`, `crop_map/<region>` with one cron schedule per entry and that entry's parameters
  (e.g. a weekly in-season map and an end-of-season final map); a region without `schedules` gets no deployment of
  its own (the `default` ones run it on demand). Schedules are checked before anything is applied;
- the tag concurrency limit `gpu` = the number of GPUs (1 without GPU: one training or inference at a time on the
  CPU), and the rate limit `catalog-requests` (`catalog_rate` searches per second, bursts of `catalog_burst`).
Flows are deployed by module path (`flows.crop_map.crop_map`): a worker imports them from the installed package.
"""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import Flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ParameterTypeError
from prefect.schedules import Cron

from flows.backfill import BACKFILL_DEPLOYMENT, backfill
from flows.crop_map import crop_map
from flows.policy import CATALOG_RATE_LIMIT, GPU_TAG
from flows.regions import load_catalog
from flows.steps import build_cube, predict, train
from infra.errors import CropflowError

CPU_POOL = "cropflow-cpu"
GPU_POOL = "cropflow-gpu"
GPU_FLOWS = ("train", "predict", "crop_map")
SCHEDULE_FIELDS = ("slug", "cron", "timezone", "parameters", "description")  # of a region's schedule entry


def gpu_count() -> int:
    """GPUs visible to PyTorch here."""
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class DeployOptions:
    """What `cropflow deploy` sets up; `gpus` decides the GPU pool and the `gpu` tag limit."""

    gpus: int = 0
    backfill_limit: int = 2
    catalog_rate: float = 2.0
    catalog_burst: int = 10

    def pool(self, flow: Flow) -> str:
        return GPU_POOL if self.gpus and flow.name in GPU_FLOWS else CPU_POOL


def region_schedules(entry: dict, region: str) -> list:
    """The Prefect cron schedules of a region catalog entry's `schedules`, each with its parameters (plus the
    region), checked: known fields, a cron string, an IANA time zone, unique slugs, and parameters that `crop_map`
    accepts (names, types, season, model)."""
    given = (entry.get("schedules") or []) if isinstance(entry, dict) else None
    if not isinstance(given, list):
        raise CropflowError(f"region {region!r}: schedules must be a list of {{cron, parameters, ...}} entries.")
    schedules, slugs = [], set()
    for i, spec in enumerate(given):
        where = f"region {region!r}: schedule {i}"
        if not isinstance(spec, dict) or "cron" not in spec:
            raise CropflowError(f'{where} needs a cron string (e.g. cron: "0 6 * 3-10 1").')
        unknown = sorted(set(spec) - set(SCHEDULE_FIELDS))
        if unknown:
            raise CropflowError(
                f"{where} has unknown field(s) {', '.join(unknown)}; valid: {', '.join(SCHEDULE_FIELDS)}."
            )
        slug, timezone, parameters = spec.get("slug"), spec.get("timezone", "UTC"), spec.get("parameters") or {}
        if slug is not None and slug in slugs:
            raise CropflowError(f"{where}: slug {slug!r} is used twice; give each schedule its own slug.")
        slugs.add(slug)
        try:
            ZoneInfo(str(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise CropflowError(
                f"{where}: timezone {timezone!r} is unknown; give an IANA name (UTC, Europe/Paris)."
            ) from None
        if not isinstance(parameters, dict) or "region" in parameters:
            raise CropflowError(f"{where}: parameters must be a mapping of crop_map parameters other than region.")
        try:
            crop_map.validate_parameters({**parameters, "region": region})
            cron = Cron(
                str(spec["cron"]), timezone=str(timezone), parameters={"region": region, **parameters}, slug=slug
            )
        except (ParameterTypeError, CropflowError, ValueError, TypeError) as exc:  # a parameter, a cron string
            raise CropflowError(f"{where} ({slug or spec['cron']}): {' '.join(str(exc).split())}") from None
        schedules.append(cron)
    return schedules


def deployments(options: DeployOptions, regions: dict[str, dict] | None = None) -> list[RunnerDeployment]:
    """Every deployment of cropflow, not yet applied (`regions`: the region catalog's entries by default)."""
    regions = load_catalog() if regions is None else regions

    def deployment(flow: Flow, name: str, **kwargs: object) -> RunnerDeployment:
        return flow.to_deployment(
            name, work_pool_name=options.pool(flow), entrypoint_type=EntrypointType.MODULE_PATH, **kwargs
        )

    found = [deployment(f, "default") for f in (build_cube, train, predict, crop_map, backfill)]
    found.append(
        deployment(
            crop_map,
            BACKFILL_DEPLOYMENT.split("/")[1],
            concurrency_limit=ConcurrencyLimitConfig(
                limit=options.backfill_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
            description="the runs of `backfill`, one per season, at most backfill_limit at once",
            tags=["backfill"],
        )
    )
    for name, entry in regions.items():
        if schedules := region_schedules(entry, name):
            found.append(
                deployment(
                    crop_map,
                    name,
                    schedules=schedules,
                    parameters={"region": name},
                    description=entry.get("description"),
                    tags=["scheduled"],
                )
            )
    return found


def apply_deployments(options: DeployOptions, regions: dict[str, dict] | None = None) -> list[str]:
    """Create or update pools, limits and deployments on the server; the names `flow/deployment` applied."""
    found = deployments(options, regions)  # checked before anything changes on the server
    with get_client(sync_client=True) as client:
        for pool in {CPU_POOL, *((GPU_POOL,) if options.gpus else ())}:
            concurrency = options.gpus if pool == GPU_POOL else None
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", concurrency_limit=concurrency), overwrite=True
            )
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=max(1, options.gpus))
        client.upsert_global_concurrency_limit_by_name(
            CATALOG_RATE_LIMIT, options.catalog_burst, slot_decay_per_second=options.catalog_rate
        )
    applied = []
    for d in found:
        d.apply(work_pool_name=d.work_pool_name)
        applied.append(f"{d.flow_name}/{d.name}")
    return applied
