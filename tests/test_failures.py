"""Permanent failures fail at once with one clear error; transient ones keep their retries.

The permanent kinds come from a real S3 endpoint over HTTP (moto's server with IAM enforced); the
transient kinds are built as botocore, aiohttp and OS errors, as s3fs raises them.
"""

from __future__ import annotations

import errno
import socket

import pytest

from indusfactory.infra import failures
from indusfactory.infra.errors import BadInputError, StorageNotFoundError, StoragePermissionError


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at what came out
        return exc
    raise AssertionError("no error was raised")


@pytest.mark.slow
def test_permanent_failures_from_the_s3_endpoint(s3_bucket, s3_iam):
    import s3fs

    def fs():
        return s3fs.S3FileSystem(skip_instance_cache=True)

    bucket = s3_bucket.removeprefix("s3://")
    missing_bucket = _raised(lambda: fs().call_s3("list_objects_v2", Bucket="no-such-bucket-at-all"))
    assert failures.failure_kind(missing_bucket) == "no_bucket" and failures.is_permanent(missing_bucket)
    missing_key = _raised(lambda: fs().cat_file(f"{bucket}/no/such/key.json"))
    assert failures.failure_kind(missing_key) == "no_key" and failures.is_permanent(missing_key)
    assert f"{bucket}/no/such/key.json" in failures.explain(missing_key, "http://endpoint")

    key_id, secret = s3_iam.user_with(["s3:ListBucket", "s3:GetObject"])
    with s3_iam.enforced(key_id="AKIAWRONGWRONGWRONG0", secret="not-the-secret"):
        wrong = _raised(lambda: fs().pipe_file(f"{bucket}/x.json", b"{}"))
        head = _raised(lambda: fs().cat_file(f"{bucket}/x.json"))  # a HEAD: a bare 403, no code
    assert failures.failure_kind(wrong) == "credentials" and failures.is_permanent(wrong)
    assert failures.service_error(wrong) == ("InvalidAccessKeyId", 403)
    assert failures.is_permanent(head) and failures.service_error(head)[1] == 403
    message = failures.explain(wrong, "http://127.0.0.1:1234")
    assert "InvalidAccessKeyId" in message and "http://127.0.0.1:1234" in message and "AWS_ACCESS_KEY_ID" in message
    assert "not-the-secret" not in message
    with s3_iam.enforced(key_id=key_id, secret=secret):
        denied = _raised(lambda: fs().pipe_file(f"{bucket}/x.json", b"{}"))
    assert failures.failure_kind(denied) == "denied" and failures.service_error(denied)[0] == "AccessDenied"
    error = failures.permanent_error(denied, "http://127.0.0.1:1234")
    assert isinstance(error, StoragePermissionError) and isinstance(error, PermissionError)
    assert isinstance(error, BadInputError) and "s3:PutObject" in str(error)
    assert isinstance(failures.permanent_error(missing_key), StorageNotFoundError)


def _client_error(code: str, status: int, operation: str = "PutObject"):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def _translated(code: str, status: int):
    """The exception s3fs raises for a service error (its own type, the ClientError as the cause)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


def _transient_errors() -> dict[str, BaseException]:
    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    return {
        "SlowDown": _translated("SlowDown", 503),
        "Throttling": _client_error("Throttling", 400),
        "429": _client_error("TooManyRequests", 429),
        "InternalError": _translated("InternalError", 500),
        "ServiceUnavailable": _translated("ServiceUnavailable", 503),
        "502": _client_error("BadGateway", 502),
        "RequestTimeout": _translated("RequestTimeout", 400),
        "endpoint refused": EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        "connect timeout": ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"),
        "read timeout": ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
        "dropped": aiohttp.ServerDisconnectedError(),
        "reset": ConnectionResetError(errno.ECONNRESET, "reset"),
        "socket timeout": socket.timeout("timed out"),
        "TimeoutError": TimeoutError(),
        "unknown": RuntimeError("something else"),
    }


@pytest.mark.parametrize("name", list(_transient_errors()))
def test_transient_failures_are_not_permanent(name):
    assert not failures.is_permanent(_transient_errors()[name]), name


@pytest.mark.parametrize(
    "exc, kind",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/factory/x.parquet"), "no_space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "no_space"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/factory"), "denied"),
        (OSError(errno.EROFS, "Read-only file system"), "denied"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/src/a.png"), "no_key"),
        (BadInputError("bad config"), "bad_input"),
    ],
)
def test_constructed_permanent_failures(exc, kind):
    from botocore.exceptions import NoCredentialsError

    assert failures.failure_kind(exc) == kind and failures.is_permanent(exc)
    assert failures.failure_kind(NoCredentialsError()) == "credentials"
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = BadInputError("the real reason")
    assert failures.is_permanent(wrapped)
    if kind == "no_space":
        message = failures.explain(exc)
        assert "no space left" in message and ("/data/factory" in message or "quota" in message)


@pytest.mark.slow
def test_prefect_retries_transient_failures_and_not_permanent_ones(prefect_api, make_config):
    from prefect import flow, task

    from tasks._prefect import TASK_DEFAULTS, factory_run

    attempts: list[str] = []

    @task(name="flaky", **{**TASK_DEFAULTS, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky(kind: str) -> str:
        attempts.append(kind)
        if kind == "transient" and len(attempts) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        if kind == "permanent":
            raise PermissionError(errno.EACCES, "Permission denied", "/data/factory/models")
        return "done"

    @flow(name="retries")
    def retries(kind: str) -> str:
        with factory_run(make_config()) as run:
            return run(flaky)(kind)

    assert retries("transient") == "done" and attempts == ["transient"] * 3
    attempts.clear()
    with pytest.raises(StoragePermissionError) as failed:
        retries("permanent")
    assert attempts == ["permanent"], "a permanent failure is not retried"
    assert "/data/factory/models" in str(failed.value) and "access denied" in str(failed.value)
