"""What every indusfactory task shares: a retry condition that does not retry bad input, run-logger
progress, and what a flow run needs to run like production (``factory_run``): Prefect results and
cache records under the factory root (reuse itself: ``tasks/reuse.py``), library logs in the run's
logs, secrets scrubbed from logs and errors."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from indusfactory.config import FactoryConfig
from indusfactory.infra import failures, redact, stopping, storage
from indusfactory.infra.errors import BadInputError
from indusfactory.layout import FactoryLayout
from tasks.reuse import CompletedOutput, recording_cache

RESULT_SETTINGS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (timeouts, throttling, 5xx, dropped connections); permanent ones fail at once:
    bad input, refused credentials, access denied, no such bucket or key, no space (``failures.is_permanent``).
    Nothing is retried once the run was asked to stop (SIGINT, SIGTERM)."""
    if stopping.stop_requested():
        return False
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified: anything not known to be permanent may be transient
        return not failures.is_permanent(exc)
    return True


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    return get_run_logger()


def training_progress(stage: str) -> Callable[[int, int, float], None]:
    logger = run_logger()

    def report(step: int, total: int, loss: float) -> None:
        logger.info("%s: step %d/%d, loss %.4f", stage, step, total, loss)

    return report


TASK_DEFAULTS: dict[str, Any] = {
    **RESULT_SETTINGS,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_unless_bad_input,
}


# -- results and cache records under the factory root ----------------------------------------------


def results_uri_for(config: FactoryConfig) -> str:
    """``<factory_root>/prefect-results``: where Prefect keeps the task results and cache records of a config."""
    return FactoryLayout.of(config.factory_root).prefect_results


def result_storage_for(config: FactoryConfig) -> Path | str:
    """Prefect ``result_storage`` for ``results_uri_for(config)``.

    A local root is a path (Prefect makes a ``LocalFileSystem`` of it). A remote root (``s3://``)
    is a ``RemoteFileSystem`` block, which Prefect requires to be saved on the server: it is saved
    as ``remote-file-system/indusfactory-results-<hash of the URI>`` (no credentials in it; fsspec
    takes them from the environment of the process that runs the task).
    """
    uri = results_uri_for(config)
    if not storage.is_remote(uri):
        return Path(uri)
    from prefect.filesystems import RemoteFileSystem

    name = "indusfactory-results-" + hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    RemoteFileSystem(basepath=uri).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def on_factory(task: Task, result_storage: Path | str, endpoint: str | None = None) -> Task:
    """``task`` writing its results and cache records to ``result_storage``, its errors scrubbed of secrets.

    A task whose cache policy is not :class:`tasks.reuse.CompletedOutput` (its key could never be a hit
    in another run) keeps its result in memory rather than leaving a new file under the factory root on
    every run. See ``tasks/reuse.py`` for how finished work is reused.
    """
    if not isinstance(task.cache_policy, CompletedOutput):
        bound = task.with_options(persist_result=False, cache_policy=NO_CACHE)
    else:
        bound = task.with_options(result_storage=result_storage)
        bound.fn = recording_cache(task.cache_policy, bound.fn)
    bound.fn = scrubbing_errors(explaining_permanent_errors(bound.fn, endpoint))
    return bound


