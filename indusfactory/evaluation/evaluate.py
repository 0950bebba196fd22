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
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indusfactory.config import EvaluationConfig, FactoryConfig
from indusfactory.evaluation.features import feature_extractor
from indusfactory.evaluation.metrics import (
    OverlapCounts,
    coco_average_precision,
    frechet_distance,
    hausdorff95,
    instances_of,
    kernel_inception_distance,
    mask_iou,
    size_histogram,
)
from indusfactory.evaluation.segmentor import (
    SegmentationSet,
    build_segmentor,
    loss_function,
    predict,
    train_segmentor,
)
from indusfactory.generation.adherence import (
    AdherenceSummary,
    auc_histogram,
    derangement,
    label_auc,
    label_contrast,
    summarise,
)
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.infra.imaging import fit_square
from indusfactory.layout import (
    ADHERENCE_TABLE,
    BASELINE_FILE,
    EVALUATION_TABLE,
    SEGMENTOR_DIR,
    DatasetLayout,
    EvaluationFolder,
)
from indusfactory.learning.models import configure_torch
from indusfactory.schema import (
    CatalogRecord,
    DatasetRecord,
    EvaluationRecord,
    category_index,
    decode_image,
    rle_to_mask,
)
from indusfactory.sources.catalog import read_catalog

log = logging.getLogger("indusfactory.evaluate")  # the name operators filter on, kept from the flat layout
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
    rows = [
        r for r in read_catalog(catalog.uri).to_pylist() if r["defective"] and r["split"] == split and r["instances"]
    ]
    return _collect(rows, to_class, resolution, "image_id")


def synthetic_images(
    dataset: DatasetRecord, categories: list[dict], resolution: int, limit: int | None
) -> tuple[LabelledImages, list[bool]]:
    """The published samples with the masks they were conditioned on, and whether each passed QC."""
    fs, path = storage.filesystem(DatasetLayout(dataset.uri).data)
    files = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet"))
    tables = [
        pq.read_table(io.BytesIO(fs.cat_file(f)), columns=["sample_id", "image", "instances", "qc_passed"])
        for f in files
    ]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows = rows[:limit] if limit else rows
    return (_collect(rows, category_index(categories), resolution, "sample_id"), [bool(r["qc_passed"]) for r in rows])


def fraction_subsets(n: int, fractions: list[float], seed: int) -> dict[float, list[int]]:
    """Nested seeded subsets of the real training split: the 10% subset is inside the 100% one."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {f: sorted(order[: max(1, math.ceil(f * n))]) for f in fractions}


def score_segmentor(model, test: LabelledImages, category_ids: list[int], binary: bool = True) -> dict:
    """Defect IoU / Dice (defect pixels vs background, over the whole split: the headline), per-class
    IoU / Dice and their mean, mean HD95, COCO mask and box AP.

    A binary head has the one class 'defect': its per-class scores are the defect scores and AP is
    class-agnostic (every ground-truth instance is a 'defect').
    """
    maps, probs = predict(model, test.data.images)
    truths = [(label > 0).astype(np.int64) for label in test.data.labels] if binary else test.data.labels
    n_classes = 2 if binary else len(category_ids) + 1
    counts, defect, distances = OverlapCounts.empty(n_classes), OverlapCounts.empty(2), []
    for prediction, truth in zip(maps, truths):
        counts.add(prediction, truth)
        defect.add((prediction > 0).astype(np.int64), (truth > 0).astype(np.int64))
        for k in range(1, n_classes):
            d = hausdorff95(prediction == k, truth == k)
            if not math.isnan(d):
                distances.append(d)
    iou, dice = counts.iou()[1:], counts.dice()[1:]
    truth_instances = [[(1, m) for _, m in image] for image in test.instances] if binary else test.instances
    ap = coco_average_precision(
        truth_instances, [instances_of(m, p) for m, p in zip(maps, probs)], [1] if binary else category_ids
    )
    return {
        "iou": _num(defect.iou()[1]),
        "dice": _num(defect.dice()[1]),
        "iou_per_class": _clean(iou),
        "dice_per_class": _clean(dice),
        "miou": _mean(iou),
        "mdice": _mean(dice),
        "hd95": float(np.mean(distances)) if distances else None,
        **{k: _num(v) for k, v in ap.items()},
    }


def _num(value: float | np.floating | None) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 5)


def _clean(values: np.ndarray) -> list[float | None]:
    return [_num(v) for v in values]


def _mean(values: np.ndarray) -> float | None:
    return _num(np.nanmean(values)) if np.isfinite(values).any() else None


def chance_levels(test: LabelledImages, seed: int, pairings: int = 20) -> dict:
    """Defect IoU on the test split of predictions that saw no image: empty, all defect, and each image
    given another test image's mask (mean over seeded derangements); ``chance`` is the best of them."""
    truths = [label > 0 for label in test.data.labels]
    all_defect = sum(int(t.sum()) for t in truths) / max(1, sum(t.size for t in truths))
    shuffled = None
    if len(truths) >= 2:
        values = []
        for k in range(pairings):
            other = derangement(len(truths), seed + k)
            inter = sum(int((truths[i] & truths[j]).sum()) for i, j in enumerate(other))
            union = sum(int((truths[i] | truths[j]).sum()) for i, j in enumerate(other))
            values.append(inter / union if union else 0.0)
        shuffled = float(np.mean(values))
    levels = {
        "empty": 0.0,
        "all_defect": _num(all_defect),
        "shuffled_masks": _num(shuffled) if shuffled is not None else None,
    }
    return {**levels, "chance": max(v for v in levels.values() if v is not None)}


