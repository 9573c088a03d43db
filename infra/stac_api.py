"""The project's own local STAC API: a PostgreSQL cluster with pgstac, served by stac-fastapi-pgstac on 127.0.0.1.

Everything lives in `settings.stac_dir`:

- `pgdata/` the PostgreSQL cluster (owned by the `postgres` system user when cropflow runs as root),
  `run/` its unix socket directory, `postgresql.log` its log;
- `stac-api.log` and `stac-api.pid` the uvicorn process serving `stac_fastapi.pgstac.app:app`.

`up` is idempotent and fast when everything already runs; `down` stops only what `up` started. Both services bind
127.0.0.1 only and PostgreSQL asks a password (scram-sha-256) on every connection. The password comes from
`settings.pg_password()` and never appears on a command line or in a log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from infra import processes
from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.settings import Settings

log = logging.getLogger(__name__)

PG_USER = "cropflow"
PG_DATABASE = "pgstac"
APP = "stac_fastapi.pgstac.app:app"
API_EXTENSIONS = "query,sort,fields,filter,pagination,collection_search,free_text"
STARTUP_TIMEOUT_S = 60.0
SETUP_HINT = "'make setup' installs it (as root)"


# ---------------------------------------------------------------------------------------------------------------------
# paths and small helpers


def _pgdata(settings: Settings) -> Path:
    return settings.stac_dir / "pgdata"


def _socket_dir(settings: Settings) -> Path:
    return settings.stac_dir / "run"


def _pg_log(settings: Settings) -> Path:
    return settings.stac_dir / "postgresql.log"


def _api_log(settings: Settings) -> Path:
    return settings.stac_dir / "stac-api.log"


def _api_pid_file(settings: Settings) -> Path:
    return settings.stac_dir / "stac-api.pid"


def _as_root() -> bool:
    return os.geteuid() == 0


def _scrub(text: str, settings: Settings) -> str:
    """`text` with the password blanked, for messages that quote logs or driver errors."""
    return processes.blank(text, [settings.pg_password()])


def _tail(path: Path, settings: Settings, start: int = 0) -> str:
    return processes.log_tail(path, [settings.pg_password()], start)


def _conninfo(settings: Settings, dbname: str = PG_DATABASE) -> str:
    """libpq connection string over TCP 127.0.0.1; it holds the password, so it is never logged or put in argv."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(
        host="127.0.0.1",
        port=settings.pg_port,
        user=PG_USER,
        dbname=dbname,
        password=settings.pg_password(),
        connect_timeout=10,
        application_name="cropflow",
    )


