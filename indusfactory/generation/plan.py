"""The generation plan: one row per sample, deciding the whole dataset.

Each defect-free image gets N offline augmentations (drivers); each driver is paired with up to
K masks sampled from the annotated training split and perturbed (the paper's SADF set), each
with its own seed. A row holds every parameter needed to rebuild its driver and mask, so the same
plan and the same models give the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from skimage.transform import AffineTransform, warp

from indusfactory.config import FactoryConfig
from indusfactory.drivers.augment import (
    AUGMENTATION_VERSION,
    apply_augmentation,
    apply_perturbation,
    augmentation_matrix,
    sample_augmentation,
    sample_perturbation,
)
from indusfactory.drivers.cracks import CRACK_STYLES, random_crack_mask
from indusfactory.drivers.topology import extract_topological_driver
from indusfactory.generation.colour import ChromaStats, pooled_chroma
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.infra.imaging import fit_square, image_grid
from indusfactory.layout import FactoryLayout, PlanFolder
from indusfactory.learning.prompts import condition_prompt
from indusfactory.schema import (
    PLAN_SCHEMA,
    CatalogRecord,
    PlanRecord,
    category_index,
    decode_image,
    encode_png,
    rle_to_mask,
)
from indusfactory.sources.catalog import read_catalog

MASK_SOURCE_BANK = "bank"
MASK_SOURCE_PROCEDURAL = "procedural"
MAX_PLACEMENT_TRIES = 20
MIN_INSIDE_ROI = 0.95


def plan_fingerprint(config: FactoryConfig, catalog: CatalogRecord) -> str:
    parts = [
        catalog.content_fingerprint,
        config.plan,
        config.generation.shard_size,
        config.concept.token,
        config.condition.prompt_template,
        config.base_model.resolution,
        storage.normalise_uri(config.factory_root),
    ]
    if config.plan.roi_dir:  # the ROI files' contents decide the placements, not only their folder's name
        parts.append(storage.folder_listing(config.plan.roi_dir))
    return fingerprint("plan", AUGMENTATION_VERSION, *parts)


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _mask_bank(rows: list[dict]) -> list[dict]:
    """Every instance of the defective train split, in a stable order."""
    bank = [
        {"image_id": r["image_id"], **inst}
        for r in rows
        if r["defective"] and r["split"] == "train"
        for inst in r["instances"]
    ]
    if not bank:
        raise BadInputError("the catalog's train split has no annotated instance to sample masks from")
    return sorted(bank, key=lambda b: (b["image_id"], b["annotation_id"]))


def crack_style_for(config: FactoryConfig, category: str) -> str:
    """The procedural crack style of a class: configured, else the class name if it is a style."""
    style = config.plan.procedural_styles.get(category, category if category in CRACK_STYLES else "hairline")
    if style not in CRACK_STYLES:
        raise BadInputError(f"plan.procedural_styles[{category!r}] = {style!r} is not one of {sorted(CRACK_STYLES)}")
    return style


def _sample_instance(config: FactoryConfig, bank: list[dict], categories: list[dict], rng: np.random.Generator) -> dict:
    """One mask of a sample: a perturbed mask from the bank, or a procedural crack of a sampled class."""
    if rng.random() < config.plan.procedural_fraction:
        category = categories[int(rng.integers(len(categories)))]
        return {
            "category_id": category["id"],
            "category": category["name"],
            "mask_source": MASK_SOURCE_PROCEDURAL,
            "mask_source_id": crack_style_for(config, category["name"]),
            "perturbation": json.dumps({"crack_seed": int(rng.integers(0, 2**31 - 1))}),
        }
    source = bank[int(rng.integers(len(bank)))]
    return {
        "category_id": source["category_id"],
        "category": source["category"],
        "mask_source": MASK_SOURCE_BANK,
        "mask_source_id": f"{source['image_id']}:{source['annotation_id']}",
        "perturbation": json.dumps(sample_perturbation(rng), sort_keys=True),
    }


def _plan_instance(
    config: FactoryConfig,
    bank: list[dict],
    categories: list[dict],
    rng: np.random.Generator,
    roi: np.ndarray | None,
    sources: "SourceImages",
    driver_id: str,
) -> dict:
    """Sample masks until one falls inside the region of interest (at once when there is none)."""
    if roi is None:
        return _sample_instance(config, bank, categories, rng)
    for _ in range(MAX_PLACEMENT_TRIES):
        inst = _sample_instance(config, bank, categories, rng)
        mask = instance_mask(inst, sources, config.base_model.resolution)
        if (mask & roi).sum() >= MIN_INSIDE_ROI * mask.sum():
            return inst
    raise BadInputError(
        f"no sampled mask falls inside the region of interest of defect-free image {driver_id} after "
        f"{MAX_PLACEMENT_TRIES} tries (the region covers {roi.mean():.0%} of the image)"
    )


def build_plan_rows(config: FactoryConfig, rows: list[dict], sources: "SourceImages") -> list[dict]:
    """The plan as a list of rows (deterministic in the config and the catalog)."""
    drivers = sorted((r for r in rows if not r["defective"]), key=lambda r: r["image_id"])
    if not drivers:
        raise BadInputError("the catalog has no defect-free image to build drivers from")
    drivers = drivers[: config.plan.max_defect_free_images or None]
    bank = _mask_bank(rows)
    pairs = sorted({(b["category_id"], b["category"]) for b in bank})
    categories = [{"id": cid, "name": name} for cid, name in pairs]
    plan: list[dict] = []
    for driver in drivers:
        for aug in range(config.plan.augmentations_per_image):
            rng = _rng(config.plan.seed, driver["image_id"], aug)
            augmentation = sample_augmentation(rng)
            roi = driver_roi(config, sources, driver["image_id"], augmentation)
            for slot in range(config.plan.images_per_driver):
                n_instances = int(rng.integers(1, config.plan.max_instances_per_image + 1))
                instances = [
                    _plan_instance(config, bank, categories, rng, roi, sources, driver["image_id"])
                    for _ in range(n_instances)
                ]
                plan.append(
                    {
                        "sample_id": fingerprint("sample", config.plan.seed, driver["image_id"], aug, slot),
                        "sample_index": len(plan),
                        "shard": len(plan) // config.generation.shard_size,
                        "driver_image_id": driver["image_id"],
                        "augmentation_index": aug,
                        "augmentation": json.dumps(augmentation, sort_keys=True),
                        "instances": instances,
                        "prompt": condition_prompt(config, [i["category"] for i in instances]),
                        "seed": int(rng.integers(0, 2**31 - 1)),
                    }
                )
    return plan


def build_plan(config: FactoryConfig, catalog: CatalogRecord, output: PlanFolder | str) -> PlanRecord:
    """Write the plan into ``output`` (reused when already complete): the folder ``plan_folder_for`` names, or
    any URI (the record's fingerprint is the plan's all the same).

    ``plan.parquet`` holds every row (one row group per shard); ``shards/shard-NNNNN.parquet`` each shard's
    rows again, alone, so generating a shard reads its own rows only (``read_plan``)."""
    folder = output if isinstance(output, PlanFolder) else PlanFolder(output, plan_fingerprint(config, catalog))
    done = PlanRecord.read_completed(folder.marker)
    if done:
        return done
    sources = SourceImages(catalog.uri, catalog.categories)
    rows = build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), sources)
    storage.write_bytes_atomic(folder.table, plan_bytes(rows))
    storage.write_many_atomic(plan_shard_files(folder, rows))
    storage.write_bytes_atomic(folder.preview, plan_preview(config, sources, rows[:32]))
    record = PlanRecord(
        uri=folder.uri,
        fingerprint=folder.fingerprint,
        samples=len(rows),
        shards=rows[-1]["shard"] + 1,
    )
    storage.write_json_atomic(folder.marker, record.model_dump(mode="json", exclude={"reused"}))
    return record


def plan_bytes(rows: list[dict]) -> bytes:
    """The plan parquet of ``rows`` (sorted by shard): one row group per shard, so a shard's rows are read
    alone (``read_plan``), at the same cost whatever the size of the plan."""
    table = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, PLAN_SCHEMA) as writer:
        shards = table.column("shard").to_numpy()
        start = 0
        while start < len(shards):
            end = int(np.searchsorted(shards, shards[start], side="right"))
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
            start = end
    return sink.getvalue().to_pybytes()


def plan_folder(plan: PlanRecord) -> PlanFolder:
    return PlanFolder(plan.uri, plan.fingerprint)


def plan_shard_files(folder: PlanFolder, rows: list[dict]) -> dict[str, bytes]:
    """``{uri: parquet}`` of each shard's rows alone (``shards/shard-NNNNN.parquet``)."""
    by_shard: dict[int, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    return {folder.shard(shard): plan_bytes(part) for shard, part in by_shard.items()}


def shard_row_groups(metadata: pq.FileMetaData, shard: int) -> list[int] | None:
    """The row groups of a plan file that may hold ``shard``'s rows, from the row groups' statistics of the
    ``shard`` column; None when a row group has no statistics."""
    column = metadata.schema.names.index("shard")
    groups = []
    for i in range(metadata.num_row_groups):
        stats = metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        if stats.min <= shard <= stats.max:
            groups.append(i)
    return groups


def read_plan(plan: PlanRecord, shard: int | None = None) -> list[dict]:
    """The plan rows (of one shard when ``shard`` is given; a shard outside the plan or without rows is an error).

    A shard reads its own file (``plans/<fp>/shards/``): the same cost at a thousand plan rows as at a
    million. A plan written before those files existed reads the shard's row groups of ``plan.parquet``
    (found from the footer's statistics; a one-row-group plan is filtered whole)."""
    if shard is not None and not 0 <= shard < plan.shards:
        raise BadInputError(f"shard {shard} is outside plan {plan.uri} (shards 0..{plan.shards - 1})")
    if shard is not None:
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(plan_folder(plan).shard(shard))))
        except FileNotFoundError:
            table = _read_plan_row_groups(plan, shard)
        table = table.filter(pa.compute.equal(table["shard"], shard))
        if table.num_rows == 0:
            raise BadInputError(f"shard {shard} of plan {plan.uri} has no rows: the plan file is damaged")
        return table.to_pylist()
    fs, path = storage.filesystem(plan_folder(plan).table)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def _read_plan_row_groups(plan: PlanRecord, shard: int) -> pa.Table:
    fs, path = storage.filesystem(plan_folder(plan).table)
    # No read-ahead: a row group is fetched by its byte range, not with the megabytes after it.
    with fs.open(path, "rb", **storage.range_read_options(fs)) as handle:
        file = pq.ParquetFile(handle, pre_buffer=True)  # a row group's columns in one read
        groups = shard_row_groups(file.metadata, shard)
        return file.read_row_groups(groups) if groups is not None else file.read()


