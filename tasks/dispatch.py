"""Work-pool fan-out: a ``generate-dataset`` run dispatches groups of shards as runs of the
``generate-shards`` deployment, waits for all of them and fails loudly when one fails (a child
run's failure does not propagate to its parent by itself in Prefect)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import copy_context

from prefect.deployments import run_deployment

from indusfactory.config import FactoryConfig
from indusfactory.generation.plan import rows_in_shards
from indusfactory.publishing.publish import existing_shards, present_shards
from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger
from tasks.report import ShardProgress


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
    """Run every missing shard on the work pool; return the records of all shards, read from storage."""
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
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        # Each thread runs in a copy of this flow run's context, so the children are linked as its subflows.
        futures = {
            pool.submit(copy_context().run, _run_group, config.execution.shard_deployment, common, group): group
            for group in groups
        }
        for future in as_completed(futures):
            group, (name, state) = futures[future], future.result()
            if not state.is_completed():
                failures.append(f"{name} (shards {group}): {state.type.value} {state.message or ''}".strip())
                logger.error("child run %s for shards %s ended %s", name, group, state.type.value)
                continue
            progress.add(rows_in_shards(plan, group, size), reused=False)
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


def _run_group(deployment: str, common: dict, group: list[int]):
    """Start one child run and wait for it to finish; returns (run name, final state)."""
    run = run_deployment(
        deployment, parameters={**common, "shards": group}, timeout=None, tags=["indusfactory", "generate-shards"]
    )
    return run.name, run.state
