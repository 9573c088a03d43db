"""Orchestration against a real local Prefect server: deployments and schedules, a scheduled run on a worker,
retries of transient errors only, backfills that resume and recompute nothing, artifacts and events, and the UI in
headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import yaml

from infra.errors import CropflowError
from infra.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CACHED_STEPS = ("build-cube", "train-model", "predict-region", "export-map", "evaluate-map")
FAST_MODEL = {"name": "random_forest", "epochs": 1}  # fitted once: seconds; as `--model random_forest --epochs 1`


# ---------------------------------------------------------------------------------------------------------------------
# Parameters (no server)


def test_seasons_from_years_ranges_and_the_crop_calendar():
    from flows.params import parse_seasons
    from flows.regions import Region

    winter = Region("w", 32631, (0, 0, 10, 10), (4, 50, 4.1, 50.1), None, None, None, calendar=("10-01", "07-31"))
    assert winter.season_dates(2024) == (date(2023, 10, 1), date(2024, 7, 31))
    assert winter.season_dates("2024-01-01..2024-02-01") == (date(2024, 1, 1), date(2024, 2, 1))
    summer = Region("s", 32631, (0, 0, 10, 10), (4, 50, 4.1, 50.1), None, None, None, calendar=("03-01", "10-31"))
    today = date(2025, 6, 15)
    assert summer.season_dates("current", today) == (date(2025, 3, 1), today)
    assert summer.season_dates("last", today) == (date(2024, 3, 1), date(2024, 10, 31))
    assert summer.season_dates("current", date(2025, 1, 10)) == (date(2024, 3, 1), date(2024, 10, 31))
    with pytest.raises(CropflowError, match="no default season"):
        summer.season_dates(None)
    with pytest.raises(CropflowError, match="ends before it starts"):
        summer.season_dates("2024-05-01..2024-03-01")
    assert parse_seasons("2019..2021") == [2019, 2020, 2021]
    assert parse_seasons("2023, 2024-03-01..2024-04-30") == [2023, "2024-03-01..2024-04-30"]
    for bad in ("2024..2019", "spring", ""):
        with pytest.raises(CropflowError):
            parse_seasons(bad)


def test_regions_as_catalog_names_geojson_and_bbox(tmp_path, monkeypatch):
    from flows.regions import resolve_region
    from infra.settings import get_settings

    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path))
    geojson = tmp_path / "field.geojson"
    ring = [[4.40, 50.90], [4.45, 50.90], [4.45, 50.93], [4.40, 50.93], [4.40, 50.90]]
    geojson.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    region = resolve_region(str(geojson), get_settings())
    assert (region.name, region.bbox, region.epsg) == ("field", (4.40, 50.90, 4.45, 50.93), 32631)
    assert region.labels is None and region.season is None
    boxed = resolve_region("4.40,50.90,4.45,50.93", get_settings(), labels=geojson)
    assert boxed.bounds == region.bounds and boxed.labels == geojson
    with pytest.raises(CropflowError, match="GeoJSON file or a bbox"):
        resolve_region("atlantis", get_settings())
    with pytest.raises(CropflowError, match="inverted"):
        resolve_region("4.5,50.9,4.4,51.0", get_settings())


def test_labels_are_read_and_reprojected_once_per_request(tiny_region, tmp_path, monkeypatch):
    """A backfill checks each season, the CLI checks before the flow and the flow checks again: the labels are read
    once while their files and the grid stay the same."""
    import flows.crop_map as crop_map_module
    from tasks.labels import read_labels

    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path / "home"))
    labels, classes = tmp_path / "labels.parquet", tiny_region / "classes.json"
    shutil.copy(tiny_region / "labels.parquet", labels)
    bbox = ",".join(str(v) for v in json.loads((tiny_region / "region.json").read_text())["bbox"])
    reads = []
    monkeypatch.setattr(crop_map_module, "read_labels", lambda path, *a: reads.append(path) or read_labels(path, *a))

    def check(season: str):
        [run] = crop_map_module.check_request(bbox, [season], ["s2"], "local", labels, classes, tmp_path / "out")
        return run

    runs = [check(s) for s in ("2023", "2024", "2024-03-01..2024-05-31", "2024")]
    assert len({r.out for r in runs}) == 3 and reads == [labels]
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: read again
    check("2024")
    assert reads == [labels, labels]


def test_a_backfills_seasons_share_one_check_of_the_region_and_catalog(tiny_region, tmp_path, monkeypatch):
    """`check_request` of a backfill's seasons resolves the region and checks the catalog and sensors once; each
    season gets the run (dates, folder) a request of that season alone gives."""
    import flows.crop_map as crop_map_module
    import flows.params as params_module

    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path / "home"))
    labels, classes = tiny_region / "labels.parquet", tiny_region / "classes.json"
    bbox = ",".join(str(v) for v in json.loads((tiny_region / "region.json").read_text())["bbox"])
    seasons = ["2023", "2024", "2024-03-01..2024-05-31"]
    request = (["s2"], "local", labels, classes, tmp_path / "out")
    alone = [run for season in seasons for run in crop_map_module.check_request(bbox, [season], *request)]
    calls = Counter()
    for module, name in ((params_module, "resolve_region"), (crop_map_module, "check_sensors")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.update([name]) or real(*a, **k))
    assert crop_map_module.check_request(bbox, seasons, *request) == alone
    assert calls == {"resolve_region": 1, "check_sensors": 1}
    assert len({(run.start, run.end, run.out) for run in alone}) == 3


# ---------------------------------------------------------------------------------------------------------------------
# A local Prefect server for the module


@pytest.fixture(scope="module")
def prefect_settings(stac_api: Settings) -> Settings:
    """The settings of the module's Prefect server: the test STAC API's, on a free port of its own."""
    from conftest import free_port

    return replace(stac_api, prefect_port=free_port())


@pytest.fixture(scope="module")
def prefect_api(prefect_settings: Settings):
    """`cropflow server up --postgres` on a free port: the server's tables are in database `prefect` of the test STAC
    API's PostgreSQL (the README's option for a production machine). Prefect clients here and in subprocesses use it."""
    import psycopg
    from conftest import stop_concurrency_services
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra import prefect_server, stac_api

    url = prefect_server.up(prefect_settings, postgres=True)
    with psycopg.connect(stac_api._conninfo(prefect_settings, prefect_server.PREFECT_DATABASE)) as conn:
        assert conn.execute("SELECT to_regclass('flow_run')").fetchone()[0] is not None  # migrated into PostgreSQL
    stop_concurrency_services()
    try:
        with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: url}):
            mp.setenv("PREFECT_API_URL", url)
            yield url
    finally:
        stop_concurrency_services()
        prefect_server.down(prefect_settings)


@pytest.fixture(scope="module")
def tiny(stac_api: Settings) -> Path:
    from flows.demo import ensure_sample

    return ensure_sample("sample-tiny")


def _runs_of(client, deployment_id) -> list:
    """The flow runs of a deployment."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _task_states(client) -> Counter:
    """(task name prefix, state name) counts of every task run of the server."""
    counts, offset = Counter(), 0
    while page := client.read_task_runs(limit=200, offset=offset):
        counts.update((r.name.rsplit("-", 1)[0], r.state.name) for r in page if r.state is not None)
        offset += len(page)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Deployments, schedules, limits


