"""Offline augmentations and mask perturbations: determinism, identity, JSON, fallbacks, roi."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.data import brick

from indusfactory.drivers.augment import (
    AUGMENTATION_KEYS,
    PERTURBATION_KEYS,
    apply_augmentation,
    apply_perturbation,
    identity_augmentation,
    identity_perturbation,
    sample_augmentation,
    sample_perturbation,
)

SEEDS = range(20)
SHAPE = (64, 64)


def brick_crop(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    gray = brick()
    r, c = rng.integers(0, gray.shape[0] - size, 2)
    return np.repeat(gray[r : r + size, c : c + size, None], 3, axis=2)


def random_mask(rng: np.random.Generator, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """A blob, a thin diagonal crack, or a single pixel (possibly at the border)."""
    mask = np.zeros(shape, bool)
    kind = rng.integers(0, 3)
    if kind == 0:
        r, c = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
        mask[r : r + rng.integers(2, 10), c : c + rng.integers(2, 10)] = True
    elif kind == 1:
        n = min(shape)
        idx = np.arange(int(rng.integers(5, n)))
        mask[idx, idx] = True
    else:
        mask[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
    return mask


def json_round_trip(params: dict) -> dict:
    return json.loads(json.dumps(params))


def assert_plain_json(params: dict, keys: dict[str, type]) -> None:
    assert set(params) == set(keys)
    for key, kind in keys.items():
        assert type(params[key]) is kind, (key, type(params[key]))
    assert json_round_trip(params) == params


# --- augmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_augmentation_is_in_range_and_plain_json(seed):
    params = sample_augmentation(np.random.default_rng(seed))
    assert params == sample_augmentation(np.random.default_rng(seed))
    assert_plain_json(params, AUGMENTATION_KEYS)
    assert 1.0 <= params["zoom"] <= 1.3
    assert -1.0 <= params["crop_x"] <= 1.0 and -1.0 <= params["crop_y"] <= 1.0
    assert -15.0 <= params["rotation_deg"] <= 15.0
    assert 0.0 <= params["noise_std"] <= 0.03
    assert 0.8 <= params["contrast"] <= 1.2
    assert abs(params["translate_x"]) <= 0.1 and abs(params["translate_y"]) <= 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_augmentation_is_deterministic_same_shape_and_survives_json(seed):
    rng = np.random.default_rng(seed)
    image = brick_crop(rng) if seed % 2 else rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    before = image.copy()
    params = sample_augmentation(rng)
    out = apply_augmentation(image, params)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, apply_augmentation(image, params))
    assert np.array_equal(out, apply_augmentation(image, json_round_trip(params)))
    assert np.array_equal(image, before)
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("seed", range(5))
def test_identity_augmentation_is_exact(seed):
    image = np.random.default_rng(seed).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    assert np.array_equal(apply_augmentation(image, identity_augmentation()), image)
    assert np.array_equal(apply_augmentation(image, json_round_trip(identity_augmentation())), image)


def test_geometry_pads_by_reflection_not_black():
    rng = np.random.default_rng(0)
    image = rng.integers(100, 201, (48, 64, 3), dtype=np.uint8)
    params = {**identity_augmentation(), "rotation_deg": 15.0, "translate_x": 0.1, "translate_y": -0.1}
    out = apply_augmentation(image, params)
    assert out.min() >= 100 and out.max() <= 200
    assert not np.array_equal(out, image)


def test_translation_moves_content_and_zoom_magnifies():
    image = np.zeros((64, 64, 3), np.uint8)
    image[30:34, 30:34] = 255
    shifted = apply_augmentation(image, {**identity_augmentation(), "translate_x": 0.125})  # 8 px right
    assert np.array_equal(shifted[30:34, 38:42], image[30:34, 30:34])
    zoomed = apply_augmentation(image, {**identity_augmentation(), "zoom": 2.0})
    assert (zoomed > 127).sum() > 2 * (image > 127).sum()
    # crop_x=1 puts the window against the right edge: its centre moves (1 - 1/1.3) * 32 px right,
    # so the centred spot appears 1.3 times that to the left of the output centre
    cropped = apply_augmentation(image, {**identity_augmentation(), "zoom": 1.3, "crop_x": 1.0})
    rows, cols = np.nonzero(cropped[:, :, 0] > 127)
    assert abs(rows.mean() - 31.5) < 1.0
    assert abs(cols.mean() - (31.5 - 1.3 * (1 - 1 / 1.3) * 32)) < 1.0


def test_augmenting_a_grey_image_keeps_it_grey():
    """The noise is luminance noise (one field for the three channels): a grey source stays grey whatever
    the params, so its samples are colour-matched to grey."""
    grey = brick_crop(np.random.default_rng(3)).mean(axis=2, keepdims=True).round().astype(np.uint8).repeat(3, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = {**sample_augmentation(rng), "noise_std": 0.03}
        out = apply_augmentation(grey, params)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
        assert not np.array_equal(out, apply_augmentation(grey, {**params, "noise_std": 0.0})), "noise is there"


def test_noise_and_contrast_do_what_they_say():
    image = brick_crop(np.random.default_rng(1))
    base = identity_augmentation()
    noisy_a = apply_augmentation(image, {**base, "noise_std": 0.03, "noise_seed": 1})
    noisy_b = apply_augmentation(image, {**base, "noise_std": 0.03, "noise_seed": 2})
    assert not np.array_equal(noisy_a, noisy_b)
    assert 3 < np.abs(noisy_a.astype(int) - image).mean() < 12
    high = apply_augmentation(image, {**base, "contrast": 1.2})
    low = apply_augmentation(image, {**base, "contrast": 0.8})
    assert high.std() > image.std() > low.std()


@pytest.mark.parametrize(
    "image, params, message",
    [
        (np.zeros((8, 8, 3), np.float64), identity_augmentation(), "uint8"),
        (np.zeros((8, 8), np.uint8), identity_augmentation(), "HxWx3"),
        (np.zeros((8, 8, 3), np.uint8), {**identity_augmentation(), "flip": 1}, "unknown keys"),
        (np.zeros((8, 8, 3), np.uint8), {k: v for k, v in identity_augmentation().items() if k != "zoom"}, "missing"),
        (np.zeros((8, 8, 3), np.uint8), {**identity_augmentation(), "zoom": "1"}, "zoom"),
        (np.zeros((8, 8, 3), np.uint8), {**identity_augmentation(), "zoom": float("nan")}, "finite"),
        (np.zeros((8, 8, 3), np.uint8), {**identity_augmentation(), "noise_seed": 1.5}, "integer"),
    ],
)
def test_bad_augmentation_input_is_refused(image, params, message):
    with pytest.raises(ValueError, match=message):
        apply_augmentation(image, params)


# --- perturbation -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_perturbation_is_in_range_and_plain_json(seed):
    params = sample_perturbation(np.random.default_rng(seed))
    assert params == sample_perturbation(np.random.default_rng(seed))
    assert_plain_json(params, PERTURBATION_KEYS)
    assert -20.0 <= params["rotation_deg"] <= 20.0
    assert 0.85 <= params["scale"] <= 1.15
    assert -0.15 <= params["shear"] <= 0.15
    assert abs(params["translate_x"]) <= 0.15 and abs(params["translate_y"]) <= 0.15
    assert params["morph_radius"] in (-1, 0, 1)
    assert params["elastic_alpha"] >= 0 and params["elastic_sigma"] > 0


def test_sampled_radii_cover_all_three_values():
    radii = {sample_perturbation(np.random.default_rng(s))["morph_radius"] for s in range(40)}
    assert radii == {-1, 0, 1}


@pytest.mark.parametrize("seed", SEEDS)
def test_perturbation_never_empty_deterministic_and_survives_json(seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng)
    before = mask.copy()
    params = sample_perturbation(rng)
    out = apply_perturbation(mask, params)
    assert out.dtype == np.bool_ and out.shape == mask.shape
    assert out.any()
    assert np.array_equal(out, apply_perturbation(mask, params))
    assert np.array_equal(out, apply_perturbation(mask, json_round_trip(params)))
    assert np.array_equal(mask, before)


@pytest.mark.parametrize("seed", SEEDS)
def test_perturbation_is_small_for_a_central_blob(seed):
    """A 20x20 central blob: sampled perturbations change it but keep it recognisable."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[22:42, 22:42] = True
    params = sample_perturbation(rng)
    out = apply_perturbation(mask, params)
    assert 0.5 < out.sum() / mask.sum() < 2.0
    rows, cols = np.nonzero(out)
    assert abs(rows.mean() - 31.5 - params["translate_y"] * 64) < 4
    assert abs(cols.mean() - 31.5 - params["translate_x"] * 64) < 4


