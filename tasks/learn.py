"""Prefect tasks around the two training stages (``indusfactory.learning.concept`` and
``indusfactory.learning.condition``)."""

from __future__ import annotations

from prefect import task

from indusfactory.config import FactoryConfig
from indusfactory.learning.concept import concept_folder_for, train_concept
from indusfactory.learning.condition import condition_folder_for, train_condition
from indusfactory.schema import CatalogRecord, ModelRecord
from tasks._prefect import TASK_DEFAULTS, run_logger, training_progress
from tasks.report import validation_artifact
from tasks.reuse import CompletedOutput, stage_lock


def _log_model(record: ModelRecord) -> ModelRecord:
    if record.reused:
        run_logger().info("%s model %s reused from %s: not trained again", record.kind, record.fingerprint, record.uri)
    else:
        run_logger().info(
            "%s model %s trained in %.1f s -> %s", record.kind, record.fingerprint, record.seconds, record.uri
        )
        validation_artifact(record)
    return record


@task(
    name="learn-concept",
    cache_policy=CompletedOutput(marker=lambda p: concept_folder_for(p["config"], p["catalog"]).marker),
    **TASK_DEFAULTS,
)
def learn_concept_task(config: FactoryConfig, catalog: CatalogRecord) -> ModelRecord:
    """DreamBooth LoRA of the defective concept (cached by data, config and code version).

    Under a storage lock: a second run of the same config waits, then finds the model and reuses it."""
    folder = concept_folder_for(config, catalog)
    with stage_lock(config, "learn-concept", folder):
        return _log_model(train_concept(config, catalog, folder, progress=training_progress("learn-concept")))


@task(
    name="learn-condition",
    cache_policy=CompletedOutput(marker=lambda p: condition_folder_for(p["config"], p["catalog"], p["concept"]).marker),
    **TASK_DEFAULTS,
)
def learn_condition_task(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> ModelRecord:
    """The conditioning network on topological drivers (cached by data, concept, config and code version).

    Under a storage lock, like ``learn-concept``."""
    folder = condition_folder_for(config, catalog, concept)
    with stage_lock(config, "learn-condition", folder):
        return _log_model(
            train_condition(config, catalog, concept, folder, progress=training_progress("learn-condition"))
        )
