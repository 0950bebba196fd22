"""Which failures a retry may cure and which it cannot, and a clear message for the second kind.

Permanent: bad input (``BadInputError``), credentials refused or missing, access denied, no such
bucket or key (or local file), no space left, a read-only filesystem. Transient: timeouts,
throttling (``SlowDown``, 429), server errors (5xx), refused, reset or dropped connections, and
anything not recognised (retrying it costs a little time; not retrying a transient one costs a run).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from indusfactory.infra.errors import (
    BadInputError,
    StorageAccessError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageSpaceError,
)

CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "AuthFailure",
        "NotSignedUp",
        "AccountProblem",
        "RequestTimeTooSkewed",
    }
)
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403", "Forbidden"})
NO_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName"})
NO_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "429",
        "408",
    }
)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
CREDENTIAL_EXCEPTIONS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "ProfileNotFound",
        "SSOTokenLoadError",
        "UnauthorizedSSOTokenError",
    }
)

PERMANENT_KINDS = frozenset({"bad_input", "credentials", "denied", "no_bucket", "no_key", "no_space"})

HINTS: dict[str, str] = {
    "credentials": "the credentials were refused or are missing: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
    "(or AWS_PROFILE, AWS_SESSION_TOKEN) in the worker's environment, and the machine's clock",
    "denied": "access denied: check that the credentials (or the local user) may read and write there "
    "(s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject)",
    "no_bucket": "no such bucket: check the bucket name and the endpoint (AWS_ENDPOINT_URL, region)",
    "no_key": "no such key or file: check the path",
    "no_space": "no space left: free space or give the factory root another volume",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts (each once, at most 10)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def service_error(exc: BaseException) -> tuple[str, int | None] | None:
    """(error code, HTTP status) of the first botocore-like ``ClientError`` in ``exc``'s chain, if any."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code") or status or "")
            return code, int(status) if status else None
    return None


def _kind_of_code(code: str, status: int | None) -> str:
    if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
        return "transient"
    if code in CREDENTIAL_CODES:
        return "credentials"
    if code in NO_BUCKET_CODES:
        return "no_bucket"
    if code in NO_KEY_CODES or status == 404:
        return "no_key"
    if code in DENIED_CODES or status in (401, 403):
        return "denied"
    return "unknown"


def _kind_of_os_error(exc: OSError) -> str:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    if exc.errno in NO_SPACE_ERRNOS:
        return "no_space"
    if isinstance(exc, PermissionError) or exc.errno in DENIED_ERRNOS:
        return "denied"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno in MISSING_ERRNOS:
        return "no_key"
    return "unknown"


def failure_kind(exc: BaseException) -> str:
    """What ``exc`` is: one of ``PERMANENT_KINDS``, ``'transient'`` or ``'unknown'`` (treated as transient).

    Bad input anywhere in the chain wins; then the storage service's own error code; then missing
    credentials; then the exception type and errno.
    """
    if any(isinstance(link, BadInputError) for link in _chain(exc)):
        return "bad_input"
    service = service_error(exc)
    if service is not None:
        kind = _kind_of_code(*service)
        if kind != "unknown":
            return kind
    if any(type(link).__name__ in CREDENTIAL_EXCEPTIONS for link in _chain(exc)):
        return "credentials"
    if isinstance(exc, OSError):
        return _kind_of_os_error(exc)
    return "unknown"


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: bad input, refused credentials, access denied, no such bucket or key,
    no space. Timeouts, throttling, 5xx, dropped connections and unrecognised failures are not permanent."""
    return failure_kind(exc) in PERMANENT_KINDS


def where(exc: BaseException) -> str | None:
    """The path or key an exception names, if it names one."""
    for link in _chain(exc):
        for attr in ("filename", "filename2"):
            value = getattr(link, attr, None)
            if value:
                return str(value)
    return None


def explain(exc: BaseException, endpoint: str | None = None) -> str:
    """One message for a permanent failure: what happened (the service's code), where (endpoint, path or
    key) and what to check."""
    kind = failure_kind(exc)
    service = service_error(exc)
    what = f"{service[0]} ({type(exc).__name__})" if service else type(exc).__name__
    place = where(exc)
    parts = [f"{what}: {str(exc)[:300]}"]
    if place and place not in parts[0]:
        parts.append(f"at {place}")
    if endpoint:
        parts.append(f"on endpoint {endpoint}")
    hint = HINTS.get(kind)
    return " ".join(parts) + (f"; {hint}" if hint else "")


ERROR_OF_KIND: dict[str, type[StorageAccessError]] = {
    "credentials": StoragePermissionError,
    "denied": StoragePermissionError,
    "no_bucket": StorageNotFoundError,
    "no_key": StorageNotFoundError,
    "no_space": StorageSpaceError,
}


def permanent_error(exc: BaseException, endpoint: str | None = None) -> StorageAccessError:
    """The clear error of a permanent storage failure (``explain``), of the matching ``StorageAccessError``
    kind: still a ``PermissionError`` / ``FileNotFoundError`` / ``OSError`` for callers catching those."""
    return ERROR_OF_KIND.get(failure_kind(exc), StorageAccessError)(explain(exc, endpoint))
