"""Stage ``evaluate-dataset``: is a published dataset worth it? The paper's downstream protocol.

A segmentor is trained (i) on real data only, (ii) on synthetic data only, (iii) on synthetic
data then fine-tuned on real data, at several fractions of the real training split, and scored
on the real test split (IoU, Dice, HD95, mask and box AP). The real-only segmentor also scores
each synthetic image against the mask it was conditioned on (adherence), and FID / KID compare
synthetic and real images. Everything lands in ``evaluation.json`` next to the manifest.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indusfactory import storage
from indusfactory.config import FactoryConfig
from indusfactory.errors import BadInputError
from indusfactory.features import feature_extractor
from indusfactory.fingerprint import fingerprint
from indusfactory.imaging import fit_square
from indusfactory.ingest import read_catalog
from indusfactory.metrics import (
    OverlapCounts,
    coco_average_precision,
    frechet_distance,
    hausdorff95,
    instances_of,
    kernel_inception_distance,
    mask_iou,
    size_histogram,
)
from indusfactory.schema import (
    EVALUATION_FILE,
    CatalogRecord,
    DatasetRecord,
    EvaluationRecord,
    category_index,
    decode_image,
    rle_to_mask,
)
from indusfactory.segmentor import SegmentationSet, build_segmentor, predict, train_segmentor

log = logging.getLogger(__name__)
RECORD_FILE = "record.json"
SEGMENTOR_DIR = "segmentor"
SIZE_BINS = np.logspace(-4, 0, 13)
"""Relative mask areas (fraction of the image) of the mask-size histograms."""


@dataclass
class LabelledImages:
    """Images with class maps and the instances (class index, mask) they were made of."""

    data: SegmentationSet
    instances: list[list[tuple[int, np.ndarray]]]
    ids: list[str]


def _labelled(image: np.ndarray, instances: list[dict], to_class: dict[int, int], resolution: int):
    image = fit_square(image, resolution)
    label = np.zeros(image.shape[:2], dtype=np.int64)
    found = []
    for inst in instances:
        mask = fit_square(rle_to_mask(inst["rle"]), resolution)
        k = to_class[inst["category_id"]] + 1
        label[mask] = k
        found.append((k, mask))
    return image, label, found


def _collect(rows, to_class, resolution, id_field) -> LabelledImages:
    out = LabelledImages(SegmentationSet([], []), [], [])
    for row in rows:
        image, label, found = _labelled(decode_image(row["image"]["bytes"]), row["instances"], to_class, resolution)
        out.data.images.append(image)
        out.data.labels.append(label)
        out.instances.append(found)
        out.ids.append(row[id_field])
    return out


def real_split(catalog: CatalogRecord, split: str, resolution: int) -> LabelledImages:
    """Annotated defective images of one split of the catalog."""
    to_class = category_index(catalog.categories)
    rows = [r for r in read_catalog(catalog.uri).to_pylist()
            if r["defective"] and r["split"] == split and r["instances"]]
    return _collect(rows, to_class, resolution, "image_id")


def synthetic_images(dataset: DatasetRecord, categories: list[dict], resolution: int,
                     limit: int | None) -> tuple[LabelledImages, list[bool]]:
    """The published samples with the masks they were conditioned on, and whether each passed QC."""
    fs, path = storage.filesystem(storage.join(dataset.uri, "data"))
    files = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(f)), columns=["sample_id", "image", "instances", "qc_passed"])
              for f in files]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows = rows[:limit] if limit else rows
    return (_collect(rows, category_index(categories), resolution, "sample_id"),
            [bool(r["qc_passed"]) for r in rows])


def fraction_subsets(n: int, fractions: list[float], seed: int) -> dict[float, list[int]]:
    """Nested seeded subsets of the real training split: the 10% subset is inside the 100% one."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {f: sorted(order[: max(1, math.ceil(f * n))]) for f in fractions}


