"""Prefect flows of cropflow and its command line.

Importing this package sets privacy defaults for Prefect (no telemetry) before Prefect is imported, and, unless
PREFECT_HOME or PREFECT_API_URL are set, points Prefect at the local server of `cropflow server up` while it runs.
"""

import os

from infra.prefect_server import running_state
from infra.settings import home_dir

if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ and (state := running_state(home_dir())):
    os.environ["PREFECT_API_URL"] = state["url"]

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the ephemeral API server starts in a subprocess; on a busy 2-core machine it needs more than the default 20 s
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_HOME", str(home_dir() / "prefect"))
# Prefect creates only the last folder of its home: make the whole path, or its database cannot be opened
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)

from infra.runs import send_logs_to_prefect  # noqa: E402 (Prefect is imported here, after the defaults above)

send_logs_to_prefect()
