"""Topological drivers: the paper's recipe, its background/colour guarantees, its validation."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.data import brick
from skimage.filters import threshold_local
from skimage.transform import resize

from indusfactory.config import DriverConfig
from indusfactory.drivers.augment import apply_perturbation, sample_perturbation
from indusfactory.drivers.topology import (
    CLASS_PALETTE,
    class_colour,
    driver_to_pil,
    extract_topological_driver,
)

SEEDS = range(20)


def brick_crop(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A random RGB crop of skimage's brick texture, slightly tinted per channel."""
    gray = brick()
    r, c = rng.integers(0, gray.shape[0] - size, 2)
    crop = gray[r : r + size, c : c + size].astype(np.float64)
    tint = rng.uniform(0.7, 1.0, 3)
    return np.clip(crop[:, :, None] * tint, 0, 255).astype(np.uint8)


def random_image(rng: np.random.Generator, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def random_mask(rng: np.random.Generator, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A non-empty rectangle, or a thin line, somewhere in the image."""
    mask = np.zeros(shape, bool)
    r0, c0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
    if rng.random() < 0.5:
        mask[r0 : r0 + rng.integers(1, 20), c0 : c0 + rng.integers(1, 20)] = True
    else:
        mask[r0, c0:] = True
    return mask


def random_instances(rng: np.random.Generator, shape: tuple[int, int] = (64, 64)) -> list[tuple[int, np.ndarray]]:
    return [(int(rng.integers(0, len(CLASS_PALETTE))), random_mask(rng, shape)) for _ in range(rng.integers(1, 4))]


def reference_driver(image: np.ndarray, instances, config: DriverConfig) -> np.ndarray:
    """The recipe written out independently, as the brief states it."""
    h, w = image.shape[:2]
    factor = config.downscale or max(2, h // 64)  # None: scales with the image
    small = resize(image, (round(h / factor), round(w / factor)), anti_aliasing=True)
    gray = rgb2gray(small)
    binary = gray > threshold_local(gray, block_size=config.block_size, offset=config.offset)
    binary = resize(binary, (h, w), order=0, anti_aliasing=False) > 0.5
    driver = np.repeat((binary * config.background_max)[:, :, None], 3, axis=2).astype(np.float64)
    for class_index, mask in instances:
        driver[mask] = class_colour(class_index)
    return (driver / 255.0).astype(np.float32)


# --- palette ------------------------------------------------------------------------------------


def test_palette_is_bright_distinct_and_large_enough():
    assert len(CLASS_PALETTE) >= 8
    assert len(set(CLASS_PALETTE)) == len(CLASS_PALETTE)
    for colour in CLASS_PALETTE:
        assert len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        assert max(colour) >= 200  # far from the grey background (every channel <= 50)
    for i, colour in enumerate(CLASS_PALETTE):
        assert class_colour(i) == colour
        assert class_colour(np.int64(i)) == colour


@pytest.mark.parametrize("bad", [len(CLASS_PALETTE), -1, 1.0, "0", True, None])
def test_class_colour_refuses_unknown_classes(bad):
    with pytest.raises(ValueError, match="class index"):
        class_colour(bad)


# --- the driver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_background_is_dark_binary_and_masks_carry_their_colour(seed):
    rng = np.random.default_rng(seed)
    image = brick_crop(rng) if seed % 2 else random_image(rng)
    config = DriverConfig(background_max=int(rng.integers(0, 51)))
    instances = random_instances(rng)
    driver = extract_topological_driver(image, instances, config)

    assert driver.dtype == np.float32 and driver.shape == image.shape
    painted = np.zeros(image.shape[:2], bool)
    for _, mask in instances:
        painted |= mask
    background = driver[~painted]
    assert background.max() <= config.background_max / 255.0
    # binary grey: each background pixel is 0 or background_max/255 on all three channels
    assert np.isin(background, [np.float32(0.0), np.float32(config.background_max / 255.0)]).all()
    assert (background == background[:, :1]).all()
    # mask pixels: exactly their class colour, later instances on top
    expected = np.zeros(image.shape, np.float32)
    for class_index, mask in instances:
        expected[mask] = np.asarray(class_colour(class_index), np.float32) / np.float32(255.0)
    assert np.array_equal(driver[painted], expected[painted])


@pytest.mark.parametrize("seed", range(6))
def test_driver_follows_the_paper_recipe(seed):
    rng = np.random.default_rng(seed)
    image = brick_crop(rng)
    config = DriverConfig(
        downscale=int(rng.integers(1, 5)),
        block_size=int(rng.choice([3, 7, 15])),
        offset=float(rng.uniform(-0.02, 0.02)),
    )
    instances = random_instances(rng)
    assert np.array_equal(
        extract_topological_driver(image, instances, config), reference_driver(image, instances, config)
    )


def test_threshold_is_adaptive_on_real_texture():
    """On a brick crop both background levels appear in reasonable proportion."""
    image = np.repeat(brick()[100:228, 100:228, None], 3, axis=2)
    driver = extract_topological_driver(image, [], DriverConfig())
    bright = (driver[:, :, 0] > 0).mean()
    assert 0.1 < bright < 0.9


@pytest.mark.parametrize("seed", SEEDS)
def test_defect_free_image_with_sampled_mask_uses_the_same_path(seed):
    """Generation drivers (defect-free image + perturbed mask) = bare driver with the mask painted."""
    rng = np.random.default_rng(seed)
    image = brick_crop(rng)
    config = DriverConfig()
    mask = apply_perturbation(random_mask(rng), sample_perturbation(rng))
    class_index = int(rng.integers(0, len(CLASS_PALETTE)))
    bare = extract_topological_driver(image, [], config)
    driver = extract_topological_driver(image, [(class_index, mask)], config)
    expected = bare.copy()
    expected[mask] = np.asarray(class_colour(class_index), np.float32) / np.float32(255.0)
    assert np.array_equal(driver, expected)
    assert np.array_equal(driver[~mask], bare[~mask])


def test_driver_is_deterministic_and_leaves_input_alone():
    rng = np.random.default_rng(3)
    image = brick_crop(rng)
    before = image.copy()
    instances = random_instances(rng)
    first = extract_topological_driver(image, instances, DriverConfig())
    assert np.array_equal(first, extract_topological_driver(image, instances, DriverConfig()))
    assert np.array_equal(image, before)


@pytest.mark.parametrize("shape", [(37, 53), (5, 7), (1, 1), (100, 64)])
def test_odd_sizes_keep_their_shape(shape):
    rng = np.random.default_rng(0)
    image = random_image(rng, shape)
    mask = np.zeros(shape, bool)
    mask[0, 0] = True
    driver = extract_topological_driver(image, [(1, mask)], DriverConfig())
    assert driver.shape == (*shape, 3)
    assert tuple(np.rint(driver[0, 0] * 255)) == class_colour(1)


def test_integer_zero_one_masks_are_accepted():
    rng = np.random.default_rng(1)
    image = random_image(rng)
    mask = random_mask(rng)
    as_bool = extract_topological_driver(image, [(2, mask)], DriverConfig())
    as_uint8 = extract_topological_driver(image, [(2, mask.astype(np.uint8))], DriverConfig())
    assert np.array_equal(as_bool, as_uint8)


@pytest.mark.parametrize(
    "image, instances, message",
    [
        (np.zeros((8, 8, 3), np.float32), [], "dtype uint8"),
        (np.zeros((8, 8), np.uint8), [], "HxWx3"),
        (np.zeros((8, 8, 4), np.uint8), [], "HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), [], "empty"),
        ([[0, 0, 0]], [], "numpy array"),
        (np.zeros((8, 8, 3), np.uint8), [(0, np.zeros((8, 9), bool))], "differs from the image"),
        (np.zeros((8, 8, 3), np.uint8), [(0, np.zeros((8, 8, 1), bool))], "2-D"),
        (np.zeros((8, 8, 3), np.uint8), [(0, np.full((8, 8), 0.5))], "boolean"),
        (np.zeros((8, 8, 3), np.uint8), [(0, np.full((8, 8), 2, np.uint8))], "boolean"),
        (np.zeros((8, 8, 3), np.uint8), [(99, np.zeros((8, 8), bool))], "class index 99"),
        (np.zeros((8, 8, 3), np.uint8), [np.zeros((8, 8), bool)], "pair"),
    ],
)
def test_bad_input_is_refused_with_the_reason(image, instances, message):
    with pytest.raises(ValueError, match=message):
        extract_topological_driver(image, instances, DriverConfig())


def test_driver_to_pil_round_trips():
    rng = np.random.default_rng(4)
    image = brick_crop(rng)
    instances = random_instances(rng)
    driver = extract_topological_driver(image, instances, DriverConfig())
    pil = driver_to_pil(driver)
    assert pil.mode == "RGB" and pil.size == (image.shape[1], image.shape[0])
    back = np.asarray(pil)
    assert back.dtype == np.uint8
    assert np.array_equal(back.astype(np.float32) / np.float32(255.0), driver)
    with pytest.raises(ValueError):
        driver_to_pil(driver * 2)
    with pytest.raises(ValueError):
        driver_to_pil(driver[:, :, 0])