@pytest.mark.parametrize("seed", range(5))
def test_elastic_warp_depends_on_its_seed(seed):
    mask = np.zeros(SHAPE, bool)
    mask[12:52, 12:52] = True
    params = {**identity_perturbation(), "elastic_alpha": 0.05, "elastic_sigma": 0.05, "elastic_seed": seed}
    a = apply_perturbation(mask, params)
    assert not np.array_equal(a, mask)
    assert not np.array_equal(a, apply_perturbation(mask, {**params, "elastic_seed": seed + 100}))


@pytest.mark.parametrize("seed", range(8))
def test_identity_perturbation_is_exact(seed):
    mask = random_mask(np.random.default_rng(seed))
    assert np.array_equal(apply_perturbation(mask, identity_perturbation()), mask)
    assert np.array_equal(apply_perturbation(mask, json_round_trip(identity_perturbation())), mask)


def test_each_step_changes_the_mask():
    mask = np.zeros(SHAPE, bool)
    mask[20:40, 25:35] = True
    base = identity_perturbation()
    for change in (
        {"rotation_deg": 20.0},
        {"scale": 1.15},
        {"shear": 0.15},
        {"translate_x": 0.1},
        {"morph_radius": 1},
        {"morph_radius": -1},
    ):
        assert not np.array_equal(apply_perturbation(mask, {**base, **change}), mask), change
    assert apply_perturbation(mask, {**base, "morph_radius": 1}).sum() > mask.sum()
    assert apply_perturbation(mask, {**base, "morph_radius": -1}).sum() < mask.sum()


