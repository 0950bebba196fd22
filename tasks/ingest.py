"""Prefect task around ``indusfactory.sources.ingest``."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from indusfactory.config import FactoryConfig
from indusfactory.demo.sample_data import ensure_sample_data
from indusfactory.schema import CatalogRecord
from indusfactory.sources.ingest import catalog_folder_for, ingest
from tasks._prefect import TASK_DEFAULTS, run_logger
from tasks.reuse import CompletedOutput


def _sample_data_if_asked(config: FactoryConfig) -> Path | None:
    """The sample dataset, written where the sources point if they are missing (``source.make_sample_data``)."""
    src = config.source
    if not src.make_sample_data:
        return None
    return ensure_sample_data(src.coco_annotations, src.images_dir, src.defect_free_dir)


def _marker(parameters: dict) -> str:
    config: FactoryConfig = parameters["config"]
    _sample_data_if_asked(config)
    return catalog_folder_for(config).marker


@task(name="ingest", cache_policy=CompletedOutput(marker=_marker), **TASK_DEFAULTS)
def ingest_task(config: FactoryConfig) -> CatalogRecord:
    """Build (or reuse) the catalog of the configured sources."""
    logger = run_logger()
    made = _sample_data_if_asked(config)
    if made:
        logger.info("sources were missing: wrote the sample dataset to %s", made)
    record = ingest(config.source, catalog_folder_for(config))
    verb = "reused" if record.reused else "built"
    logger.info(
        "catalog %s %s: found %d = ingested %d + quarantined %d + duplicates %d (%d defective, %d defect-free)",
        record.fingerprint,
        verb,
        record.found,
        record.ingested,
        record.quarantined,
        record.duplicates,
        record.defective,
        record.defect_free,
    )
    return record
