"""Shared pytest fixtures. Each block below belongs to one part of cropflow; add new fixtures in their own block."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from infra.settings import Settings, get_settings

# Prefect: no telemetry, and a private home so tests never touch a user's Prefect database.
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cropflow-test-prefect-")
# Google's and AWS's clients: no probe of a cloud's metadata server for credentials (seconds of timeouts off the cloud)
os.environ["NO_GCE_CHECK"] = "true"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

# ---------------------------------------------------------------------------------------------------------------------
# Local STAC API (infra/stac_api.py): a real PostgreSQL + pgstac + stac-fastapi in a temporary CROPFLOW_HOME.


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_home() -> Iterator[Path]:
    """A fresh folder for the test STAC API's home, outside pytest's temp root, removed afterwards.

    As root, PostgreSQL runs as `postgres`, which must traverse every parent of its data folder. pytest keeps its temp
    root private (0700) and makes it so again whenever another pytest session starts, which would cut a running
    PostgreSQL of this session off from its data; a folder of its own in the system temp folder is not touched.
    """
    home = Path(tempfile.mkdtemp(prefix="cropflow-test-home-"))
    if os.geteuid() == 0:
        home.chmod(0o711)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stac_api() -> Iterator[Settings]:
    """The local STAC API started once per session on free non-default ports; yields its `Settings`, then stops it.

    While it is active, `CROPFLOW_HOME`, `CROPFLOW_PG_PORT` and `CROPFLOW_STAC_PORT` point at it, so code calling
    `get_settings()` uses it too.
    """
    from infra import stac_api as stac_api_module

    pg_port = free_port()
    stac_port = free_port()
    while stac_port == pg_port:
        stac_port = free_port()
    with postgres_home() as home, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROPFLOW_HOME", str(home))
        mp.setenv("CROPFLOW_PG_PORT", str(pg_port))
        mp.setenv("CROPFLOW_STAC_PORT", str(stac_port))
        mp.delenv("CROPFLOW_PG_PASSWORD", raising=False)  # the test cluster gets its own generated password
        settings = get_settings()
        try:
            stac_api_module.up(settings)
            yield settings
        finally:
            stac_api_module.down(settings)


@pytest.fixture
def load_region(stac_api: Settings) -> Callable[[Path], dict[str, int]]:
    """`load_region(region_dir)` loads a region folder (collections/*.json, items/*.ndjson) into the test STAC API."""
    from infra import stac_api as stac_api_module

    def _load(region_dir: Path) -> dict[str, int]:
        return stac_api_module.load(stac_api, region_dir)

    return _load


# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# Sample regions (tasks/sample_region.py): generated once per test session and shared read-only.


@pytest.fixture(scope="session")
def tiny_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px sample region (simulated pixels, real formats); tests must not modify it."""
    from tasks.sample_region import generate_region

    return generate_region(tmp_path_factory.mktemp("regions") / "tiny", size=64, seed=3)


# ---------------------------------------------------------------------------------------------------------------------
# Models (models/): tiny tensors, and a test encoder registered as backbone "tiny".


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tensors of model tests are tiny: one thread avoids synchronisation costs, which explode on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model_helpers.TinyTemporalEncoder`, registered as backbone "tiny" for the duration of a test."""
    from model_helpers import TinyTemporalEncoder

    from models.registry import MODELS

    monkeypatch.setitem(MODELS, "tiny", TinyTemporalEncoder)


# ---------------------------------------------------------------------------------------------------------------------
# Object storage (infra/storage.py): a real S3-compatible server (moto's) on 127.0.0.1, credentials from the env.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """moto's S3 server on a free port of 127.0.0.1 for the session; `AWS_*` point every S3 client at it.

    Yields the `ThreadedMotoServer` (tests may stop and start it: its buckets live in this process).
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "cropflow-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "cropflow-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries; cropflow's uploads retry on top
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_server, request: pytest.FixtureRequest) -> str:
    """A new empty bucket on the test S3 server; returns its `s3://` URL."""
    import fsspec

    name = "cropflow-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    return f"s3://{name}"


# ---------------------------------------------------------------------------------------------------------------------
# Prefect: a temporary API server for the tests of a module that run flows (per module: harnesses never nest).


def stop_concurrency_services() -> None:
    """Prefect's concurrency-slot services keep a client of the server they first talked to (one per limit name, e.g.
    tag:gpu); stop them around each module's server, or tagged tasks call a server that is gone."""
    from prefect.concurrency import services
    from prefect.concurrency.v1 import services as v1_services

    for service in (
        services.ConcurrencySlotAcquisitionService,
        services.ConcurrencySlotAcquisitionWithLeaseService,
        v1_services.ConcurrencySlotAcquisitionService,
    ):
        service.drain_all(timeout=10)


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    stop_concurrency_services()
    with prefect_test_harness(server_startup_timeout=120):
        yield
    stop_concurrency_services()


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `cropflow ...` refused through the real entry point (flows.cli.main), in this process.


@pytest.fixture
def refused_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Callable[[list[str]], tuple[int, str]]:
    """`refused_cli(args)` runs `cropflow args`, which must exit, and returns its exit status and its output on one
    line (the console made wide enough for one line per message)."""
    from flows import cli

    monkeypatch.setattr(cli.console, "width", 1000)

    def run(args: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["cropflow", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out = capsys.readouterr()
        return exit_info.value.code, " ".join((out.out + out.err).split())

    return run