def adherence_scores(model, synthetic: LabelledImages) -> list[float]:
    """IoU of the real-data segmentor's defect pixels with each sample's conditioning mask."""
    maps, _ = predict(model, synthetic.data.images)
    return [mask_iou(m > 0, label > 0) for m, label in zip(maps, synthetic.data.labels)]


def pixel_adherence(synthetic: LabelledImages, seed: int) -> tuple[AdherenceSummary, list[float], list[float | None]]:
    """Whether the samples follow their labels, on the pixels (``indusfactory.generation.adherence``, no model):
    the summary, each sample's label AUC and its chance AUC (its image with another sample's mask)."""
    images, masks = synthetic.data.images, [label > 0 for label in synthetic.data.labels]
    aucs = [label_auc(image, mask) for image, mask in zip(images, masks)]
    contrasts = [label_contrast(image, mask) for image, mask in zip(images, masks)]
    chance: list[float | None] = [None] * len(images)
    if len(images) >= 2:
        chance = [label_auc(images[i], masks[j]) for i, j in enumerate(derangement(len(images), seed))]
    summary = summarise(aucs, [c for c in chance if c is not None], contrasts)
    return summary, aucs, chance


def fidelity(config: FactoryConfig, real: list[np.ndarray], synthetic: list[np.ndarray]) -> dict:
    e = config.evaluation
    extract = feature_extractor(e.feature_extractor, e.seed)
    a, b = extract(real), extract(synthetic)
    kid, kid_std = kernel_inception_distance(a, b, subset_size=e.kid_subset_size, seed=e.seed)
    return {
        "feature_extractor": e.feature_extractor,
        "real_images": len(real),
        "synthetic_images": len(synthetic),
        "fid": _num(frechet_distance(a, b)),
        "kid": _num(kid),
        "kid_std": _num(kid_std),
    }


def distribution(name_of: dict[int, str], instances: list[list[tuple[int, np.ndarray]]]) -> dict:
    """Per-class instance counts and the histogram of relative mask areas."""
    counts = {name: 0 for name in name_of.values()}
    areas = []
    for image in instances:
        for k, mask in image:
            counts[name_of[k]] += 1
            areas.append(mask.mean())
    return {"instances_per_class": counts, "mask_size_histogram": size_histogram(areas, SIZE_BINS)}


