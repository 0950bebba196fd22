"""Estimates before spending: the expected time and images/s of a run's generation, from the throughput
earlier runs measured on the same device kind (``indusfactory.throughput``), and the record of this one."""

from __future__ import annotations

from indusfactory.config import FactoryConfig
from indusfactory.generation import throughput
from indusfactory.publishing.publish import is_published
from indusfactory.schema import DatasetRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger
from tasks.report import EXPECTED


def announce_estimate(config: FactoryConfig, plan: PlanRecord, dataset_uri: str) -> throughput.Estimate | None:
    """Log the expected generation time and images/s, and hand them to the run's progress artifact (its ETA)."""
    logger = run_logger()
    if is_published(dataset_uri):
        logger.info("estimate: %s is already published, nothing to generate", dataset_uri)
        return None
    try:
        device = throughput.device_kind(config.execution)
        found = throughput.estimate(config, device, plan.samples)
    except Exception as exc:  # noqa: BLE001 - an estimate never stops a run
        logger.warning("estimate: none (%s: %s)", type(exc).__name__, exc)
        return None
    EXPECTED.set(found)
    if found is None:
        logger.info(
            "estimate: no earlier run on %s with %s at %d px: no estimate for %d images (this run's "
            "throughput is kept for the next one)",
            device,
            config.base_model.pretrained,
            config.base_model.resolution,
            plan.samples,
        )
    else:
        logger.info("estimate: %s", found.text())
    return found


def record_throughput(
    config: FactoryConfig, dataset: DatasetRecord, shards: list[ShardRecord], seconds: float
) -> str | None:
    """Keep what this run's generation measured (wall seconds of the stage) for the next runs' estimates."""
    images = sum(s.planned for s in shards if not s.reused)
    try:
        uri = throughput.record(config, throughput.device_kind(config.execution), dataset.uri, images, seconds)
    except Exception as exc:  # noqa: BLE001 - a missing measurement only costs the next run its estimate
        run_logger().warning("throughput not kept (%s: %s)", type(exc).__name__, exc)
        return None
    if uri:
        run_logger().info(
            "throughput: %d images in %.1f s (%.2f images/s) kept in %s", images, seconds, images / seconds, uri
        )
    return uri
