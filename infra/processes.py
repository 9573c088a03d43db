"""The local services' processes (the STAC API and its PostgreSQL, the Prefect server): whether a pid is alive and
what it runs, free ports, signals to a process group, log tails with secrets blanked, HTTP to 127.0.0.1."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from infra.errors import CropflowError

SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|(^|_)KEY($|_)|ACCESS_KEY|CONNECTION_STRING", re.IGNORECASE)
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this interpreter, so that they get reaped


def track(proc: subprocess.Popen) -> None:
    """Remember a service process started here: `pid_alive` polls it, so an exited child is reaped, not a zombie."""
    _CHILDREN[proc.pid] = proc


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (not a zombie)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` (empty when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def port_argument(pid: int) -> int | None:
    """The value of `--port` on `pid`'s command line, if any."""
    cmd = cmdline(pid)
    with contextlib.suppress(ValueError, IndexError):
        return int(cmd[cmd.index("--port") + 1])
    return None


def port_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:`port` (as PostgreSQL and uvicorn do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_port(port: int, what: str, env: str) -> None:
    """Refuse to start `what` on a port another program holds, naming the variable `env` that moves it."""
    if not port_free(port):
        raise CropflowError(
            f"port {port} on 127.0.0.1, wanted for {what}, is already in use by another program; stop that program "
            f"or choose a free port with the environment variable {env} (e.g. {env}={port + 1})."
        )


def local_client(timeout: float = 5.0) -> httpx.Client:
    """An HTTP client for the local services: never through a proxy (they are on 127.0.0.1)."""
    return httpx.Client(timeout=timeout, trust_env=False)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit; False if it still runs."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def signal_group(pid: int, sig: int) -> None:
    """Signal `pid`'s process group if it leads one (as `start_new_session` made it), else `pid` alone."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop(pid: int, grace: float) -> None:
    """SIGTERM `pid`'s group, SIGKILL it if it has not exited after `grace` seconds."""
    signal_group(pid, signal.SIGTERM)
    if not wait_gone(pid, grace):
        signal_group(pid, signal.SIGKILL)
        wait_gone(pid, 5)
    _CHILDREN.pop(pid, None)


def env_secrets() -> list[str]:
    """Values of this process's environment variables whose names say they are secret (passwords, keys, tokens)."""
    return [value for name, value in os.environ.items() if value and SECRET_NAMES.search(name)]


def blank(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets` and the environment's secrets replaced by `***`, for messages that quote logs or
    driver errors."""
    for secret in sorted({*secrets, *env_secrets()}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def log_tail(path: Path, secrets: Iterable[str] = (), start: int = 0, lines: int = 15) -> str:
    """The last `lines` lines of `path` from byte `start`, secrets blanked ("" if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return blank("\n".join(text.strip().splitlines()[-lines:]), secrets)
