"""What the benchmarks share: their cache folder option, comma-separated options and peak memory."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Annotated

import typer

from infra.settings import get_settings

CacheOption = Annotated[
    Path | None, typer.Option(help="folder of generated regions and cubes (default CROPFLOW_HOME/bench)")
]


def bench_cache(cache: Path | None) -> Path:
    """The benchmarks' folder of generated regions and cubes (created): `cache`, else `CROPFLOW_HOME/bench`."""
    folder = cache or get_settings().home / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def listed(text: str) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def max_rss_mb() -> float:
    """This process's peak resident set size in MB (`ru_maxrss` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
