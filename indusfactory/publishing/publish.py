"""Export: shards, COCO and the manifest of a dataset version under the factory root.

Layout of ``datasets/<name>/<version>/``::

    data/train-00000-of-00002.parquet   shards, Hugging Face naming; a shard exists only when complete
    shards/train-00000-of-00002.json    the shard's record: rows, counts, size, MD5 and sha256 of its parquet
    images/train-00000-of-00002/<sample_id>.png    the images the COCO files name, one folder per shard
    annotations/shards/train-00000-of-00002.json   COCO per shard
    annotations/instances_train.json    merged COCO (file_name relative to images/), written streaming
    contact_sheet.png                   samples above their mask outlines
    README.md                           dataset card; `datasets.load_dataset(path)` reads the folder
    manifest.json                       counts, checksums, lineage, config: written last (commit marker)

A version with a manifest is published and never rewritten: nothing writes into it again. A version is
one closed set: its shards carry the fingerprint of what made them (plan, models, generation and driver
config; ``generation_fingerprint``), and a folder that published, or holds shards of, another plan or
config is refused (``check_version``), so a pinned ``export.version`` reused for a changed config never
mixes two datasets nor returns the old one. One run at a time writes a version: the flows hold a storage
lock per version around generation and publishing; a shard is written once (``write_bytes_exclusive``).

Publishing scales with the number of shards, not with their bytes: a shard's size, MD5 and sha256 are
computed from the bytes in hand as it is written and kept in its record; the reuse check, the dispatcher and
publish compare them with the file's metadata (one listing: size, and the ETag on S3), never reading a shard
back; the merged COCO is streamed shard by shard.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from indusfactory.config import FactoryConfig
from indusfactory.generation.adherence import NEAR_CHANCE, AdherenceSummary, summarise_totals
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError, IndusfactoryError, NearChanceError, VersionConflictError
from indusfactory.infra.fingerprint import CODE_VERSION, fingerprint
from indusfactory.infra.imaging import image_grid
from indusfactory.layout import MANIFEST_FILE, DatasetFolder, DatasetLayout, FactoryLayout
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

log = logging.getLogger("indusfactory.export")  # the name operators filter on, kept from the flat layout

SHARD_METADATA = b"indusfactory.shard"
"""Parquet metadata key of a shard's own counts and origin: ``{"planned": n, "dropped": k,
"generation_fingerprint": fp}``."""


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}"


def shard_uri(dataset_uri: str, split: str, index: int, total: int) -> str:
    return DatasetLayout(dataset_uri).shard(shard_name(split, index, total))


def shard_coco_uri(dataset_uri: str, split: str, index: int, total: int) -> str:
    return DatasetLayout(dataset_uri).shard_coco(shard_name(split, index, total))


def is_published(dataset_uri: str) -> bool:
    return storage.exists(DatasetLayout(dataset_uri).manifest)


def coco_of_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """COCO ``images`` and ``annotations`` of dataset rows (ids from the plan's sample index)."""
    images, annotations = [], []
    for row in rows:
        images.append(
            {
                "id": int(row["sample_index"]),
                "file_name": row["image"]["path"],
                "width": row["width"],
                "height": row["height"],
                "sample_id": row["sample_id"],
            }
        )
        for k, inst in enumerate(row["instances"]):
            annotations.append(
                {
                    "id": int(row["sample_index"]) * 100 + k + 1,
                    "image_id": int(row["sample_index"]),
                    "category_id": inst["category_id"],
                    "segmentation": inst["rle"],
                    "area": inst["area"],
                    "bbox": inst["bbox"],
                    "iscrowd": 0,
                }
            )
    return images, annotations


def refuse_published(dataset_uri: str) -> None:
    """Raise when ``dataset_uri`` is published: nothing is ever written into a folder with a manifest."""
    if is_published(dataset_uri):
        raise VersionConflictError(
            f"{dataset_uri} is published (it has a {MANIFEST_FILE}) and never written into "
            "again; set export.version to a new name to make another dataset"
        )


def write_shard(
    dataset_uri: str,
    split: str,
    index: int,
    total: int,
    rows: list[dict],
    categories: list[dict],
    seconds: float,
    dropped: int = 0,
    worker: str = "",
    generation_fingerprint: str = "",
    adherence: dict | None = None,
) -> ShardRecord:
    """Write images, the shard's COCO file and, last, its parquet (the shard's completion marker).

    ``rows`` are the samples kept; ``dropped`` more were planned and left out by QC (recorded in the
    parquet metadata with ``generation_fingerprint`` and the adherence totals of every generated sample,
    ``adherence.shard_totals``, so a reused shard reports them too). A shard is written once: when its
    parquet is already there (another run of the version wrote it first), that one is kept and returned.
    """
    refuse_published(dataset_uri)
    done = existing_shard(dataset_uri, split, index, total)
    if done:
        return done
    layout, name = DatasetLayout(dataset_uri), shard_name(split, index, total)
    rows = [{**row, "image": {**row["image"], "path": layout.image_name(name, row["image"]["path"])}} for row in rows]
    storage.write_many_atomic({layout.image(row["image"]["path"]): row["image"]["bytes"] for row in rows})
    images, annotations = coco_of_rows(rows)
    coco_uri = layout.shard_coco(name)
    storage.write_json_atomic(coco_uri, coco_document(images, annotations, categories, name))
    schema = with_metadata(DATASET_SCHEMA, categories, huggingface=True)
    counts = json.dumps(
        {
            "planned": len(rows) + dropped,
            "dropped": dropped,
            "generation_fingerprint": generation_fingerprint,
            "adherence": adherence or {},
        }
    ).encode()
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata({**schema.metadata, SHARD_METADATA: counts}))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    uri = layout.shard(name)
    if not storage.write_bytes_exclusive(uri, data):
        log.warning("%s was written by another run meanwhile: that one is kept, this run's copy dropped", uri)
        kept = existing_shard(dataset_uri, split, index, total)
        if kept is None:
            raise IndusfactoryError(f"{uri} was written by another run but cannot be read back")
        return kept
    record = ShardRecord(
        index=index,
        total=total,
        uri=uri,
        coco_uri=coco_uri,
        rows=len(rows),
        flagged=sum(not r["qc_passed"] for r in rows),
        dropped=dropped,
        sha256=storage.sha256_bytes(data),
        seconds=round(seconds, 3),
        worker=worker or (rows[0]["worker"] if rows else ""),
        generation_fingerprint=generation_fingerprint,
        adherence=adherence or {},
        **written_stamp(uri, data),
    )
    _write_shard_record(dataset_uri, split, record)
    return record


