"""What people see in the Prefect UI: a markdown summary and a per-shard table for each dataset run."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from indusfactory.schema import CatalogRecord, DatasetRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger


def _stage_line(name: str, reused: bool, detail: str) -> str:
    return f"| {name} | {'reused (cached)' if reused else 'ran'} | {detail} |"


def summarise_run(catalog: CatalogRecord, concept: ModelRecord, condition: ModelRecord, plan: PlanRecord,
                  shards: list[ShardRecord], dataset: DatasetRecord) -> str:
    """Log and publish the run summary; returns the markdown."""
    reused_shards = sum(s.reused for s in shards)
    markdown = "\n".join([
        f"# Dataset `{dataset.name}/{dataset.version}`", "",
        f"Written to `{dataset.uri}` ({dataset.samples} samples, {dataset.shards} shards).", "",
        "| stage | status | detail |", "| --- | --- | --- |",
        _stage_line("ingest", catalog.reused, f"{catalog.ingested} ingested, {catalog.quarantined} quarantined"),
        _stage_line("learn-concept", concept.reused, f"`{concept.fingerprint}`, {concept.steps} steps"),
        _stage_line("learn-condition", condition.reused, f"`{condition.fingerprint}`, {condition.steps} steps"),
        _stage_line("plan", plan.reused, f"{plan.samples} samples"),
        _stage_line("generate", reused_shards == len(shards), f"{len(shards) - reused_shards} shards generated, "
                    f"{reused_shards} reused"),
        _stage_line("publish", dataset.reused, "manifest.json written last"), "",
        "## Load it", "", "```python", "import pandas as pd",
        f"df = pd.read_parquet('{dataset.uri}/data/')", "from pycocotools.coco import COCO",
        f"coco = COCO('{dataset.uri}/annotations/instances_train.json')", "```",
    ])
    key = "".join(ch if ch.isalnum() else "-" for ch in dataset.name.lower())
    create_markdown_artifact(markdown, key=f"{key}-summary", description="indusfactory dataset run")
    create_table_artifact([s.model_dump(mode="json", exclude={"uri", "coco_uri"}) for s in shards],
                          key=f"{key}-shards", description="per-shard figures")
    logger = run_logger()
    for line in markdown.splitlines()[4:11]:
        logger.info(line)
    return markdown


def collect_shards(futures, total_samples: int) -> list[ShardRecord]:
    """Wait for the shard futures, updating a progress artifact (samples done / total, images/s)."""
    import time

    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.futures import as_completed

    started = time.perf_counter()
    artifact = create_progress_artifact(0.0, description=f"generated 0 / {total_samples} samples")
    done, records = 0, []
    for future in as_completed(futures):
        record = future.result()
        records.append(record)
        done += record.rows
        rate = done / max(time.perf_counter() - started, 1e-9)
        update_progress_artifact(artifact, 100.0 * done / max(total_samples, 1),
                                 description=f"generated {done} / {total_samples} samples ({rate:.2f} images/s)")
    return sorted(records, key=lambda r: r.index)