def test_translation_clips_at_the_border_without_wrapping():
    mask = np.zeros(SHAPE, bool)
    mask[20:40, 54:64] = True
    out = apply_perturbation(mask, {**identity_perturbation(), "translate_x": 0.1})
    assert out.any() and out.sum() < mask.sum()
    assert not out[:, :32].any()


def test_erosion_of_a_thin_crack_falls_back_to_no_erosion_but_keeps_translation():
    mask = np.zeros(SHAPE, bool)
    mask[32, 10:50] = True
    params = {**identity_perturbation(), "morph_radius": -1, "translate_y": 0.1, "rotation_deg": 5.0}
    out = apply_perturbation(mask, params)
    assert out.any()
    assert np.array_equal(out, apply_perturbation(mask, {**params, "morph_radius": 0}))
    assert not np.array_equal(out, apply_perturbation(mask, {**params, "morph_radius": 0, "translate_y": 0.0}))


def test_translation_out_of_the_image_falls_back_to_no_translation():
    mask = np.zeros(SHAPE, bool)
    mask[0:8, 0:8] = True
    params = {**identity_perturbation(), "translate_x": -0.5, "morph_radius": -1, "rotation_deg": 20.0, "scale": 1.15}
    out = apply_perturbation(mask, params)
    expected = apply_perturbation(mask, {**params, "translate_x": 0.0, "morph_radius": 0})
    assert out.any() and np.array_equal(out, expected)
    assert not np.array_equal(out, mask)


