"""Every data contract of the factory: catalog, plan and dataset parquet schemas, COCO documents,
stage records, and the RLE helpers that move masks between them.

Masks are always COCO RLE produced and decoded by pycocotools (compressed ``counts`` as str).
Images inside parquet are structs of ``bytes`` and ``path``, the way Hugging Face ``datasets``
stores an ``Image`` feature, so ``load_dataset`` decodes them.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
METADATA_SCHEMA_VERSION = b"indusfactory.schema_version"
METADATA_CATEGORIES = b"indusfactory.categories"
METADATA_HUGGINGFACE = b"huggingface"

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
RLE_STRUCT = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

CATALOG_INSTANCE = pa.struct(
    [
        ("annotation_id", pa.int64()),
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("rle", RLE_STRUCT),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.float64()),
        ("iscrowd", pa.bool_()),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
        ("defective", pa.bool_()),
        ("image", IMAGE_STRUCT),
        ("instances", pa.list_(CATALOG_INSTANCE)),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        # what was refused: "image" (counted in CatalogRecord.quarantined), "annotation" (a COCO
        # annotation naming no image entry) or "mask" (a mask file no image claims)
        ("item", pa.string()),
        # the COCO annotation ids that left with it (accounted, never silently lost)
        ("annotation_ids", pa.list_(pa.int64())),
    ]
)

PLAN_INSTANCE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("mask_source", pa.string()),
        ("mask_source_id", pa.string()),
        ("perturbation", pa.string()),
    ]
)

PLAN_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("sample_index", pa.int64()),
        ("shard", pa.int32()),
        ("driver_image_id", pa.string()),
        ("augmentation_index", pa.int32()),
        ("augmentation", pa.string()),
        ("instances", pa.list_(PLAN_INSTANCE)),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
    ]
)

DATASET_INSTANCE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("rle", RLE_STRUCT),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.float64()),
        ("mask_source", pa.string()),
    ]
)

DATASET_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("sample_index", pa.int64()),
        ("image", IMAGE_STRUCT),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("instances", pa.list_(DATASET_INSTANCE)),
        ("driver", IMAGE_STRUCT),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("driver_image_id", pa.string()),
        ("qc_mask_contrast", pa.float64()),
        # score of the configured adherence scorer (generation.adherence_scorer); null when none is set
        ("qc_adherence", pa.float64()),
        # P(a label pixel is darker than a ring pixel) of the sample's own mask (indusfactory.generation.adherence)
        ("qc_label_auc", pa.float64()),
        # the same with the previous sample's mask in the shard: the chance level (null in a one-sample shard)
        ("qc_chance_auc", pa.float64()),
        ("qc_passed", pa.bool_()),
        ("base_model", pa.string()),
        ("concept_fingerprint", pa.string()),
        ("condition_fingerprint", pa.string()),
        ("code_version", pa.string()),
        ("worker", pa.string()),
    ]
)

_HF_VALUE_TYPES = {
    pa.string(): "string",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


def huggingface_feature(arrow_type: pa.DataType) -> dict:
    """The Hugging Face ``datasets`` feature of an Arrow type: ``IMAGE_STRUCT`` decodes as ``Image``, lists as
    ``List``, structs field by field, the rest as ``Value``."""
    if arrow_type == IMAGE_STRUCT:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        return {"feature": huggingface_feature(arrow_type.value_type), "_type": "List"}
    if pa.types.is_struct(arrow_type):
        return {field.name: huggingface_feature(field.type) for field in arrow_type}
    return {"dtype": _HF_VALUE_TYPES[arrow_type], "_type": "Value"}


HF_FEATURES = {field.name: huggingface_feature(field.type) for field in DATASET_SCHEMA}
"""What Hugging Face ``datasets`` reads from a shard's parquet metadata, derived from ``DATASET_SCHEMA``."""


def with_metadata(schema: pa.Schema, categories: list[dict], huggingface: bool = False) -> pa.Schema:
    """Attach the schema version, the categories and (for datasets) the HF features to a schema."""
    metadata = {
        METADATA_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        METADATA_CATEGORIES: json.dumps(categories).encode(),
    }
    if huggingface:
        metadata[METADATA_HUGGINGFACE] = json.dumps({"info": {"features": HF_FEATURES}}).encode()
    return schema.with_metadata(metadata)


def categories_from_metadata(schema: pa.Schema) -> list[dict]:
    """The ``[{"id", "name", ...}]`` categories stored in a catalog or dataset schema."""
    raw = (schema.metadata or {}).get(METADATA_CATEGORIES)
    if raw is None:
        raise ValueError("parquet file has no indusfactory categories metadata")
    return json.loads(raw)


def category_index(categories: list[dict]) -> dict[int, int]:
    """Category id -> class index (position in the id-sorted categories), used for driver colours."""
    return {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}