def evaluation_folder_for(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> EvaluationFolder:
    """The evaluation's folder, inside the dataset version it evaluates, with its fingerprint."""
    return DatasetLayout(dataset.uri).evaluation_folder(evaluation_fingerprint(config, catalog, dataset))


def evaluation_uri_for(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> str:
    return evaluation_folder_for(config, catalog, dataset).uri


def evaluation_fingerprint(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> str:
    return fingerprint(
        "evaluation",
        catalog.content_fingerprint,
        dataset.uri,
        dataset.samples,
        config.evaluation,
        config.base_model.resolution,
    )


REAL_ONLY, SYNTHETIC_ONLY, SYNTHETIC_REAL = "real only", "synthetic only", "synthetic + real"
SHUFFLED, EMPTY = "shuffled labels", "empty masks"
HELPS, NO_BENEFIT, INCONCLUSIVE = "synthetic helps", "no benefit", "inconclusive: the baseline did not learn"
METRICS = ("iou", "dice", "miou", "mdice", "hd95", "mask_ap", "mask_ap50", "box_ap", "box_ap50")


@dataclass
class ProtocolData:
    """What the downstream protocol trains and scores on (all at the segmentor's resolution)."""

    train: LabelledImages
    test: LabelledImages
    synthetic: SegmentationSet
    """The QC-passed samples the segmentor trains on."""
    category_ids: list[int]


def pretraining_sets(synthetic: SegmentationSet, controls: Sequence[str], seed: int) -> dict[str, SegmentationSet]:
    """Pre-training data of each regime fine-tuned on real: the samples with their labels, and the
    controls: labels shuffled between samples (a derangement) and empty masks."""
    sets = {SYNTHETIC_REAL: synthetic}
    if SHUFFLED in controls and len(synthetic) >= 2:
        other = derangement(len(synthetic), seed)
        sets[f"{SHUFFLED} + real"] = SegmentationSet(synthetic.images, [synthetic.labels[j] for j in other])
    if EMPTY in controls:
        sets[f"{EMPTY} + real"] = SegmentationSet(synthetic.images, [np.zeros_like(y) for y in synthetic.labels])
    return sets


def synthetic_subset(n_synthetic: int, n_real: int, ratio: float | None, seed: int) -> list[int]:
    """The samples of a synthetic:real ``ratio`` (seeded; every sample when ratio is None)."""
    if ratio is None:
        return list(range(n_synthetic))
    k = min(n_synthetic, max(1, round(ratio * n_real)))
    return sorted(np.random.default_rng(seed).permutation(n_synthetic)[:k].tolist())


def run_seed(e: EvaluationConfig, data: ProtocolData, seed: int) -> tuple[list[dict], object]:
    """Every regime with one seed: per-run score rows, and the real-only model of the largest fraction.

    Real only trains ``steps + finetune_steps`` steps, the same budget as pre-training + fine-tuning.
    """
    n_classes = 2 if e.binary else len(data.category_ids) + 1
    loss = loss_function(e.binary, e.loss)
    cache: dict[tuple, object] = {}

    def trained(train_set: SegmentationSet, steps: int, init=None):
        model = copy.deepcopy(init) if init is not None else build_segmentor(n_classes, e.segmentor_pretrained, seed)
        train_segmentor(model, train_set, steps, e.batch_size, e.learning_rate, seed, loss)
        return model

    def pretrained(regime: str, indices: list[int]):
        if (regime, tuple(indices)) not in cache:
            sets = pretraining_sets(data.synthetic.subset(indices), e.controls, seed)
            cache[(regime, tuple(indices))] = trained(sets[regime], e.steps)
        return cache[(regime, tuple(indices))]

    def row(regime, fraction, ratio, n_real, n_synthetic, steps, model) -> dict:
        return {
            "regime": regime,
            "real_fraction": fraction,
            "synthetic_ratio": ratio,
            "real_images": n_real,
            "synthetic_images": n_synthetic,
            "steps": steps,
            "seed": seed,
            **score_segmentor(model, data.test, data.category_ids, e.binary),
        }

    everything = list(range(len(data.synthetic)))
    rows = [row(SYNTHETIC_ONLY, 0.0, None, 0, len(everything), e.steps, pretrained(SYNTHETIC_REAL, everything))]
    baseline = None
    for fraction, subset in fraction_subsets(len(data.train.data), e.real_fractions, seed).items():
        real = data.train.data.subset(subset)
        baseline = trained(real, e.steps + e.finetune_steps)
        rows.append(row(REAL_ONLY, fraction, None, len(subset), 0, e.steps + e.finetune_steps, baseline))
        ratios: list[float | None] = list(e.synthetic_ratios or []) or [None]
        for ratio in ratios:
            indices = synthetic_subset(len(data.synthetic), len(subset), ratio, seed)
            for regime in pretraining_sets(data.synthetic.subset(indices), e.controls, seed):
                tuned = trained(real, e.finetune_steps, init=pretrained(regime, indices))
                rows.append(row(regime, fraction, ratio, len(subset), len(indices), e.steps + e.finetune_steps, tuned))
        log.info("seed %d at %.0f%% of the real train split (%d images) done", seed, 100 * fraction, len(subset))
    return rows, baseline


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1; None with fewer than two values) of the values that are not None."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return _num(np.mean(known)), _num(np.std(known, ddof=1)) if len(known) >= 2 else None


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per regime, real fraction and synthetic ratio: mean and std over seeds of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["regime"], r["real_fraction"], r["synthetic_ratio"]), []).append(r)
    out = []
    for rows in groups.values():
        first = rows[0]
        row = {
            k: first[k]
            for k in ("regime", "real_fraction", "synthetic_ratio", "real_images", "synthetic_images", "steps")
        }
        row["seeds"] = len(rows)
        for key in METRICS:
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in rows])
        row["iou_per_seed"] = [r["iou"] for r in rows]
        out.append(row)
    return out