def test_last_resort_is_the_original_mask():
    mask = np.zeros(SHAPE, bool)
    mask[30, 30] = True
    params = {
        **identity_perturbation(),
        "translate_x": 0.9,
        "elastic_alpha": 0.3,
        "elastic_sigma": 0.1,
        "elastic_seed": 7,
        "morph_radius": -1,
    }
    # roi = the original pixel: every perturbed version misses it, the original does not
    assert not (apply_perturbation(mask, {**params, "translate_x": 0.0, "morph_radius": 0}) & mask).any()
    assert np.array_equal(apply_perturbation(mask, params, roi=mask.copy()), mask)


@pytest.mark.parametrize("seed", SEEDS)
def test_roi_is_respected(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[rng.integers(10, 30) :, rng.integers(10, 30) :][:15, :15] = True
    roi = np.zeros(SHAPE, bool)
    roi[:, : int(rng.integers(12, 64))] = True
    roi[mask.nonzero()[0][0], mask.nonzero()[1][0]] = True  # roi meets the original mask
    params = sample_perturbation(rng)
    out = apply_perturbation(mask, params, roi=roi)
    assert out.any() and not (out & ~roi).any()
    assert np.array_equal(out, apply_perturbation(mask, json_round_trip(params), roi=roi))


def test_roi_that_misses_even_the_original_is_an_error():
    mask = np.zeros(SHAPE, bool)
    mask[5:10, 5:10] = True
    roi = np.zeros(SHAPE, bool)
    roi[50:, 50:] = True
    with pytest.raises(ValueError, match="roi"):
        apply_perturbation(mask, identity_perturbation(), roi=roi)


@pytest.mark.parametrize(
    "mask, params, roi, message",
    [
        (np.zeros(SHAPE, bool), identity_perturbation(), None, "empty"),
        (np.ones(SHAPE, np.uint8), identity_perturbation(), None, "bool"),
        (np.ones((4, 4, 1), bool), identity_perturbation(), None, "2-D"),
        (np.ones(SHAPE, bool), identity_perturbation(), np.ones((8, 8), bool), "differs"),
        (np.ones(SHAPE, bool), {**identity_perturbation(), "scale": 0.0}, None, "scale"),
        (np.ones(SHAPE, bool), {**identity_perturbation(), "warp": 1.0}, None, "unknown keys"),
        (np.ones(SHAPE, bool), {**identity_perturbation(), "morph_radius": True}, None, "morph_radius"),
    ],
)
def test_bad_perturbation_input_is_refused(mask, params, roi, message):
    with pytest.raises(ValueError, match=message):
        apply_perturbation(mask, params, roi=roi)


def test_thin_crack_is_not_reduced_to_a_few_pixels():
    """Erosion would wipe a 1-px crack down to nothing; the perturbation keeps most of it instead."""
    from indusfactory.drivers.augment import MIN_KEPT_AREA, apply_perturbation, identity_perturbation

    mask = np.zeros((64, 64), dtype=bool)
    mask[32, 8:56] = True
    mask[33, 20:40] = True
    params = {**identity_perturbation(), "morph_radius": -1}
    out = apply_perturbation(mask, params)
    assert out.sum() >= MIN_KEPT_AREA * mask.sum()
    assert np.array_equal(out, mask)  # the fallback drops the erosion and nothing else changes


def test_a_thin_crack_is_not_widened_by_the_dilation():
    mask = np.zeros(SHAPE, bool)
    mask[10:50, 30] = True  # 1 px wide
    base = identity_perturbation()
    assert np.array_equal(apply_perturbation(mask, {**base, "morph_radius": 1}), mask)
    wide = np.zeros(SHAPE, bool)
    wide[10:50, 28:32] = True  # 4 px wide: dilated as before
    assert apply_perturbation(wide, {**base, "morph_radius": 1}).sum() > wide.sum()
