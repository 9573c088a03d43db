"""Where code runs: inside a Prefect flow or task run (artifacts and run loggers exist) or not."""

from __future__ import annotations

from prefect.context import FlowRunContext, TaskRunContext


def in_prefect_run() -> bool:
    """True inside a Prefect flow run or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