def test_deploy_creates_deployments_schedules_pools_and_limits(prefect_api, tmp_path, monkeypatch):
    from prefect import get_client

    from flows.deploy import CPU_POOL, GPU_POOL, DeployOptions, apply_deployments
    from flows.regions import CATALOG
    from flows.steps import build_cube

    regions = yaml.safe_load(CATALOG.read_text())["regions"]
    weekly = {"slug": "weekly", "cron": "30 5 * * 2", "timezone": "Europe/Paris", "parameters": {"season": 2025}}
    regions["wheat-belt"] = {**regions["sample-tiny"], "schedules": [weekly]}  # sample-tiny has none
    catalog = tmp_path / "regions.yaml"
    catalog.write_text(yaml.safe_dump({"regions": regions}))
    monkeypatch.setenv("CROPFLOW_REGIONS", str(catalog))  # the region catalog that `cropflow deploy` reads
    applied = apply_deployments(DeployOptions(gpus=1, backfill_limit=3, catalog_rate=0.5))
    assert apply_deployments(DeployOptions(gpus=1, backfill_limit=3, catalog_rate=0.5)) == applied
    assert set(applied) == {f"{f}/default" for f in ("build_cube", "train", "predict", "crop_map", "backfill")} | {
        "crop_map/backfill",
        "crop_map/sample",
        "crop_map/wheat-belt",
    }
    with get_client(sync_client=True) as client:
        [wheat] = client.read_deployment_by_name("crop_map/wheat-belt").schedules
        assert (wheat.slug, wheat.schedule.cron, wheat.schedule.timezone) == ("weekly", "30 5 * * 2", "Europe/Paris")
        assert wheat.parameters == {"region": "wheat-belt", "season": 2025}
        sample = client.read_deployment_by_name("crop_map/sample")
        schedules = {s.slug: s for s in sample.schedules}
        assert {slug: s.schedule.cron for slug, s in schedules.items()} == {
            "in-season": "0 6 * 3-10 1",
            "end-of-season": "0 6 15 11 *",
        }
        assert schedules["in-season"].parameters == {
            "region": "sample",
            "season": "current",
            "model": {"epochs": 20, "time_budget_s": 300},
        }
        assert schedules["end-of-season"].parameters == {"region": "sample", "season": "last", "robustness": True}
        backfill = client.read_deployment_by_name("crop_map/backfill")
        assert backfill.global_concurrency_limit.limit == 3 and not backfill.schedules
        pools = {n: client.read_deployment_by_name(n).work_pool_name for n in ("train/default", "build_cube/default")}
        assert pools == {"train/default": GPU_POOL, "build_cube/default": CPU_POOL}
        assert client.read_work_pool(GPU_POOL).concurrency_limit == 1
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        rate = client.read_global_concurrency_limit_by_name("catalog-requests")
        assert (rate.limit, rate.slot_decay_per_second) == (10, 0.5)
        # the parameters are those of the flow: a deployment refuses a bad one before any run
        assert set(client.read_deployment_by_name("build_cube/default").parameter_openapi_schema["properties"]) == set(
            build_cube.parameters.properties
        )


