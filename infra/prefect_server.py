"""A local Prefect server with its UI (`cropflow server up|down|status`), on 127.0.0.1 only.

Its files live in `$CROPFLOW_HOME/prefect-server/`: `home/` (PREFECT_HOME of the server: the SQLite database by
default), `server.log`, `server.json` (pid, port, API URL). With `postgres=True` its database is `prefect` in the
PostgreSQL cluster of the local STAC API (`infra/stac_api.py`), started if needed; the connection URL with its
password goes to the server's environment only, never to a log. Clients reach it with
`PREFECT_API_URL=http://127.0.0.1:<port>/api`; the `cropflow` command sets that itself while the server runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from infra import processes
from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.settings import Settings

STARTUP_TIMEOUT_S = 120.0  # a cold start migrates the database: up to a minute on a busy 2-core machine
PREFECT_DATABASE = "prefect"
STATE_FILE = Path("prefect-server", "server.json")  # under CROPFLOW_HOME
SERVER_ARGS = ["-m", "prefect", "server", "start"]  # after the interpreter, in the command line of our server


def server_dir(settings: Settings) -> Path:
    return settings.home / STATE_FILE.parent


def _state_file(settings: Settings) -> Path:
    return settings.home / STATE_FILE


def _save_state(settings: Settings, state: dict) -> None:
    """Write the state file whole or not at all: beside it, then renamed into place (`infra.atomic.atomic_path`)."""
    with atomic_path(_state_file(settings)) as tmp, tmp.open("w") as out:
        json.dump(state, out)


def api_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prefect_port}/api"


def _state(settings: Settings) -> dict | None:
    """The running server's state (pid alive), or None."""
    return running_state(settings.home)


def running_state(home: Path) -> dict | None:
    """The state (`pid`, `url`, `database`) of the server of the installation in `home` if its process runs: the
    pid of the state file is alive and its command line is that of `up`'s server on the state's port (a stale pid
    reused by another process is not ours)."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
        pid, port = int(state["pid"]), urlsplit(state["url"]).port
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ours = (
        processes.pid_alive(pid) and processes.cmdline(pid)[1:5] == SERVER_ARGS and processes.port_argument(pid) == port
    )
    return state if ours else None


def _healthy(url: str) -> bool:
    try:
        with processes.local_client() as client:
            return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _postgres_url(settings: Settings) -> str:
    """The connection URL of database `prefect` in the STAC API's PostgreSQL cluster, created if missing."""
    import psycopg

    from infra import stac_api

    stac_api.up(settings)
    with psycopg.connect(stac_api._conninfo(settings), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PREFECT_DATABASE,)).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {PREFECT_DATABASE}")
    password = settings.pg_password()
    return f"postgresql+asyncpg://{stac_api.PG_USER}:{password}@127.0.0.1:{settings.pg_port}/{PREFECT_DATABASE}"


def up(settings: Settings, postgres: bool = False) -> str:
    """Start the server (idempotent), wait until its API answers, return the API URL."""
    url = api_url(settings)
    state = _state(settings)
    if state:
        if _healthy(state["url"]):
            return state["url"]
        down(settings)
    processes.check_port(settings.prefect_port, "the Prefect server", "CROPFLOW_PREFECT_PORT")
    folder = server_dir(settings)
    (folder / "home").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    secrets: list[str] = []  # what the server's log could quote: its database URL holds the PostgreSQL password
    if postgres:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = _postgres_url(settings)
        secrets = [settings.pg_password()]
    log = folder / "server.log"
    cmd = [sys.executable, *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(settings.prefect_port)]
    with log.open("ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    processes.track(proc)
    database = "postgresql" if postgres else "sqlite"
    _save_state(settings, {"pid": proc.pid, "url": url, "database": database})
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            down(settings)
            raise CropflowError(
                f"the Prefect server did not start; the end of {log}:\n{processes.log_tail(log, secrets, offset)}"
            )
        time.sleep(0.5)
    return url


def down(settings: Settings) -> None:
    """Stop the server started by `up` (idempotent)."""
    state = _state(settings)
    if state:
        pid = int(state["pid"])
        processes.stop(pid, grace=30)  # start_new_session made it a group leader: the server and its children
    _state_file(settings).unlink(missing_ok=True)


def status(settings: Settings) -> dict:
    """`{"running": bool, "url": str, "ui": str, "database": str | None}`."""
    state = _state(settings)
    url = state["url"] if state else api_url(settings)
    running = state is not None and _healthy(url)
    return {
        "running": running,
        "url": url,
        "ui": url.removesuffix("/api"),
        "database": state["database"] if state else None,
    }