def rows_in_shards(plan: PlanRecord, shards: list[int], shard_size: int) -> int:
    """Plan rows in the given shards (every shard holds ``shard_size`` rows but the last)."""
    return sum(min(shard_size, plan.samples - i * shard_size) for i in shards)


def check_references(rows: list[dict], sources: "SourceImages") -> None:
    """Every image and bank mask the rows name exists in the catalog (checked before any model loads)."""
    for row in rows:
        if not sources.has_image(row["driver_image_id"]):
            raise BadInputError(
                f"plan row {row['sample_id']} references image {row['driver_image_id']}, which is not in the catalog"
            )
        for inst in row["instances"]:
            if inst["mask_source"] != MASK_SOURCE_PROCEDURAL and not sources.has_mask(inst["mask_source_id"]):
                raise BadInputError(
                    f"plan row {row['sample_id']} references mask {inst['mask_source_id']}, which is not in the catalog"
                )


@dataclass
class SampleInputs:
    """What a plan row rebuilds into: the driver, the labelled masks it was painted with and the
    (augmented) defect-free image it was made from."""

    driver: np.ndarray
    instances: list[tuple[dict, np.ndarray]]
    image: np.ndarray | None = None


class SourceImages:
    """Decoded catalog images and masks, looked up by id (decoded once per process)."""

    def __init__(self, catalog_uri: str, categories: list[dict]):
        self._rows = {r["image_id"]: r for r in read_catalog(catalog_uri).to_pylist()}
        self._images: dict[tuple[str, int], np.ndarray] = {}
        self._defect_chroma: dict[int, ChromaStats | None] = {}
        self.class_index = category_index(categories)

    def image(self, image_id: str, resolution: int) -> np.ndarray:
        key = (image_id, resolution)
        if key not in self._images:
            if image_id not in self._rows:
                raise BadInputError(f"plan references image {image_id}, which is not in the catalog")
            self._images[key] = fit_square(decode_image(self._rows[image_id]["image"]["bytes"]), resolution)
        return self._images[key]

    def has_image(self, image_id: str) -> bool:
        return image_id in self._rows

    def has_mask(self, source_id: str) -> bool:
        image_id, _, annotation_id = source_id.rpartition(":")
        return annotation_id.isdigit() and any(
            inst["annotation_id"] == int(annotation_id) for inst in self._rows.get(image_id, {}).get("instances", [])
        )

    def file_name(self, image_id: str) -> str:
        return self._rows[image_id]["file_name"]

    def defect_chroma(self, resolution: int) -> ChromaStats | None:
        """Chroma statistics of the real defects of the training split at ``resolution`` (computed once);
        None when it has no annotated pixel. Other splits are never read: the test split stays unseen."""
        if resolution not in self._defect_chroma:
            pairs = (
                (self.image(image_id, resolution), fit_square(rle_to_mask(inst["rle"]), resolution))
                for image_id, row in self._rows.items()
                if row["split"] == "train"
                for inst in row["instances"]
            )
            self._defect_chroma[resolution] = pooled_chroma(pairs)
        return self._defect_chroma[resolution]

    def mask(self, source_id: str, resolution: int) -> np.ndarray:
        image_id, annotation_id = source_id.rsplit(":", 1)
        for inst in self._rows.get(image_id, {}).get("instances", []):
            if inst["annotation_id"] == int(annotation_id):
                return fit_square(rle_to_mask(inst["rle"]), resolution)
        raise BadInputError(f"plan references mask {source_id}, which is not in the catalog")


