"""Where cropflow keeps its working data and how it reaches its local services.

Everything comes from the environment so that schedules, CI and laptops can differ without code changes.
Secrets (the PostgreSQL password) are read from the environment or a 0600 file and never logged.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from infra.errors import CropflowError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """Paths and ports of one cropflow installation."""

    home: Path
    stac_port: int
    pg_port: int
    prefect_port: int = 4200

    @property
    def stac_dir(self) -> Path:
        return self.home / "stac"

    @property
    def regions_dir(self) -> Path:
        return self.home / "regions"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def stac_url(self) -> str:
        return f"http://127.0.0.1:{self.stac_port}"

    def pg_password(self) -> str:
        """The PostgreSQL password: `CROPFLOW_PG_PASSWORD`, else one generated once and kept in a 0600 file."""
        env = os.environ.get("CROPFLOW_PG_PASSWORD")
        if env:
            return env
        path = self.stac_dir / ".pgpass"
        if path.exists():
            return path.read_text().strip()
        self.stac_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
        return password


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        port = int(raw)
    except ValueError:
        raise CropflowError(f"{name}={raw!r} is not a port number; set it to an integer from 1024 to 65535.") from None
    if not 1024 <= port <= 65535:
        raise CropflowError(f"{name}={port} is out of range; set it to an integer from 1024 to 65535.")
    return port


def home_dir() -> Path:
    """`CROPFLOW_HOME` (default `./.cropflow`), absolute."""
    return Path(os.environ.get("CROPFLOW_HOME", Path.cwd() / ".cropflow")).expanduser().resolve()


def get_settings() -> Settings:
    """Settings from the environment (`CROPFLOW_HOME`, `CROPFLOW_STAC_PORT`, `CROPFLOW_PG_PORT`,
    `CROPFLOW_PREFECT_PORT`)."""
    return Settings(
        home=home_dir(),
        stac_port=_port("CROPFLOW_STAC_PORT", 8082),
        pg_port=_port("CROPFLOW_PG_PORT", 5439),
        prefect_port=_port("CROPFLOW_PREFECT_PORT", 4200),
    )


def real_data_dir() -> Path | None:
    """The real-data folder (`CROPFLOW_REAL_DATA`, else `../shared/data` beside the repository), if present."""
    env = os.environ.get("CROPFLOW_REAL_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None
