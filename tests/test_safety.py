"""Safety (issue 9; docs/reliability.md): local services on 127.0.0.1 with passwords, secrets only from the
environment and never written out, YAML and checkpoints loaded safely, run folders inside the output root.

The STAC API's and PostgreSQL's listening sockets and password checks are in tests/test_stac_api.py.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import subprocess
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import psycopg
import pytest

from infra.errors import CropflowError
from infra.settings import REPO_ROOT, Settings

SOURCES = sorted(
    p for folder in ("flows", "tasks", "models", "infra", "tests") for p in (REPO_ROOT / folder).rglob("*.py")
)


@functools.cache
def _trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in SOURCES]


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call `<module>.<name>(...)` or `<name>(...)` in the code base."""
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_yaml_is_loaded_safely() -> None:
    unsafe = [
        f"{p.relative_to(REPO_ROOT)}:{c.lineno}" for name in ("unsafe_load", "full_load") for p, c in _calls(name)
    ]
    for path, call in _calls("load") + _calls("load_all"):
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "yaml":
            loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                unsafe.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}")
    assert not unsafe, f"yaml loaded without SafeLoader at {unsafe}; use yaml.safe_load"
    assert len(_calls("safe_load")) >= 3  # the region and catalog configs are read, and safely


def test_checkpoints_load_with_weights_only() -> None:
    loads = [
        (p, c)
        for p, c in _calls("load")
        if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", None) == "torch"
    ]
    unsafe = [
        f"{p.relative_to(REPO_ROOT)}:{c.lineno}"
        for p, c in loads
        if not (isinstance(flag := _keyword(c, "weights_only"), ast.Constant) and flag.value is True)
    ]
    assert loads and not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_postgres_has_no_trust_rule(stac_api: Settings) -> None:
    from infra import stac_api as stac

    conninfo = f"host=127.0.0.1 port={stac_api.pg_port} user={stac.PG_USER} dbname=postgres"
    with psycopg.connect(conninfo, password=stac_api.pg_password(), connect_timeout=5) as conn:
        rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules WHERE error IS NULL").fetchall()
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
    assert rules and {m for _, m in rules} == {"scram-sha-256"}, rules  # TCP and unix socket alike: a password
    assert any(t.startswith("host") for t, _ in rules) and listen == "127.0.0.1"


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}


@pytest.mark.slow
def test_prefect_server_listens_on_loopback_only(tmp_path: Path) -> None:
    from conftest import free_port

    from infra import prefect_server

    settings = Settings(home=tmp_path / "home", stac_port=free_port(), pg_port=free_port(), prefect_port=free_port())
    prefect_server.up(settings)
    try:
        assert _listening(settings.prefect_port) == {"127.0.0.1"}
    finally:
        prefect_server.down(settings)
    assert not _listening(settings.prefect_port)


def test_prefect_server_trusts_no_stale_pid_file(tmp_path: Path) -> None:
    """A pid file whose process is not our server (the pid reused since) names no server: nothing is signalled."""
    from conftest import free_port

    from infra import prefect_server

    settings = Settings(home=tmp_path, stac_port=free_port(), pg_port=free_port(), prefect_port=free_port())
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group leader, as the server would be
    try:
        state = {"pid": other.pid, "url": prefect_server.api_url(settings), "database": "sqlite"}
        (tmp_path / prefect_server.STATE_FILE).parent.mkdir(parents=True)
        (tmp_path / prefect_server.STATE_FILE).write_text(json.dumps(state))
        assert prefect_server.running_state(tmp_path) is None
        assert not prefect_server.status(settings)["running"]
        prefect_server.down(settings)
        assert other.poll() is None, "down() signalled a process that is not the Prefect server"
        assert not (tmp_path / prefect_server.STATE_FILE).exists()
    finally:
        other.kill()
        other.wait()


def test_prefect_server_state_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """A state that fails to serialise midway leaves the previous state file as it was, and no scratch file."""
    from infra import prefect_server

    settings = Settings(home=tmp_path, stac_port=18081, pg_port=15431)  # nothing is started
    state = {"pid": 4242, "url": prefect_server.api_url(settings), "database": "sqlite"}
    prefect_server._save_state(settings, state)
    path = tmp_path / prefect_server.STATE_FILE
    assert json.loads(path.read_text()) == state
    with pytest.raises(TypeError, match="not JSON serializable"):
        prefect_server._save_state(settings, {**state, "pid": 4343, "database": object()})  # fails after "pid"
    assert json.loads(path.read_text()) == state
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_prefect_server_start_failure_quotes_its_log_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import free_port

    from infra import prefect_server

    secret = "fake-pg-password-0c41d7"
    monkeypatch.setenv("CROPFLOW_PG_PASSWORD", secret)
    monkeypatch.setenv("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", secret)  # the server's settings check quotes it, exits
    settings = Settings(home=tmp_path, stac_port=free_port(), pg_port=free_port(), prefect_port=free_port())
    with pytest.raises(CropflowError, match="the Prefect server did not start") as refused:
        prefect_server.up(settings)
    assert "input_value='***'" in str(refused.value) and secret not in str(refused.value)
    assert secret in (tmp_path / "prefect-server" / "server.log").read_text()  # the log has it, the message not


