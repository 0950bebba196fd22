"""Reusing finished work: one rule, in three layers.

1. **The truth is the completion marker.** Every stage writes its output into the folder
   ``indusfactory.layout`` names and, last, its marker (``record.json``, ``catalog.json``, ``plan.json``,
   a shard's parquet, ``manifest.json``). A library stage handed a folder whose marker exists returns that
   record (``reused``) and does nothing else, in a flow, the command line, a notebook or a test. Nothing
   else decides whether work is finished.
2. **Prefect's cache is a shortcut derived from it.** Each stage task has the cache policy
   :class:`CompletedOutput`: its key exists only while the marker is on storage and its folder is complete
   (``files.json`` says every file is there), so a deleted or cut output is never a cache hit. A hit skips
   the task run entirely (no worker slot, no model load). The run that builds an output has no key yet
   (Prefect computes it before the task runs), so it writes the cache record the *next* run looks up as
   soon as its output is complete (:func:`recording_cache`): the next run, on any machine sharing the
   factory root, is a plain hit. Records live under ``<factory_root>/prefect-results``.
3. **One builder at a time: the storage lock.** Around a build, the stage takes its lock
   (:func:`stage_lock`, ``<factory_root>/locks/<stage>-<fingerprint>.lock``); a second run of the same
   config waits, then finds the marker and reuses. Prefect's isolation levels and lock managers lock a cache
   key, and here the key exists only once the output does, so they cannot hold back the second builder of
   the first build; and Prefect has no lock manager for S3. The storage lock works the same on a local root
   and on S3, so it is the one lock.

A task without this policy (the dispatcher, publishing, reports) keeps no result on storage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext, TaskRunContext

from indusfactory.config import FactoryConfig
from indusfactory.infra import redact, storage
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.infra.locking import StorageLock, default_owner
from indusfactory.layout import FactoryLayout, StageFolder


def output_complete(marker_uri: str) -> bool:
    """The marker is on storage and its folder is not a cut upload."""
    return storage.exists(marker_uri) and not storage.incomplete(storage.parent(marker_uri))


@dataclass
class CompletedOutput(CachePolicy):
    """A Prefect cache policy: the key of a stage's output while its completion marker is on storage and its
    folder complete; no key (no cache) otherwise. ``marker`` maps the task's parameters to the marker's URI."""

    marker: Callable[[dict[str, Any]], str] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.marker is None:
            return None
        uri = self.marker(inputs)
        return fingerprint(task_ctx.task.name, uri) if output_complete(uri) else None


def recording_cache(policy: CompletedOutput, fn: Callable) -> Callable:
    """``fn`` that writes the cache record the *next* run will look up as soon as its output is complete.

    The record says ``reused``: that is what a cache hit is. A record that cannot be written only costs the
    next run a task run that finds the marker and reuses the output.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        context = TaskRunContext.get()
        if context is None or context.result_store is None:
            return result
        try:
            key = policy.compute_key(context, context.parameters, {})
            if key and key != context.task_run.cache_key:
                fields = getattr(type(result), "model_fields", {})
                cached = result.model_copy(update={"reused": True}) if "reused" in fields else result
                context.result_store.write(obj=cached, key=key)
        except Exception as exc:  # noqa: BLE001 - a missing cache record only costs a rerun that reuses
            get_run_logger().warning(
                "cache record of %s not written (%s: %s); the next run finds the output instead",
                context.task.name,
                type(exc).__name__,
                redact.scrub(str(exc)),
            )
        return result

    return wrapper


def stage_lock(config: FactoryConfig, stage: str, output: StageFolder) -> StorageLock:
    """The lock of one stage's output (``<factory_root>/locks/<stage>-<fingerprint>.lock``), owned by this
    worker and flow run, with the config's stale timeout; waits are logged to the run."""
    owner = default_owner()
    flow_run = FlowRunContext.get()
    if flow_run is not None and flow_run.flow_run is not None:
        owner += f", flow run {flow_run.flow_run.name!r}"
    return StorageLock(
        FactoryLayout.of(config.factory_root).lock(f"{stage}-{output.fingerprint}"),
        owner=owner,
        stale_after=config.execution.lock_stale_seconds,
        wait_timeout=config.execution.lock_wait_seconds,
        logger=get_run_logger(),
    )
