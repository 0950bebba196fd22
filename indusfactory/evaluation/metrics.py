"""Segmentation and fidelity metrics of the evaluation stage.

IoU and Dice per class, Hausdorff distance (95th percentile, normalised by the image diagonal),
mask and box AP through pycocotools' ``COCOeval``, and FID / KID between feature sets.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import label

from indusfactory.schema import coco_document, mask_to_rle, rle_bbox_area

# --- overlap -----------------------------------------------------------------------------------


@dataclass
class OverlapCounts:
    """Pixel intersection and union sums per class over a set of images (class 0 is background)."""

    intersection: np.ndarray
    union: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray

    @classmethod
    def empty(cls, n_classes: int) -> "OverlapCounts":
        return cls(*(np.zeros(n_classes, dtype=np.int64) for _ in range(4)))

    def add(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        for k in range(len(self.union)):
            p, t = prediction == k, truth == k
            self.intersection[k] += int((p & t).sum())
            self.union[k] += int((p | t).sum())
            self.predicted[k] += int(p.sum())
            self.truth[k] += int(t.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU over the whole set; NaN for a class absent from both prediction and truth."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.intersection / self.union, np.nan)

    def dice(self) -> np.ndarray:
        total = self.predicted + self.truth
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 2 * self.intersection / total, np.nan)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --- boundary distance -------------------------------------------------------------------------


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95(prediction: np.ndarray, truth: np.ndarray) -> float:
    """95th percentile of the symmetric boundary distances, divided by the image diagonal.

    Both empty: NaN (nothing to measure); exactly one empty: 1.0 (the worst normalised value).
    """
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if not prediction.any() and not truth.any():
        return float("nan")
    if not prediction.any() or not truth.any():
        return 1.0
    bp, bt = _boundary(prediction), _boundary(truth)
    to_truth = ndimage.distance_transform_edt(~bt)[bp]
    to_prediction = ndimage.distance_transform_edt(~bp)[bt]
    distance = np.percentile(np.concatenate([to_truth, to_prediction]), 95)
    return float(distance / np.hypot(*prediction.shape))


# --- COCO AP -----------------------------------------------------------------------------------


def instances_of(class_map: np.ndarray, scores: np.ndarray | None = None) -> list[tuple[int, np.ndarray, float]]:
    """Connected components of each class of a class map: (class index, mask, score).

    ``scores`` (K x H x W probabilities) gives each component the mean probability of its class.
    """
    out = []
    for k in np.unique(class_map):
        if k == 0:
            continue
        components = label(class_map == k, connectivity=2)
        for c in range(1, components.max() + 1):
            mask = components == c
            score = float(scores[k][mask].mean()) if scores is not None else 1.0
            out.append((int(k), mask, score))
    return out


def coco_average_precision(
    truth: list[list[tuple[int, np.ndarray]]],
    predictions: list[list[tuple[int, np.ndarray, float]]],
    category_ids: list[int],
) -> dict[str, float]:
    """Mask and box AP (COCO AP@[.5:.95] and AP@.5) of instance predictions, through ``COCOeval``.

    ``truth[i]`` and ``predictions[i]`` are the instances of image i, with class indices 1..K
    mapping to ``category_ids[k - 1]``. Returns NaN when there is no ground-truth instance.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict] = []
    annotations: list[dict] = []
    results: list[dict] = []
    for image_id, (gt, pred) in enumerate(zip(truth, predictions), start=1):
        height, width = (gt[0][1] if gt else pred[0][1] if pred else np.zeros((1, 1))).shape
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.png"})
        for k, mask in gt:
            rle = mask_to_rle(mask)
            bbox, area = rle_bbox_area(rle)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[k - 1],
                    "segmentation": rle,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
        for k, mask, score in pred:
            rle = mask_to_rle(mask)
            bbox, _ = rle_bbox_area(rle)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[k - 1],
                    "segmentation": rle,
                    "bbox": bbox,
                    "score": score,
                }
            )
    if not annotations:
        return {"mask_ap": float("nan"), "mask_ap50": float("nan"), "box_ap": float("nan"), "box_ap50": float("nan")}
    categories = [{"id": c, "name": str(c)} for c in category_ids]
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO()
        gt_coco.dataset = coco_document(images, annotations, categories, "evaluation ground truth")
        gt_coco.createIndex()
        for iou_type, name in (("segm", "mask"), ("bbox", "box")):
            if not results:
                out[f"{name}_ap"] = out[f"{name}_ap50"] = 0.0
                continue
            evaluator = COCOeval(gt_coco, gt_coco.loadRes(results), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out[f"{name}_ap"] = max(0.0, float(evaluator.stats[0]))
            out[f"{name}_ap50"] = max(0.0, float(evaluator.stats[1]))
    return out


# --- fidelity ----------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID formula between Gaussian fits of two feature sets (N x D each); NaN when either set has fewer than
    two samples (no covariance to fit)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product(cov_a, cov_b))


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr sqrt(A B) for covariance matrices, as Tr sqrt(A^1/2 B A^1/2): symmetric, so eigen-decompositions
    suffice. Stable where ``scipy.linalg.sqrtm`` of the non-symmetric product fails on singular covariances
    (few samples, or features that do not vary: 'Internal error in scipy.linalg.sqrtm')."""
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (unbiased MMD^2 with the cubic polynomial kernel), mean and std over random subsets."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        return float("nan"), float("nan")
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        m = size
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def size_histogram(areas: list[float], bins: np.ndarray) -> list[int]:
    """Counts of relative mask areas (fraction of the image) in ``bins``."""
    counts, _ = np.histogram(np.asarray(areas, dtype=np.float64), bins=bins)
    return counts.astype(int).tolist()