def score_segmentor(model, test: LabelledImages, category_ids: list[int]) -> dict:
    """IoU / Dice per class and mean, mean HD95 over defect classes, COCO mask and box AP."""
    n_classes = len(category_ids) + 1
    maps, probs = predict(model, test.data.images)
    counts, distances = OverlapCounts.empty(n_classes), []
    for prediction, truth in zip(maps, test.data.labels):
        counts.add(prediction, truth)
        for k in range(1, n_classes):
            d = hausdorff95(prediction == k, truth == k)
            if not math.isnan(d):
                distances.append(d)
    iou, dice = counts.iou()[1:], counts.dice()[1:]
    ap = coco_average_precision(test.instances, [instances_of(m, p) for m, p in zip(maps, probs)], category_ids)
    return {"iou_per_class": _clean(iou), "dice_per_class": _clean(dice), "miou": _mean(iou), "mdice": _mean(dice),
            "hd95": float(np.mean(distances)) if distances else None, **{k: _num(v) for k, v in ap.items()}}


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 5)


def _clean(values: np.ndarray) -> list[float | None]:
    return [_num(v) for v in values]


def _mean(values: np.ndarray) -> float | None:
    return _num(np.nanmean(values)) if np.isfinite(values).any() else None


def adherence_scores(model, synthetic: LabelledImages) -> list[float]:
    """IoU of the real-data segmentor's defect pixels with each sample's conditioning mask."""
    maps, _ = predict(model, synthetic.data.images)
    return [mask_iou(m > 0, label > 0) for m, label in zip(maps, synthetic.data.labels)]


def fidelity(config: FactoryConfig, real: list[np.ndarray], synthetic: list[np.ndarray]) -> dict:
    e = config.evaluation
    extract = feature_extractor(e.feature_extractor, e.seed)
    a, b = extract(real), extract(synthetic)
    kid, kid_std = kernel_inception_distance(a, b, subset_size=e.kid_subset_size, seed=e.seed)
    return {"feature_extractor": e.feature_extractor, "real_images": len(real), "synthetic_images": len(synthetic),
            "fid": _num(frechet_distance(a, b)), "kid": _num(kid), "kid_std": _num(kid_std)}


def distribution(name_of: dict[int, str], instances: list[list[tuple[int, np.ndarray]]]) -> dict:
    """Per-class instance counts and the histogram of relative mask areas."""
    counts = {name: 0 for name in name_of.values()}
    areas = []
    for image in instances:
        for k, mask in image:
            counts[name_of[k]] += 1
            areas.append(mask.mean())
    return {"instances_per_class": counts, "mask_size_histogram": size_histogram(areas, SIZE_BINS)}


