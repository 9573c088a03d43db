"""Retry policy for requests to services (STAC APIs, object stores): retry what can succeed on retry, never a user's
mistake. One predicate (`is_retryable`) and one backoff (`HttpRetry`) for every caller."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from urllib3 import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# HTTP statuses worth another try: too many requests, and server-side errors.
RETRY_STATUSES = frozenset({429, *range(500, 600)})
# `OSError` numbers of failures that can go away: a refused, reset or unreachable connection, a timeout, a busy server
# (s3fs turns S3's 503 SlowDown/ServiceUnavailable into EBUSY, 500 InternalError into EREMOTEIO). Not among them: no
# such file, permission denied, read-only, no space or quota left, file too large: the same call would fail again.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EREMOTEIO,
    }
)


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

    def delay(self, retry: int) -> float:
        """Seconds to wait before the `retry`-th retry (from 1), as urllib3 waits (see the class docstring)."""
        if retry <= 1:
            return 0.0
        return min(self.backoff_max, self.backoff * 2 ** (retry - 1) + random.uniform(0, self.jitter))

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, called again after `delay(n)` while it fails with an error that `is_retryable`, at most `retries`
        times (each logged as a warning naming `what`); the last error is raised."""
        retry = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                retry += 1
                if retry > self.retries or not is_retryable(exc):
                    raise
                wait = self.delay(retry)
                log.warning("%s failed (%s); retry %d of %d in %.1f s", what, exc, retry, self.retries, wait)
                time.sleep(wait)


# object-store requests (uploads, publishing): the store may be unreachable for a while (about 2 minutes of retries)
STORE_RETRY = HttpRetry(retries=8, backoff=1.0, backoff_max=30.0)


def is_retryable(exc: BaseException) -> bool:
    """True for errors that can go away on their own: HTTP 429 and 5xx, timeouts, refused or dropped connections
    (builtin, httpx, requests and botocore ones), and `OSError`s numbered in `TRANSIENT_ERRNOS`; else the error that
    caused `exc` (`raise ... from`) decides, as when s3fs turns a botocore `ClientError` into an `OSError`.

    A `CropflowError` (a bad parameter, missing data, retries already spent) and every other error are final:
    HTTP 4xx (403, 404, ...), missing files, permissions, a full disk.
    """
    import httpx
    import requests
    from botocore import exceptions as boto

    from infra.errors import CropflowError

    if isinstance(exc, CropflowError):
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    if status is not None:
        return status in RETRY_STATUSES
    transient = (
        TimeoutError,
        ConnectionError,
        httpx.TimeoutException,
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        requests.ConnectionError,
        requests.Timeout,
        boto.ConnectionError,
        boto.HTTPClientError,
    )
    if isinstance(exc, transient) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS):
        return True
    return exc.__cause__ is not None and is_retryable(exc.__cause__)


def retry_condition(task: object, task_run: object, state: object) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its exception `is_retryable`."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_retryable(exc)
