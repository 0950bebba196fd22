"""What people see in the Prefect UI: a markdown summary and a per-shard table for each dataset run."""

from __future__ import annotations

import base64
import time

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed

from indusfactory.generation.adherence import FOLLOWS_LABELS
from indusfactory.infra import storage
from indusfactory.schema import CatalogRecord, DatasetRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger


def _stage_line(name: str, reused: bool, detail: str) -> str:
    return f"| {name} | {'reused (cached)' if reused else 'ran'} | {detail} |"


def summarise_run(
    catalog: CatalogRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    plan: PlanRecord,
    shards: list[ShardRecord],
    dataset: DatasetRecord,
) -> str:
    """Log and publish the run summary; returns the markdown."""
    reused_shards = sum(s.reused for s in shards)
    flagged, dropped = sum(s.flagged for s in shards), sum(s.dropped for s in shards)
    markdown = "\n".join(
        [
            f"# Dataset `{dataset.name}/{dataset.version}`",
            "",
            f"Written to `{dataset.uri}` ({dataset.samples} samples, {dataset.shards} shards).",
            "",
            *_adherence_lines(dataset, condition),
            "| stage | status | detail |",
            "| --- | --- | --- |",
            _stage_line("ingest", catalog.reused, f"{catalog.ingested} ingested, {catalog.quarantined} quarantined"),
            _stage_line(
                "learn-concept",
                concept.reused,
                f"`{concept.fingerprint}`, {concept.steps} steps"
                + (
                    f"; colourfulness {concept.look['generated']['colourfulness']} vs sources "
                    f"{concept.look['sources']['colourfulness']}"
                    if concept.look
                    else ""
                ),
            ),
            _stage_line(
                "learn-condition",
                condition.reused,
                f"`{condition.fingerprint}`, {condition.steps} steps"
                + (f"; held-out validation: {_headline(condition.adherence)}" if condition.adherence else ""),
            ),
            _stage_line("plan", plan.reused, f"{plan.samples} samples"),
            _stage_line(
                "generate",
                reused_shards == len(shards),
                f"{len(shards) - reused_shards} shards generated, "
                f"{reused_shards} reused; {_rate(shards)}; QC: {flagged} flagged, {dropped} dropped",
            ),
            _stage_line("publish", dataset.reused, "manifest.json written last"),
            "",
            "## Load it",
            "",
            "```python",
            "import pandas as pd",
            f"df = pd.read_parquet('{dataset.uri}/data/')",
            "from pycocotools.coco import COCO",
            f"coco = COCO('{dataset.uri}/annotations/instances_train.json')",
            "```",
        ]
    )
    key = "".join(ch if ch.isalnum() else "-" for ch in dataset.name.lower())
    create_markdown_artifact(markdown, key=f"{key}-summary", description="indusfactory dataset run")
    create_table_artifact([_shard_row(s) for s in shards], key=f"{key}-shards", description="per-shard figures")
    logger = run_logger()
    for line in markdown.splitlines()[2:14]:
        if line.startswith("> **Warning"):
            logger.warning(line)
        elif line.strip():
            logger.info(line)
    return markdown


def _headline(adherence: dict) -> str:
    return (
        f"{adherence['verdict']} (median label AUC {adherence['median_auc']:.3f} vs chance "
        f"{adherence['chance_auc']:.3f}, {adherence['samples']} samples)"
    )


def _adherence_lines(dataset: DatasetRecord, condition: ModelRecord) -> list[str]:
    """Whether the labels follow the images, first thing on the page; a warning when they do not."""
    if not dataset.adherence:
        return []
    lines = [f"**Labels: {_headline(dataset.adherence)}.**", ""]
    if dataset.adherence["verdict"] != FOLLOWS_LABELS:
        lines += [
            "> **Warning: the defects are not where the labels say.** Do not train on this dataset; the "
            "conditioning network did not learn the condition (see its validation in the model card). "
            "`generation.refuse_near_chance: true` refuses to publish such a dataset.",
            "",
        ]
    return lines


def _rate(shards: list[ShardRecord]) -> str:
    """Images/s of the generated shards (worker time; reused shards took none)."""
    generated = [s for s in shards if not s.reused]
    seconds = sum(s.seconds for s in generated)
    if not generated or seconds <= 0:
        return "no images generated"
    return f"{sum(s.planned for s in generated) / seconds:.2f} images/s"


def _shard_row(shard: ShardRecord) -> dict:
    row = shard.model_dump(mode="json", exclude={"uri", "coco_uri"})
    row["planned"] = shard.planned
    row["images_per_s"] = round(shard.planned / shard.seconds, 3) if shard.seconds > 0 else None
    return row


def progress_description(done: int, total: int, generated: int, seconds: float, reused: int, dropped: int) -> str:
    """``6 / 8 samples done: 4 generated at 1.93 images/s, 2 reused, 0 dropped by QC``."""
    rate = generated / seconds if seconds > 0 else 0.0
    return (
        f"{done} / {total} samples done: {generated} generated at {rate:.2f} images/s, {reused} reused, "
        f"{dropped} dropped by QC"
    )


class ShardProgress:
    """The run's progress artifact (and a log line per update): samples done / total, images/s."""

    def __init__(self, total: int, already_done: int = 0):
        self.total, self.started = total, time.perf_counter()
        self.done = self.reused = already_done
        self.generated = self.dropped = 0
        self.artifact = create_progress_artifact(self._percent(), description=self.description())

    def _percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)

    def description(self) -> str:
        return progress_description(
            self.done, self.total, self.generated, time.perf_counter() - self.started, self.reused, self.dropped
        )

    def add(self, samples: int, reused: bool, dropped: int = 0) -> None:
        """``samples`` more plan rows are done (``reused``: found on storage, not generated)."""
        self.done += samples
        if reused:
            self.reused += samples
        else:
            self.generated += samples
        self.dropped += dropped
        description = self.description()
        update_progress_artifact(self.artifact, self._percent(), description=description)
        run_logger().info("progress: %s", description)


def collect_shards(futures, total_samples: int) -> list[ShardRecord]:
    """Wait for the shard futures, updating a progress artifact (samples done / total, images/s)."""
    progress, records = ShardProgress(total_samples), []
    for future in as_completed(futures):
        record = future.result()
        records.append(record)
        progress.add(record.planned, record.reused, record.dropped)
    return sorted(records, key=lambda r: r.index)


MAX_INLINE_IMAGE_BYTES = 1 << 20


def image_markdown(uri: str, name: str) -> str:
    """An image inlined as a data URI (small PNGs) so the UI shows it wherever the factory root is."""
    data = storage.read_bytes(uri)
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        return f"- `{name}`: `{uri}`"
    return f"![{name}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n\n`{uri}`"


def validation_artifact(record: ModelRecord) -> str | None:
    """A markdown artifact of a trained model's validation grids (the last one shown first)."""
    if not record.validation:
        return None
    what = {
        "concept": "concept samples (instance prompt; class prompt below with prior preservation)",
        "condition": "driver | generated | mask overlay",
    }.get(record.kind, record.kind)
    lines = [
        f"# Validation of {record.kind} `{record.fingerprint}`",
        "",
        f"{what}; final loss {record.final_loss}, {record.steps} steps, {'reused' if record.reused else 'trained'}.",
        "",
    ]
    for name in reversed(record.validation):
        lines += [f"## {name}", "", image_markdown(storage.join(record.uri, name), name), ""]
    markdown = "\n".join(lines)
    create_markdown_artifact(
        markdown, key=f"{record.kind}-validation", description=f"validation images of the {record.kind} model"
    )
    return markdown
