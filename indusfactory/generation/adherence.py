"""Does a generated image show its defect where its label says? Measured on the pixels, by no model.

The defects of this factory are darker than the surface around them (cracks, scratches, pits), so
a sample *follows its label* when the pixels inside the label are darker than the ring of pixels
just around it. Per sample:

- ``label_auc``: the probability that a label pixel is darker than a ring pixel (Mann-Whitney AUC;
  ties count half). 0.5 is no relation, 1.0 every label pixel is darker than every ring pixel.
- ``label_contrast``: (ring mean - label mean) / ring mean, in luminance.

Over a set of samples the *chance level* is the same measure with each image paired with another
sample's mask (a derangement): a model that ignores the labels scores as well on its own masks as
on anybody's. A set follows its labels when its median AUC is clearly above that chance level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.stats import rankdata

FOLLOWS_LABELS = "follows labels"
NEAR_CHANCE = "near chance"
DEFAULT_MARGIN = 0.1
"""How far above the chance level the median AUC must be for a set to follow its labels."""


def ring_width(resolution: int) -> int:
    """Width in pixels of the ring a label is compared with: 3 px at 64 px, growing with the image."""
    return max(2, round(3 * resolution / 64))


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of a uint8 HxWx3 image, float64 in 0..255."""
    return image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def label_and_ring_pixels(
    image: np.ndarray, mask: np.ndarray, ring: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Luminance of the label's pixels and of the ring around it; None when either is empty."""
    ring = ring or ring_width(image.shape[0])
    inside = mask.astype(bool)
    around = binary_dilation(inside, iterations=ring) & ~inside
    if not inside.any() or not around.any():
        return None
    gray = luminance(image)
    return gray[inside], gray[around]


def label_auc(image: np.ndarray, mask: np.ndarray, ring: int | None = None) -> float:
    """P(a label pixel is darker than a ring pixel); 0.5 when the label or its ring is empty."""
    pixels = label_and_ring_pixels(image, mask, ring)
    if pixels is None:
        return 0.5
    a, b = pixels
    ranks = rankdata(np.concatenate([a, b]))
    # Mann-Whitney U of the ring pixels: how often a ring pixel is brighter than a label pixel.
    u_ring = ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2
    return float(u_ring / (len(a) * len(b)))


def label_contrast(image: np.ndarray, mask: np.ndarray, ring: int | None = None) -> float:
    """How much darker the label is than the ring around it: (ring - label) / ring, in luminance."""
    pixels = label_and_ring_pixels(image, mask, ring)
    if pixels is None:
        return 0.0
    inside, around = pixels
    return float((around.mean() - inside.mean()) / max(around.mean(), 1.0))


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of 0..n-1 that moves every index (n >= 2): who gets whose mask."""
    if n < 2:
        raise ValueError("a chance pairing needs at least two samples")
    order = np.random.default_rng(seed).permutation(n)
    shifted = np.empty(n, dtype=int)
    shifted[order] = np.roll(order, 1)
    return shifted


def colourfulness(image: np.ndarray) -> float:
    """Median over pixels of (max - min) over the RGB channels: 0 for a grey image."""
    rgb = image[..., :3].astype(np.int16)
    return float(np.median(rgb.max(axis=2) - rgb.min(axis=2)))


@dataclass(frozen=True)
class AdherenceSummary:
    """How a set of samples follows its labels, with the chance level of the same set."""

    samples: int
    median_auc: float
    chance_auc: float
    fraction_darker: float
    median_contrast: float
    margin: float
    verdict: str

    @property
    def follows_labels(self) -> bool:
        return self.verdict == FOLLOWS_LABELS

    def headline(self) -> str:
        return (
            f"{self.verdict}: median label AUC {self.median_auc:.3f} vs chance {self.chance_auc:.3f} "
            f"({self.fraction_darker:.0%} of {self.samples} samples darker inside their label)"
        )

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "median_auc": round(self.median_auc, 4),
            "chance_auc": round(self.chance_auc, 4),
            "fraction_darker": round(self.fraction_darker, 4),
            "median_contrast": None if np.isnan(self.median_contrast) else round(self.median_contrast, 4),
            "margin": self.margin,
            "verdict": self.verdict,
        }


def summarise(
    aucs: Sequence[float], chance_aucs: Sequence[float], contrasts: Sequence[float], margin: float = DEFAULT_MARGIN
) -> AdherenceSummary:
    """The verdict of a set from per-sample AUCs, their chance pairing and contrasts."""
    median_auc = float(np.median(aucs)) if len(aucs) else 0.5
    chance = float(np.median(chance_aucs)) if len(chance_aucs) else 0.5
    verdict = FOLLOWS_LABELS if len(aucs) and median_auc >= chance + margin else NEAR_CHANCE
    return AdherenceSummary(
        samples=len(aucs),
        median_auc=median_auc,
        chance_auc=chance,
        fraction_darker=float(np.mean(np.asarray(contrasts) > 0)) if len(contrasts) else 0.0,
        median_contrast=float(np.median(contrasts)) if len(contrasts) else 0.0,
        margin=margin,
        verdict=verdict,
    )


def measure(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], margin: float = DEFAULT_MARGIN, seed: int = 0
) -> AdherenceSummary:
    """Adherence of images to their own masks against the chance pairing (each image, another's mask)."""
    aucs = [label_auc(image, mask) for image, mask in zip(images, masks)]
    contrasts = [label_contrast(image, mask) for image, mask in zip(images, masks)]
    chance = []
    if len(images) >= 2:
        other = derangement(len(images), seed)
        chance = [label_auc(images[i], masks[j]) for i, j in enumerate(other)]
    return summarise(aucs, chance, contrasts, margin)


# --- totals that merge across shards (a dataset's verdict without re-reading its shards) ----------

HISTOGRAM_BINS = 50
"""AUC histograms of 50 bins over 0..1: medians merge across shards to within 0.02."""


def auc_histogram(values: Sequence[float]) -> list[int]:
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))
    return counts.astype(int).tolist()


