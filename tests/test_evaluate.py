"""Evaluation: metrics against hand-computed values, and the evaluate-dataset flow on the tiny chain."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from indusfactory.evaluation.metrics import (
    OverlapCounts,
    coco_average_precision,
    frechet_distance,
    hausdorff95,
    instances_of,
    kernel_inception_distance,
    mask_iou,
)


def test_iou_and_dice_by_hand():
    truth = np.zeros((3, 3), dtype=int)
    truth[0, 0] = truth[0, 1] = 1
    prediction = np.zeros((3, 3), dtype=int)
    prediction[0, 1] = prediction[1, 1] = 1
    counts = OverlapCounts.empty(3)
    counts.add(prediction, truth)
    iou, dice = counts.iou(), counts.dice()
    assert iou[1] == pytest.approx(1 / 3) and dice[1] == pytest.approx(2 * 1 / (2 + 2))
    assert iou[0] == pytest.approx(6 / 8), "background: 6 shared pixels of 8 in the union"
    assert math.isnan(iou[2]) and math.isnan(dice[2]), "a class absent from both is not scored"
    assert mask_iou(truth == 1, prediction == 1) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_hausdorff95_by_hand():
    truth, prediction = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    truth[2, 2], prediction[2, 5] = True, True
    assert hausdorff95(prediction, truth) == pytest.approx(3 / math.hypot(10, 10))
    assert hausdorff95(truth, truth) == 0.0
    assert hausdorff95(prediction, np.zeros_like(truth)) == 1.0, "a missed or hallucinated defect is the worst"
    assert math.isnan(hausdorff95(np.zeros_like(truth), np.zeros_like(truth)))


def test_coco_ap_through_pycocotools_by_hand():
    gt = np.zeros((32, 32), bool)
    gt[5:15, 5:15] = True  # 100 px
    inside = np.zeros_like(gt)
    inside[5:13, 5:14] = True  # 72 px inside it: IoU 0.72
    perfect = coco_average_precision([[(1, gt)]], [[(1, gt, 0.9)]], [7])
    assert perfect["mask_ap"] == pytest.approx(1.0) and perfect["box_ap"] == pytest.approx(1.0)
    partial = coco_average_precision([[(1, gt)]], [[(1, inside, 0.9)]], [7])
    # Matched at IoU thresholds 0.50, 0.55, 0.60, 0.65, 0.70 of the ten: AP = 5/10, AP50 = 1.
    assert partial["mask_ap"] == pytest.approx(0.5) and partial["mask_ap50"] == pytest.approx(1.0)
    assert partial["box_ap"] == pytest.approx(0.5)
    wrong_class = coco_average_precision([[(1, gt)]], [[(2, gt, 0.9)]], [7, 8])
    assert wrong_class["mask_ap"] == pytest.approx(0.0)
    none = coco_average_precision([[(1, gt)]], [[]], [7])
    assert none["mask_ap"] == 0.0


def test_instances_of_a_class_map_are_connected_components():
    class_map = np.zeros((8, 8), dtype=int)
    class_map[0:2, 0:2] = 1
    class_map[5:7, 5:7] = 1
    class_map[0:2, 5:7] = 2
    probs = np.zeros((3, 8, 8))
    probs[1] = 0.8
    probs[2] = 0.6
    found = instances_of(class_map, probs)
    assert sorted((k, int(m.sum()), s) for k, m, s in found) == [(1, 4, 0.8), (1, 4, 0.8), (2, 4, 0.6)]


def test_fid_matches_the_matrix_square_root_and_survives_singular_covariances():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
    expected -= 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # fewer samples than features and a feature that never varies: rank-deficient covariances
    few = rng.normal(size=(5, 16))
    few[:, 3] = 1.0
    assert np.isfinite(frechet_distance(few, rng.normal(size=(6, 16))))
    assert np.isnan(frechet_distance(few, few[:1]))  # one sample has no covariance: undefined, not an error


def test_fid_and_kid_by_hand():
    a = np.random.default_rng(0).normal(size=(200, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(3 * 4.0), "same covariance: |mu_a - mu_b|^2"
    kid, std = kernel_inception_distance(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), subsets=3, subset_size=2)
    # k(u, v) = (u v + 1)^3: off-diagonal means 1 and 27, cross mean (1 + 1 + 8 + 27) / 4.
    assert kid == pytest.approx(1 + 27 - 2 * 37 / 4) and std == pytest.approx(0.0)


def test_evaluate_dataset_flow_fills_every_cell(prefect_api, make_config):
    from prefect.client.orchestration import get_client

    from flows.evaluate_dataset import evaluate_dataset
    from flows.generate_dataset import generate_dataset

    # The untrained test model's samples pass or fail the contrast QC by chance; let every one pass, so the
    # evaluation always has synthetic images to shuffle and pre-train on.
    config = make_config(evaluation={"enabled": False}, generation={"min_mask_contrast": -1.0})
    with pytest.raises(Exception, match="not published"):
        evaluate_dataset(config=config)
    dataset = generate_dataset(config=config)
    record = evaluate_dataset(config=config)
    regimes = [(row["regime"], row["real fraction"]) for row in record.table]
    # Issue 14 changed the layout: the controls are rows of their own, every row is a mean over seeds.
    assert regimes == [
        ("synthetic only", "0%"),
        ("real only", "10%"),
        ("synthetic + real", "10%"),
        ("shuffled labels + real", "10%"),
        ("empty masks + real", "10%"),
        ("real only", "100%"),
        ("synthetic + real", "100%"),
        ("shuffled labels + real", "100%"),
        ("empty masks + real", "100%"),
    ]
    for row in record.table:
        assert row["seeds"] == 3 and row["iou_std"] is not None, row
        for key in ("iou", "miou", "mdice", "hd95", "mask_ap", "box_ap"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0, (row["regime"], key)
    root = Path(dataset.uri)
    evaluation = json.loads((root / "evaluation.json").read_text())
    assert evaluation["adherence"]["samples"] == dataset.samples
    assert evaluation["adherence"]["verdict"] in ("follows labels", "near chance"), "measured on the pixels"
    assert record.verdict in ("synthetic helps", "no benefit", "inconclusive: the baseline did not learn")
    assert evaluation["verdict"] == record.verdict and evaluation["chance"]["chance"] >= 0.0
    assert f"**Verdict: {record.verdict}**" in (Path(record.uri) / "table.md").read_text()
    assert evaluation["fidelity"]["fid"] is not None and evaluation["fidelity"]["kid"] is not None
    assert set(evaluation["distributions"]["real"]["instances_per_class"]) == {"hairline", "branched"}
    for plot in record.plots:
        assert (Path(record.uri) / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "manifest.json").is_file(), "the published version is untouched"
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"demo-cracks-evaluation-table", "demo-cracks-evaluation"} <= keys
    again = evaluate_dataset(config=config)
    assert again.reused and again.table == record.table

    # The real-data segmentor the evaluation saved drives generation QC: same scores as the evaluation's.
    import pandas as pd

    from indusfactory.generation.generate import adherence_scorer
    from indusfactory.schema import decode_image, rle_to_mask

    check = json.loads((Path(record.uri) / "segmentor" / "baseline_check.json").read_text())
    assert check["learned"] == record.baseline["learned"], "the saved segmentor says whether it learned"
    scorer = adherence_scorer(f"segformer:{record.uri}/segmentor")
    samples = pd.read_parquet(root / "data").sort_values("sample_id")
    masks = [np.logical_or.reduce([rle_to_mask(i["rle"]) for i in insts]) for insts in samples["instances"]]
    scores = scorer([decode_image(img["bytes"]) for img in samples["image"]], masks)
    saved = pd.read_parquet(Path(record.uri) / "adherence.parquet").set_index("sample_id")
    assert saved["label_auc"].notna().all()
    if record.baseline["learned"]:
        assert scores == pytest.approx(saved.loc[samples["sample_id"], "adherence_iou"].tolist())
    else:  # a segmentor that did not learn does not score adherence
        assert saved["adherence_iou"].isna().all() and "skipped" in evaluation["adherence"]["segmentor"]
        assert len(scores) == len(samples)
