"""Work-pool fan-out: a ``generate-dataset`` run dispatches groups of shards as runs of the
``generate-shards`` deployment, waits for all of them and fails loudly when one fails (a child
run's failure does not propagate to its parent by itself in Prefect).

A parent that stops before its children finish (SIGINT / SIGTERM, a cancel from Prefect, a crash,
an error while it waits) cancels its unfinished children, as ``prefect flow-run cancel`` does: it
proposes ``Cancelling``; the server makes a scheduled child without infrastructure ``Cancelled`` at
once, a pending or running one ``Cancelling`` (its worker stops it), and refuses it for a finished
one (a ``Completed`` child is never touched). Prefect does not do this by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.logging.loggers import flow_run_logger
from prefect.states import Cancelling

from indusfactory.config import FactoryConfig
from indusfactory.generation.plan import rows_in_shards
from indusfactory.infra import stopping
from indusfactory.publishing.publish import existing_shards, present_shards
from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger
from tasks.report import ShardProgress

POLL_SECONDS = 5.0
"""How often the parent reads the states of its unfinished children (a stop cuts the wait short)."""
READ_BATCH = 200
"""Flow runs read per API call (the server's default page size)."""
FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]


class ShardRunsFailed(RuntimeError):
    """One or more child ``generate-shards`` runs did not complete."""


def shard_groups(total: int, per_run: int) -> list[list[int]]:
    """Shard indices in groups of ``per_run`` (the last group may be smaller)."""
    return [list(range(start, min(start + per_run, total))) for start in range(0, total, per_run)]


def dispatch_shard_runs(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
) -> list[ShardRecord]:
    """Run every missing shard on the work pool; return the records of all shards, read from storage.

    Whatever ends the wait early (a stop, a cancel, an error) cancels the child runs not yet finished."""
    split, size, logger = config.export.split, config.generation.shard_size, run_logger()
    present = present_shards(dataset_uri, split, plan.shards)  # one listing of data/, no shard read
    missing = [i for i in range(plan.shards) if i not in present]
    groups = shard_groups(len(missing), config.execution.shards_per_run)
    groups = [[missing[i] for i in group] for group in groups]
    logger.info(
        "%d of %d shards to generate, dispatched as %d runs of %s",
        len(missing),
        plan.shards,
        len(groups),
        config.execution.shard_deployment,
    )
    common = {
        "config": config,
        "catalog": catalog,
        "plan": plan,
        "concept": concept,
        "condition": condition,
        "dataset_uri": dataset_uri,
    }
    progress = ShardProgress(plan.samples, already_done=plan.samples - rows_in_shards(plan, missing, size))
    children: dict[UUID, list[int]] = {}  # child run id -> its shards
    failures: list[str] = []
    try:
        for group in groups:
            stopping.check("dispatching generate-shards runs")
            # In this flow run's context: the children are linked to it as its subflows.
            run = run_deployment(
                config.execution.shard_deployment,
                parameters={**common, "shards": group},
                timeout=0,  # created, not waited for: the wait below reads every child at once and can stop
                tags=["indusfactory", "generate-shards"],
            )
            children[run.id] = group
        for run in _finished_runs(children):
            group, state = children[run.id], run.state
            if state is None or not state.is_completed():
                kind = state.type.value if state else "unknown"
                failures.append(f"{run.name} (shards {group}): {kind} {state.message if state else ''}".strip())
                logger.error("child run %s for shards %s ended %s", run.name, group, kind)
                continue
            progress.add(rows_in_shards(plan, group, size), reused=False)
    except BaseException:  # a stop (StopRequested, Prefect's TerminationSignal), a cancel or an error while waiting
        _cancel_unfinished(children, logger)
        raise
    if failures:
        raise ShardRunsFailed(
            f"{len(failures)} of {len(groups)} generate-shards runs failed: "
            + "; ".join(failures)
            + ". Rerun generate-dataset: finished shards are kept, only the missing ones run again."
        )
    found = existing_shards(dataset_uri, split, plan.shards)  # their records, checked against one listing
    absent = [i for i in range(plan.shards) if i not in found]
    if absent:
        raise ShardRunsFailed(f"child runs completed but shards {absent} are not on storage under {dataset_uri}")
    return [found[i].model_copy(update={"reused": i not in missing}) for i in range(plan.shards)]


