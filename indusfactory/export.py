"""Export: shards, COCO and the manifest of a dataset version under the factory root.

Layout of ``datasets/<name>/<version>/``::

    data/train-00000-of-00002.parquet   shards, Hugging Face naming; a shard exists only when complete
    images/<sample_id>.png              the images the COCO files name
    annotations/shards/train-00000-of-00002.json   COCO per shard
    annotations/instances_train.json    merged COCO (file_name relative to images/)
    contact_sheet.png                   samples above their mask outlines
    README.md                           dataset card; `datasets.load_dataset(path)` reads the folder
    manifest.json                       counts, checksums, lineage, config: written last (commit marker)

A version with a manifest is published and never rewritten.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indusfactory import storage
from indusfactory.adherence import NEAR_CHANCE, AdherenceSummary, summarise_totals
from indusfactory.errors import IndusfactoryError, NearChanceError
from indusfactory.config import FactoryConfig
from indusfactory.fingerprint import CODE_VERSION, fingerprint
from indusfactory.imaging import image_grid
from indusfactory.schema import (
    DATASET_SCHEMA,
    SCHEMA_VERSION,
    CatalogRecord,
    DatasetRecord,
    ModelRecord,
    PlanRecord,
    ShardRecord,
    coco_document,
    decode_image,
    encode_png,
    rle_to_mask,
    with_metadata,
)

MANIFEST_FILE = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"
SHARD_METADATA = b"indusfactory.shard"
"""Parquet metadata key of a shard's own counts: ``{"planned": n, "dropped": k}``."""


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}"


def shard_uri(dataset_uri: str, split: str, index: int, total: int) -> str:
    return storage.join(dataset_uri, "data", f"{shard_name(split, index, total)}.parquet")


def shard_coco_uri(dataset_uri: str, split: str, index: int, total: int) -> str:
    return storage.join(dataset_uri, "annotations", "shards", f"{shard_name(split, index, total)}.json")


def is_published(dataset_uri: str) -> bool:
    return storage.exists(storage.join(dataset_uri, MANIFEST_FILE))


def coco_of_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """COCO ``images`` and ``annotations`` of dataset rows (ids from the plan's sample index)."""
    images, annotations = [], []
    for row in rows:
        images.append({"id": int(row["sample_index"]), "file_name": row["image"]["path"], "width": row["width"],
                       "height": row["height"], "sample_id": row["sample_id"]})
        for k, inst in enumerate(row["instances"]):
            annotations.append({
                "id": int(row["sample_index"]) * 100 + k + 1, "image_id": int(row["sample_index"]),
                "category_id": inst["category_id"], "segmentation": inst["rle"], "area": inst["area"],
                "bbox": inst["bbox"], "iscrowd": 0,
            })
    return images, annotations


def write_shard(dataset_uri: str, split: str, index: int, total: int, rows: list[dict], categories: list[dict],
                seconds: float, dropped: int = 0, worker: str = "", adherence: dict | None = None) -> ShardRecord:
    """Write images, the shard's COCO file and, last, its parquet (the shard's completion marker).

    ``rows`` are the samples kept; ``dropped`` more were planned and left out by QC (recorded in the
    parquet metadata, so a reused shard reports them too), as are the adherence totals of every
    generated sample (``adherence.shard_totals``).
    """
    storage.write_many_atomic({storage.join(dataset_uri, "images", row["image"]["path"]): row["image"]["bytes"]
                               for row in rows})
    images, annotations = coco_of_rows(rows)
    coco_uri = shard_coco_uri(dataset_uri, split, index, total)
    storage.write_json_atomic(coco_uri, coco_document(images, annotations, categories, shard_name(split, index, total)))
    schema = with_metadata(DATASET_SCHEMA, categories, huggingface=True)
    counts = json.dumps({"planned": len(rows) + dropped, "dropped": dropped, "adherence": adherence or {}}).encode()
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata({**schema.metadata, SHARD_METADATA: counts}))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    uri = shard_uri(dataset_uri, split, index, total)
    storage.write_bytes_atomic(uri, data)
    return ShardRecord(index=index, total=total, uri=uri, coco_uri=coco_uri, rows=len(rows),
                       flagged=sum(not r["qc_passed"] for r in rows), dropped=dropped,
                       sha256=storage.sha256_bytes(data), seconds=round(seconds, 3),
                       worker=worker or (rows[0]["worker"] if rows else ""), adherence=adherence or {})