def written_stamp(uri: str, data: bytes) -> dict:
    """What a shard's checks compare its file with later: size and MD5 of the bytes in hand at the write, and
    the file's version right after it (its ETag on S3, a local file's mtime: one HEAD or stat, no read)."""
    return {
        "bytes": len(data),
        "md5": storage.md5_bytes(data),
        "version": storage.file_version(storage.info(uri) or {}),
    }


def _write_shard_record(dataset_uri: str, split: str, record: ShardRecord) -> None:
    name = shard_name(split, record.index, record.total)
    fields = record.model_dump(mode="json", exclude={"reused", "seconds"})
    storage.write_json_atomic(DatasetLayout(dataset_uri).shard_record(name), fields)


def existing_shard(
    dataset_uri: str, split: str, index: int, total: int, found: dict | None = None
) -> ShardRecord | None:
    """The record of a shard already on storage (a rerun does not regenerate it), else None.

    Read from the shard's record (``shards/<shard>.json``) once the parquet's metadata matches what the record
    says was written (size, and the MD5 ETag or the version): no byte of the shard is read. ``found``: the
    parquet's metadata from a listing already made (None: looked up here). A shard without a matching record (written
    before records existed, or a crash between the parquet and its record) is read whole once, and its record
    written unless the version is published."""
    layout, name = DatasetLayout(dataset_uri), shard_name(split, index, total)
    uri = layout.shard(name)
    if found is None:
        found = storage.info(uri)
    if not found:
        return None
    try:
        kept = ShardRecord.model_validate({**storage.read_json(layout.shard_record(name)), "seconds": 0.0})
    except (FileNotFoundError, ValueError):
        kept = None
    if kept is not None and kept.uri == uri and kept.bytes:
        problem = storage.differs_from_write(found, kept.bytes, kept.md5, kept.version)
        if problem is None:
            return kept.model_copy(update={"reused": True})
        log.warning("%s %s: its record is not trusted, the shard is read instead", uri, problem)
    return _shard_read_whole(dataset_uri, split, index, total)


