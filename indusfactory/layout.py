"""Every path under the factory root, and every stage's completion marker, in one place.

::

    <factory_root>/
      catalog/<fp>/             catalog.parquet, quarantine.parquet, report.md, catalog.json (marker)
      models/concept/<fp>/      LoRA or full weights, README.md (card), training_config.json, record.json (marker)
      models/concept/<fp>.checkpoint/      checkpoint.pt, validation/step-NNNNNN.png (while training)
      models/condition/<fp>/    the conditioning network, as above
      models/class-images/<fp>/ prior-preservation images, class_images.json (marker)
      plans/<fp>/               plan.parquet, shards/shard-NNNNN.parquet, preview.png, plan.json (marker)
      datasets/<name>/latest    the version a reader gets by default
      datasets/<name>/<version>/
        data/<split>-NNNNN-of-NNNNN.parquet   one shard each (a shard's completion marker)
        shards/<shard>.json     the shard's record, written right after it
        images/<shard>/<id>.png, annotations/instances_<split>.json, annotations/shards/<shard>.json
        README.md (card), contact_sheet.png, evaluation.json, manifest.json (the version's marker)
        evaluation/<fp>/        evaluation.json, table.md, adherence.parquet, plots, segmentor/, record.json
      throughput/<device>/      measured images/s of past runs
      locks/<name>.lock         storage locks (one writer per output)
      prefect-results/          Prefect's task results and cache records

A stage's folder is a :class:`StageFolder`: its URI *and* the fingerprint of what made it, decided
together here and handed on, so no stage reads a fingerprint back out of a path. A stage is complete
when its marker exists (written last, after everything it lists); that marker is the one truth every
reuse mechanism reads (see docs/ARCHITECTURE.md, "Reusing finished work").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from indusfactory.infra.storage import join, normalise_uri, parent

# -- file names -------------------------------------------------------------------------------------

CATALOG_FILE = "catalog.parquet"
QUARANTINE_FILE = "quarantine.parquet"
INGEST_REPORT_FILE = "report.md"
CATALOG_RECORD = "catalog.json"

MODEL_RECORD = "record.json"
MODEL_CARD = "README.md"
TRAINING_CONFIG = "training_config.json"
CLASS_IMAGES_RECORD = "class_images.json"
CHECKPOINT_FILE = "checkpoint.pt"
VALIDATION_DIR = "validation"

PLAN_FILE = "plan.parquet"
PLAN_SHARDS = "shards"
PLAN_RECORD = "plan.json"
PREVIEW_FILE = "preview.png"

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
DATASET_CARD = "README.md"
CONTACT_SHEET = "contact_sheet.png"
EVALUATION_FILE = "evaluation.json"

EVALUATION_RECORD = "record.json"
EVALUATION_TABLE = "table.md"
ADHERENCE_TABLE = "adherence.parquet"
SEGMENTOR_DIR = "segmentor"
BASELINE_FILE = "baseline_check.json"

LOCKS_DIR = "locks"
THROUGHPUT_DIR = "throughput"
RESULTS_DIR = "prefect-results"


# -- a stage's folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageFolder:
    """One stage's output folder: where it is and the fingerprint of what made it."""

    uri: str
    fingerprint: str
    marker_name: ClassVar[str] = MODEL_RECORD

    @property
    def marker(self) -> str:
        """The completion marker: written last; the folder is complete when it exists."""
        return join(self.uri, self.marker_name)

    def file(self, name: str) -> str:
        return join(self.uri, name)


@dataclass(frozen=True)
class CatalogFolder(StageFolder):
    """``catalog/<fp>``: the ingested catalog, its quarantine and report."""

    marker_name: ClassVar[str] = CATALOG_RECORD

    @property
    def table(self) -> str:
        return join(self.uri, CATALOG_FILE)

    @property
    def quarantine(self) -> str:
        return join(self.uri, QUARANTINE_FILE)

    @property
    def report(self) -> str:
        return join(self.uri, INGEST_REPORT_FILE)


@dataclass(frozen=True)
class ModelFolder(StageFolder):
    """``models/<kind>/<fp>``: a trained model, its card and training config; its checkpoint beside it."""

    marker_name: ClassVar[str] = MODEL_RECORD

    @property
    def card(self) -> str:
        return join(self.uri, MODEL_CARD)

    @property
    def training_config(self) -> str:
        return join(self.uri, TRAINING_CONFIG)

    @property
    def checkpoint(self) -> str:
        """``<folder>.checkpoint``: the resumable training state, beside the model (never inside it)."""
        return checkpoint_folder(self.uri)


@dataclass(frozen=True)
class ClassImagesFolder(StageFolder):
    """``models/class-images/<fp>``: the prior-preservation images of a concept."""

    marker_name: ClassVar[str] = CLASS_IMAGES_RECORD


@dataclass(frozen=True)
class PlanFolder(StageFolder):
    """``plans/<fp>``: the plan parquet, one file per shard, the preview."""

    marker_name: ClassVar[str] = PLAN_RECORD

    @property
    def table(self) -> str:
        return join(self.uri, PLAN_FILE)

    @property
    def preview(self) -> str:
        return join(self.uri, PREVIEW_FILE)

    def shard(self, index: int) -> str:
        """One shard's rows (what a generation worker reads)."""
        return join(self.uri, PLAN_SHARDS, f"shard-{index:05d}.parquet")