@contextlib.contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    """Serialise `up`/`down` of one installation across processes."""
    settings.stac_dir.mkdir(parents=True, exist_ok=True)
    with (settings.stac_dir / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL binaries, running them as the right user


def _major(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def _pg_bindir(settings: Settings) -> tuple[Path, int]:
    """The PostgreSQL server binaries to use: those of the cluster's version if it exists, else the newest."""
    needed = ("initdb", "pg_ctl", "postgres", "pg_isready")
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).resolve().parent)
    candidates = [c for c in candidates if all((c / n).is_file() for n in needed)]
    want = None
    version_file = _pgdata(settings) / "PG_VERSION"
    with contextlib.suppress(OSError, ValueError):
        want = int(version_file.read_text().strip())
    for bindir in candidates:
        major = _major(bindir)
        if major is not None and (want is None or major == want):
            return bindir, major
    if want is not None:
        raise CropflowError(
            f"the STAC database in {_pgdata(settings)} was made by PostgreSQL {want}, whose server binaries are not "
            f"installed; install the Debian package postgresql-{want}, or remove {settings.stac_dir} to start afresh "
            "(its catalog is rebuilt by loading the regions again)."
        )
    raise CropflowError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found in /usr/lib/postgresql/*/bin or on "
        f"PATH; install the Debian packages postgresql-15 and postgresql-15-postgis-3 ({SETUP_HINT})."
    )


def _check_postgis(bindir: Path, major: int) -> None:
    sharedir = Path(f"/usr/share/postgresql/{major}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if out:
            sharedir = Path(out)
    if not (sharedir / "extension" / "postgis.control").is_file():
        raise CropflowError(
            f"PostGIS is not installed for PostgreSQL {major} (no {sharedir}/extension/postgis.control), and pgstac "
            f"needs it; install the Debian package postgresql-{major}-postgis-3 ({SETUP_HINT})."
        )


def _as_pg_user(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` system user when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if _as_root() else cmd


def _pg_owner() -> tuple[int, int] | None:
    """(uid, gid) that must own the cluster files: `postgres` when root, else None (the current user)."""
    if not _as_root():
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise CropflowError(
            "cropflow runs as root but there is no 'postgres' system user to run PostgreSQL as; install the Debian "
            f"package postgresql-15 ({SETUP_HINT}) or run cropflow as a normal user."
        ) from None
    if shutil.which("runuser") is None:
        raise CropflowError("cropflow runs as root but 'runuser' (Debian package util-linux) is missing; install it.")
    return entry.pw_uid, entry.pw_gid


def _run_pg(cmd: list[str], settings: Settings, timeout: float, what: str) -> None:
    """Run a PostgreSQL tool (as `postgres` when root); raise a `CropflowError` naming the log on failure."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                _as_pg_user(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd="/",
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CropflowError(
                f"{what} did not finish within {timeout:.0f} s; see the PostgreSQL log {_pg_log(settings)}."
            ) from None
        if proc.returncode != 0:
            out.seek(0)
            output = _scrub(out.read().decode(errors="replace").strip(), settings)
            log_tail = _tail(_pg_log(settings), settings)
            raise CropflowError(
                f"{what} failed (exit {proc.returncode}): {output}\n"
                f"See the PostgreSQL log {_pg_log(settings)}" + (f"; its end:\n{log_tail}" if log_tail else ".")
            )


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL cluster


def _postmaster(settings: Settings) -> tuple[int, int] | None:
    """(pid, port) of our running postmaster, from `pgdata/postmaster.pid`; None if it does not run."""
    try:
        lines = (_pgdata(settings) / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    if not processes.pid_alive(pid) or str(_pgdata(settings)) not in processes.cmdline(pid):
        return None  # stale pid file, or the pid now belongs to another process
    return pid, port


def _pg_conf(settings: Settings) -> str:
    def quote(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    return (
        "# Written by cropflow (infra/stac_api.py) at every start; edit postgresql.conf instead.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {settings.pg_port}\n"
        f"unix_socket_directories = {quote(str(_socket_dir(settings)))}\n"
        "unix_socket_permissions = 0700\n"
        "password_encryption = 'scram-sha-256'\n"
        "max_connections = 50\n"
        "synchronous_commit = off\n"
        "log_timezone = 'UTC'\n"
        "timezone = 'UTC'\n"
    )


def _prepare_dirs(settings: Settings, owner: tuple[int, int] | None) -> None:
    """Create the socket dir and PostgreSQL log, owned by whoever runs PostgreSQL; check it can reach them."""
    stac = settings.stac_dir
    stac.mkdir(parents=True, exist_ok=True)
    sock = _socket_dir(settings)
    if len(str(sock)) + len("/.s.PGSQL.65535") > 100:
        raise CropflowError(
            f"the PostgreSQL socket path under {sock} is longer than unix sockets allow (~100 characters); set "
            "CROPFLOW_HOME to a shorter folder."
        )
    sock.mkdir(mode=0o700, exist_ok=True)
    _pg_log(settings).touch(mode=0o600, exist_ok=True)
    if owner is not None:
        stac.chmod(stac.stat().st_mode | 0o711)  # postgres must traverse it; .pgpass stays 0600
        for path in (sock, _pg_log(settings)):
            os.chown(path, *owner)
        reach = subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-w", str(sock)], cwd="/", capture_output=True, check=False
        )
        if reach.returncode != 0:
            raise CropflowError(
                f"PostgreSQL runs as the 'postgres' user, which cannot reach {stac} (a parent folder is not "
                "traversable by other users); set CROPFLOW_HOME to a folder outside private home directories "
                "(e.g. /var/lib/cropflow) or make its parent folders traversable (chmod o+x)."
            )


def _initdb(settings: Settings, bindir: Path, owner: tuple[int, int] | None) -> None:
    """Create the cluster in a scratch dir, then rename it to `pgdata`, so that a failure leaves nothing half-made."""
    pgdata = _pgdata(settings)
    scratch = pgdata.with_name("pgdata.initdb-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    fd, pwfile = tempfile.mkstemp(prefix=".pw-", dir=_socket_dir(settings))  # mode 0600, in a 0700 dir
    try:
        with os.fdopen(fd, "w") as f:
            f.write(settings.pg_password() + "\n")
        if owner is not None:
            os.chown(scratch, *owner)
            os.chown(pwfile, *owner)
        log.info("creating the PostgreSQL cluster in %s", pgdata)
        _run_pg(
            [
                str(bindir / "initdb"),
                "-D",
                str(scratch),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ],
            settings,
            timeout=120,
            what="initdb (creating the PostgreSQL cluster)",
        )
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        Path(pwfile).unlink(missing_ok=True)
    with (scratch / "postgresql.conf").open("a") as f:
        f.write("\n# cropflow: listen address, port and socket directory\ninclude_if_exists = 'cropflow.conf'\n")
    scratch.rename(pgdata)


def _wait_pg_ready(settings: Settings, bindir: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(settings.pg_port), "-t", "2"],
            capture_output=True,
            check=False,
        )
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise CropflowError(
                f"PostgreSQL does not accept connections on 127.0.0.1:{settings.pg_port} after {timeout:.0f} s; see "
                f"its log {_pg_log(settings)}:\n{_tail(_pg_log(settings), settings)}"
            )
        time.sleep(0.2)


def _stop_pg(settings: Settings) -> None:
    running = _postmaster(settings)
    if running is None:
        return
    pid = running[0]
    log.info("stopping PostgreSQL (pid %d)", pid)
    try:
        bindir, _ = _pg_bindir(settings)
        _run_pg(
            [str(bindir / "pg_ctl"), "stop", "-D", str(_pgdata(settings)), "-m", "fast", "-w", "-t", "60"],
            settings,
            timeout=90,
            what="pg_ctl stop",
        )
    except CropflowError as exc:  # binaries gone or stop refused: signal the postmaster ourselves
        log.warning("pg_ctl stop failed (%s); signalling the postmaster", exc)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        if not processes.wait_gone(pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            processes.wait_gone(pid, 10)


def _start_pg(settings: Settings, bindir: Path) -> None:
    pgdata = _pgdata(settings)
    conf = pgdata / "cropflow.conf"
    conf.write_text(_pg_conf(settings))
    owner = _pg_owner()
    if owner is not None:
        os.chown(conf, *owner)
    log.info("starting PostgreSQL on 127.0.0.1:%d", settings.pg_port)
    _run_pg(
        [str(bindir / "pg_ctl"), "start", "-D", str(pgdata), "-l", str(_pg_log(settings)), "-w", "-t", "60"],
        settings,
        timeout=90,
        what="starting PostgreSQL (pg_ctl start)",
    )


def _ensure_database(settings: Settings) -> None:
    """Create database `pgstac` if missing and migrate it to this pypgstac's pgstac version."""
    import psycopg
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    try:
        with psycopg.connect(_conninfo(settings, "postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {PG_DATABASE}")
    except psycopg.Error as exc:
        raise CropflowError(
            f"cannot prepare database {PG_DATABASE!r} on 127.0.0.1:{settings.pg_port}: {_scrub(str(exc), settings)} "
            f"(if CROPFLOW_PG_PASSWORD changed since the cluster was created, set it back); "
            f"PostgreSQL log: {_pg_log(settings)}"
        ) from None
    db = PgstacDB(dsn=_conninfo(settings))
    try:
        version = Migrate(db).run_migration()
    except Exception as exc:
        raise CropflowError(
            f"pypgstac migrate failed: {_scrub(str(exc), settings)}; PostgreSQL log: {_pg_log(settings)}"
        ) from None
    finally:
        _close_db(db)
    log.info("pgstac schema at version %s", version)


def _close_db(db: object) -> None:
    pool = getattr(db, "pool", None)
    with contextlib.suppress(Exception):
        db.disconnect()  # type: ignore[attr-defined]
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.close()


# ---------------------------------------------------------------------------------------------------------------------
# the API process


def _api_pid(settings: Settings) -> int | None:
    """Pid of our running API process (from the pid file, checked against its command line); None otherwise."""
    try:
        pid = int(_api_pid_file(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    if not processes.pid_alive(pid):
        return None
    cmd = processes.cmdline(pid)
    if APP not in cmd:
        return None  # the pid was reused by something else
    return pid


def _api_healthy(settings: Settings) -> bool:
    try:
        with processes.local_client(2.0) as client:
            return client.get(f"{settings.stac_url}/_mgmt/health").status_code == 200
    except httpx.HTTPError:
        return False


def _stop_api(settings: Settings) -> None:
    pid = _api_pid(settings)
    if pid is not None:
        log.info("stopping the STAC API (pid %d)", pid)
        # start_new_session made it a process-group leader: signal the group (uvicorn and any worker it forked)
        processes.stop(pid, grace=15)
    _api_pid_file(settings).unlink(missing_ok=True)


def _start_api(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_"))}
    env.update(
        PGUSER=PG_USER,
        PGPASSWORD=settings.pg_password(),
        PGHOST="127.0.0.1",
        PGPORT=str(settings.pg_port),
        PGDATABASE=PG_DATABASE,
        ENABLED_EXTENSIONS=API_EXTENSIONS,
        ENABLE_TRANSACTIONS_EXTENSIONS="false",
        DB_MIN_CONN_SIZE="1",
        DB_MAX_CONN_SIZE="4",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        APP,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.stac_port),
        "--workers",
        "1",
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "info",
    ]
    log_path = _api_log(settings)
    with log_path.open("ab") as out:
        offset = out.tell()
        out.write(f"--- cropflow: starting the STAC API on {settings.stac_url} at {time.ctime()}\n".encode())
        out.flush()
        proc = subprocess.Popen(  # password only in env (readable by the owner alone), never in argv
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=settings.stac_dir,
            start_new_session=True,
            close_fds=True,
        )
    processes.track(proc)
    with atomic_path(_api_pid_file(settings)) as tmp:
        tmp.write_text(f"{proc.pid}\n")
    log.info("starting the STAC API on %s (pid %d, log %s)", settings.stac_url, proc.pid, log_path)

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _api_healthy(settings):
        if proc.poll() is not None:
            _api_pid_file(settings).unlink(missing_ok=True)
            raise CropflowError(
                f"the STAC API exited during startup (status {proc.returncode}); see its log {log_path}:\n"
                f"{_tail(log_path, settings, offset)}"
            )
        if time.monotonic() > deadline:
            _stop_api(settings)
            raise CropflowError(
                f"the STAC API did not become healthy at {settings.stac_url}/_mgmt/health within "
                f"{STARTUP_TIMEOUT_S:.0f} s; see its log {log_path}:\n{_tail(log_path, settings, offset)}"
            )
        time.sleep(0.2)


def _check_filter(settings: Settings) -> None:
    """The API must advertise CQL2 filtering and answer a cql2-json cloud-cover search."""
    with processes.local_client(10.0) as client:
        conforms = client.get(f"{settings.stac_url}/").json().get("conformsTo", [])
        wanted = ("item-search#filter", "cql2/1.0/conf/cql2-json", "cql2/1.0/conf/basic-cql2")
        missing = [w for w in wanted if not any(c.endswith(w) or w in c for c in conforms)]
        response = client.post(
            f"{settings.stac_url}/search",
            json={
                "filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 50]},
                "filter-lang": "cql2-json",
                "limit": 1,
            },
        )
    if missing or response.status_code != 200:
        raise CropflowError(
            f"the STAC API at {settings.stac_url} does not support CQL2 filters (missing conformance {missing}, "
            f"filtered search answered HTTP {response.status_code}); see its log {_api_log(settings)}."
        )


# ---------------------------------------------------------------------------------------------------------------------
# public API


def up(settings: Settings) -> None:
    """Start PostgreSQL (creating the cluster and pgstac schema if missing) and the STAC API; wait until they answer.

    Idempotent: returns at once when both already run and are healthy. Raises `CropflowError` when a port is taken
    by another program, PostgreSQL or PostGIS is missing, or a service fails to start (naming its log file).
    """
    with _lock(settings):
        pg = _postmaster(settings)
        api = _api_pid(settings)
        if (
            pg is not None
            and pg[1] == settings.pg_port
            and api is not None
            and processes.port_argument(api) == settings.stac_port
            and _api_healthy(settings)
        ):
            return

        # a service of ours on another port than asked (settings changed): stop it, then start it afresh
        if pg is not None and pg[1] != settings.pg_port:
            _stop_api(settings)
            _stop_pg(settings)
            pg = None
        if api is not None and processes.port_argument(api) != settings.stac_port:
            _stop_api(settings)
            api = None
        if pg is None:
            processes.check_port(settings.pg_port, "PostgreSQL of the local STAC API", "CROPFLOW_PG_PORT")
        if api is None:
            processes.check_port(settings.stac_port, "the local STAC API", "CROPFLOW_STAC_PORT")

        bindir, major = _pg_bindir(settings)
        _check_postgis(bindir, major)
        settings.pg_password()  # generated and stored once, before anything uses it
        owner = _pg_owner()
        _prepare_dirs(settings, owner)
        if pg is None:
            if not (_pgdata(settings) / "PG_VERSION").is_file():
                _initdb(settings, bindir, owner)
            _stop_api(settings)  # its connections went with the old server
            api = None
            _start_pg(settings, bindir)
        _wait_pg_ready(settings, bindir)
        _ensure_database(settings)

        if api is not None:  # running but unhealthy
            _stop_api(settings)
        _start_api(settings)
        _check_filter(settings)
        log.info("STAC API ready at %s", settings.stac_url)


def down(settings: Settings) -> None:
    """Stop the STAC API and PostgreSQL started by `up` for these settings (only those); idempotent."""
    if not settings.stac_dir.is_dir():
        return
    with _lock(settings):
        _stop_api(settings)
        _stop_pg(settings)


def status(settings: Settings) -> dict:
    """`{"postgres": bool, "api": bool, "url": str, "collections": [ids]}`; never raises because nothing runs."""
    postgres = False
    pg = _postmaster(settings) if settings.stac_dir.is_dir() else None
    if pg is not None and pg[1] == settings.pg_port:
        with contextlib.suppress(CropflowError, OSError, subprocess.SubprocessError):
            bindir, _ = _pg_bindir(settings)
            postgres = (
                subprocess.run(
                    [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(settings.pg_port), "-t", "2"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                ).returncode
                == 0
            )
    api = settings.stac_dir.is_dir() and _api_pid(settings) is not None and _api_healthy(settings)
    collections: list[str] = []
    if api:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError), processes.local_client() as client:
            body = client.get(f"{settings.stac_url}/collections", params={"limit": 1000}).json()
            collections = sorted(c["id"] for c in body.get("collections", []))
    return {"postgres": postgres, "api": api, "url": settings.stac_url, "collections": collections}


def read_items(path: Path) -> list[dict]:
    """The STAC items of an `.ndjson` file (one per line), each checked to be a Feature with a collection."""
    items = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CropflowError(f"{path}:{number} is not valid JSON ({exc.msg}); regenerate the region.") from None
            if not isinstance(item, dict) or item.get("type") != "Feature" or not item.get("collection"):
                raise CropflowError(f"{path}:{number} is not a STAC item with a 'collection'; regenerate the region.")
            items.append(item)
    return items


def load(settings: Settings, region_dir: Path) -> dict[str, int]:
    """Upsert `region_dir/collections/*.json` then `region_dir/items/*.ndjson` into pgstac; items per collection.

    Loading the same folder again replaces the same records (no duplicates). Needs PostgreSQL running (`up`).
    """
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods

    region_dir = Path(region_dir)
    collection_files = sorted((region_dir / "collections").glob("*.json"))
    item_files = sorted((region_dir / "items").glob("*.ndjson"))
    if not collection_files and not item_files:
        raise CropflowError(
            f"{region_dir} has no collections/*.json nor items/*.ndjson; give a region folder written by "
            "'cropflow sample'."
        )
    collections = []
    for path in collection_files:
        try:
            collection = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CropflowError(f"cannot read STAC collection {path}: {exc}") from None
        if not isinstance(collection, dict) or collection.get("type") != "Collection" or not collection.get("id"):
            raise CropflowError(f"{path} is not a STAC collection (needs 'type': 'Collection' and an 'id').")
        collections.append(collection)
    items = [item for path in item_files for item in read_items(path)]
    counts: dict[str, int] = {c["id"]: 0 for c in collections}
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (item["collection"], str(item.get("id")))
        if key not in seen:
            seen.add(key)
            counts[item["collection"]] = counts.get(item["collection"], 0) + 1

    pg = _postmaster(settings) if settings.stac_dir.is_dir() else None
    if pg is None or pg[1] != settings.pg_port:
        raise CropflowError(
            f"the local STAC database is not running (PostgreSQL on 127.0.0.1:{settings.pg_port}); start it with "
            "'cropflow stac up'."
        )
    db = PgstacDB(dsn=_conninfo(settings))
    try:
        loader = Loader(db=db)
        if collections:
            loader.load_collections(iter(collections), insert_mode=Methods.upsert)
        if items:
            loader.load_items(iter(items), insert_mode=Methods.upsert)
    except CropflowError:
        raise
    except Exception as exc:
        raise CropflowError(f"loading {region_dir} into pgstac failed: {_scrub(str(exc), settings)}") from None
    finally:
        _close_db(db)
    log.info("loaded %s from %s", ", ".join(f"{n} {c}" for c, n in counts.items()), region_dir)
    return counts