def instance_mask(inst: dict, sources: SourceImages, resolution: int, roi: np.ndarray | None = None) -> np.ndarray:
    """The mask a plan instance paints: a perturbed bank mask or a procedural crack (within ``roi``)."""
    params = json.loads(inst["perturbation"])
    if inst["mask_source"] == MASK_SOURCE_PROCEDURAL:
        mask = random_crack_mask(
            (resolution, resolution), inst["mask_source_id"], np.random.default_rng(params["crack_seed"])
        )
        return mask & roi if roi is not None else mask
    return apply_perturbation(sources.mask(inst["mask_source_id"], resolution), params, roi=roi)


def roi_square(roi_dir: str, name: str, resolution: int) -> np.ndarray:
    """An ROI file as a boolean square at ``resolution``, decoded once per process and version of the file
    (every row and augmentation of its image warps the same square; a file redrawn in place is read again)."""
    uri = storage.join(roi_dir, name)
    found = storage.info(uri)
    if found is None:
        raise FileNotFoundError(uri)
    return _decoded_roi(uri, storage.file_version(found), int(found.get("size") or 0), resolution)


@functools.lru_cache(maxsize=256)
def _decoded_roi(uri: str, version: str, size: int, resolution: int) -> np.ndarray:
    square = fit_square(decode_image(storage.read_bytes(uri)).max(axis=2) > 0, resolution)
    square.setflags(write=False)  # shared between rows: callers warp a copy
    return square