def _shard_read_whole(dataset_uri: str, split: str, index: int, total: int) -> ShardRecord:
    uri = shard_uri(dataset_uri, split, index, total)
    data = storage.read_bytes(uri)
    table = pq.read_table(io.BytesIO(data), columns=["qc_passed", "worker"])
    counts = json.loads((table.schema.metadata or {}).get(SHARD_METADATA, b"{}"))
    record = ShardRecord(
        index=index,
        total=total,
        uri=uri,
        coco_uri=shard_coco_uri(dataset_uri, split, index, total),
        rows=table.num_rows,
        flagged=int((~np.asarray(table["qc_passed"])).sum()),
        dropped=int(counts.get("dropped", 0)),
        adherence=counts.get("adherence", {}),
        sha256=storage.sha256_bytes(data),
        seconds=0.0,
        worker=table["worker"][0].as_py() if table.num_rows else "",
        generation_fingerprint=counts.get("generation_fingerprint", ""),
        reused=True,
        **written_stamp(uri, data),
    )
    if not is_published(dataset_uri):
        _write_shard_record(dataset_uri, split, record)
    return record


def existing_shards(dataset_uri: str, split: str, total: int) -> dict[int, ShardRecord]:
    """``existing_shard`` of every shard of a version, from one listing of ``data/`` and their records, read 16 at
    a time (the work-pool dispatcher, the scale benchmark's reuse check)."""
    from concurrent.futures import ThreadPoolExecutor

    found = storage.listing(DatasetLayout(dataset_uri).data)
    entries = {i: found.get(f"{shard_name(split, i, total)}.parquet") for i in range(total)}
    present = [i for i, entry in entries.items() if entry]
    with ThreadPoolExecutor(max_workers=16) as pool:  # each a record read: latency-bound on object stores
        records = pool.map(lambda i: existing_shard(dataset_uri, split, i, total, entries[i]), present)
        return {i: record for i, record in zip(present, records) if record is not None}


def present_shards(dataset_uri: str, split: str, total: int) -> set[int]:
    """The shards of a version whose parquet is on storage, from one listing of ``data/`` (nothing read)."""
    found = storage.listing(DatasetLayout(dataset_uri).data)
    return {i for i in range(total) if f"{shard_name(split, i, total)}.parquet" in found}