def existing_shard(dataset_uri: str, split: str, index: int, total: int) -> ShardRecord | None:
    """The record of a shard already on storage (a rerun does not regenerate it), else None."""
    uri = shard_uri(dataset_uri, split, index, total)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    table = pq.read_table(io.BytesIO(data), columns=["qc_passed", "worker"])
    counts = json.loads((table.schema.metadata or {}).get(SHARD_METADATA, b"{}"))
    return ShardRecord(index=index, total=total, uri=uri, coco_uri=shard_coco_uri(dataset_uri, split, index, total),
                       rows=table.num_rows, flagged=int((~np.asarray(table["qc_passed"])).sum()),
                       dropped=int(counts.get("dropped", 0)), adherence=counts.get("adherence", {}),
                       sha256=storage.sha256_bytes(data), seconds=0.0,
                       worker=table["worker"][0].as_py() if table.num_rows else "", reused=True)


def dataset_card(name: str, version: str, split: str, manifest: dict) -> str:
    """README.md with the front matter `datasets.load_dataset(folder)` reads."""
    counts = manifest["counts"]
    return "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", f"  - split: {split}",
        f"    path: data/{split}-*.parquet", "task_categories:", "- image-segmentation", "tags:",
        "- synthetic", "- industrial-inspection", "- indusfactory", "---", "",
        f"# {name} {version}", "",
        "Synthetic, self-annotated industrial defect images made by indusfactory "
        "(DreamBooth concept + ControlNet-style conditioning on topological drivers).", "",
        f"- samples: {counts['samples']} in {counts['shards']} shards ({counts['flagged']} flagged by QC; "
        f"{counts['dropped']} of {counts['planned']} planned dropped by QC)",
        f"- categories: {', '.join(c['name'] for c in manifest['categories'])}",
        f"- base model: `{manifest['lineage']['base_model']}`; concept `{manifest['lineage']['concept_fingerprint']}`;"
        f" condition `{manifest['lineage']['condition_fingerprint']}`",
        *adherence_lines(manifest.get("adherence")), "",
        "## Load it", "", "```python", "import pandas as pd",
        'df = pd.read_parquet("{root}/data/")', "from datasets import load_dataset",
        'ds = load_dataset("{root}")', "from pycocotools.coco import COCO",
        f'coco = COCO("{{root}}/annotations/instances_{split}.json")', "```", "",
        "Masks are COCO RLE (`instances[].rle`, decode with `pycocotools.mask.decode`).", "",
    ]).replace("{root}", f"<path to {name}/{version}>")


def adherence_verdict(shards: list[ShardRecord], generation: dict, dataset_uri: str) -> AdherenceSummary:
    """Whether the dataset's samples follow their labels; with ``refuse_near_chance``, an error if not."""
    summary = summarise_totals([s.adherence for s in shards], margin=generation.get("adherence_margin", 0.1))
    if not summary.follows_labels and generation.get("refuse_near_chance"):
        raise NearChanceError(f"not publishing {dataset_uri}: its samples do not follow their labels ("
                              f"{summary.headline()}; needs {summary.margin} above chance). The conditioning "
                              "network did not learn where the defects go: train it longer (condition.steps), "
                              "check its validation adherence in the model card, or set "
                              "generation.refuse_near_chance false to publish it marked 'near chance'.")
    return summary


def adherence_lines(adherence: dict | None) -> list[str]:
    """The card's statement of whether the labels follow the images (a warning when they do not)."""
    if not adherence:
        return []
    line = (f"- labels: **{adherence['verdict']}**: median label AUC {adherence['median_auc']:.3f} against "
            f"{adherence['chance_auc']:.3f} by chance (the same images with other samples' masks); "
            f"{adherence['fraction_darker']:.0%} of {adherence['samples']} samples darker inside their label")
    if adherence["verdict"] == NEAR_CHANCE:
        return [line, "", "> **Warning**: the defects in these images are not where the labels say. Do not train "
                "on this dataset; retrain the conditioning network (see its model card's validation adherence)."]
    return [line]