def explaining_permanent_errors(fn: Callable, endpoint: str | None = None) -> Callable:
    """``fn`` whose permanent storage failures (access denied, bad credentials, no such bucket or key, no space)
    leave as one ``StorageAccessError`` naming the endpoint, path or key and what to check; it is not retried."""
    if getattr(fn, "__explains_errors__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInputError:
            raise
        except Exception as exc:
            if not failures.is_permanent(exc):
                raise
            place = failures.where(exc) or ""
            raise failures.permanent_error(exc, None if place.startswith("/") else endpoint) from exc

    wrapper.__explains_errors__ = True  # type: ignore[attr-defined]  # a marker on the function object
    return wrapper


def scrubbing_errors(fn: Callable) -> Callable:
    """``fn`` whose exceptions leave with every known secret scrubbed from their messages (same type)."""
    if getattr(fn, "__scrubs_errors__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            replacement = _scrubbed(exc)
            if replacement is exc:
                raise
            raise replacement from None

    wrapper.__scrubs_errors__ = True  # type: ignore[attr-defined]  # a marker on the function object
    return wrapper


def _scrubbed(exc: BaseException) -> BaseException:
    """``exc`` scrubbed in place; a type whose ``__str__`` still shows a secret is replaced by a plain one."""
    redact.scrub_exception(exc)
    if not redact.still_leaks(exc):
        return exc
    kind = BadInputError if isinstance(exc, BadInputError) else RuntimeError
    return kind(f"{type(exc).__name__}: {redact.scrub(str(exc))}")


# -- logs ------------------------------------------------------------------------------------------

LIBRARY_LOGGERS: dict[str, int] = {
    "indusfactory": logging.INFO,
    "diffusers": logging.WARNING,
    "transformers": logging.WARNING,
    "peft": logging.WARNING,
    "accelerate": logging.WARNING,
    "huggingface_hub": logging.WARNING,
}
"""Library loggers whose records go to the Prefect run they happen in (like ``PREFECT_LOGGING_EXTRA_LOGGERS``)."""


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for library loggers: sends records made inside a flow or task run to that
    run's logs, and quietly drops the others (the library also runs outside Prefect: CLI, tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) is None and not (FlowRunContext.get() or TaskRunContext.get()):
            return
        super().emit(record)


def route_library_logs() -> None:
    """Attach a :class:`RunLogHandler` to each library logger (once) and set its level if none was set.

    Loggers the user already routes with ``PREFECT_LOGGING_EXTRA_LOGGERS`` keep Prefect's own handler.
    """
    for name, level in LIBRARY_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def install_log_redaction() -> int:
    """A :class:`indusfactory.infra.redact.RedactingFilter` on every handler of this process (Prefect's API and
    console handlers included); run again after logging is reconfigured. Returns how many were added."""
    return redact.install_filter(redact.all_handlers())


def prepare_logging() -> None:
    route_library_logs()
    install_log_redaction()


prepare_logging()


# -- one flow run ----------------------------------------------------------------------------------


def refuse_uri_credentials(config: FactoryConfig) -> None:
    """A config never carries credentials: it is copied into manifests, model cards and Prefect parameters."""
    dump = config.model_dump(mode="json")
    keys = redact.uri_credentials(dump)
    if keys:
        redact.register_uri_credentials(dump)
        raise BadInputError(
            f"{', '.join(keys)}: credentials in a URI (user:password@ before the host) are refused; "
            "give them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "HF_TOKEN) or a Prefect block, never the config"
        )


@contextmanager
def factory_run(config: FactoryConfig) -> Iterator[Callable[[Task], Task]]:
    """The frame of every indusfactory flow: ``with factory_run(config) as run: run(ingest_task)(config)``.

    ``run(task)`` is ``task`` with its results and cache records under ``<factory_root>/prefect-results``
    (so a cache hit holds across workers and machines) and its errors scrubbed of secrets. Library
    logs go to the run's logs, every log handler scrubs secrets, a config carrying credentials in a
    URI is refused, and an error leaving the flow is scrubbed too.

    SIGINT and SIGTERM also set the stop flag (``indusfactory.infra.stopping``) before the handler they
    replace runs (Prefect's, in a worker's flow run): the task threads (generation shards) stop at their
    next batch or denoising step instead of finishing their shard while the flow waits for them.
    """
    try:
        with stopping.stopping_on_signals():
            prepare_logging()
            refuse_uri_credentials(config)
            result_storage = result_storage_for(config)
            endpoint = storage.endpoint_of(config.factory_root) or storage.endpoint_of(config.source.images_dir)
            yield lambda task: on_factory(task, result_storage, endpoint)
    except Exception as exc:
        replacement = _scrubbed(exc)
        if replacement is exc:
            raise
        raise replacement from None