def shard_fingerprint(uri: str) -> str:
    """The ``generation_fingerprint`` in a shard's parquet metadata ("" for shards written before it existed)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb", **storage.range_read_options(fs)) as handle:  # the footer only
        metadata = pq.read_schema(handle).metadata or {}
    return json.loads(metadata.get(SHARD_METADATA, b"{}")).get("generation_fingerprint", "")


def foreign_shards(dataset_uri: str, generation_fingerprint: str, split: str, total: int) -> list[str]:
    """The parquet files in ``<dataset_uri>/data/`` that are not shards of this plan and config: another
    split or shard count, or another ``generation_fingerprint`` (read from each shard when one is given)."""
    fs, path = storage.filesystem(DatasetLayout(dataset_uri).data)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    ours = {f"{shard_name(split, i, total)}.parquet" for i in range(total)}
    foreign = []
    for name in sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)):
        if not name.endswith(".parquet") or name.startswith((storage.TMP_PREFIX, ".")):
            continue
        known = generation_fingerprint and name in ours
        made_by = shard_fingerprint(storage.join(DatasetLayout(dataset_uri).data, name)) if known else ""
        if name not in ours or (generation_fingerprint and made_by and made_by != generation_fingerprint):
            foreign.append(name)
    return foreign


def check_before_writing(dataset_uri: str, split: str, total: int) -> None:
    """What ``generate_shard`` checks before generating, in one listing: the version is not published and
    ``data/`` holds no shard named for another split or shard count (``check_version`` reads fingerprints)."""
    refuse_published(dataset_uri)
    foreign = foreign_shards(dataset_uri, "", split, total)
    if foreign:
        raise VersionConflictError(_foreign_message(dataset_uri, foreign))


def check_shard_origin(shard: ShardRecord, generation_fingerprint: str, dataset_uri: str) -> None:
    """Refuse to reuse a shard that another plan or config made (a pinned version reused for a changed config)."""
    made_by = shard.generation_fingerprint
    if not (made_by and generation_fingerprint and made_by != generation_fingerprint):
        return
    if is_published(dataset_uri):
        raise VersionConflictError(
            f"{dataset_uri} was published from another plan or config (generation "
            f"fingerprint {made_by}, {generation_fingerprint} now); a published version is "
            "never rewritten: set export.version to a new name"
        )
    raise VersionConflictError(_foreign_message(dataset_uri, [posixpath.basename(shard.uri)]))


def _foreign_message(dataset_uri: str, names: list[str]) -> str:
    return (
        f"{DatasetLayout(dataset_uri).data} holds shards of another plan or config ({', '.join(names)}), left "
        f"by an unfinished run under the same export.version; nothing in {dataset_uri} is published yet: delete "
        "that folder to make the version with the current config, or set export.version to a new name"
    )


def check_version(dataset_uri: str, lineage: dict, split: str, total: int) -> None:
    """Refuse a version folder that published another plan or config (any ``lineage`` fingerprint differs), or
    that holds shards of one; a version is one closed set of the shards of one plan."""
    if is_published(dataset_uri):
        theirs = storage.read_json(DatasetLayout(dataset_uri).manifest).get("lineage", {})
        differ = sorted(
            k for k in theirs.keys() & lineage.keys() if k.endswith("_fingerprint") and theirs[k] != lineage[k]
        )
        if differ:
            what = "; ".join(f"{k} {theirs[k]} there, {lineage[k]} now" for k in differ)
            raise VersionConflictError(
                f"{dataset_uri} was published from another plan or config ({what}); a "
                "published version is never rewritten: set export.version to a new name, or "
                "leave it unset to derive one from the config"
            )
        return
    foreign = foreign_shards(dataset_uri, lineage.get("generation_fingerprint", ""), split, total)
    if foreign:
        raise VersionConflictError(_foreign_message(dataset_uri, foreign))


def dataset_card(name: str, version: str, split: str, manifest: dict) -> str:
    """README.md as a ``huggingface_hub.DatasetCard``: its ``DatasetCardData`` carries the ``configs`` whose
    ``data_files`` `datasets.load_dataset(folder)` reads (exactly the manifest's shards); its body says what
    the dataset is and how to load it."""
    counts = manifest["counts"]
    data = DatasetCardData(
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": [shard["path"] for shard in manifest["shards"]]}],
            }
        ],
        task_categories=["image-segmentation"],
        tags=["synthetic", "industrial-inspection", "indusfactory"],
    )
    body = "\n".join(
        [
            f"# {name} {version}",
            "",
            "Synthetic, self-annotated industrial defect images made by indusfactory "
            "(DreamBooth concept + ControlNet-style conditioning on topological drivers).",
            "",
            f"- samples: {counts['samples']} in {counts['shards']} shards ({counts['flagged']} flagged by QC; "
            f"{counts['dropped']} of {counts['planned']} planned dropped by QC)",
            f"- categories: {', '.join(c['name'] for c in manifest['categories'])}",
            f"- base model: `{manifest['lineage']['base_model']}`;"
            f" concept `{manifest['lineage']['concept_fingerprint']}`;"
            f" condition `{manifest['lineage']['condition_fingerprint']}`",
            *adherence_lines(manifest.get("adherence")),
            "",
            "## Load it",
            "",
            "```python",
            "import pandas as pd",
            'df = pd.read_parquet("{root}/data/")',
            "from datasets import load_dataset",
            'ds = load_dataset("{root}")',
            "from pycocotools.coco import COCO",
            f'coco = COCO("{{root}}/annotations/instances_{split}.json")',
            "```",
            "",
            "Masks are COCO RLE (`instances[].rle`, decode with `pycocotools.mask.decode`).",
            "",
        ]
    ).replace("{root}", f"<path to {name}/{version}>")
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def adherence_verdict(shards: list[ShardRecord], generation: dict, dataset_uri: str) -> AdherenceSummary:
    """Whether the dataset's samples follow their labels; with ``refuse_near_chance``, an error if not."""
    summary = summarise_totals([s.adherence for s in shards], margin=generation.get("adherence_margin", 0.1))
    if not summary.follows_labels and generation.get("refuse_near_chance"):
        raise NearChanceError(
            f"not publishing {dataset_uri}: its samples do not follow their labels ("
            f"{summary.headline()}; needs {summary.margin} above chance). The conditioning "
            "network did not learn where the defects go: train it longer (condition.steps), "
            "check its validation adherence in the model card, or set "
            "generation.refuse_near_chance false to publish it marked 'near chance'."
        )
    return summary


def adherence_lines(adherence: dict | None) -> list[str]:
    """The card's statement of whether the labels follow the images (a warning when they do not)."""
    if not adherence:
        return []
    line = (
        f"- labels: **{adherence['verdict']}**: median label AUC {adherence['median_auc']:.3f} against "
        f"{adherence['chance_auc']:.3f} by chance (the same images with other samples' masks); "
        f"{adherence['fraction_darker']:.0%} of {adherence['samples']} samples darker inside their label"
    )
    if adherence["verdict"] == NEAR_CHANCE:
        return [
            line,
            "",
            "> **Warning**: the defects in these images are not where the labels say. Do not train "
            "on this dataset; retrain the conditioning network (see its model card's validation adherence).",
        ]
    return [line]


def finalize_dataset(
    dataset_uri: str,
    name: str,
    version: str,
    split: str,
    shards: list[ShardRecord],
    categories: list[dict],
    config: dict,
    lineage: dict,
) -> DatasetRecord:
    """Merge COCO, write the card, then the manifest (last), then move the ``latest`` pointer.

    An already published version is checked against ``lineage`` (refused when another plan or config made
    it) and returned as it is; ``latest`` is repaired if a crash left it behind.
    """
    manifest_uri = DatasetLayout(dataset_uri).manifest
    shards = sorted(shards, key=lambda s: s.index)
    expected = shards[0].total if shards else 0
    if is_published(dataset_uri):
        return _published(dataset_uri, name, version, split, lineage, expected)
    if [s.index for s in shards] != list(range(expected)):
        raise IndusfactoryError(f"cannot publish {dataset_uri}: shards {[s.index for s in shards]} of {expected}")
    check_version(dataset_uri, lineage, split, expected)  # data/ holds exactly these shards, of this config
    check_unchanged(dataset_uri, shards)
    summary = adherence_verdict(shards, config.get("generation", {}), dataset_uri)
    storage.remove_temporaries(dataset_uri)  # left by a crashed attempt; every shard is complete now
    annotation_count = merge_coco(
        DatasetLayout(dataset_uri).coco(split), [s.coco_uri for s in shards], categories, f"{name} {version}"
    )
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "split": split,
        "schema_version": SCHEMA_VERSION,
        "code_version": CODE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "counts": {
            "samples": sum(s.rows for s in shards),
            "shards": len(shards),
            "planned": sum(s.planned for s in shards),
            "dropped": sum(s.dropped for s in shards),
            "flagged": sum(s.flagged for s in shards),
            "annotations": annotation_count,
        },
        "qc": {
            key: config.get("generation", {}).get(key)
            for key in ("qc_action", "min_mask_contrast", "min_label_auc", "adherence_scorer", "min_adherence")
        },
        "adherence": summary.as_dict(),
        "shards": [
            {
                "path": shard.uri[len(dataset_uri) + 1 :],
                "rows": shard.rows,
                "dropped": shard.dropped,
                "flagged": shard.flagged,
                "sha256": shard.sha256,
                "worker": shard.worker,
            }
            for shard in shards
        ],
        "categories": categories,
        "lineage": lineage,
        "config": config,
    }
    preview = preview_rows(shards, 16)
    if preview:
        storage.write_bytes_atomic(DatasetLayout(dataset_uri).contact_sheet, contact_sheet(preview))
    storage.write_bytes_atomic(DatasetLayout(dataset_uri).card, dataset_card(name, version, split, manifest).encode())
    document = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode("utf-8")
    if not storage.write_bytes_exclusive(manifest_uri, document):  # published by another run meanwhile
        return _published(dataset_uri, name, version, split, lineage, expected)
    point_latest(dataset_uri, version, manifest["created"])
    return DatasetRecord(
        name=name,
        version=version,
        uri=dataset_uri,
        manifest_uri=manifest_uri,
        samples=manifest["counts"]["samples"],
        shards=len(shards),
        adherence=summary.as_dict(),
    )


