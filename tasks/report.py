"""What people see in the Prefect UI: a markdown summary and a per-shard table for each dataset run."""

from __future__ import annotations

import base64
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone

from prefect import Task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed

from indusfactory.generation.adherence import FOLLOWS_LABELS
from indusfactory.generation.throughput import Estimate, duration
from indusfactory.infra import storage
from indusfactory.layout import DatasetLayout, ModelFolder
from indusfactory.publishing.catalogue import NOT_RUN, adherence_headline
from indusfactory.schema import CatalogRecord, DatasetRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import run_logger


class StageClock:
    """Seconds each task of a flow run spent running (summed over its runs: ``generate-shard`` x N), measured
    around the task function, so a cached task counts nothing: ``run = clock.wrap(run)`` in a flow."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def wrap(self, run: Callable[[Task], Task]) -> Callable[[Task], Task]:
        def timed(task: Task) -> Task:
            bound = run(task)
            fn = bound.fn

            @functools.wraps(fn)
            def measured(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with self._lock:
                        self.seconds[task.name] = self.seconds.get(task.name, 0.0) + time.perf_counter() - started

            bound.fn = measured
            return bound

        return timed

    def total(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Wall seconds of a block (e.g. the whole generation stage, whatever runs it)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _stage_line(name: str, reused: bool, clock: StageClock | None, detail: str, fallback: float = 0.0) -> str:
    seconds = clock.seconds.get(name, fallback) if clock else fallback
    return f"| {name} | {'reused (cached)' if reused else 'ran'} | {seconds:.1f} s | {detail} |"


def summarise_run(
    catalog: CatalogRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    plan: PlanRecord,
    shards: list[ShardRecord],
    dataset: DatasetRecord,
    clock: StageClock | None = None,
    evaluation: str = NOT_RUN,
) -> str:
    """Log and publish the run summary; returns the markdown.

    ``evaluation``: the headline of the dataset's evaluation, ``not run`` or why it is missing."""
    reused_shards = sum(s.reused for s in shards)
    flagged, dropped = sum(s.flagged for s in shards), sum(s.dropped for s in shards)
    markdown = "\n".join(
        [
            f"# Dataset `{dataset.name}/{dataset.version}`",
            "",
            f"Written to `{dataset.uri}` ({dataset.samples} samples, {dataset.shards} shards).",
            "",
            *_adherence_lines(dataset, condition),
            f"**Evaluation: {evaluation}.**",
            "",
            f"**Throughput: {_rate(shards)}.**",
            "",
            "| stage | status | time | detail |",
            "| --- | --- | --- | --- |",
            _stage_line(
                "ingest", catalog.reused, clock, f"{catalog.ingested} ingested, {catalog.quarantined} quarantined"
            ),
            _stage_line(
                "learn-concept",
                concept.reused,
                clock,
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
                clock,
                f"`{condition.fingerprint}`, {condition.steps} steps"
                + (f"; held-out validation: {_headline(condition.adherence)}" if condition.adherence else ""),
            ),
            _stage_line("build-plan", plan.reused, clock, f"{plan.samples} samples"),
            _stage_line(
                "generate-shard",
                reused_shards == len(shards),
                clock,
                f"{len(shards) - reused_shards} shards "
                f"generated, {reused_shards} reused; {_rate(shards)}; QC: {flagged} flagged, {dropped} dropped",
                fallback=sum(s.seconds for s in shards if not s.reused),
            ),
            _stage_line("publish-dataset", dataset.reused, clock, "manifest.json written last"),
            *(
                [
                    f"| evaluate-dataset | {'ran' if 'evaluate-dataset' in clock.seconds else '-'} | "
                    f"{clock.seconds.get('evaluate-dataset', 0.0):.1f} s | {evaluation} |",
                    f"| total | | {clock.total():.1f} s | wall time of the run so far |",
                ]
                if clock
                else []
            ),
            "",
            "## Models",
            "",
            *(
                f"- {m.kind} `{m.fingerprint}`: [model card]({ModelFolder(m.uri, m.fingerprint).card})"
                for m in (concept, condition)
            ),
            "",
            *_contact_sheet_lines(dataset),
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
    for line in markdown.splitlines()[2:20]:
        if line.startswith("> **Warning"):
            logger.warning(line)
        elif line.strip():
            logger.info(line)
    return markdown


def _contact_sheet_lines(dataset: DatasetRecord) -> list[str]:
    uri = DatasetLayout(dataset.uri).contact_sheet
    if not storage.exists(uri):
        return ["## Contact sheet", "", "none (no sample to show)", ""]
    return ["## Contact sheet", "", image_markdown(uri, "contact sheet"), ""]


_headline = adherence_headline


def _adherence_lines(dataset: DatasetRecord, condition: ModelRecord) -> list[str]:
    """Whether the labels follow the images, first thing on the page; a warning when they do not."""
    if not dataset.adherence:
        return ["**Labels: not measured** (no sample with a label).", ""]
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


EXPECTED: ContextVar[Estimate | None] = ContextVar("indusfactory_expected_throughput", default=None)
"""The estimate of the run's generation (``tasks.estimate.announce_estimate``), shown by its progress artifact."""


def eta_text(remaining: int, generated: int, elapsed: float, expected: Estimate | None) -> str:
    """``; expected 2.10 images/s (3 earlier runs on cpu x1); ETA 04:51:10 UTC (2 min 10 s left)``: the ETA from
    the rate measured so far in this run, else from the estimate."""
    text = (
        f"; expected {expected.images_per_s:.2f} images/s ({expected.runs} earlier runs on {expected.device})"
        if expected
        else ""
    )
    rate = generated / elapsed if generated and elapsed > 0 else expected.images_per_s if expected else None
    if remaining > 0 and rate:
        left = remaining / rate
        eta = datetime.now(timezone.utc) + timedelta(seconds=left)
        text += f"; ETA {eta:%H:%M:%S} UTC ({duration(left)} left)"
    return text


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
        elapsed = time.perf_counter() - self.started
        return progress_description(
            self.done, self.total, self.generated, elapsed, self.reused, self.dropped
        ) + eta_text(self.total - self.done, self.generated, elapsed, EXPECTED.get())

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