def evaluation_fingerprint(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> str:
    return fingerprint("evaluation", catalog.content_fingerprint, dataset.uri, dataset.samples,
                       config.evaluation.model_dump(mode="json", exclude={"enabled"}), config.base_model.resolution)


def evaluate_dataset(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> EvaluationRecord:
    """Run the downstream protocol, adherence and fidelity; write ``evaluation.json`` (reused when present)."""
    fp = evaluation_fingerprint(config, catalog, dataset)
    folder_uri = storage.join(dataset.uri, "evaluation", fp)
    done = EvaluationRecord.read_completed(storage.join(folder_uri, RECORD_FILE))
    if done:
        return done
    e, started = config.evaluation, time.perf_counter()
    resolution = e.resolution or config.base_model.resolution
    train, test = real_split(catalog, "train", resolution), real_split(catalog, "test", resolution)
    if not len(train.data) or not len(test.data):
        raise BadInputError(f"catalog {catalog.uri} needs annotated defective images in both its train split "
                            f"({len(train.data)}) and its test split ({len(test.data)}) to evaluate")
    synthetic, passed = synthetic_images(dataset, catalog.categories, resolution, e.max_synthetic_images)
    training_synthetic = synthetic.data.subset([i for i, ok in enumerate(passed) if ok])
    if not len(training_synthetic):
        raise BadInputError(f"dataset {dataset.uri} has no QC-passed sample to train the segmentor on")
    categories = sorted(catalog.categories, key=lambda c: c["id"])
    category_ids, name_of = [c["id"] for c in categories], {i + 1: c["name"] for i, c in enumerate(categories)}
    n_classes = len(categories) + 1

    def trained(data: SegmentationSet, steps: int, init=None):
        model = copy.deepcopy(init) if init is not None else build_segmentor(n_classes, e.segmentor_pretrained, e.seed)
        train_segmentor(model, data, steps, e.batch_size, e.learning_rate, e.seed)
        return model

    rows = []
    synthetic_model = trained(training_synthetic, e.steps)
    rows.append({"regime": "synthetic only", "real_fraction": 0.0, "real_images": 0,
                 "synthetic_images": len(training_synthetic), **score_segmentor(synthetic_model, test, category_ids)})
    real_model = None
    for fraction, subset in fraction_subsets(len(train.data), e.real_fractions, e.seed).items():
        real_data = train.data.subset(subset)
        real_model = trained(real_data, e.steps)
        rows.append({"regime": "real only", "real_fraction": fraction, "real_images": len(subset),
                     "synthetic_images": 0, **score_segmentor(real_model, test, category_ids)})
        tuned = trained(real_data, e.finetune_steps, init=synthetic_model)
        rows.append({"regime": "synthetic + real", "real_fraction": fraction, "real_images": len(subset),
                     "synthetic_images": len(training_synthetic), **score_segmentor(tuned, test, category_ids)})
        log.info("evaluation at %.0f%% of the real train split (%d images) done", 100 * fraction, len(subset))
    scores = adherence_scores(real_model, synthetic)  # every sample, by the real-only model of the largest fraction
    real_all = real_split(catalog, "val", resolution)
    real_images = train.data.images + real_all.data.images + test.data.images
    result = {
        "fingerprint": fp, "dataset": {"name": dataset.name, "version": dataset.version, "uri": dataset.uri},
        "protocol": {"test_images": len(test.data), "train_images": len(train.data),
                     "segmentor": e.segmentor_pretrained or "SegFormer (small, from scratch)",
                     "steps": e.steps, "finetune_steps": e.finetune_steps, "resolution": resolution,
                     "real_fractions": e.real_fractions, "seed": e.seed},
        "results": rows,
        "adherence": _adherence_summary(scores),
        "fidelity": fidelity(config, real_images, training_synthetic.images),
        "distributions": {"size_bins": SIZE_BINS.round(6).tolist(),
                          "real": distribution(name_of, train.instances + real_all.instances + test.instances),
                          "synthetic": distribution(name_of, synthetic.instances)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return write_evaluation(folder_uri, dataset, result, synthetic.ids, scores, real_model)


def _adherence_summary(scores: list[float]) -> dict:
    values = np.asarray(scores, dtype=np.float64)
    counts, _ = np.histogram(values, bins=np.linspace(0, 1, 11))
    return {"samples": len(values), "mean": _num(values.mean()), "median": _num(np.median(values)),
            "p10": _num(np.percentile(values, 10)), "p90": _num(np.percentile(values, 90)),
            "histogram_bins": np.linspace(0, 1, 11).round(2).tolist(), "histogram": counts.tolist()}


def results_table(result: dict) -> list[dict]:
    """Rows laid out like the paper's Tables 1 and 2: regime x real fraction -> metrics."""
    keys = ("miou", "mdice", "hd95", "mask_ap", "mask_ap50", "box_ap", "box_ap50")
    return [{"regime": r["regime"], "real fraction": f"{100 * r['real_fraction']:.0f}%", "real images": r["real_images"],
             "synthetic images": r["synthetic_images"], **{k: r[k] for k in keys}} for r in result["results"]]


def results_markdown(result: dict) -> str:
    rows = results_table(result)
    header = list(rows[0])
    fmt = [" | ".join(header), " | ".join("---" for _ in header)]
    fmt += [" | ".join("—" if r[h] is None else f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h])
                       for h in header) for r in rows]
    a, f = result["adherence"], result["fidelity"]
    return "\n".join([
        f"# Evaluation of `{result['dataset']['name']}/{result['dataset']['version']}`", "",
        f"Real test split: {result['protocol']['test_images']} images; segmentor: {result['protocol']['segmentor']}.",
        "", *fmt, "",
        f"Adherence (IoU of the real-data segmentor with the conditioning mask, {a['samples']} samples): "
        f"mean {a['mean']}, median {a['median']}, p10 {a['p10']}, p90 {a['p90']}.", "",
        f"Fidelity ({f['feature_extractor']} features): FID {f['fid']}, KID {f['kid']} ± {f['kid_std']}.", ""])


def write_evaluation(folder_uri: str, dataset: DatasetRecord, result: dict, sample_ids: list[str],
                     scores: list[float], segmentor) -> EvaluationRecord:
    """Plots, adherence scores, the table and the real-data segmentor (``segmentor/``, safetensors; usable
    as ``generation.adherence_scorer: segformer:<folder>``) in ``evaluation/<fp>/``; the record last."""
    from indusfactory.plots import adherence_histogram, mask_size_plot, metric_vs_fraction

    plots = {"metric_vs_fraction.png": metric_vs_fraction(result), "adherence_histogram.png": adherence_histogram(result),
             "mask_sizes.png": mask_size_plot(result)}
    with storage.local_copy_for_write(folder_uri) as folder:
        for name, png in plots.items():
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(png)
        pq.write_table(pa.table({"sample_id": sample_ids, "adherence_iou": scores}),
                       os.path.join(folder, "adherence.parquet"))
        with open(os.path.join(folder, "table.md"), "w", encoding="utf-8") as handle:
            handle.write(results_markdown(result))
        segmentor.save_pretrained(os.path.join(folder, SEGMENTOR_DIR), safe_serialization=True)
    record = EvaluationRecord(uri=folder_uri, fingerprint=result["fingerprint"], dataset_uri=dataset.uri,
                              table=results_table(result), adherence=result["adherence"],
                              fidelity=result["fidelity"], plots=sorted(plots), seconds=result["seconds"])
    document = {**result, **record.model_dump(mode="json", exclude={"reused"})}
    storage.write_json_atomic(storage.join(folder_uri, EVALUATION_FILE), document)
    storage.write_json_atomic(storage.join(dataset.uri, EVALUATION_FILE), document)
    storage.write_bytes_atomic(storage.join(folder_uri, RECORD_FILE), record.to_json().encode("utf-8"))
    log.info("evaluation written to %s", storage.join(dataset.uri, EVALUATION_FILE))
    return record


def published_dataset(dataset_uri: str) -> DatasetRecord:
    """The record of a published dataset version, read from its manifest."""
    manifest_uri = storage.join(dataset_uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise BadInputError(f"dataset {dataset_uri} is not published (no manifest.json): run generate-dataset first")
    manifest = storage.read_json(manifest_uri)
    return DatasetRecord(name=manifest["name"], version=manifest["version"], uri=dataset_uri,
                         manifest_uri=manifest_uri, samples=manifest["counts"]["samples"],
                         shards=manifest["counts"]["shards"], reused=True)


@functools.lru_cache(maxsize=2)
def segmentor_adherence_scorer(folder: str):
    """An adherence scorer for generation QC from a segmentor an evaluation saved: IoU of its defect
    pixels with each sample's mask (the same score as the evaluation's adherence)."""
    from transformers import SegformerForSemanticSegmentation

    from indusfactory.errors import ModelLoadError

    try:
        with storage.local_copy_for_read(folder) as local:
            model = SegformerForSemanticSegmentation.from_pretrained(local, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"adherence segmentor {folder} cannot be loaded: {exc}") from exc

    def score(images: list[np.ndarray], masks: list[np.ndarray]) -> list[float]:
        maps, _ = predict(model, images)
        return [mask_iou(m > 0, mask) for m, mask in zip(maps, masks)]

    return score