def check_unchanged(dataset_uri: str, shards: list[ShardRecord]) -> None:
    """Every shard is the file its record says was written: compared with one listing of ``data/`` (size, and
    the MD5 ETag on S3 or the version elsewhere). Only a record without them (made by an older version of the
    factory) has its shard read to compare the sha256."""
    found = storage.listing(DatasetLayout(dataset_uri).data)
    for shard in shards:
        entry = found.get(posixpath.basename(shard.uri))
        if shard.bytes:
            problem = storage.differs_from_write(entry, shard.bytes, shard.md5, shard.version)
        elif entry is None:
            problem = "is missing"
        else:
            same = storage.sha256_bytes(storage.read_bytes(shard.uri)) == shard.sha256
            problem = None if same else "changed after it was written"
        if problem:
            raise IndusfactoryError(f"cannot publish {dataset_uri}: {shard.uri} {problem}")


def merge_coco(uri: str, shard_coco_uris: list[str], categories: list[dict], description: str) -> int:
    """Write the merged COCO file of the shards' COCO files at ``uri``, streaming: one shard's file in memory at a
    time, its images and annotations spooled to local temporary files, the output written (uploaded) piece by
    piece. The result is ``schema.coco_document`` of every shard's images and annotations, in shard order (keys
    sorted, one image or annotation a line). Returns the number of annotations."""
    import tempfile

    head = coco_document([], [], categories, description)
    streamed = [key for key, value in head.items() if isinstance(value, list) and key != "categories"]
    spools = {key: tempfile.TemporaryFile() for key in streamed}
    counts = dict.fromkeys(streamed, 0)
    try:
        for doc in storage.read_json_many(shard_coco_uris):  # a few at a time; one window in memory
            for key in streamed:
                for item in doc.get(key, []):
                    spools[key].write((b",\n" if counts[key] else b"\n") + json.dumps(item, sort_keys=True).encode())
                    counts[key] += 1
        with storage.open_atomic(uri) as out:
            out.write(b"{")
            for n, key in enumerate(sorted(head)):
                out.write((b",\n" if n else b"") + json.dumps(key).encode() + b": ")
                if key not in spools:
                    out.write(json.dumps(head[key], sort_keys=True).encode())
                    continue
                out.write(b"[")
                spools[key].seek(0)
                for chunk in iter(lambda: spools[key].read(1 << 20), b""):
                    out.write(chunk)
                out.write(b"\n]")
            out.write(b"}\n")
    finally:
        for spool in spools.values():
            spool.close()
    return counts.get("annotations", 0)


