"""An evaluation that can say no: the verdict of the downstream protocol on tiny data made here.

Real-only baselines that cannot learn make the evaluation inconclusive; synthetic images whose
defects are not where their labels say bring no benefit; the rules themselves by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indusfactory.config import EvaluationConfig
from indusfactory.evaluation.evaluate import (
    HELPS,
    INCONCLUSIVE,
    NO_BENEFIT,
    LabelledImages,
    ProtocolData,
    adherence_report,
    chance_levels,
    compare,
    decide,
    pixel_adherence,
    results_table,
    run_protocol,
    write_evaluation,
)
from indusfactory.evaluation.segmentor import SegmentationSet
from indusfactory.generation.adherence import derangement
from indusfactory.layout import EvaluationFolder
from indusfactory.schema import DatasetRecord

SIZE = 32
DATASET = DatasetRecord(name="tiny", version="v", uri="unused", manifest_uri="unused", samples=8, shards=1)


def _surface(rng: np.random.Generator) -> np.ndarray:
    return np.clip(150 + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _blob(rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    h, w = rng.integers(3, 6), rng.integers(8, 16)
    if rng.random() < 0.5:
        h, w = w, h
    y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
    mask[y : y + h, x : x + w] = True
    return mask


def defect_images(n: int, seed: int, visible: bool = True) -> LabelledImages:
    """Noisy grey surfaces with one rectangular defect each: dark when ``visible``, else no pixel change."""
    rng = np.random.default_rng(seed)
    images, labels, instances = [], [], []
    for _ in range(n):
        image, mask = _surface(rng), _blob(rng)
        if visible:
            image[mask] = (image[mask] * 0.4).astype(np.uint8)
        images.append(image)
        labels.append(mask.astype(np.int64))
        instances.append([(1, mask)])
    return LabelledImages(SegmentationSet(images, labels), instances, [f"i{k}" for k in range(n)])


def _config(**overrides) -> EvaluationConfig:
    base = {
        "real_fractions": [1.0],
        "seeds": 2,
        "steps": 30,
        "finetune_steps": 30,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "controls": ["shuffled labels"],
    }
    return EvaluationConfig(**{**base, **overrides})


def _result(protocol: dict, e: EvaluationConfig, test_images: int, synthetic: LabelledImages) -> dict:
    """A result document around a protocol output, as evaluate_dataset writes it."""
    pixels, aucs, chance = pixel_adherence(synthetic, seed=0)
    adherence = adherence_report(pixels, aucs, chance, DATASET, None)
    bins = [0.0, 0.5, 1.0]
    return {
        "fingerprint": "fp",
        "dataset": {"name": "tiny", "version": "v"},
        **protocol,
        "adherence": adherence,
        "fidelity": {"feature_extractor": "small", "fid": None, "kid": None, "kid_std": None},
        "seconds": 1.0,
        "distributions": {
            "size_bins": bins,
            "real": {"mask_size_histogram": [1, 0]},
            "synthetic": {"mask_size_histogram": [1, 0]},
        },
        "protocol": {
            "test_images": test_images,
            "segmentor": "tiny",
            "head": "binary",
            "seeds": [0, 1],
            "steps": e.steps,
            "finetune_steps": e.finetune_steps,
            "real_only_steps": e.steps + e.finetune_steps,
            "spread_rule": "max std",
            "synthetic_ratios": e.synthetic_ratios,
        },
    }


def test_invisible_defects_make_the_evaluation_inconclusive(tmp_path):
    """Masks with no visible pixel change: no segmentor can learn them, so nothing can be concluded,
    even with synthetic data that follows its labels. The verdict is in the table, evaluation.json
    and the record, and the blind segmentor scores no adherence."""
    e = _config()
    synthetic = defect_images(8, seed=3)
    data = ProtocolData(
        train=defect_images(6, seed=1, visible=False),
        test=defect_images(2, seed=2, visible=False),
        synthetic=synthetic.data,
        category_ids=[1],
    )
    protocol, baseline = run_protocol(e, data)
    assert protocol["verdict"] == INCONCLUSIVE, protocol["baseline"]
    assert protocol["baseline"]["learned"] is False
    assert all(c["verdict"] == INCONCLUSIVE for c in protocol["comparisons"])
    result = _result(protocol, e, 2, synthetic)
    real_only = [row for row in results_table(result) if row["regime"] == "real only"]
    assert [row["check"] for row in real_only] == ["did not learn"]
    assert all(row["seeds"] == 2 and row["iou_std"] is not None for row in results_table(result))

    dataset = DATASET.model_copy(update={"uri": str(tmp_path / "dataset")})
    per_sample = {
        "sample_id": synthetic.ids,
        "label_auc": [0.5] * 8,
        "chance_auc": [0.5] * 8,
        "adherence_iou": [None] * 8,
    }
    folder = EvaluationFolder(str(tmp_path / "dataset" / "evaluation" / "fp"), "fp")
    record = write_evaluation(folder, dataset, result, per_sample, baseline)
    document = json.loads((tmp_path / "dataset" / "evaluation.json").read_text())
    assert record.verdict == document["verdict"] == INCONCLUSIVE
    assert f"**Verdict: {INCONCLUSIVE}**" in (Path(record.uri) / "table.md").read_text()
    assert document["adherence"]["verdict"] == "follows labels", "the synthetic defects are visible: pixels say so"
    assert "skipped" in document["adherence"]["segmentor"]
    assert json.loads((Path(record.uri) / "segmentor" / "baseline_check.json").read_text())["learned"] is False


def test_synthetic_labels_not_where_the_defects_are_bring_no_benefit():
    """Real data a segmentor learns; synthetic images whose defects are elsewhere than their labels."""
    e = _config()
    synthetic = defect_images(8, seed=3)
    moved = derangement(len(synthetic.data), seed=5)
    wrong = SegmentationSet(synthetic.data.images, [synthetic.data.labels[j] for j in moved])
    data = ProtocolData(
        train=defect_images(8, seed=1), test=defect_images(4, seed=2), synthetic=wrong, category_ids=[1]
    )
    protocol, baseline = run_protocol(e, data)
    assert protocol["baseline"]["learned"] is True, protocol["baseline"]
    assert protocol["verdict"] == NO_BENEFIT, (protocol["comparisons"], protocol["verdict_reason"])
    regimes = [r["regime"] for r in protocol["results"]]
    assert regimes == ["synthetic only", "real only", "synthetic + real", "shuffled labels + real"]
    assert baseline is not None


def test_chance_levels_by_hand():
    a, b = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    a[0, :2] = 1  # 2 px
    b[0, :] = 1  # 4 px, overlapping a in 2
    test = LabelledImages(SegmentationSet([np.zeros((4, 4, 3), np.uint8)] * 2, [a, b]), [[], []], ["a", "b"])
    levels = chance_levels(test, seed=0)
    assert levels["all_defect"] == pytest.approx(6 / 32)
    assert levels["shuffled_masks"] == pytest.approx((2 + 2) / (4 + 4)), "swapped masks: 2 shared of 4 each way"
    assert levels["chance"] == pytest.approx(0.5)


def _row(iou: float, std: float | None, seeds: int = 3) -> dict:
    return {"iou": iou, "iou_std": std, "seeds": seeds}


def test_a_difference_counts_only_beyond_the_spread():
    assert compare(_row(0.5, 0.02), _row(0.4, 0.03), 0.02)["beyond_spread"] is True
    assert compare(_row(0.5, 0.12), _row(0.4, 0.03), 0.02)["beyond_spread"] is False, "inside the larger std"
    assert compare(_row(0.41, 0.0), _row(0.40, 0.0), 0.02)["beyond_spread"] is False, "below min_difference"
    assert compare(_row(0.9, None, 1), _row(0.1, None, 1), 0.02)["beyond_spread"] is False, "one seed: no spread"
    assert compare(_row(0.5, 0.0), None, 0.02) is None


def test_the_verdict_needs_the_baseline_and_the_shuffled_control():
    learned = {1.0: {"learned": True, "iou": 0.3, "iou_std": 0.01, "chance_iou": 0.05, "margin": 0.05}}
    blind = {1.0: {**learned[1.0], "learned": False, "iou": 0.0}}
    helps = [{"real_fraction": 1.0, "synthetic_ratio": None, "verdict": HELPS}]
    assert decide(helps, learned, 3)[0] == HELPS
    assert decide([{**helps[0], "verdict": NO_BENEFIT}], learned, 3)[0] == NO_BENEFIT
    assert decide([{**helps[0], "verdict": INCONCLUSIVE}], blind, 3)[0] == INCONCLUSIVE
