"""What the benchmarks share: their cache folder option, markdown tables, peak memory, child processes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
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


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines (then an empty line)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]


def max_rss_mb() -> float:
    """This process's peak resident set size in MB (`ru_maxrss` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ChildFailed(Exception):
    """A benchmark's child interpreter failed; the message is the last line of its stderr (or how it ended)."""


def run_child(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `python -m module *args` in a fresh interpreter (its peak memory is its own) and return the JSON object
    it prints last; `env` is added to this process's environment. Raises `ChildFailed` when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    if proc.returncode != 0:
        ended = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise ChildFailed((proc.stderr.strip().splitlines() or [ended])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])