def test_log_quotes_blank_the_environments_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.processes import log_tail

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-1f9a")
    monkeypatch.setenv("CROPFLOW_CATALOG_TOKEN", "tok-77c2")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=az-9b1e")
    monkeypatch.setenv("KEYBOARD_LAYOUT", "fr-azerty")  # not a secret by its name
    log = tmp_path / "service.log"
    log.write_text(
        "old line\nconnect with s3-secret-1f9a and tok-77c2 (fr-azerty) pw-given\nAccountName=a;AccountKey=az-9b1e\n"
    )
    tail = log_tail(log, ["pw-given"], start=len("old line\n"))
    assert tail == "connect with *** and *** (fr-azerty) ***\n***"


def test_local_health_checks_ignore_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra import prefect_server

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # no proxy there: a request through it fails
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        assert prefect_server._healthy(f"http://127.0.0.1:{server.server_port}/api")
    finally:
        server.shutdown()


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-6f1c0d",
    "PC_SDK_SUBSCRIPTION_KEY": "fake-catalog-key-93ab27",
    "CROPFLOW_PG_PASSWORD": "fake-pg-password-5e8d41",
}


def test_secrets_never_reach_logs_outputs_or_stac_items(
    stac_api: Settings, load_region, tiny_region: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from models.registry import build_model
    from tasks.catalog import search_items
    from tasks.cube import build_cube
    from tasks.export import export_map_task
    from tasks.labels import read_classes
    from tasks.predict import predict_region

    load_region(tiny_region)
    secrets = [stac_api.pg_password(), *SECRETS.values()]  # the cluster's own password, and fake ones in the env
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    log_file = tmp_path / "run.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        meta = json.loads((tiny_region / "region.json").read_text())
        season = tuple(date.fromisoformat(d) for d in meta["season"])
        items = search_items("local", "s2", *season, bbox=tuple(meta["bbox"]))
        out = tmp_path / "outputs"
        query = {"catalog": "local", "url": stac_api.stac_url, "bbox": meta["bbox"]}
        cube = build_cube(
            {"s2": items},
            meta["epsg"],
            tuple(meta["bounds"]),
            *season,
            out / "cube.zarr",
            bands={"s2": ["B04", "B08"]},
            query=query,
        )
        classes = read_classes(tiny_region / "classes.json")
        torch.manual_seed(0)
        model = build_model("tempcnn", in_channels=2, num_classes=len(classes), widths=(8,), hidden=8)
        ckpt = {
            "sensor": "s2",
            "bands": ["B04", "B08"],
            "classes": classes,
            "norm": {"mean": [0.1, 0.3], "std": [0.1] * 2},
        }
        probs = predict_region(cube, model, ckpt, out / "probabilities.zarr", window=32, progress=False)
        export_map_task.fn(probs, tiny_region / "classes.json", "tiny", season, out)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 10 and any(p.name.endswith(".ndjson") for p in written)  # COGs, Zarr, the STAC item
    assert "s2 (sentinel-2-l2a at local)" in log_file.read_text()  # the run's logs were captured
    logs = [log_file, stac_api.stac_dir / "stac-api.log", stac_api.stac_dir / "postgresql.log"]
    for path in written + logs:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"a secret is written in {path}"


def test_run_folders_stay_inside_the_output_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.params import resolve_run

    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bbox = "4.42,50.98,4.43,50.99"
    run = resolve_run(bbox, "2024-03-01..2024-10-31")
    assert run.out.parent.parent == tmp_path / "home" / "outputs"
    assert resolve_run(bbox, "2024", outputs="maps").out.is_relative_to(Path("maps"))  # below the working folder
    assert resolve_run(bbox, "2024", outputs=tmp_path / "elsewhere").out.is_relative_to(tmp_path / "elsewhere")
    for escape in ("../../etc", "maps/../../etc", "..", Path("a/../../b")):
        with pytest.raises(CropflowError, match=r"climbs out of the working folder with '\.\.'"):
            resolve_run(bbox, "2024", outputs=escape)