def finalize_dataset(dataset_uri: str, name: str, version: str, split: str, shards: list[ShardRecord],
                     categories: list[dict], config: dict, lineage: dict) -> DatasetRecord:
    """Merge COCO, write the card, then the manifest (last), then move the ``latest`` pointer."""
    manifest_uri = storage.join(dataset_uri, MANIFEST_FILE)
    if is_published(dataset_uri):
        manifest = storage.read_json(manifest_uri)
        return DatasetRecord(name=name, version=version, uri=dataset_uri, manifest_uri=manifest_uri,
                             samples=manifest["counts"]["samples"], shards=manifest["counts"]["shards"],
                             adherence=manifest.get("adherence", {}), reused=True)
    shards = sorted(shards, key=lambda s: s.index)
    expected = shards[0].total if shards else 0
    if [s.index for s in shards] != list(range(expected)):
        raise IndusfactoryError(f"cannot publish {dataset_uri}: shards {[s.index for s in shards]} of {expected}")
    for shard in shards:
        if storage.sha256_bytes(storage.read_bytes(shard.uri)) != shard.sha256:
            raise IndusfactoryError(f"cannot publish {dataset_uri}: {shard.uri} changed after it was written")
    summary = adherence_verdict(shards, config.get("generation", {}), dataset_uri)
    storage.remove_temporaries(dataset_uri)  # left by a crashed attempt; every shard is complete now
    images, annotations = [], []
    for shard in shards:
        doc = storage.read_json(shard.coco_uri)
        images += doc["images"]
        annotations += doc["annotations"]
    storage.write_json_atomic(storage.join(dataset_uri, "annotations", f"instances_{split}.json"),
                              coco_document(images, annotations, categories, f"{name} {version}"))
    manifest = {
        "name": name, "version": version, "split": split, "schema_version": SCHEMA_VERSION,
        "code_version": CODE_VERSION, "created": datetime.now(timezone.utc).isoformat(),
        "counts": {"samples": sum(s.rows for s in shards), "shards": len(shards),
                   "planned": sum(s.planned for s in shards), "dropped": sum(s.dropped for s in shards),
                   "flagged": sum(s.flagged for s in shards), "annotations": len(annotations)},
        "qc": {key: config.get("generation", {}).get(key) for key in
               ("qc_action", "min_mask_contrast", "min_label_auc", "adherence_scorer", "min_adherence")},
        "adherence": summary.as_dict(),
        "shards": [{"path": shard.uri[len(dataset_uri) + 1:], "rows": shard.rows, "dropped": shard.dropped,
                    "flagged": shard.flagged, "sha256": shard.sha256, "worker": shard.worker} for shard in shards],
        "categories": categories, "lineage": lineage, "config": config,
    }
    preview = preview_rows(shards, 16)
    if preview:
        storage.write_bytes_atomic(storage.join(dataset_uri, CONTACT_SHEET), contact_sheet(preview))
    storage.write_bytes_atomic(storage.join(dataset_uri, "README.md"),
                               dataset_card(name, version, split, manifest).encode())
    storage.write_json_atomic(manifest_uri, manifest)
    storage.write_bytes_atomic(storage.join(dataset_uri.rsplit("/", 1)[0], "latest"), f"{version}\n".encode())
    return DatasetRecord(name=name, version=version, uri=dataset_uri, manifest_uri=manifest_uri,
                         samples=manifest["counts"]["samples"], shards=len(shards), adherence=summary.as_dict())


def preview_rows(shards: list[ShardRecord], count: int) -> list[dict]:
    """The first ``count`` samples (image and instances) of the shards, skipping empty ones."""
    rows: list[dict] = []
    for shard in shards:
        if len(rows) >= count:
            break
        if shard.rows:
            table = pq.read_table(io.BytesIO(storage.read_bytes(shard.uri)), columns=["image", "instances"])
            rows += table.to_pylist()[: count - len(rows)]
    return rows


def contact_sheet(rows: list[dict], columns: int = 8) -> bytes:
    """PNG grid: each sample's image above the same image with its mask outlined in red."""
    from skimage.segmentation import find_boundaries

    tiles = []
    for row in rows:
        image = decode_image(row["image"]["bytes"])
        overlay = image.copy()
        for inst in row["instances"]:
            overlay[find_boundaries(rle_to_mask(inst["rle"]), mode="outer")] = (255, 0, 0)
        tiles.append(np.concatenate([image, overlay], axis=0))
    if not tiles:
        return b""
    grid = image_grid(tiles, columns)
    return encode_png(grid, compress_level=1)  # a preview: 4x faster to encode than level 6


def dataset_version(config: FactoryConfig, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord) -> str:
    """The configured version, or one derived from everything that decides the bytes."""
    if config.export.version:
        return config.export.version
    return "v-" + fingerprint("dataset", plan.fingerprint, concept.fingerprint, condition.fingerprint,
                              config.generation, config.driver, length=10)


def dataset_uri_for(config: FactoryConfig, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord) -> str:
    return storage.FactoryLayout.of(config.factory_root).dataset(
        config.export.dataset_name, dataset_version(config, plan, concept, condition))


def publish_dataset(config: FactoryConfig, catalog: CatalogRecord, plan: PlanRecord, concept: ModelRecord,
                    condition: ModelRecord, dataset_uri: str, shards: list[ShardRecord]) -> DatasetRecord:
    """Finalise the dataset version at ``dataset_uri`` with the lineage of everything that made it."""
    lineage = {"base_model": config.base_model.pretrained, "catalog_fingerprint": catalog.content_fingerprint,
               "plan_fingerprint": plan.fingerprint, "concept_fingerprint": concept.fingerprint,
               "condition_fingerprint": condition.fingerprint}
    version = dataset_uri.rstrip("/").rsplit("/", 1)[-1]
    return finalize_dataset(dataset_uri, config.export.dataset_name, version, config.export.split, shards,
                            catalog.categories, config.model_dump(mode="json"), lineage)