def _published(dataset_uri: str, name: str, version: str, split: str, lineage: dict, total: int) -> DatasetRecord:
    """The record of a published version, after checking it was made by ``lineage``; repairs ``latest``."""
    check_version(dataset_uri, lineage, split, total)
    manifest_uri = DatasetLayout(dataset_uri).manifest
    manifest = storage.read_json(manifest_uri)
    point_latest(dataset_uri, version, manifest.get("created", ""))
    return DatasetRecord(
        name=name,
        version=version,
        uri=dataset_uri,
        manifest_uri=manifest_uri,
        samples=manifest["counts"]["samples"],
        shards=manifest["counts"]["shards"],
        adherence=manifest.get("adherence", {}),
        reused=True,
    )


def point_latest(dataset_uri: str, version: str, created: str) -> bool:
    """Point ``<dataset>/latest`` at ``version`` unless it already does, or names a version published later
    (by its manifest's ``created``); True when written. Run on every publish and every reuse, so a crash
    between a manifest and its pointer is repaired by the next run."""
    latest_uri = DatasetLayout(dataset_uri).latest
    current = storage.read_bytes(latest_uri).decode("utf-8", "replace").strip() if storage.exists(latest_uri) else ""
    if current == version:
        return False
    try:
        other = DatasetLayout(dataset_uri).sibling(current).manifest if current else ""
    except BadInputError:
        other = ""  # a damaged pointer: replaced
    if other and storage.exists(other) and str(storage.read_json(other).get("created", "")) > created:
        log.info("%s stays at %s, published after %s", latest_uri, current, version)
        return False
    storage.write_bytes_atomic(latest_uri, f"{version}\n".encode())
    return True


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
    return "v-" + generation_fingerprint(config, plan, concept, condition)


