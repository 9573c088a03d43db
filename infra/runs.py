"""Where code runs: inside a Prefect flow or task run (artifacts and run loggers exist) or not."""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

# cropflow's own loggers (`logging.getLogger(__name__)` in its packages)
CROPFLOW_LOGGERS = ("flows", "tasks", "infra", "models")


def in_prefect_run() -> bool:
    """True inside a Prefect flow run or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class _InRun(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return in_prefect_run()


def send_logs_to_prefect() -> None:
    """Send what cropflow's own loggers record inside a run (e.g. the cube's unreadable assets and clipped values)
    to the Prefect API too, so that the run's logs in the UI show it; outside a run, and always, records still go
    to the console. Prefect's `PREFECT_LOGGING_EXTRA_LOGGERS` would do it only where it is set before Prefect is
    imported, which a work pool's flow-run process does not guarantee. Idempotent."""
    for name in CROPFLOW_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_InRun())
            logger.addHandler(handler)
