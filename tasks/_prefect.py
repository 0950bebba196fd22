"""What every indusfactory task shares: cache keys that trust only outputs still on storage,
a retry condition that does not retry bad input, and run-logger progress."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.context import TaskRunContext

from indusfactory import storage
from indusfactory.errors import BadInputError
from indusfactory.fingerprint import fingerprint

RESULT_SETTINGS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


def cache_when_present(marker_uri: Callable[[dict[str, Any]], str]) -> Callable[[TaskRunContext, dict], str | None]:
    """A ``cache_key_fn``: the key of the stage's output when its completion marker exists, else no cache.

    A cache record is only trusted while what it describes is on storage; a deleted output means
    the task runs again and rebuilds it.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        uri = marker_uri(parameters)
        return fingerprint(context.task.name, uri) if storage.exists(uri) else None

    return key


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (storage, network); a ``BadInputError`` fails at once."""
    try:
        state.result()
    except BadInputError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
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
