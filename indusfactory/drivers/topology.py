"""Topological drivers: the conditioning images of the paper (Valvano et al., WACV 2024).

A driver is the image's texture reduced to a dark binary pattern (downscale, grayscale, adaptive
threshold, resize back, scaled to ``0..background_max``) with every defect mask painted on top in
its class colour, returned as float32 RGB in ``0..1``. One function builds the drivers of both
stages: training drivers (defective image + its annotated masks) and generation drivers
(defect-free image + sampled masks), so the two are indistinguishable by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import threshold_local
from skimage.transform import resize

from indusfactory.config import DriverConfig
from indusfactory.infra.errors import BadInputError

CLASS_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # 0 red
    (0, 255, 0),  # 1 green
    (0, 0, 255),  # 2 blue
    (255, 255, 0),  # 3 yellow
    (255, 0, 255),  # 4 magenta
    (0, 255, 255),  # 5 cyan
    (255, 128, 0),  # 6 orange
    (128, 0, 255),  # 7 violet
    (0, 255, 128),  # 8 spring green
    (255, 0, 128),  # 9 rose
    (0, 128, 255),  # 10 azure
    (255, 255, 255),  # 11 white
)
"""RGB colour of each defect class index (0-based, in the order of the catalog's categories).

Every colour has at least one channel at 255 (>= 200), so it is at least 200 away, on some
channel, from the driver background (grey, every channel in ``0..DriverConfig.background_max``
and ``background_max <= 50`` by default). All colours are distinct. Class index ``i`` is painted
in ``CLASS_PALETTE[i]``; indices past the palette are refused, not cycled, so that two classes
never share a colour.
"""


def class_colour(class_index: int) -> tuple[int, int, int]:
    """The RGB colour (0..255) of a class index; ValueError outside ``0..len(CLASS_PALETTE)-1``."""
    if isinstance(class_index, (bool, np.bool_)) or not isinstance(class_index, (int, np.integer)):
        raise BadInputError(f"class index must be an int, got {type(class_index).__name__}")
    if not 0 <= int(class_index) < len(CLASS_PALETTE):
        raise BadInputError(
            f"class index {class_index} has no colour: the palette covers classes 0..{len(CLASS_PALETTE) - 1}"
        )
    return CLASS_PALETTE[int(class_index)]


def _check_image(image: np.ndarray) -> None:
    """Raise BadInputError unless ``image`` is a non-empty uint8 HxWx3 array."""
    if not isinstance(image, np.ndarray):
        raise BadInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadInputError(f"image must have shape HxWx3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise BadInputError(f"image must have dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f"image is empty, shape {image.shape}")


def _check_mask(mask: np.ndarray, shape: tuple[int, int], where: str) -> np.ndarray:
    """Return ``mask`` as bool HxW; raise BadInputError if it is not a 0/1 array of ``shape``."""
    if not isinstance(mask, np.ndarray):
        raise BadInputError(f"{where}: mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise BadInputError(f"{where}: mask must be 2-D (HxW), got shape {mask.shape}")
    if mask.shape != shape:
        raise BadInputError(f"{where}: mask shape {mask.shape} differs from the image's {shape}")
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all():
        return mask.astype(bool)
    raise BadInputError(f"{where}: mask must be boolean (or integer 0/1), got dtype {mask.dtype}")


def threshold_background(image: np.ndarray, config: DriverConfig) -> np.ndarray:
    """The driver background of ``image``: a uint8 HxW map with values in {0, background_max}.

    Grayscale, downscale by ``config.downscale_for(height)`` (anti-aliased), ``threshold_local`` with
    ``config.block_size`` and ``config.offset``, resize back to HxW (nearest), times
    ``background_max``.
    """
    _check_image(image)
    height, width = image.shape[:2]
    factor = config.downscale_for(height)
    small_shape = (max(1, round(height / factor)), max(1, round(width / factor)))
    # Grayscale first: both steps are linear, so the order does not change the result, and the
    # anti-aliased resize then runs on one channel instead of three.
    gray = rgb2gray(image)  # float64 in 0..1
    if factor > 1:
        gray = resize(gray, small_shape, order=1, anti_aliasing=True)
    binary = gray > threshold_local(gray, block_size=config.block_size, offset=config.offset)
    if binary.shape != (height, width):
        binary = resize(binary, (height, width), order=0, anti_aliasing=False) > 0.5
    return binary.astype(np.uint8) * np.uint8(config.background_max)


def extract_topological_driver(
    image: np.ndarray, instances: Sequence[tuple[int, np.ndarray]], config: DriverConfig
) -> np.ndarray:
    """The paper's topological driver of ``image`` with ``instances`` painted on it.

    ``image`` is uint8 HxWx3 RGB; ``instances`` are ``(class_index, mask)`` pairs, masks bool HxW
    (integer 0/1 accepted), painted in order (later on top) in ``class_colour(class_index)``.
    Returns float32 HxWx3 in 0..1 (value / 255): background pixels are 0 or
    ``background_max / 255`` on every channel, mask pixels exactly their class colour / 255.
    """
    _check_image(image)
    shape = image.shape[:2]
    checked = []
    for number, instance in enumerate(instances):
        try:
            class_index, mask = instance
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"instance {number} must be a (class_index, mask) pair") from exc
        colour = class_colour(class_index)
        checked.append((colour, _check_mask(mask, shape, f"instance {number} (class {class_index})")))
    background = threshold_background(image, config)
    driver = np.repeat(background[:, :, None], 3, axis=2)
    for colour, mask in checked:
        driver[mask] = colour
    return driver.astype(np.float32) / np.float32(255.0)


def driver_to_pil(driver: np.ndarray) -> Image.Image:
    """A float driver (HxWx3 in 0..1) as a uint8 RGB PIL image (values rounded to 0..255)."""
    if not isinstance(driver, np.ndarray) or driver.ndim != 3 or driver.shape[2] != 3:
        raise BadInputError(f"driver must be an HxWx3 numpy array, got {getattr(driver, 'shape', type(driver))}")
    if driver.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(driver))
    if not np.issubdtype(driver.dtype, np.floating):
        raise BadInputError(f"driver must be float in 0..1 or uint8, got dtype {driver.dtype}")
    if not np.isfinite(driver).all() or driver.min() < 0.0 or driver.max() > 1.0:
        raise BadInputError("driver values must be finite and within 0..1")
    return Image.fromarray(np.rint(driver.astype(np.float64) * 255.0).astype(np.uint8))
