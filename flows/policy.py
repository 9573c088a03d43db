"""How the flows run their steps: caching, retries and the names of the concurrency limits they use.

Caching: a task whose inputs did not change is not run again, in this process or the next.

Each cached step gets a key from what its result depends on: the region and season, a fingerprint of the query
(catalog, bbox, sensors, cloud filter and the ids of the items found, so a new acquisition makes a new cube), the
code version (a digest of the science code in `tasks/` and `models/`) and, after the cube, the model version (its
name, settings and training budget). Results are persisted under `$CROPFLOW_HOME/prefect-results`, one file per
key, so a second run of a flow or a backfill resumed after a crash recomputes nothing that finished; a step whose
outputs were deleted since, or rewritten under another key (a stamp beside them says which), is run again.

Retries: only errors that can go away (timeouts, dropped connections, HTTP 429/5xx; `infra.retry.is_retryable`),
with exponential backoff and jitter; a `CropflowError` (bad parameter, missing data) fails at once.

Concurrency (created on the server by `cropflow deploy`, no-ops without them): the tag `gpu` (training and inference
tasks) is limited to the number of GPUs; `catalog-requests` is a rate limit taken before each catalog search.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from prefect import Task, get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from prefect.filesystems import LocalFileSystem
from prefect.settings import PREFECT_API_URL
from prefect.tasks import exponential_backoff

from flows.params import Run
from infra.atomic import atomic_path
from infra.retry import retry_condition
from infra.settings import REPO_ROOT, home_dir
from infra.storage import location

CATALOG_RATE_LIMIT = "catalog-requests"
GPU_TAG = "gpu"
RETRIES = 3
RETRY_BACKOFF_S = 10.0  # the n-th retry waits 10 * 2**(n-1) s, +-50 % jitter
RETRY_JITTER = 0.5


def digest(value: Any) -> str:
    """A short stable digest of JSON-able `value` (dates and paths as strings, dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def code_version() -> str:
    """A digest of the science code (`tasks/`, `models/`): a change there invalidates every cached result."""
    h = hashlib.sha256()
    for folder in ("tasks", "models"):
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".json") and path.is_file():
                h.update(path.relative_to(REPO_ROOT).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def results_dir() -> Path:
    """Where persisted task results live: `$CROPFLOW_HOME/prefect-results`."""
    return home_dir() / "prefect-results"


@cache
def _saved_storage(api_url: str | None, basepath: str) -> LocalFileSystem:
    block = LocalFileSystem(basepath=basepath)
    block.save(f"cropflow-results-{digest(basepath)[:8]}", overwrite=True)  # Prefect wants result storage saved
    return block


def result_storage() -> LocalFileSystem:
    """The result storage of cached tasks (`results_dir()`), saved once per Prefect API as a block."""
    return _saved_storage(PREFECT_API_URL.value(), str(results_dir()))


def step_key(step: str, run: Run, **depends_on: Any) -> str:
    """The cache key of `step` in one run folder: readable, then a digest of the folder, the code version and
    everything else the step depends on."""
    everything = {**depends_on, "out": run.out, "code": code_version()}
    return f"{step}-{run.region.name}-{run.season}-{digest(everything)}"


def on_server(read: Callable[[SyncPrefectClient], object]) -> bool:
    """Whether `read(client)` finds what it reads on the Prefect API (a deployment, a limit...)."""
    with get_client(sync_client=True) as client:
        try:
            read(client)
        except ObjectNotFound:
            return False
    return True


def limit_exists(name: str) -> bool:
    """Whether the Prefect server has the global concurrency limit `name` (`cropflow deploy` creates them)."""
    return on_server(lambda client: client.read_global_concurrency_limit_by_name(name))


def retrying(task: Task, backoff_s: float = RETRY_BACKOFF_S) -> Task:
    """`task` retried on transient errors only (`infra.retry.is_retryable`), with exponential backoff from
    `backoff_s` and jitter."""
    return task.with_options(
        retries=RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_s),
        retry_jitter_factor=RETRY_JITTER,
        retry_condition_fn=retry_condition,
    )


def _stamp(outputs: list[Path]) -> Path:
    """Where the key a step's outputs were last written under is kept: `.<first output>.cache-key` beside it."""
    first = location(outputs[0])
    return first.with_name(f".{first.name}.cache-key")


def cached(task: Task, key: str, outputs: list[Path]) -> Callable[..., Any]:
    """`task` (retrying) with a persisted result under `key`; recomputed when one of its `outputs` is missing or was
    last written under another key (the run folder rebuilt with other options since, e.g. a cloud mask switched to
    another and back), which a stamp beside the outputs records once the task has finished."""
    stamp = _stamp(outputs)
    current = all(location(p).exists() for p in outputs) and stamp.exists() and stamp.read_text() == key
    runnable = retrying(task).with_options(
        cache_key_fn=lambda *_: key,
        persist_result=True,
        result_storage=result_storage(),
        refresh_cache=not current,
    )

    def run(*args: Any, **kwargs: Any) -> Any:
        if not current and stamp.exists():
            stamp.unlink()  # the outputs are about to change: no stamp until they match `key`
        result = runnable(*args, **kwargs)
        if not current:
            with atomic_path(stamp) as tmp:
                tmp.write_text(key)
        return result

    return run