def _finished_runs(ids: Iterable[UUID]) -> Iterator[FlowRun]:
    """Each child run once it is in a final state (Completed, Failed, Cancelled, Crashed), in the order they end."""
    waiting = set(ids)
    with get_client(sync_client=True) as client:
        while waiting:
            stopping.check("waiting for generate-shards runs")
            for run in _read_runs(client, waiting, FINAL):  # only the finished ones come back
                waiting.discard(run.id)
                yield run
            if waiting:
                stopping.pause(POLL_SECONDS, "waiting for generate-shards runs")


def _read_runs(client: SyncPrefectClient, ids: Iterable[UUID], states: list[StateType] | None = None) -> list[FlowRun]:
    """The runs with these ids (in these states)."""
    in_states = FlowRunFilterState(type=FlowRunFilterStateType(any_=states)) if states else None
    return _read_all(client, FlowRunFilter(id=FlowRunFilterId(any_=list(ids)), state=in_states))


def _read_all(client: SyncPrefectClient, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
    """Every flow run the filter matches, a page at a time (the server caps one answer)."""
    runs: list[FlowRun] = []
    while True:
        page = client.read_flow_runs(
            flow_run_filter=flow_run_filter, sort=FlowRunSort.ID_DESC, limit=READ_BATCH, offset=len(runs)
        )
        runs += page
        if len(page) < READ_BATCH:
            return runs


def _cancel_unfinished(children: dict[UUID, list[int]], logger: logging.Logger | logging.LoggerAdapter) -> None:
    if not children:
        return
    try:
        with get_client(sync_client=True) as client:
            cancelled = cancel_runs(client, _read_runs(client, children))
    except Exception as exc:  # noqa: BLE001 - the reason the parent stops is the error to raise, not this one
        logger.error("could not cancel the child generate-shards runs (%s): cancel them in the UI", exc)
        return
    logger.warning(
        "cancelled %d of %d child generate-shards runs (the unfinished ones; finished ones are kept)",
        cancelled,
        len(children),
    )


def cancel_runs(client: SyncPrefectClient, runs: Iterable[FlowRun]) -> int:
    """Propose ``Cancelling`` to each run not in a final state; return how many are now Cancelling or Cancelled.

    The server turns a scheduled run without infrastructure into ``Cancelled`` and refuses the proposal
    for a run that finished meanwhile."""
    cancelled = 0
    for run in runs:
        if run.state is not None and run.state.is_final():
            continue
        result = client.set_flow_run_state(
            run.id, Cancelling(message="its parent generate-dataset run stopped before it finished")
        )
        state: State | None = result.state
        if state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED):
            cancelled += 1
    return cancelled


def cancel_child_runs(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Flow hook (``on_cancellation``, ``on_crashed``): cancel the run's child runs that are not finished.

    Finds them through the API (``parent_flow_run_id``), so it also serves where the dispatcher's own
    clean-up did not run (a child created as the stop came; the hooks of a cancelled run that Prefect
    runs in its worker once the run's process is gone); logs only when there was something to cancel."""
    unfinished = FlowRunFilterState(type=FlowRunFilterStateType(not_any_=FINAL))
    with get_client(sync_client=True) as client:
        children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]), state=unfinished)
        cancelled = cancel_runs(client, _read_all(client, children))
    if cancelled:
        flow_run_logger(flow_run, flow).warning(
            "cancelled %d unfinished child runs of %s (%s)", cancelled, flow_run.name, state.name
        )