def baseline_checks(results: list[dict], chance: float, margin: float) -> dict[float, dict]:
    """Per real fraction: has the real-only segmentor learned? Mean defect IoU minus its std must exceed
    the chance IoU plus ``margin``."""
    checks = {}
    for r in results:
        if r["regime"] == REAL_ONLY:
            lower = None if r["iou"] is None else r["iou"] - (r["iou_std"] or 0.0)
            checks[r["real_fraction"]] = {
                "iou": r["iou"],
                "iou_std": r["iou_std"],
                "chance_iou": chance,
                "margin": margin,
                "learned": lower is not None and lower > chance + margin,
            }
    return checks


def compare(a: dict, b: dict | None, min_difference: float) -> dict | None:
    """Is regime ``a`` better than ``b`` beyond the spread? Difference of mean defect IoU greater than the
    larger of the two stds and than ``min_difference``, with two seeds or more."""
    if b is None:
        return None
    if a["iou"] is None or b["iou"] is None:
        return {"difference": None, "spread": None, "beyond_spread": False}
    difference, spread = a["iou"] - b["iou"], max(a["iou_std"] or 0.0, b["iou_std"] or 0.0)
    beyond = min(a["seeds"], b["seeds"]) >= 2 and difference > spread and difference > min_difference
    return {"difference": _num(difference), "spread": _num(spread), "beyond_spread": bool(beyond)}


def _find(results: list[dict], regime: str, fraction: float, ratio: float | None = None) -> dict | None:
    return next(
        (
            r
            for r in results
            if r["regime"] == regime and r["real_fraction"] == fraction and r["synthetic_ratio"] == ratio
        ),
        None,
    )


def comparisons(results: list[dict], checks: dict[float, dict], min_difference: float) -> list[dict]:
    """Synthetic + real against real only and each control, per real fraction and synthetic ratio."""
    out = []
    for r in results:
        if r["regime"] != SYNTHETIC_REAL:
            continue
        fraction, ratio = r["real_fraction"], r["synthetic_ratio"]
        c = {
            "real_fraction": fraction,
            "synthetic_ratio": ratio,
            "baseline_learned": checks[fraction]["learned"],
            "vs_real_only": compare(r, _find(results, REAL_ONLY, fraction), min_difference),
            "vs_shuffled_labels": compare(r, _find(results, f"{SHUFFLED} + real", fraction, ratio), min_difference),
            "vs_empty_masks": compare(r, _find(results, f"{EMPTY} + real", fraction, ratio), min_difference),
        }
        beats = [c["vs_real_only"], c["vs_shuffled_labels"]]
        helps = all(x is not None and x["beyond_spread"] for x in beats)
        c["verdict"] = INCONCLUSIVE if not c["baseline_learned"] else HELPS if helps else NO_BENEFIT
        out.append(c)
    return out