@dataclass(frozen=True)
class EvaluationFolder(StageFolder):
    """``datasets/<name>/<version>/evaluation/<fp>``: an evaluation lives in the version it evaluates."""

    marker_name: ClassVar[str] = EVALUATION_RECORD

    @property
    def document(self) -> str:
        return join(self.uri, EVALUATION_FILE)

    @property
    def table(self) -> str:
        return join(self.uri, EVALUATION_TABLE)


def checkpoint_folder(output_uri: str) -> str:
    """Where a training run keeps its resumable state: ``<output>.checkpoint``."""
    return output_uri.rstrip("/") + ".checkpoint"


def checkpoint_file(checkpoint_uri: str) -> str:
    return join(checkpoint_uri, CHECKPOINT_FILE)


def validation_image(checkpoint_uri: str, step: int) -> str:
    return join(checkpoint_uri, VALIDATION_DIR, f"step-{step:06d}.png")


# -- a dataset version ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLayout:
    """Where each file of a dataset version lives under its folder (``datasets/<name>/<version>``).

    Images go one folder per shard (``images/<shard>/<sample_id>.png``): no folder or prefix listing holds
    more than a shard's images, however large the dataset."""

    uri: str

    @property
    def data(self) -> str:
        """The folder of the shards' parquet files."""
        return join(self.uri, "data")

    def shard(self, shard: str) -> str:
        """The shard's parquet (Hugging Face naming, ``train-00000-of-00042``): its completion marker."""
        return join(self.data, f"{shard}.parquet")

    def shard_coco(self, shard: str) -> str:
        return join(self.uri, "annotations", "shards", f"{shard}.json")

    def shard_record(self, shard: str) -> str:
        """The shard's record (rows, counts, size, MD5 and sha256 of its parquet), written right after it."""
        return join(self.uri, "shards", f"{shard}.json")

    def coco(self, split: str) -> str:
        """The merged COCO file of the version."""
        return join(self.uri, "annotations", f"instances_{split}.json")

    @staticmethod
    def image_name(shard: str, file_name: str) -> str:
        """An image's name relative to ``images/``: the COCO ``file_name`` and the parquet ``image.path``."""
        return f"{shard}/{file_name}"

    def image(self, image_name: str) -> str:
        return join(self.uri, "images", image_name)

    @property
    def manifest(self) -> str:
        """The version's completion marker: a version is published when it exists."""
        return join(self.uri, MANIFEST_FILE)

    @property
    def card(self) -> str:
        return join(self.uri, DATASET_CARD)

    @property
    def contact_sheet(self) -> str:
        return join(self.uri, CONTACT_SHEET)

    @property
    def evaluation(self) -> str:
        """The latest evaluation's document, copied beside the manifest."""
        return join(self.uri, EVALUATION_FILE)

    @property
    def latest(self) -> str:
        """``datasets/<name>/latest``: the file naming the version readers get by default."""
        return join(parent(self.uri), LATEST_FILE)

    def sibling(self, version: str) -> "DatasetLayout":
        """Another version of the same dataset."""
        return DatasetLayout(join(parent(self.uri), version))

    def evaluation_folder(self, fingerprint: str) -> EvaluationFolder:
        return EvaluationFolder(join(self.uri, "evaluation", fingerprint), fingerprint)


@dataclass(frozen=True)
class DatasetFolder(StageFolder):
    """``datasets/<name>/<version>``: a dataset version, named by the fingerprint of what made it."""

    name: str = ""
    marker_name: ClassVar[str] = MANIFEST_FILE

    @property
    def version(self) -> str:
        return self.fingerprint

    @property
    def files(self) -> DatasetLayout:
        return DatasetLayout(self.uri)


# -- the factory root -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactoryLayout:
    """Where each stage writes under the factory root."""

    root: str

    @classmethod
    def of(cls, root: str) -> "FactoryLayout":
        return cls(normalise_uri(root))

    def catalog(self, fingerprint: str) -> CatalogFolder:
        return CatalogFolder(join(self.root, "catalog", fingerprint), fingerprint)

    def models(self, kind: str) -> str:
        """The folder of every model of one kind (``concept``, ``condition``, ``class-images``)."""
        return join(self.root, "models", kind)

    def model(self, kind: str, fingerprint: str) -> ModelFolder:
        return ModelFolder(join(self.models(kind), fingerprint), fingerprint)

    def class_images(self, fingerprint: str) -> ClassImagesFolder:
        return ClassImagesFolder(join(self.models("class-images"), fingerprint), fingerprint)

    def plan(self, fingerprint: str) -> PlanFolder:
        return PlanFolder(join(self.root, "plans", fingerprint), fingerprint)

    @property
    def datasets(self) -> str:
        return join(self.root, "datasets")

    def dataset_versions(self, name: str) -> str:
        """The folder of every version of one dataset (and its ``latest``)."""
        return join(self.datasets, name)

    def latest(self, name: str) -> str:
        return join(self.dataset_versions(name), LATEST_FILE)

    def dataset(self, name: str, version: str) -> DatasetFolder:
        return DatasetFolder(join(self.dataset_versions(name), version), version, name)

    def lock(self, name: str) -> str:
        """A storage lock's file: ``locks/<name>.lock``."""
        return join(self.root, LOCKS_DIR, f"{name}.lock")

    def throughput(self, device_slug: str) -> str:
        """The measured throughput records of one device kind."""
        return join(self.root, THROUGHPUT_DIR, device_slug)

    @property
    def prefect_results(self) -> str:
        """Prefect's task results and cache records for runs on this root."""
        return join(self.root, RESULTS_DIR)
