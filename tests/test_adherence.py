"""The adherence measure says 'follows labels' only when defects sit where the labels say."""

from __future__ import annotations

import numpy as np
import pytest

from indusfactory.demo.surfaces import defect_mask, surface, write_surface_dataset
from indusfactory.generation import adherence
from indusfactory.infra.imaging import fit_square


def _textured(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    grey = (surface("fbm", size, rng) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _darken(image: np.ndarray, mask: np.ndarray, factor: float = 0.4) -> np.ndarray:
    out = image.astype(np.float64)
    out[mask] *= factor
    return out.round().astype(np.uint8)


def _masks(n: int, rng: np.random.Generator, size: int = 64) -> list[np.ndarray]:
    return [defect_mask(["hairline", "crack", "scratch"][i % 3], size, rng) for i in range(n)]


def test_images_darkened_along_their_masks_follow_their_labels_far_above_chance():
    rng = np.random.default_rng(0)
    masks = _masks(12, rng)
    images = [_darken(_textured(rng), m) for m in masks]
    summary = adherence.measure(images, masks)
    assert summary.follows_labels
    assert summary.median_auc > 0.9
    assert 0.3 < summary.chance_auc < 0.7
    assert summary.fraction_darker == 1.0


def test_images_whose_defects_ignore_the_labels_are_near_chance():
    rng = np.random.default_rng(1)
    masks = _masks(12, rng)
    elsewhere = _masks(12, rng)  # each image is darkened along another, unrelated mask
    images = [_darken(_textured(rng), m) for m in elsewhere]
    summary = adherence.measure(images, masks)
    assert summary.verdict == adherence.NEAR_CHANCE
    assert abs(summary.median_auc - summary.chance_auc) < adherence.DEFAULT_MARGIN


def test_label_auc_is_one_half_without_relation_and_one_for_a_perfectly_dark_label():
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:20, 15] = True
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert adherence.label_auc(flat, mask) == pytest.approx(0.5)
    assert adherence.label_auc(_darken(flat, mask), mask) == pytest.approx(1.0)
    assert adherence.label_auc(flat, np.zeros_like(mask)) == 0.5


def test_the_chance_pairing_gives_every_sample_another_samples_mask():
    for n in (2, 3, 10):
        other = adherence.derangement(n, seed=n)
        assert sorted(other) == list(range(n))
        assert all(other[i] != i for i in range(n))


def test_shard_totals_merge_into_the_median_of_all_samples():
    rng = np.random.default_rng(2)
    aucs, chance = rng.uniform(0.6, 1.0, 300), rng.uniform(0.3, 0.7, 300)
    contrasts = rng.normal(0.1, 0.1, 300)
    shards = [
        adherence.shard_totals(aucs[i : i + 100], chance[i : i + 100], contrasts[i : i + 100]) for i in (0, 100, 200)
    ]
    merged = adherence.summarise_totals(shards)
    assert merged.median_auc == pytest.approx(np.median(aucs), abs=0.02)
    assert merged.chance_auc == pytest.approx(np.median(chance), abs=0.02)
    assert merged.fraction_darker == pytest.approx(np.mean(contrasts > 0))
    assert merged.follows_labels
    assert not adherence.summarise_totals([adherence.shard_totals(chance, chance, contrasts)]).follows_labels


def test_grey_images_have_no_colourfulness_and_tinted_ones_do():
    rng = np.random.default_rng(3)
    grey = _textured(rng)
    assert adherence.colourfulness(grey) == 0
    tinted = (grey * np.array([1.0, 0.7, 0.4])).astype(np.uint8)
    assert adherence.colourfulness(tinted) > 20


def test_a_thin_crack_downscaled_stays_one_piece(tmp_path):
    from skimage.measure import label

    rng = np.random.default_rng(4)
    pieces_nearest, pieces_coverage = [], []
    for i in range(20):
        mask = defect_mask("hairline", 256, rng)
        from PIL import Image

        nearest = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST)) > 127
        pieces_nearest.append(label(nearest, connectivity=2).max())
        pieces_coverage.append(label(fit_square(mask, 64), connectivity=2).max())
    assert np.median(pieces_coverage) == 1
    assert np.median(pieces_nearest) > 1  # what nearest-neighbour sampling did to the same cracks
    assert fit_square(np.pad(np.ones((1, 1), bool), ((100, 155), (100, 155))), 64).sum() == 1  # never empty


def test_the_surface_dataset_keeps_a_test_split_and_is_reproducible(tmp_path):
    import json

    a = write_surface_dataset(tmp_path / "a", n_defective=12, n_defect_free=4, n_heldout=2, size=64, tint="teal")
    b = write_surface_dataset(tmp_path / "b", n_defective=12, n_defect_free=4, n_heldout=2, size=64, tint="teal")
    coco = json.loads(a.coco_annotations.read_text())
    assert {i["split"] for i in coco["images"]} == {"train", "val", "test"}
    assert {c["name"] for c in coco["categories"]} == {"hairline", "crack", "scratch"}
    assert a.coco_annotations.read_text() == b.coco_annotations.read_text()
    assert (a.images_dir / "defect_0000.png").read_bytes() == (b.images_dir / "defect_0000.png").read_bytes()
    assert len(list(a.heldout_defect_free_dir.glob("*.png"))) == 2