def decide(compared: list[dict], checks: dict[float, dict], seeds: int) -> tuple[str, str]:
    """The verdict and its reason: inconclusive when no real-only baseline learned, 'synthetic helps' when
    a setting whose baseline learned beats real only and the shuffled-labels control beyond the spread."""
    if not any(c["learned"] for c in checks.values()):
        fraction, check = max(checks.items())
        return INCONCLUSIVE, (
            f"the real-only segmentor's defect IoU ({_pm(check['iou'], check['iou_std'])} at "
            f"{100 * fraction:.0f}% real) is not above chance ({check['chance_iou']:.3f} + "
            f"margin {check['margin']})"
        )
    helping = [c for c in compared if c["verdict"] == HELPS]
    if helping:
        where = ", ".join(
            f"{100 * c['real_fraction']:.0f}% real"
            + (f" (ratio {c['synthetic_ratio']})" if c["synthetic_ratio"] is not None else "")
            for c in helping
        )
        return HELPS, f"synthetic + real beats real only and the shuffled-labels control beyond the spread at {where}"
    if seeds < 2:
        return NO_BENEFIT, "one seed: no spread to tell a difference from noise"
    return NO_BENEFIT, (
        "synthetic + real does not beat both real only and the shuffled-labels control by more than "
        "the spread over seeds at any setting whose baseline learned"
    )


def run_protocol(e: EvaluationConfig, data: ProtocolData) -> tuple[dict, object]:
    """The downstream protocol over every seed: per-run rows, aggregated results, chance level, baseline
    checks, comparisons and the verdict; and the real-only model (first seed, largest fraction)."""
    runs, first_baseline = [], None
    for i in range(e.seeds):
        rows, baseline = run_seed(e, data, e.seed + i)
        runs.extend(rows)
        first_baseline = baseline if first_baseline is None else first_baseline
    results = aggregate(runs)
    chance = chance_levels(data.test, e.seed)
    checks = baseline_checks(results, chance["chance"], e.chance_margin)
    compared = comparisons(results, checks, e.min_difference)
    verdict, reason = decide(compared, checks, e.seeds)
    largest = max(checks)
    out = {
        "results": results,
        "runs": runs,
        "chance": chance,
        "baseline": {
            "learned": checks[largest]["learned"],
            "by_fraction": [{"real_fraction": f, **c} for f, c in checks.items()],
        },
        "comparisons": compared,
        "verdict": verdict,
        "verdict_reason": reason,
    }
    return out, first_baseline


