"""Retry policy for HTTP requests: retry what can succeed on retry, never a user's mistake."""

from __future__ import annotations

from dataclasses import dataclass

from urllib3 import Retry

# HTTP statuses worth another try: too many requests, and server-side errors.
RETRY_STATUSES = frozenset({429, *range(500, 600)})


@dataclass(frozen=True)
class HttpRetry:
    """Retries of HTTP requests on 429, 5xx, timeouts and dropped connections, with exponential backoff and jitter.

    The first retry goes at once, the n-th after `backoff * 2**(n-1)` seconds plus up to `jitter` random seconds
    (at most `backoff_max`), or after what a `Retry-After` header asks. `timeout` bounds connecting and each wait
    for response bytes.
    """

    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 1.0
    timeout: float = 60.0

    def urllib3(self) -> Retry:
        """The policy as a urllib3 `Retry` (for `requests` adapters, e.g. pystac-client's `StacApiIO`)."""
        return Retry(
            total=self.retries,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # STAC searches are POSTs that only read
            backoff_factor=self.backoff,
            backoff_max=self.backoff_max,
            backoff_jitter=self.jitter,
            raise_on_status=False,  # the last response comes back, so its status and body reach the error message
        )


def is_retryable(exc: BaseException) -> bool:
    """True for errors that can go away on their own: timeouts, dropped connections, HTTP 429 and 5xx.

    A `CropflowError` (a bad parameter, missing data) and every other error are final: retrying cannot fix them.
    """
    import httpx
    import requests

    from infra.errors import CropflowError

    if isinstance(exc, CropflowError):
        return False
    if isinstance(exc, TimeoutError | ConnectionError | httpx.TransportError):
        return True
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    return status in RETRY_STATUSES


def retry_condition(task: object, task_run: object, state: object) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its exception `is_retryable`."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_retryable(exc)