def test_region_schedules_are_checked_before_anything_is_deployed():
    from flows.deploy import DeployOptions, deployments

    weekly = {"slug": "weekly", "cron": "0 6 * * 1", "parameters": {"season": "current"}}
    refused = [
        ({**weekly, "cron": "61 6 * * 1"}, 'Invalid cron string: "61 6 * * 1"'),
        ({**weekly, "timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus' is unknown; give an IANA name"),
        ({**weekly, "every": "monday"}, "unknown field(s) every; valid: slug, cron, timezone"),
        ({**weekly, "parameters": {"seasn": 2024}}, "but was provided with parameters ['seasn', 'region']"),
        ({**weekly, "parameters": {"season": "spring"}}, "season 'spring' is not a season; give a year"),
        ({**weekly, "parameters": {"model": {"epoch": 3}}}, "model.epoch: Extra inputs are not permitted"),
        ({**weekly, "parameters": {"region": "elsewhere"}}, "parameters must be a mapping of crop_map parameters"),
        ({"slug": "weekly"}, "needs a cron string"),
    ]
    for schedule, message in refused:
        with pytest.raises(CropflowError, match=re.escape("region 'r': schedule 0") + ".*" + re.escape(message)):
            deployments(DeployOptions(), {"r": {"schedules": [schedule]}})
    with pytest.raises(CropflowError, match="schedule 1: slug 'weekly' is used twice"):
        deployments(DeployOptions(), {"r": {"schedules": [weekly, weekly]}})
    [scheduled] = [d for d in deployments(DeployOptions(), {"r": {"schedules": [weekly]}}) if d.name == "r"]
    assert [s.parameters for s in scheduled.schedules] == [{"region": "r", "season": "current"}]


WORKER_SEASON = "2024-04-01..2024-05-31"
SCHEDULE_LEAD_S = 20  # how far ahead of the request the worker's scheduled run is due


def _wait(what: str, done, timeout: float, *logs: Path, progress=lambda: "") -> None:
    """Poll `done()` every second until it is true; after `timeout` s fail naming `what`, the last `progress()` and
    the ends of `logs`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- end of {log}:\n{log.read_text()[-4000:]}" for log in logs if log.exists())
            pytest.fail(f"{what} within {timeout:.0f} s {progress()}{tails}")
        time.sleep(1)


@pytest.fixture(scope="module")
def worker_runs(prefect_api, prefect_settings, tiny, tmp_path_factory) -> dict:
    """On a process worker of `cropflow-cpu`, started first and seen online by the server: a `build_cube`
    deployment's run scheduled SCHEDULE_LEAD_S ahead by the server, then a backfill's season submitted to
    `crop_map/backfill`. Returns both flow runs (final), the backfill's state and the outputs root."""
    from prefect import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Interval

    from flows.backfill import BACKFILL_DEPLOYMENT, backfill
    from flows.deploy import CPU_POOL, DeployOptions, apply_deployments
    from flows.params import ModelSpec
    from flows.steps import build_cube
    from infra import prefect_server

    out = tmp_path_factory.mktemp("worker-outputs")
    logs = (out / "worker.log", prefect_server.server_dir(prefect_settings) / "server.log")
    apply_deployments(DeployOptions(), regions={})
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", CPU_POOL, "--type", "process"],
        env=env,
        stdout=logs[0].open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as client:

            def online() -> bool:
                return any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(CPU_POOL))

            _wait(f"no worker of {CPU_POOL} online", online, 120, *logs)
            # The server creates a schedule's runs from now on, within seconds of the deployment (its scheduler
            # loops every 5 s): a first run due before that is skipped and the next is an hour later. A busy machine
            # took more than 5 s, so the first run is due SCHEDULE_LEAD_S after the request.
            due = datetime.now(UTC) + timedelta(seconds=SCHEDULE_LEAD_S)
            params = {"region": "sample-tiny", "season": WORKER_SEASON, "outputs": str(out)}
            tick = build_cube.to_deployment(
                "tick",
                schedules=[Interval(3600, anchor_date=due, parameters=params)],
                work_pool_name=CPU_POOL,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
            tick_id = tick.apply(work_pool_name=CPU_POOL)

            def runs() -> list:
                return sorted(_runs_of(client, tick_id), key=lambda r: r.expected_start_time)

            _wait("the server scheduled no run of the deployment", runs, 60, *logs)
            first = runs()[0].expected_start_time
            if abs(first - due) > timedelta(seconds=1):
                pytest.fail(
                    f"the first run is due at {first}, not {due}: the server scheduled the deployment's runs more "
                    f"than {SCHEDULE_LEAD_S} s after it was requested"
                )
            _wait(  # the server marks a run Late 15 s after its time: Late means no worker took it
                "no scheduled run finished",
                lambda: runs()[0].state.is_final(),
                240,
                *logs,
                progress=lambda: f"(states by start time: {[r.state.name for r in runs()]})",
            )
            done = runs()[0]
            client.delete_deployment(tick_id)
            state = backfill(
                region="sample-tiny",
                seasons=[WORKER_SEASON],
                model=ModelSpec(**FAST_MODEL),
                outputs=out,
                return_state=True,
            )
            on_worker = _runs_of(client, client.read_deployment_by_name(BACKFILL_DEPLOYMENT).id)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    return {"scheduled": done, "due": due, "backfill": state, "crop_map": on_worker, "outputs": out}


@pytest.mark.slow
def test_scheduled_run_fires_and_completes_on_a_worker(worker_runs):
    from prefect.client.schemas.objects import StateType

    run, due = worker_runs["scheduled"], worker_runs["due"]
    assert run.state.type == StateType.COMPLETED, run.state.message
    assert run.auto_scheduled and abs(run.expected_start_time - due) < timedelta(seconds=1)
    assert (worker_runs["outputs"] / "sample-tiny" / "2024-04-01_2024-05-31" / "cube.zarr").is_dir()
    late = run.start_time - run.expected_start_time
    print(f"scheduled run: started {late.total_seconds():.1f} s after its time, ran {run.total_run_time}")


@pytest.mark.slow
def test_backfill_submits_its_seasons_to_the_deployment(worker_runs):
    assert worker_runs["backfill"].is_completed(), worker_runs["backfill"].message
    [run] = worker_runs["crop_map"]
    assert run.state.name == "Completed" and run.parameters["season"] == WORKER_SEASON and "backfill" in run.tags
    assert (worker_runs["outputs"] / "sample-tiny" / "2024-04-01_2024-05-31" / "crop_map.tif").is_file()


def test_backfill_without_a_worker_fails_and_says_how_to_start_one(prefect_api, tiny, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType

    from flows.backfill import backfill
    from flows.crop_map import crop_map
    from flows.params import ModelSpec

    pool = "cropflow-idle"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    idle = crop_map.to_deployment("idle", work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH)
    idle_id = idle.apply(work_pool_name=pool)
    season = "2024-03-01..2024-04-30"
    run = {"region": "sample-tiny", "seasons": [season], "model": ModelSpec(**FAST_MODEL), "outputs": tmp_path}
    with get_client(sync_client=True) as client:
        with pytest.raises(
            CropflowError, match=f"no worker serves work pool {pool} .*prefect worker start --pool {pool}"
        ):
            backfill(**run, deployment="crop_map/idle")
        assert not _runs_of(client, idle_id)  # nothing submitted
        client.send_worker_heartbeat(pool, "hung-worker", heartbeat_interval_seconds=60)  # online, takes no run
        t0 = time.monotonic()
        with pytest.raises(CropflowError, match=rf"season\(s\) {season} \(Scheduled\) did not start within 2 s"):
            backfill(**run, deployment="crop_map/idle", start_timeout_s=2)
        assert time.monotonic() - t0 < 60
        assert [r.state.name for r in _runs_of(client, idle_id)] == ["Cancelled"]  # left nothing to run later


# ---------------------------------------------------------------------------------------------------------------------
# Retries


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests of a path, then 200."""

    failures: ClassVar[dict[str, int]] = {"/flaky": 1, "/down": 99}
    seen: ClassVar[Counter] = Counter()

    def do_GET(self) -> None:
        self.seen[self.path] += 1
        self.send_response(503 if self.seen[self.path] <= self.failures.get(self.path, 0) else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_cached_step_reruns_when_its_outputs_were_rewritten_under_another_key(prefect_api, tmp_path):
    from prefect import flow, task

    from flows.policy import cached

    out, runs = tmp_path / "cube.txt", []

    @task
    def write(option: str) -> str:
        runs.append(option)
        out.write_text(option)
        return option

    @flow
    def step(option: str) -> str:
        return cached(write, f"step-{option}-{tmp_path.name}", [out])(option)

    assert [step("auto"), step("auto"), step("spectral")] == ["auto", "auto", "spectral"]
    assert runs == ["auto", "spectral"]  # the second "auto" came from the cache
    assert step("auto") == "auto" and out.read_text() == "auto"  # not the cached result over the spectral file
    assert runs == ["auto", "spectral", "auto"]
    assert (tmp_path / ".cube.txt.cache-key").read_text() == f"step-auto-{tmp_path.name}"
    out.unlink()
    assert step("auto") == "auto" and runs[-1] == "auto" and len(runs) == 4  # deleted output: run again


def test_transient_errors_are_retried_and_bad_parameters_are_not(prefect_api):
    from prefect import flow, task

    from flows.policy import retrying
    from infra.retry import is_retryable

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    @task
    def fetch(path: str) -> int:
        response = httpx.get(base + path, timeout=5)
        response.raise_for_status()
        return response.status_code

    @task
    def refuse(region: str) -> None:
        raise CropflowError(f"unknown region {region!r}")

    @flow
    def fetching(path: str) -> int:
        return retrying(fetch, backoff_s=0.1)(path)

    @flow
    def refusing() -> None:
        retrying(refuse, backoff_s=0.1)("atlantis")

    try:
        assert fetching("/flaky") == 200  # the run recovers after one 503
        assert _Flaky.seen["/flaky"] == 2
        state = refusing(return_state=True)
        assert state.is_failed() and "atlantis" in state.message
        down = fetching("/down", return_state=True)
        assert down.is_failed()
        assert _Flaky.seen["/down"] == 4  # the first try and 3 retries, then the run fails
    finally:
        server.shutdown()
    assert is_retryable(TimeoutError()) and is_retryable(ConnectionResetError())
    assert not is_retryable(CropflowError("bad bbox")) and not is_retryable(ValueError("bug"))


# ---------------------------------------------------------------------------------------------------------------------
# Backfill: killed midway, resumed, run again


def _backfill_process(out: Path, seasons: str) -> subprocess.Popen:
    """`cropflow backfill` of the tiny region in this process's Prefect server, run here (`--here`)."""
    args = ["backfill", "--region", "sample-tiny", "--seasons", seasons, "--model", "random_forest", "--epochs", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args, "--outputs", str(out), "--here"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _outputs(out: Path) -> dict[str, float]:
    """Every file under `out` with its modification time, a Zarr store counting as one file."""
    found = {}
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if not any(part.endswith(".zarr") for part in rel.parts[:-1]) and (path.is_file() or path.suffix == ".zarr"):
            found[str(rel)] = path.stat().st_mtime
    return found


@pytest.mark.slow
def test_backfill_killed_midway_resumes_then_recomputes_nothing(prefect_api, tiny, tmp_path):
    from prefect import get_client

    from flows.backfill import backfill
    from flows.params import ModelSpec

    seasons = ["2024-03-01..2024-05-31", "2024-06-01..2024-08-31"]
    out = tmp_path / "out"
    second = out / "sample-tiny" / "2024-06-01_2024-08-31"
    run = {"region": "sample-tiny", "seasons": seasons, "model": ModelSpec(**FAST_MODEL), "outputs": out}
    with get_client(sync_client=True) as client:
        before = _task_states(client)
        killed = _backfill_process(out, ",".join(seasons))
        while not second.exists():  # the first season is mapped: kill the backfill in the second one
            assert killed.poll() is None, killed.stdout.read()
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        after_kill = _task_states(client)
        assert backfill(**run, deployment=None) == dict.fromkeys(seasons, "Completed")
        after_resume = _task_states(client)
        mapped = _outputs(out)
        t0 = time.perf_counter()
        backfill(**run, deployment=None)
        print(f"second backfill of {len(seasons)} seasons: {time.perf_counter() - t0:.1f} s")
        after_again = _task_states(client)
    for step in CACHED_STEPS:
        computed_killed = after_kill[(step, "Completed")] - before[(step, "Completed")]
        computed_resumed = after_resume[(step, "Completed")] - after_kill[(step, "Completed")]
        assert computed_killed >= 1, step  # the first season was mapped before the kill: not again
        assert computed_killed + computed_resumed == len(seasons), step  # none twice, none missing
        assert after_resume[(step, "Cached")] - after_kill[(step, "Cached")] == 2 - computed_resumed, step
        assert after_again[(step, "Completed")] == after_resume[(step, "Completed")], step  # nothing recomputed
        assert after_again[(step, "Cached")] - after_resume[(step, "Cached")] == len(seasons), step
    assert _outputs(out) == mapped, "the second backfill rewrote outputs"
    names = {season: sorted(p.split("/", 2)[2] for p in mapped if p.split("/")[1] == season) for season in (
        "2024-03-01_2024-05-31", "2024-06-01_2024-08-31")}  # fmt: skip
    assert names["2024-03-01_2024-05-31"] == names["2024-06-01_2024-08-31"]
    assert {"cube.zarr", "model.pt", "crop_map.tif", "metrics.json", "crop_map.stac.json"} <= set(
        names["2024-03-01_2024-05-31"]
    )
    leftovers = [p for p in mapped if ".partial" in p or ".tmp-" in p]
    assert not leftovers, leftovers
    items = list(out.glob("sample-tiny/*/stac/items/*.ndjson"))
    assert sum(len(p.read_text().splitlines()) for p in items) == len(seasons)  # one map item per season


# ---------------------------------------------------------------------------------------------------------------------
# Artifacts, events and the UI


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1200",
]


class Chromium:
    """Headless Chromium driven through the DevTools protocol (a page, its text once rendered, screenshots)."""

    def __init__(self, profile: Path) -> None:
        from conftest import free_port

        port = free_port()
        args = [*CHROMIUM_FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            [shutil.which("chromium"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                time.sleep(0.3)
        from websockets.sync.client import connect

        self.ws = connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=2**26)
        self.calls = 0

    def call(self, method: str, **params: object) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while (reply := json.loads(self.ws.recv())).get("id") != self.calls:
            pass  # an event
        assert "error" not in reply, reply
        return reply["result"]

    def open(self, url: str, *expected: str, timeout: float = 90) -> str:
        """Go to `url`; its text once every `expected` string shows (the UI renders after its API calls)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            text = self.call("Runtime.evaluate", expression="document.body.innerText")["result"].get("value", "")
            if all(e in text for e in expected) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.mark.slow
def test_crop_map_run_artifacts_events_and_ui(prefect_api, worker_runs, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian package chromium is not installed (infra/setup.sh installs it): no browser to open the UI")
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter

    [run] = worker_runs["crop_map"]  # a crop_map run of a worker, in the server of the UI
    run_id = run.id
    with get_client(sync_client=True) as client:
        children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        descendants = {run_id} | {r.id for r in client.read_flow_runs(flow_run_filter=children)}
        assert len(descendants) == 4  # crop_map, build_cube, train, predict
        mine = [a for a in client.read_artifacts() if a.flow_run_id in descendants]
        artifacts = {a.key: a for a in mine}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # events reach the server asynchronously
            found = client.read_events(EventFilter(event=EventNameFilter(prefix=["cropflow."])), limit=50).events
            events = {e.event: e for e in found if e.resource.id.endswith(".sample-tiny.2024-04-01_2024-05-31")}
            if set(events) == {"cropflow.cube.ready", "cropflow.map.published"}:
                break
            time.sleep(1)
    assert {"crop-map-report-sample-tiny", "crop-map-classes-sample-tiny"} <= set(artifacts)
    assert {"crop-map-preview-sample-tiny", "confusion-matrix-sample-tiny"} <= set(artifacts)
    assert any(a.type == "progress" and a.data == 100.0 for a in mine)  # tiled inference's progress
    report = artifacts["crop-map-report-sample-tiny"].data
    for text in ("2024-04-01 to 2024-05-31", "| s2 |", "Clear-sky fraction", "random_forest", "crop_map.tif"):
        assert text in report, text
    classes = artifacts["crop-map-classes-sample-tiny"].data
    assert "winter_wheat" in classes and "area_ha" in classes
    published, ready = events["cropflow.map.published"], events["cropflow.cube.ready"]
    assert published.resource.id == "cropflow.map.sample-tiny.2024-04-01_2024-05-31"
    assert published.resource["cropflow.region"] == "sample-tiny"
    assert Path(published.payload["crop_map"]).is_file() and published.payload["metrics"]["overall_accuracy"] > 0.2
    assert Path(ready.payload["path"]).name == "cube.zarr" and ready.payload["items"]["s2"] > 0

    ui = prefect_api.removesuffix("/api")
    shots = REPO / "test-outputs" / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    browser = Chromium(tmp_path / "chromium")
    try:
        expected = (run.name, "crop_map", "Completed", "cropflow-cpu", "Beginning subflow run")
        page = browser.open(f"{ui}/runs/flow-run/{run_id}", *expected)
        assert all(e in page for e in expected), page[:2000]
        browser.screenshot(shots / "flow-run.png")
        report = artifacts["crop-map-report-sample-tiny"].id
        page = browser.open(f"{ui}/artifacts/artifact/{report}", "Crop map of sample-tiny", "Outputs")
        assert "Crop map of sample-tiny, 2024-04-01 to 2024-05-31" in page and "crop_map.tif" in page, page[:2000]
        browser.screenshot(shots / "report.png")
        preview = artifacts["crop-map-preview-sample-tiny"].id
        browser.open(f"{ui}/artifacts/artifact/{preview}", "crop-map-preview-sample-tiny")
        shown = "[...document.images].filter(i => i.src.startsWith('data:image/png') && i.naturalWidth > 100).length"
        deadline = time.monotonic() + 30
        while not (images := browser.call("Runtime.evaluate", expression=shown)["result"]["value"]):
            assert time.monotonic() < deadline, "the map preview is not shown"
            time.sleep(0.5)
        browser.screenshot(shots / "map.png")
    finally:
        browser.close()
    assert images == 1
    for name in ("flow-run", "report", "map"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
