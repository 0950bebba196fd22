"""Ingest: a team's COCO file, its images and a folder of defect-free images become the catalog.

Every image is normalised to RGB (EXIF orientation applied), keyed by a content hash, split
reproducibly, and stored with its instances as COCO RLE. What cannot be used is quarantined with
a reason; ``ingested + quarantined + duplicates = found`` always holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from indusfactory import storage
from indusfactory.config import SourceConfig
from indusfactory.errors import BadInputError
from indusfactory.fingerprint import fingerprint
from indusfactory.schema import (
    CATALOG_SCHEMA,
    QUARANTINE_SCHEMA,
    CatalogRecord,
    encode_png,
    mask_to_rle,
    rle_bbox_area,
    with_metadata,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CATALOG_FILE = "catalog.parquet"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "report.md"
RECORD_FILE = "catalog.json"


@dataclass
class IngestResult:
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    duplicates: int = 0
    found: int = 0

    def reject(self, source_uri: str, kind: str, reason: str) -> None:
        log.warning("quarantined %s: %s", source_uri, reason)
        self.quarantine.append({"source_uri": source_uri, "kind": kind, "reason": reason})


def source_listing(source: SourceConfig) -> dict:
    """What the ingest cache key depends on: the COCO file's hash and every file's name and size."""
    for label, uri in (("coco_annotations", source.coco_annotations), ("images_dir", source.images_dir),
                       ("defect_free_dir", source.defect_free_dir)):
        if not storage.exists(uri):
            raise BadInputError(f"source.{label} {uri} does not exist")
    listing = {"coco_sha256": storage.sha256_bytes(storage.read_bytes(source.coco_annotations))}
    for label, uri in (("images", source.images_dir), ("defect_free", source.defect_free_dir)):
        fs, path = storage.filesystem(uri)
        listing[label] = sorted((posixpath.relpath(p, path), int(info.get("size") or 0))
                                for p, info in fs.find(path, detail=True).items())
    return listing


def ingest_fingerprint(source: SourceConfig, factory_root: str) -> str:
    return fingerprint("ingest", source.model_dump(exclude={"make_sample_data"}), source_listing(source),
                       storage.normalise_uri(factory_root))


def load_rgb(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to RGB uint8 with EXIF orientation applied; clear errors for bad files."""
    if not data:
        raise BadInputError(f"{name} is an empty (zero-byte) file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadInputError(f"{name} has {width}x{height} pixels, above the limit of {max_pixels}")
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                array = (255.0 * array / max(float(array.max()), 1.0)).astype(np.uint8)
                image = Image.fromarray(array)
            rgb = np.asarray(image.convert("RGB"))
    except BadInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"{name} is refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(f"{name} is not a readable image: {exc}") from exc
    return rgb, width, height


def split_of(image_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Reproducible train/val/test assignment from the content hash and a seed."""
    value = int(hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if value < fractions[0]:
        return "train"
    return "val" if value < fractions[0] + fractions[1] else "test"


def decode_annotation(ann: dict, height: int, width: int) -> np.ndarray:
    """The boolean mask of a COCO annotation: polygons, uncompressed or compressed RLE."""
    segmentation = ann.get("segmentation")
    if segmentation is None or segmentation == []:
        raise BadInputError(f"annotation {ann.get('id')} has no segmentation")
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        size = [int(v) for v in segmentation.get("size", [])]
        if size != [height, width]:
            raise BadInputError(
                f"annotation {ann.get('id')} mask size {size} does not match its image ({height}x{width})")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise BadInputError(f"annotation {ann.get('id')} has an unknown segmentation type")
    return mask_utils.decode(rle).astype(bool)


def _instances(anns: Iterable[dict], categories: dict[int, str], height: int, width: int) -> list[dict]:
    instances = []
    for ann in anns:
        category_id = ann.get("category_id")
        if category_id not in categories:
            raise BadInputError(f"annotation {ann.get('id')} has unknown category id {category_id}")
        mask = decode_annotation(ann, height, width)
        if not mask.any():
            raise BadInputError(f"annotation {ann.get('id')} has an empty mask")
        rle = mask_to_rle(mask)
        bbox, area = rle_bbox_area(rle)
        instances.append({
            "annotation_id": int(ann["id"]), "category_id": int(category_id),
            "category": categories[category_id], "rle": rle, "bbox": bbox, "area": area,
            "iscrowd": bool(ann.get("iscrowd", 0)),
        })
    return instances


def _add_image(result: IngestResult, seen: set[str], source: SourceConfig, uri: str, name: str,
               instances_of: Callable[[int, int], list[dict]] | None) -> None:
    """Read, normalise and catalog one image, or quarantine it with the reason."""
    try:
        rgb, width, height = load_rgb(storage.read_bytes(uri), uri, source.max_image_pixels)
        png = encode_png(rgb)
        image_id = hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()[:20]
        if image_id in seen:
            result.duplicates += 1
            log.warning("dropped %s: exact duplicate of an image already ingested", uri)
            return
        instances = instances_of(rgb.shape[0], rgb.shape[1]) if instances_of else []
    except FileNotFoundError:
        result.reject(uri, "missing_file", f"{uri} does not exist")
        return
    except BadInputError as exc:
        result.reject(uri, "bad_input", str(exc))
        return
    seen.add(image_id)
    result.rows.append({
        "image_id": image_id, "source_uri": uri, "file_name": name, "width": width, "height": height,
        "split": split_of(image_id, source.split_seed, source.split_fractions),
        "defective": instances_of is not None, "image": {"bytes": png, "path": f"{image_id}.png"},
        "instances": instances,
    })


def read_coco(uri: str) -> dict:
    try:
        coco = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"COCO file {uri} is not valid JSON: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise BadInputError(f"COCO file {uri} has no '{key}' list")
    return coco


def collect(source: SourceConfig) -> tuple[IngestResult, list[dict]]:
    """Read every source image, returning catalog rows, quarantine rows and the categories."""
    coco = read_coco(source.coco_annotations)
    categories = sorted(({"id": int(c["id"]), "name": str(c["name"]), "supercategory": c.get("supercategory", "")}
                         for c in coco["categories"]), key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in categories}
    anns_by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        anns_by_image.setdefault(ann.get("image_id"), []).append(ann)
    result, seen = IngestResult(), set()
    for entry in coco["images"]:
        result.found += 1
        file_name = str(entry.get("file_name", ""))
        try:
            uri = storage.join(source.images_dir, file_name)
        except BadInputError as exc:
            result.reject(file_name, "unsafe_path", str(exc))
            continue
        anns = anns_by_image.get(entry.get("id"), [])
        _add_image(result, seen, source, uri, file_name, lambda h, w, anns=anns: _instances(anns, names, h, w))
    fs, root = storage.filesystem(source.defect_free_dir)
    for path in sorted(fs.find(root)):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        result.found += 1
        name = posixpath.relpath(path, root)
        _add_image(result, seen, source, storage.join(source.defect_free_dir, name), name, None)
    return result, categories


def _report(record: CatalogRecord, quarantine: list[dict]) -> str:
    lines = [
        "# Ingest report", "",
        f"- found: {record.found}", f"- ingested: {record.ingested} "
        f"({record.defective} defective, {record.defect_free} defect-free)",
        f"- duplicates dropped: {record.duplicates}", f"- quarantined: {record.quarantined}", "",
    ]
    if quarantine:
        lines += ["| file | kind | reason |", "| --- | --- | --- |"]
        lines += [f"| {q['source_uri']} | {q['kind']} | {q['reason']} |" for q in quarantine]
    return "\n".join(lines) + "\n"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def ingest(source: SourceConfig, catalog_uri: str) -> CatalogRecord:
    """Build the catalog at ``catalog_uri`` (reused as is if it is already complete)."""
    record_uri = storage.join(catalog_uri, RECORD_FILE)
    if storage.exists(record_uri):
        return CatalogRecord.model_validate({**storage.read_json(record_uri), "reused": True})
    result, categories = collect(source)
    if not any(row["defective"] for row in result.rows):
        raise BadInputError(
            f"no usable defective image in {source.coco_annotations} ({result.found} found, "
            f"{len(result.quarantine)} quarantined): see the reasons logged above")
    table = pa.Table.from_pylist(result.rows, schema=with_metadata(CATALOG_SCHEMA, categories))
    content = fingerprint("catalog", [(r["image_id"], r["split"], r["instances"]) for r in result.rows])
    defective = sum(row["defective"] for row in result.rows)
    record = CatalogRecord(
        uri=catalog_uri, fingerprint=catalog_uri.rstrip("/").rsplit("/", 1)[-1], content_fingerprint=content, found=result.found,
        ingested=len(result.rows), quarantined=len(result.quarantine), duplicates=result.duplicates,
        defective=defective, defect_free=len(result.rows) - defective, categories=categories,
    )
    assert record.ingested + record.quarantined + record.duplicates == record.found
    storage.write_bytes_atomic(storage.join(catalog_uri, CATALOG_FILE), _parquet_bytes(table))
    quarantine = pa.Table.from_pylist(result.quarantine, schema=QUARANTINE_SCHEMA)
    storage.write_bytes_atomic(storage.join(catalog_uri, QUARANTINE_FILE), _parquet_bytes(quarantine))
    storage.write_bytes_atomic(storage.join(catalog_uri, REPORT_FILE), _report(record, result.quarantine).encode())
    storage.write_json_atomic(record_uri, record.model_dump(mode="json", exclude={"reused"}))
    return record


def read_catalog(catalog_uri: str) -> pa.Table:
    """The catalog table (with its categories metadata)."""
    fs, path = storage.filesystem(storage.join(catalog_uri, CATALOG_FILE))
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def catalog_uri_for(config) -> str:
    """Where the catalog of ``config.source`` lives under the factory root."""
    return storage.FactoryLayout.of(config.factory_root).catalog(ingest_fingerprint(config.source, config.factory_root))


def catalog_marker(catalog_uri: str) -> str:
    return storage.join(catalog_uri, RECORD_FILE)
