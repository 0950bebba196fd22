"""Prefect task around the evaluation stage (``indusfactory.evaluation.evaluate``) and what it shows in the UI."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from indusfactory.config import FactoryConfig
from indusfactory.evaluation.evaluate import evaluate_dataset, evaluation_folder_for
from indusfactory.infra import storage
from indusfactory.layout import EvaluationFolder
from indusfactory.schema import CatalogRecord, DatasetRecord, EvaluationRecord
from tasks._prefect import TASK_DEFAULTS, run_logger
from tasks.report import image_markdown
from tasks.reuse import CompletedOutput


def _marker(p: dict) -> str:
    return evaluation_folder_for(p["config"], p["catalog"], p["dataset"]).marker


@task(name="evaluate-dataset", cache_policy=CompletedOutput(marker=_marker), **TASK_DEFAULTS)
def evaluate_dataset_task(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> EvaluationRecord:
    """Downstream segmentation (real / synthetic / synthetic + real), adherence and fidelity of a dataset."""
    record = evaluate_dataset(config, catalog, dataset)
    logger = run_logger()
    logger.info(
        "evaluation of %s/%s %s: %s",
        dataset.name,
        dataset.version,
        "reused" if record.reused else f"computed in {record.seconds:.0f} s",
        record.uri,
    )
    for row in record.table:
        logger.info(
            "%s at %s real: defect IoU %s ± %s, mask AP %s %s",
            row["regime"],
            row["real fraction"],
            row["iou"],
            row["iou_std"],
            row["mask_ap"],
            row["check"],
        )
    logger.info("verdict: %s (%s)", record.verdict, record.verdict_reason)
    key = "".join(ch if ch.isalnum() else "-" for ch in dataset.name.lower())
    create_table_artifact(
        record.table,
        key=f"{key}-evaluation-table",
        description=f"downstream segmentation, mean and std over seeds; verdict: {record.verdict}",
    )
    table = storage.read_bytes(EvaluationFolder(record.uri, record.fingerprint).table).decode("utf-8")
    images = [image_markdown(storage.join(record.uri, name), name) for name in record.plots]
    create_markdown_artifact(
        "\n\n".join([table, *images, f"Files: `{record.uri}`"]),
        key=f"{key}-evaluation",
        description="evaluation of the published dataset",
    )
    return record