def generation_fingerprint(
    config: FactoryConfig, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord
) -> str:
    """What makes a dataset's shards: plan, models, generation and driver config (also the derived version)."""
    return fingerprint(
        "dataset",
        plan.fingerprint,
        concept.fingerprint,
        condition.fingerprint,
        config.generation,
        config.driver,
        length=10,
    )


def dataset_folder_for(
    config: FactoryConfig, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord
) -> DatasetFolder:
    """The dataset version's folder under the factory root (``datasets/<name>/<version>``), with its version."""
    return FactoryLayout.of(config.factory_root).dataset(
        config.export.dataset_name, dataset_version(config, plan, concept, condition)
    )


def dataset_uri_for(config: FactoryConfig, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord) -> str:
    return dataset_folder_for(config, plan, concept, condition).uri


def publish_dataset(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    output: DatasetFolder | str,
    shards: list[ShardRecord],
) -> DatasetRecord:
    """Finalise the dataset version in ``output`` with the lineage of everything that made it: the folder
    ``dataset_folder_for`` names, or any URI (the version is then the configured or derived one all the same)."""
    folder = (
        output
        if isinstance(output, DatasetFolder)
        else DatasetFolder(output, dataset_version(config, plan, concept, condition), config.export.dataset_name)
    )
    return finalize_dataset(
        folder.uri,
        config.export.dataset_name,
        folder.version,
        config.export.split,
        shards,
        catalog.categories,
        config.model_dump(mode="json"),
        dataset_lineage(config, catalog, plan, concept, condition),
    )


def dataset_lineage(
    config: FactoryConfig, catalog: CatalogRecord, plan: PlanRecord, concept: ModelRecord, condition: ModelRecord
) -> dict:
    """The manifest's ``lineage``: the base model and the fingerprint of everything that made the dataset."""
    return {
        "base_model": config.base_model.pretrained,
        "catalog_fingerprint": catalog.content_fingerprint,
        "plan_fingerprint": plan.fingerprint,
        "concept_fingerprint": concept.fingerprint,
        "condition_fingerprint": condition.fingerprint,
        "generation_fingerprint": generation_fingerprint(config, plan, concept, condition),
    }


def check_dataset_version(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
) -> None:
    """``check_version`` for a config: run before generating, so a foreign or changed version fails first."""
    check_version(
        dataset_uri, dataset_lineage(config, catalog, plan, concept, condition), config.export.split, plan.shards
    )
