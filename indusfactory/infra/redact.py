"""Keep secrets out of logs, artifacts, manifests and error messages.

Two kinds of secret are known without being told:

- the values of secret-looking environment variables (``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``HF_TOKEN``, ``PREFECT_API_KEY``, and any variable whose name holds
  ``SECRET``, ``TOKEN``, ``PASSWORD``, ``PASSWD``, ``API_KEY``, ``PRIVATE_KEY``, ``CREDENTIAL``
  or ``AUTH``), read afresh on every use so credentials rotated at run time are covered;
- credentials written into a URL (``s3://KEY:SECRET@bucket/...``, ``https://user:pass@host``),
  recognised by their shape.

Anything else (a secret read from a Prefect ``Secret`` block, say) is added with :func:`register`.
:func:`scrub` replaces all of them with ``***``; :class:`RedactingFilter` does it to every log
record passing a handler; :func:`scrub_exception` does it, in place, to an exception and its
chain, so the exception keeps its type (a ``BadInputError`` is still not retried).

The configuration must never carry credentials: :func:`uri_credentials` names the keys that do,
so a run can refuse them before anything is written (the config is copied into manifests and
model cards).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

SECRET_NAMES = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "AZURE_STORAGE_KEY",
        "AZURE_CLIENT_SECRET",
        "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    }
)
SECRET_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "API_KEY", "PRIVATE_KEY", "CREDENTIAL", "AUTH")
NOT_SECRET_NAMES = frozenset(
    {
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AWS_SHARED_CREDENTIALS_FILE",
        "PREFECT_API_AUTH_STRING_FILE",
    }
)
NOT_SECRET_VALUES = frozenset(
    {
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "none",
        "null",
        "auto",
        "warn",
        "ignore",
        "error",
        "enabled",
        "disabled",
    }
)
MIN_SECRET_LENGTH = 6
"""Shorter values are not scrubbed from every message (they would mangle ordinary words); real keys are longer."""

# scheme://userinfo@ — userinfo is everything up to the last '@' before the path.
URL_CREDENTIALS = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^\s/?#@'\"]*(?:@[^\s/?#@'\"]*)*)@"
)

_registered: set[str] = set()
_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    """True for environment variable names that hold credentials."""
    upper = name.upper()
    if upper in NOT_SECRET_NAMES:
        return False
    return upper in SECRET_NAMES or any(part in upper for part in SECRET_NAME_PARTS)


def _worth_scrubbing(value: str) -> bool:
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH or value.lower() in NOT_SECRET_VALUES:
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def register(*values: str | None) -> None:
    """Treat these values as secrets from now on in this process (e.g. a Prefect Secret block's value)."""
    with _lock:
        _registered.update(v for v in values if v and _worth_scrubbing(v))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every known secret value, longest first (so a secret containing another is masked whole)."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if is_secret_name(name) and _worth_scrubbing(value)}
    with _lock:
        found |= _registered
    # URL credentials planted in the environment (e.g. a proxy URL) are secrets too.
    for value in environ.values():
        for match in URL_CREDENTIALS.finditer(value):
            found.update(p for p in re.split(r"[:@]", match.group("userinfo")) if _worth_scrubbing(p))
    return sorted(found, key=len, reverse=True)


def scrub(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every known secret and every URL's credentials replaced by ``***``."""
    if not text:
        return text
    text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, MASK)
    return text


def contains_secret(text: str, environ: Mapping[str, str] | None = None) -> bool:
    return scrub(text, environ) != text


def scrub_exception(exc: BaseException) -> BaseException:
    """Scrub ``exc`` and its cause/context chain in place (messages, OS error fields, notes); returns ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            current.args = tuple(_scrub_value(a) for a in current.args)
        except (AttributeError, TypeError):  # an exception type with read-only args
            pass
        if isinstance(current, OSError):
            for attr in ("strerror", "filename", "filename2"):
                value = getattr(current, attr, None)
                if isinstance(value, str):
                    try:
                        setattr(current, attr, scrub(value))
                    except AttributeError:
                        pass
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [scrub(n) if isinstance(n, str) else n for n in notes]
        pending.extend([current.__cause__, current.__context__])
    return exc


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bytes):
        try:
            return scrub(value.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub_value(v) for v in value)
    return value


def still_leaks(exc: BaseException) -> bool:
    """True when ``str(exc)`` still shows a secret after :func:`scrub_exception` (a custom ``__str__``)."""
    try:
        return contains_secret(str(exc))
    except Exception:  # noqa: BLE001 - a broken __str__ shows nothing
        return False


def uri_credentials(data: Any, path: str = "") -> list[str]:
    """Dotted keys of every string in ``data`` (a config dump) that carries credentials in a URL."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            found += uri_credentials(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            found += uri_credentials(value, f"{path}[{index}]")
    elif isinstance(data, str) and URL_CREDENTIALS.search(data):
        found.append(path or "<value>")
    return found


def register_uri_credentials(data: Any) -> None:
    """Register the userinfo parts of every credential-bearing URL in ``data`` as secrets."""
    for text in _strings(data):
        for match in URL_CREDENTIALS.finditer(text):
            register(*re.split(r"[:@]", match.group("userinfo")))


def _strings(data: Any) -> Iterable[str]:
    if isinstance(data, Mapping):
        for value in data.values():
            yield from _strings(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from _strings(value)
    elif isinstance(data, str):
        yield data


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs the message, arguments, traceback and stack of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the formatter's problem, not ours
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_filter(handlers: Iterable[logging.Handler]) -> int:
    """Add a :class:`RedactingFilter` to each handler that lacks one; returns how many were added."""
    added = 0
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
            added += 1
    return added


def all_handlers() -> list[logging.Handler]:
    """Every handler attached to the root logger or to any named logger of this process."""
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers += logger.handlers
    return handlers
