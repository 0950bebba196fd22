"""generation.colour_match: samples take their source's colour around the label and the real defects' colour
inside it, and keep the luma that labels are measured by."""

from __future__ import annotations

import numpy as np

from indusfactory.generation.adherence import colourfulness, label_auc, luminance
from indusfactory.generation.colour import ChromaStats, image_chroma, match_chroma

SIZE = 48


def _noisy_colour_image(seed: int = 0) -> np.ndarray:
    """What a small base model draws: a texture with colour noise, and a dark crack across the middle."""
    rng = np.random.default_rng(seed)
    image = rng.normal(150, 25, (SIZE, SIZE, 3))
    image[22:25, :] -= 70
    return np.clip(image, 0, 255).astype(np.uint8)


def _label() -> np.ndarray:
    label = np.zeros((SIZE, SIZE), dtype=bool)
    label[22:25, :] = True
    return label


def _tinted(rgb: tuple[int, int, int], seed: int = 1, colour_grain: bool = False) -> np.ndarray:
    """A surface of one tint with grain: grey grain (no chroma spread), or grain per channel."""
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 12, (SIZE, SIZE, 3 if colour_grain else 1))
    return np.clip(np.array(rgb) + grain, 0, 255).astype(np.uint8)


def test_grey_sources_give_grey_samples_with_the_same_luma_and_label_auc():
    generated, label = _noisy_colour_image(), _label()
    grey_source = _tinted((140, 140, 140))
    assert colourfulness(generated) > 20

    matched = match_chroma(generated, grey_source, label)

    assert colourfulness(matched) == 0
    assert np.abs(luminance(matched) - luminance(generated)).max() <= 0.5  # rounding only
    assert abs(label_auc(matched, label) - label_auc(generated, label)) < 0.01


def test_chroma_moves_to_the_source_around_the_label_and_to_the_real_defects_inside():
    generated, label = _noisy_colour_image(), _label()
    teal_source = _tinted((80, 130, 120))
    rust = ChromaStats(mean=(-25.0, 30.0), std=(4.0, 3.0))

    matched = match_chroma(generated, teal_source, label, rust)

    around, inside, source = image_chroma(matched, ~label), image_chroma(matched, label), image_chroma(teal_source)
    assert around is not None and inside is not None and source is not None
    assert np.allclose(around.mean, source.mean, atol=0.6) and np.allclose(around.std, source.std, atol=0.6)
    assert np.allclose(inside.mean, rust.mean, atol=0.6) and np.allclose(inside.std, rust.std, atol=0.6)


def test_without_defect_statistics_the_label_takes_the_transform_of_its_surroundings():
    generated, label = _noisy_colour_image(), _label()
    generated[label] = (generated[label] * np.array([0.6, 0.6, 1.0])).astype(np.uint8)  # a bluish crack
    teal_source = _tinted((80, 130, 120), colour_grain=True)

    matched = match_chroma(generated, teal_source, label)

    # the crack stays bluer than its surroundings (Cb up), scaled like every other pixel, not reset
    before_gap = image_chroma(generated, label).mean[0] - image_chroma(generated, ~label).mean[0]
    after_gap = image_chroma(matched, label).mean[0] - image_chroma(matched, ~label).mean[0]
    assert before_gap > 5 and after_gap > 0


def test_defect_chroma_reads_the_training_split_only():
    from indusfactory.generation.plan import SourceImages
    from indusfactory.schema import encode_png, mask_to_rle

    label = _label()

    def row(image_id: str, split: str, rgb: tuple[int, int, int]) -> dict:
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8) + 128
        image[label] = rgb
        return {
            "image_id": image_id,
            "split": split,
            "defective": True,
            "image": {"bytes": encode_png(image)},
            "instances": [{"annotation_id": 1, "rle": mask_to_rle(label)}],
        }

    sources = SourceImages.__new__(SourceImages)
    sources._rows = {r["image_id"]: r for r in [row("a", "train", (150, 60, 40)), row("b", "test", (40, 60, 150))]}
    sources._images, sources._defect_chroma = {}, {}

    stats = sources.defect_chroma(SIZE)

    rust = image_chroma(np.full((1, 1, 3), (150, 60, 40), dtype=np.uint8))
    assert stats is not None and np.allclose(stats.mean, rust.mean, atol=1.0)  # the test split's blue is unread