# --- masks -------------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a boolean HxW mask, with ``counts`` as str (JSON-able)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Boolean HxW mask of a compressed or uncompressed COCO RLE."""
    size = [int(s) for s in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    else:
        encoded = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


def rle_bbox_area(rle: dict) -> tuple[list[float], float]:
    """COCO ``[x, y, w, h]`` box and pixel area of an RLE."""
    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return [float(v) for v in mask_utils.toBbox(encoded)], float(mask_utils.area(encoded))


# --- images ------------------------------------------------------------------------------------


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 HxWx3 (or HxW) array; deterministic for the same pixels and level.

    Level 1 is about 4x faster than 6 on photographs and often no larger (ingest uses it)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=compress_level)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """uint8 HxWx3 RGB array of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# --- COCO --------------------------------------------------------------------------------------


def coco_document(images: list[dict], annotations: list[dict], categories: list[dict], description: str) -> dict:
    """A COCO instances document (``info``, ``images``, ``annotations``, ``categories``)."""
    return {
        "info": {"description": description, "version": SCHEMA_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


# --- stage records: the small things tasks exchange --------------------------------------------


class Record(BaseModel):
    """A small, JSON-serialisable description of a stage output (URIs, hashes, counts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    required_suffix: ClassVar[str | None] = None
    """A folder with the record but no ``files.json`` listing must hold a file ending so (else incomplete)."""

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def read_completed(cls, record_uri: str):
        """The record a finished stage left at ``record_uri``, marked ``reused``; None if absent, or if its
        folder lacks a file the record's write left there (a cut upload): the stage then makes it again."""
        from indusfactory.infra import storage

        if not storage.exists(record_uri):
            return None
        folder = storage.parent(record_uri)
        problems = storage.incomplete(folder, cls.required_suffix)
        if problems:
            log.warning(
                "%s has its completion marker but is incomplete (%s): not reused, made again",
                folder,
                "; ".join(problems),
            )
            return None
        return cls.model_validate({**storage.read_json(record_uri), "reused": True})


class CatalogRecord(Record):
    uri: str
    fingerprint: str
    content_fingerprint: str
    found: int
    ingested: int
    quarantined: int
    duplicates: int
    defective: int
    defect_free: int
    categories: list[dict[str, Any]]
    annotations: dict[str, int] = {}
    """found = ingested + quarantined (with their image) + duplicates + orphaned: COCO annotations,
    or for a mask folder the connected components of the masks that were read."""
    reused: bool = False


class ModelRecord(Record):
    kind: str
    uri: str
    fingerprint: str
    base_model: str
    steps: int
    seconds: float
    method: str = "lora"
    """Concept: 'lora' or 'full'; condition: 'controlnet'."""
    required_suffix: ClassVar[str | None] = ".safetensors"
    final_loss: float | None = None
    validation: list[str] = []
    """Validation grids, relative to ``uri`` (e.g. ``validation/step-000150.png``)."""
    look: dict[str, Any] = {}
    """Concept: colourfulness and mean colour of its samples vs its training images (``concept.concept_look``)."""
    adherence: dict[str, Any] = {}
    """Condition: the held-out probe (``adherence.AdherenceSummary.as_dict`` plus where its masks came from)."""
    reused: bool = False


class PlanRecord(Record):
    uri: str
    fingerprint: str
    samples: int
    shards: int
    adherence: dict[str, Any] = {}
    """Whether the samples follow their labels (``adherence.AdherenceSummary.as_dict``)."""
    reused: bool = False


class ShardRecord(Record):
    index: int
    total: int
    uri: str
    coco_uri: str
    rows: int
    """Samples written (planned - dropped)."""
    flagged: int
    """Written samples that failed QC (qc_passed false)."""
    sha256: str
    seconds: float
    worker: str
    dropped: int = 0
    """Samples that failed QC and were left out (generation.qc_action 'drop')."""
    adherence: dict[str, Any] = {}
    """Totals over the shard's generated samples, dropped ones included (``adherence.shard_totals``): AUC
    histograms of own and chance masks, samples darker inside their label, samples scored."""
    generation_fingerprint: str = ""
    """What made the shard: plan, models, generation and driver config (``export.generation_fingerprint``)."""
    bytes: int = 0
    """Size of the parquet, with ``md5`` and ``sha256`` computed from the bytes in hand when it was written: publish
    and reuse check the file by its metadata (size, ETag or ``version``), never by reading it back (0: unknown)."""
    md5: str = ""
    version: str = ""
    """The parquet's version right after its write: its ETag on S3 (the MD5 of a single-part upload, another value
    with SSE-KMS), a local file's mtime."""
    reused: bool = False

    @property
    def planned(self) -> int:
        """Plan rows of the shard: every one is either written or dropped."""
        return self.rows + self.dropped


class EvaluationRecord(Record):
    """What evaluate-dataset measured (the full result is in ``evaluation.json``)."""

    uri: str
    fingerprint: str
    dataset_uri: str
    table: list[dict[str, Any]]
    """Rows like the paper's Tables 1 and 2: regime, real fraction, mIoU, mDice, HD95, mask/box AP."""
    adherence: dict[str, Any]
    fidelity: dict[str, Any]
    plots: list[str]
    seconds: float
    verdict: str | None = None
    """'synthetic helps', 'no benefit' or 'inconclusive: the baseline did not learn' (None: older records)."""
    verdict_reason: str | None = None
    baseline: dict[str, Any] = {}
    """Whether the real-only segmentor learned (above the chance IoU of the test split), per real fraction."""
    chance: dict[str, Any] = {}
    """Defect IoU of predictions that saw no image: empty, all defect, shuffled test masks; ``chance``."""
    reused: bool = False


class DatasetRecord(Record):
    name: str
    version: str
    uri: str
    manifest_uri: str
    samples: int
    shards: int
    adherence: dict[str, Any] = {}
    """Whether the samples follow their labels (``adherence.AdherenceSummary.as_dict``)."""
    reused: bool = False