def evaluate_dataset(config: FactoryConfig, catalog: CatalogRecord, dataset: DatasetRecord) -> EvaluationRecord:
    """Run the downstream protocol, adherence and fidelity; write ``evaluation.json`` (reused when present)."""
    target = evaluation_folder_for(config, catalog, dataset)
    fp = target.fingerprint
    done = EvaluationRecord.read_completed(target.marker)
    if done:
        return done
    configure_torch(config.execution)
    e, started = config.evaluation, time.perf_counter()
    resolution = e.resolution or config.base_model.resolution
    train, test = real_split(catalog, "train", resolution), real_split(catalog, "test", resolution)
    if not len(train.data) or not len(test.data):
        raise BadInputError(
            f"catalog {catalog.uri} needs annotated defective images in both its train split "
            f"({len(train.data)}) and its test split ({len(test.data)}) to evaluate"
        )
    synthetic, passed = synthetic_images(dataset, catalog.categories, resolution, e.max_synthetic_images)
    training_synthetic = synthetic.data.subset([i for i, ok in enumerate(passed) if ok])
    if not len(training_synthetic):
        raise BadInputError(f"dataset {dataset.uri} has no QC-passed sample to train the segmentor on")
    categories = sorted(catalog.categories, key=lambda c: c["id"])
    category_ids, name_of = [c["id"] for c in categories], {i + 1: c["name"] for i, c in enumerate(categories)}
    protocol, real_model = run_protocol(e, ProtocolData(train, test, training_synthetic, category_ids))
    pixels, aucs, chance_aucs = pixel_adherence(synthetic, e.seed)
    scores = adherence_scores(real_model, synthetic) if protocol["baseline"]["learned"] else None
    real_all = real_split(catalog, "val", resolution)
    real_images = train.data.images + real_all.data.images + test.data.images
    result = {
        "fingerprint": fp,
        "dataset": {"name": dataset.name, "version": dataset.version, "uri": dataset.uri},
        "protocol": {
            "test_images": len(test.data),
            "train_images": len(train.data),
            "segmentor": e.segmentor_pretrained or "SegFormer (small, from scratch)",
            "head": f"binary (defect vs background), {e.loss}" if e.binary else "per category, CE + Dice",
            "steps": e.steps,
            "finetune_steps": e.finetune_steps,
            "real_only_steps": e.steps + e.finetune_steps,
            "resolution": resolution,
            "real_fractions": e.real_fractions,
            "seed": e.seed,
            "seeds": [e.seed + i for i in range(e.seeds)],
            "controls": e.controls,
            "synthetic_ratios": e.synthetic_ratios,
            "spread_rule": f"difference of mean defect IoU > max(std of the two) and > {e.min_difference}, "
            "two seeds or more",
        },
        **protocol,
        "adherence": adherence_report(pixels, aucs, chance_aucs, dataset, scores),
        "fidelity": fidelity(config, real_images, training_synthetic.images),
        "distributions": {
            "size_bins": SIZE_BINS.round(6).tolist(),
            "real": distribution(name_of, train.instances + real_all.instances + test.instances),
            "synthetic": distribution(name_of, synthetic.instances),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("evaluation of %s/%s: %s (%s)", dataset.name, dataset.version, result["verdict"], result["verdict_reason"])
    per_sample = {
        "sample_id": synthetic.ids,
        "label_auc": aucs,
        "chance_auc": chance_aucs,
        "adherence_iou": list(scores) if scores else [None] * len(aucs),
    }
    return write_evaluation(target, dataset, result, per_sample, real_model)


def adherence_report(
    pixels: AdherenceSummary,
    aucs: list[float],
    chance: list[float | None],
    dataset: DatasetRecord,
    scores: list[float] | None,
) -> dict:
    """Adherence measured on the pixels (the headline, with its chance level), the published manifest's,
    and the real-only segmentor's IoU only when that segmentor passed its check."""
    segmentor = (
        _adherence_summary(scores)
        if scores is not None
        else {
            "skipped": "the real-only segmentor did not learn (baseline check failed): its IoU with the "
            "labels would measure the segmentor, not the data"
        }
    )
    return {
        **pixels.as_dict(),
        "method": "pixels (label AUC vs a chance pairing; indusfactory.adherence)",
        "headline": pixels.headline(),
        "auc_histogram": auc_histogram(aucs),
        "chance_histogram": auc_histogram([c for c in chance if c is not None]),
        "published": dataset.adherence or None,
        "segmentor": segmentor,
    }


def _adherence_summary(scores: list[float]) -> dict:
    values = np.asarray(scores, dtype=np.float64)
    counts, _ = np.histogram(values, bins=np.linspace(0, 1, 11))
    return {
        "samples": len(values),
        "mean": _num(values.mean()),
        "median": _num(np.median(values)),
        "p10": _num(np.percentile(values, 10)),
        "p90": _num(np.percentile(values, 90)),
        "histogram_bins": np.linspace(0, 1, 11).round(2).tolist(),
        "histogram": counts.tolist(),
    }


def _check_of(result: dict, r: dict) -> str:
    """The table's check column: did the baseline learn, and each synthetic + real setting's verdict."""
    if r["regime"] == REAL_ONLY:
        c = next(b for b in result["baseline"]["by_fraction"] if b["real_fraction"] == r["real_fraction"])
        return "learned" if c["learned"] else "did not learn"
    if r["regime"] == SYNTHETIC_REAL:
        return next(
            c["verdict"]
            for c in result["comparisons"]
            if c["real_fraction"] == r["real_fraction"] and c["synthetic_ratio"] == r["synthetic_ratio"]
        )
    return ""


def results_table(result: dict) -> list[dict]:
    """Rows like the paper's Tables 1 and 2, over seeds: regime x real fraction -> mean and std of each
    metric (``iou`` is the defect IoU, the headline), and the check of each row."""
    keys = (
        "iou",
        "iou_std",
        "dice",
        "dice_std",
        "miou",
        "mdice",
        "hd95",
        "hd95_std",
        "mask_ap",
        "mask_ap_std",
        "mask_ap50",
        "box_ap",
        "box_ap50",
    )
    return [
        {
            "regime": r["regime"],
            "real fraction": f"{100 * r['real_fraction']:.0f}%",
            "synthetic ratio": r["synthetic_ratio"],
            "real images": r["real_images"],
            "synthetic images": r["synthetic_images"],
            "steps": r["steps"],
            "seeds": r["seeds"],
            **{k: r[k] for k in keys},
            "check": _check_of(result, r),
        }
        for r in result["results"]
    ]


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def results_markdown(result: dict) -> str:
    """``table.md``: the verdict first, then mean ± std over seeds of each regime, the chance level,
    adherence on the pixels and fidelity."""
    sweep = result["protocol"].get("synthetic_ratios") is not None
    header = [
        "regime",
        "real fraction",
        *(["synthetic ratio"] if sweep else []),
        "real images",
        "synthetic images",
        "steps",
        "seeds",
        "defect IoU",
        "Dice",
        "HD95",
        "mask AP",
        "mask AP50",
        "box AP",
        "check",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r, t in zip(result["results"], results_table(result)):
        cells = [
            r["regime"],
            t["real fraction"],
            *([str(r["synthetic_ratio"])] if sweep else []),
            str(r["real_images"]),
            str(r["synthetic_images"]),
            str(r["steps"]),
            str(r["seeds"]),
            _pm(r["iou"], r["iou_std"]),
            _pm(r["dice"], r["dice_std"]),
            _pm(r["hd95"], r["hd95_std"]),
            _pm(r["mask_ap"], r["mask_ap_std"]),
            _pm(r["mask_ap50"], r["mask_ap50_std"]),
            _pm(r["box_ap"], r["box_ap_std"]),
            t["check"],
        ]
        lines.append(" | ".join(cells))
    a, f, c, p = result["adherence"], result["fidelity"], result["chance"], result["protocol"]
    segmentor = a["segmentor"]
    segmentor_line = (
        f"skipped: {segmentor['skipped']}."
        if "skipped" in segmentor
        else f"mean {segmentor['mean']}, median {segmentor['median']} ({segmentor['samples']} samples)."
    )
    return "\n".join(
        [
            f"# Evaluation of `{result['dataset']['name']}/{result['dataset']['version']}`",
            "",
            f"**Verdict: {result['verdict']}** — {result['verdict_reason']}.",
            "",
            f"Real test split: {p['test_images']} images; segmentor: {p['segmentor']}, head {p['head']}; "
            f"{len(p['seeds'])} seeds (mean ± std); real only trains {p['real_only_steps']} steps, the budget of "
            f"pre-training ({p['steps']}) + fine-tuning ({p['finetune_steps']}). Spread rule: {p['spread_rule']}.",
            "",
            f"Chance defect IoU on the test split: {c['chance']:.3f} (empty 0, all defect {c['all_defect']}, "
            f"shuffled test masks {c['shuffled_masks']}); a baseline has learned when IoU − std > chance + "
            f"{result['baseline']['by_fraction'][0]['margin']}.",
            "",
            *lines,
            "",
            f"Adherence on the pixels: {a['headline']}.",
            "",
            f"Adherence by the real-only segmentor: {segmentor_line}",
            "",
            f"Fidelity ({f['feature_extractor']} features): FID {f['fid']}, KID {f['kid']} ± {f['kid_std']}.",
            "",
        ]
    )


def write_evaluation(
    target: EvaluationFolder, dataset: DatasetRecord, result: dict, per_sample: dict, segmentor
) -> EvaluationRecord:
    """Plots, per-sample adherence, the table and the real-data segmentor (``segmentor/``, safetensors;
    usable as ``generation.adherence_scorer: segformer:<folder>`` when ``baseline.learned``) in
    ``evaluation/<fp>/``; the record last."""
    from indusfactory.evaluation.plots import adherence_histogram, mask_size_plot, metric_vs_fraction

    plots = {
        "metric_vs_fraction.png": metric_vs_fraction(result),
        "adherence_histogram.png": adherence_histogram(result),
        "mask_sizes.png": mask_size_plot(result),
    }
    with storage.local_copy_for_write(target.uri) as folder:
        for name, png in plots.items():
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(png)
        table = pa.table(
            {
                "sample_id": pa.array(per_sample["sample_id"], pa.string()),
                **{k: pa.array(per_sample[k], pa.float64()) for k in ("label_auc", "chance_auc", "adherence_iou")},
            }
        )
        pq.write_table(table, os.path.join(folder, ADHERENCE_TABLE))
        with open(os.path.join(folder, EVALUATION_TABLE), "w", encoding="utf-8") as handle:
            handle.write(results_markdown(result))
        segmentor.save_pretrained(os.path.join(folder, SEGMENTOR_DIR), safe_serialization=True)
        with open(os.path.join(folder, SEGMENTOR_DIR, BASELINE_FILE), "w", encoding="utf-8") as handle:
            json.dump(result["baseline"], handle, indent=1)
    record = EvaluationRecord(
        uri=target.uri,
        fingerprint=target.fingerprint,
        dataset_uri=dataset.uri,
        table=results_table(result),
        adherence=result["adherence"],
        fidelity=result["fidelity"],
        plots=sorted(plots),
        seconds=result["seconds"],
        verdict=result["verdict"],
        verdict_reason=result["verdict_reason"],
        baseline=result["baseline"],
        chance=result["chance"],
    )
    document = {**result, **record.model_dump(mode="json", exclude={"reused"})}
    storage.write_json_atomic(target.document, document)
    storage.write_json_atomic(DatasetLayout(dataset.uri).evaluation, document)
    storage.write_bytes_atomic(target.marker, record.to_json().encode("utf-8"))
    log.info("evaluation written to %s", DatasetLayout(dataset.uri).evaluation)
    return record


def published_dataset(dataset_uri: str) -> DatasetRecord:
    """The record of a published dataset version, read from its manifest."""
    manifest_uri = DatasetLayout(dataset_uri).manifest
    if not storage.exists(manifest_uri):
        raise BadInputError(f"dataset {dataset_uri} is not published (no manifest.json): run generate-dataset first")
    manifest = storage.read_json(manifest_uri)
    return DatasetRecord(
        name=manifest["name"],
        version=manifest["version"],
        uri=dataset_uri,
        manifest_uri=manifest_uri,
        samples=manifest["counts"]["samples"],
        shards=manifest["counts"]["shards"],
        adherence=manifest.get("adherence") or {},
        reused=True,
    )


def _baseline_learned(folder: str) -> bool | None:
    """Whether a saved segmentor passed its evaluation's baseline check (None: no check saved)."""
    path = os.path.join(folder, BASELINE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("learned")


@functools.lru_cache(maxsize=2)
def segmentor_adherence_scorer(folder: str):
    """An adherence scorer for generation QC from a segmentor an evaluation saved: IoU of its defect
    pixels with each sample's mask (the same score as the evaluation's adherence)."""
    from transformers import SegformerForSemanticSegmentation

    from indusfactory.infra.errors import ModelLoadError

    try:
        with storage.local_copy_for_read(folder) as local:
            model = SegformerForSemanticSegmentation.from_pretrained(local, use_safetensors=True)
            learned = _baseline_learned(local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"adherence segmentor {folder} cannot be loaded: {exc}") from exc
    if learned is False:
        log.warning(
            "adherence segmentor %s did not learn in its evaluation (no better than chance on the real "
            "test split): its scores measure the segmentor, not the samples",
            folder,
        )

    def score(images: list[np.ndarray], masks: list[np.ndarray]) -> list[float]:
        maps, _ = predict(model, images)
        return [mask_iou(m > 0, mask) for m, mask in zip(maps, masks)]

    return score
