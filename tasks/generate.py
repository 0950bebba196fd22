"""Prefect tasks of the factory floor: the plan, one shard of generation, and publishing."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prefect import Task, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from indusfactory.config import FactoryConfig
from indusfactory.generation.generate import GenerationContext, generate_shard
from indusfactory.generation.plan import build_plan, plan_folder_for, rows_in_shards
from indusfactory.infra.devices import device_pool
from indusfactory.infra.locking import StorageLock
from indusfactory.layout import DatasetFolder
from indusfactory.publishing.publish import publish_dataset, shard_uri
from indusfactory.schema import CatalogRecord, DatasetRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import TASK_DEFAULTS, run_logger
from tasks.report import collect_shards
from tasks.reuse import CompletedOutput, stage_lock


@task(
    name="build-plan",
    cache_policy=CompletedOutput(marker=lambda p: plan_folder_for(p["config"], p["catalog"]).marker),
    **TASK_DEFAULTS,
)
def build_plan_task(config: FactoryConfig, catalog: CatalogRecord) -> PlanRecord:
    """Drivers from defect-free images paired with sampled masks: one row per sample."""
    record = build_plan(config, catalog, plan_folder_for(config, catalog))
    run_logger().info(
        "plan %s %s: %d samples in %d shards",
        record.fingerprint,
        "reused" if record.reused else "built",
        record.samples,
        record.shards,
    )
    return record


def version_lock(config: FactoryConfig, version: DatasetFolder) -> StorageLock:
    """The lock of one dataset version (``<factory_root>/locks/dataset-<name>-<version>.lock``), held around
    checking its folder, generating its shards and publishing it: a second run of the version waits, then
    finds it published."""
    return stage_lock(config, f"dataset-{config.export.dataset_name}", version)


def _shard_marker(p: dict) -> str:
    return shard_uri(p["dataset_uri"], p["config"].export.split, p["shard"], p["plan"].shards)


@task(
    name="generate-shard",
    task_run_name="generate-shard-{shard}",
    cache_policy=CompletedOutput(marker=_shard_marker),
    **TASK_DEFAULTS,
)
def generate_shard_task(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
    shard: int,
) -> ShardRecord:
    """Generate one shard of the plan and write it (skipped when the shard is already on storage)."""
    ctx = GenerationContext(
        config=config, catalog_uri=catalog.uri, categories=catalog.categories, concept=concept, condition=condition
    )
    record = generate_shard(ctx, plan, dataset_uri, shard)
    if record.reused:
        run_logger().info("shard %d/%d already written by %s: not regenerated", shard + 1, plan.shards, record.worker)
    else:
        run_logger().info(
            "shard %d/%d: %d images in %.1f s (%.2f images/s); QC (%s): %d flagged, %d dropped",
            shard + 1,
            plan.shards,
            record.planned,
            record.seconds,
            record.planned / max(record.seconds, 1e-9),
            config.generation.qc_action,
            record.flagged,
            record.dropped,
        )
    return record


def generate_shards_locally(
    run: Callable[[Task], Task],
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
    shards: Iterable[int],
) -> list[ShardRecord]:
    """Run ``generate-shard`` for ``shards`` in this flow, as many at once as there are device slots
    (``execution.devices``; each shard leases one for its sampling), with a progress artifact."""
    slots = len(device_pool(config.execution).slots)
    shards = list(shards)
    with ThreadPoolTaskRunner(max_workers=slots) as runner:
        futures = runner.map(
            run(generate_shard_task),
            {
                "config": unmapped(config),
                "catalog": unmapped(catalog),
                "plan": unmapped(plan),
                "concept": unmapped(concept),
                "condition": unmapped(condition),
                "dataset_uri": unmapped(dataset_uri),
                "shard": shards,
            },
        )
        return collect_shards(futures, rows_in_shards(plan, shards, config.generation.shard_size))


@task(name="publish-dataset", **TASK_DEFAULTS)
def publish_dataset_task(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
    shards: list[ShardRecord],
) -> DatasetRecord:
    """Merge COCO, write the dataset card and, last, the manifest; then point ``latest`` at it."""
    record = publish_dataset(config, catalog, plan, concept, condition, dataset_uri, shards)
    run_logger().info(
        "dataset %s/%s %s at %s: %d samples in %d shards",
        record.name,
        record.version,
        "was already published" if record.reused else "published",
        record.uri,
        record.samples,
        record.shards,
    )
    return record
