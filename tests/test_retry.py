"""One predicate (`is_retryable`) and one backoff (`HttpRetry`) for every retried request: STAC APIs, object stores."""

from __future__ import annotations

import errno
import logging

import httpx
import pytest
import requests
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from infra.errors import CropflowError
from infra.retry import HttpRetry, is_retryable


def _http(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:8082/search")
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=httpx.Response(status, request=request))


def _boto(status: int, code: str) -> ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "CopyObject")


def _s3(status: int, code: str) -> BaseException:
    """What s3fs raises for an S3 error response: botocore's `ClientError`, translated (mostly into an `OSError`)."""
    return translate_boto_error(_boto(status, code))


def _caused_by(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as raised:
        return raised


CASES = [
    ("HTTP 429 too many requests", _http(429), True),
    ("HTTP 500", _http(500), True),
    ("HTTP 503", _http(503), True),
    ("HTTP 400", _http(400), False),
    ("HTTP 403", _http(403), False),
    ("HTTP 404", _http(404), False),
    ("S3 503 SlowDown", _s3(503, "SlowDown"), True),
    ("S3 500 InternalError", _s3(500, "InternalError"), True),
    ("S3 502 with a code s3fs does not know", _s3(502, "BadGateway"), True),
    ("S3 400 RequestTimeout", _s3(400, "RequestTimeout"), True),
    ("S3 403 AccessDenied", _s3(403, "AccessDenied"), False),
    ("S3 404 NoSuchBucket", _s3(404, "NoSuchBucket"), False),
    ("S3 400 InvalidBucketName", _s3(400, "InvalidBucketName"), False),
    ("botocore ClientError 503, untranslated", _boto(503, "ServiceUnavailable"), True),
    ("botocore ClientError 403, untranslated", _boto(403, "AccessDenied"), False),
    ("botocore endpoint unreachable", EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
    ("botocore read timeout", ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
    ("httpx connection refused", httpx.ConnectError("refused"), True),
    ("httpx read timeout", httpx.ReadTimeout("slow"), True),
    ("requests connection error", requests.ConnectionError("down"), True),
    ("timeout", TimeoutError("timed out"), True),
    ("connection reset", ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    ("host unreachable", OSError(errno.EHOSTUNREACH, "No route to host"), True),
    ("no space left", OSError(errno.ENOSPC, "No space left on device"), False),
    ("quota exceeded", OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    ("file too large", OSError(errno.EFBIG, "File too large"), False),
    ("read-only file system", OSError(errno.EROFS, "Read-only file system"), False),
    ("permission denied", PermissionError(errno.EACCES, "Permission denied"), False),
    ("no such file", FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
    ("disk I/O error", OSError(errno.EIO, "Input/output error"), False),
    ("bad parameter", CropflowError("bbox: west 10 > east 5"), False),
    ("a bug", ValueError("bug"), False),
    ("an error raised from a timeout", _caused_by(RuntimeError("read failed"), TimeoutError()), True),
    ("a user error raised from a timeout (retries spent)", _caused_by(CropflowError("gave up"), TimeoutError()), False),
]


@pytest.mark.parametrize(("exc", "transient"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_transient_errors(exc: BaseException, transient: bool):
    assert is_retryable(exc) is transient


def test_backoff_is_urllib3s():
    """Requests retried by `call` wait as those retried by urllib3 (STAC searches): the first retry at once."""
    policy = HttpRetry(retries=6, backoff=1.0, backoff_max=5.0, jitter=0.0)
    retry, waits = policy.urllib3(), []
    for _ in range(6):
        retry = retry.increment(method="GET", url="/search", error=ConnectionResetError())
        waits.append(retry.get_backoff_time())
    assert [policy.delay(n) for n in range(1, 7)] == waits == [0, 2, 4, 5, 5, 5]
    jittery = HttpRetry(backoff=1.0, backoff_max=60.0, jitter=0.5)
    assert all(4 <= jittery.delay(3) <= 4.5 for _ in range(20))


def test_call_retries_transient_errors_only(caplog):
    failures = [ConnectionResetError(errno.ECONNRESET, "reset"), _s3(503, "SlowDown")]
    calls = []

    def flaky() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    quick = HttpRetry(retries=2, backoff=0.01, jitter=0.0)
    with caplog.at_level(logging.WARNING, logger="infra.retry"):
        assert quick.call(flaky, "upload to s3://b/k") == "done"
    assert len(calls) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "retry 1 of 2" in messages[0] and "retry 2 of 2" in messages[1]
    assert all(m.startswith("upload to s3://b/k failed") for m in messages)

    calls.clear()
    failures[:] = [TimeoutError("slow")] * 3
    with pytest.raises(TimeoutError):
        quick.call(flaky, "upload")
    assert len(calls) == 3, "the first try and 2 retries, then the last error"

    calls.clear()
    failures[:] = [_s3(403, "AccessDenied"), TimeoutError()]
    with pytest.raises(PermissionError, match="AccessDenied"):
        quick.call(flaky, "upload")
    assert len(calls) == 1, "a final error is raised at once"