def histogram_median(counts: Sequence[int]) -> float:
    """The median of values binned by ``auc_histogram`` (linear within the bin); 0.5 when empty."""
    binned = np.asarray(counts, dtype=np.float64)
    total = binned.sum()
    if total == 0:
        return 0.5
    cumulative = np.cumsum(binned)
    k = int(np.searchsorted(cumulative, total / 2))
    before = cumulative[k - 1] if k else 0.0
    width = 1.0 / len(binned)
    return float(k * width + width * (total / 2 - before) / max(binned[k], 1.0))


def shard_totals(aucs: Sequence[float], chance: Sequence[float], contrasts: Sequence[float]) -> dict:
    """What a shard keeps so that a dataset's summary merges from its shards."""
    return {
        "auc_histogram": auc_histogram(aucs),
        "chance_histogram": auc_histogram(chance),
        "darker": int(np.sum(np.asarray(contrasts) > 0)),
        "scored": len(aucs),
    }


def summarise_totals(totals: Sequence[dict], margin: float = DEFAULT_MARGIN) -> AdherenceSummary:
    """The verdict of a dataset from its shards' ``shard_totals`` (medians from the merged histograms)."""
    totals = [t for t in totals if t]
    zeros = [0] * HISTOGRAM_BINS
    aucs = np.sum([t["auc_histogram"] for t in totals], axis=0) if totals else zeros
    chance = np.sum([t["chance_histogram"] for t in totals], axis=0) if totals else zeros
    scored = int(sum(t["scored"] for t in totals))
    median_auc, chance_auc = histogram_median(aucs), histogram_median(chance)
    verdict = FOLLOWS_LABELS if scored and median_auc >= chance_auc + margin else NEAR_CHANCE
    return AdherenceSummary(
        samples=scored,
        median_auc=median_auc,
        chance_auc=chance_auc,
        fraction_darker=sum(t["darker"] for t in totals) / scored if scored else 0.0,
        median_contrast=float("nan"),
        margin=margin,
        verdict=verdict,
    )