def driver_roi(config: FactoryConfig, sources: SourceImages, image_id: str, augmentation: dict) -> np.ndarray | None:
    """Where masks may go on an augmented driver image: brighter than ``roi_min_intensity`` and
    inside the image's ROI file from ``roi_dir`` (warped like the image); None when unconstrained."""
    resolution = config.base_model.resolution
    roi = None
    if config.plan.roi_dir:
        name = sources.file_name(image_id).rsplit(".", 1)[0] + ".png"
        try:
            square = roi_square(config.plan.roi_dir, name, resolution)
        except FileNotFoundError as exc:
            raise BadInputError(f"plan.roi_dir has no region-of-interest file {name} for image {image_id}") from exc
        matrix = augmentation_matrix(augmentation, square.shape)
        roi = warp(square.astype(np.float64), AffineTransform(matrix=matrix), order=0, mode="reflect") > 0.5
    if config.plan.roi_min_intensity is not None:
        image = apply_augmentation(sources.image(image_id, resolution), augmentation)
        bright = image.astype(np.float64).mean(axis=2) > config.plan.roi_min_intensity
        roi = bright if roi is None else roi & bright
    if roi is not None and not roi.any():
        raise BadInputError(f"the region of interest of defect-free image {image_id} is empty")
    return roi


def materialise(row: dict, sources: SourceImages, config: FactoryConfig) -> SampleInputs:
    """Rebuild a plan row's driver and masks exactly (same code path as training drivers)."""
    resolution = config.base_model.resolution
    augmentation = json.loads(row["augmentation"])
    image = apply_augmentation(sources.image(row["driver_image_id"], resolution), augmentation)
    roi = driver_roi(config, sources, row["driver_image_id"], augmentation)
    instances = [(inst, instance_mask(inst, sources, resolution, roi)) for inst in row["instances"]]
    driver = extract_topological_driver(
        image, [(sources.class_index[inst["category_id"]], mask) for inst, mask in instances], config.driver
    )
    return SampleInputs(driver=driver, instances=instances, image=image)


def plan_folder_for(config: FactoryConfig, catalog: CatalogRecord) -> PlanFolder:
    """The plan's folder under the factory root, with its fingerprint."""
    return FactoryLayout.of(config.factory_root).plan(plan_fingerprint(config, catalog))


def plan_uri_for(config: FactoryConfig, catalog: CatalogRecord) -> str:
    return plan_folder_for(config, catalog).uri


def plan_preview(config: FactoryConfig, sources: SourceImages, rows: list[dict]) -> bytes:
    """PNG contact sheet of the drivers (masks painted in their class colours) of the first rows."""
    tiles = [(materialise(row, sources, config).driver * 255).round().astype(np.uint8) for row in rows]
    return encode_png(image_grid(tiles)) if tiles else b""
