"""Offline augmentations of defect-free images and shape perturbations of defect masks.

Both come as a pair of functions: ``sample_*`` draws a small JSON-serialisable dict of plain
floats and ints from a ``numpy.random.Generator``, ``apply_*`` rebuilds the result exactly from
that dict. A generation plan stores the dicts, so the plan alone decides every driver.

Geometry follows skimage: points are ``(x, y) = (column, row)``; matrices are 3x3 homogeneous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from skimage.morphology import dilation, disk, erosion
from skimage.transform import AffineTransform, warp

from indusfactory.infra.errors import BadInputError

AUGMENTATION_KEYS: dict[str, type] = {
    "zoom": float,  # crop/zoom factor, >= 1 (1 = whole image)
    "crop_x": float,  # crop centre offset, -1..1 of the free margin (1 - 1/zoom) * W/2
    "crop_y": float,  # same along the rows
    "rotation_deg": float,  # rotation about the image centre, degrees
    "translate_x": float,  # shift of the content, fraction of the width (positive: right)
    "translate_y": float,  # shift of the content, fraction of the height (positive: down)
    "noise_std": float,  # gaussian noise std, in 0..1 intensity units
    "contrast": float,  # contrast factor about the image mean (1 = unchanged)
    "noise_seed": int,  # seed of the noise
}
"""Keys of an augmentation params dict and their types (see ``sample_augmentation``)."""

PERTURBATION_KEYS: dict[str, type] = {
    "rotation_deg": float,  # rotation about the mask's bounding-box centre, degrees
    "scale": float,  # isotropic scale about the same centre
    "shear": float,  # shear coefficient (x += shear * y)
    "translate_x": float,  # shift, fraction of the image width
    "translate_y": float,  # shift, fraction of the image height
    "elastic_alpha": float,  # largest elastic displacement, fraction of the shorter image side
    "elastic_sigma": float,  # smoothing of the displacement field, fraction of the shorter side
    "elastic_seed": int,  # seed of the displacement field
    "morph_radius": int,  # > 0: dilation by disk(r); < 0: erosion by disk(-r); 0: none
}
"""Keys of a perturbation params dict and their types (see ``sample_perturbation``)."""


def _read_params(params: Mapping, spec: dict[str, type], what: str) -> dict:
    """Check ``params`` has exactly ``spec``'s keys with finite numbers; return them typed."""
    if not isinstance(params, Mapping):
        raise BadInputError(f"{what} params must be a mapping, got {type(params).__name__}")
    missing = sorted(set(spec) - set(params))
    unknown = sorted(set(params) - set(spec))
    if missing or unknown:
        raise BadInputError(f"{what} params: missing keys {missing}, unknown keys {unknown}")
    typed = {}
    for key, kind in spec.items():
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise BadInputError(f"{what} params: {key} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise BadInputError(f"{what} params: {key} must be finite, got {value!r}")
        if kind is int and float(value) != int(value):
            raise BadInputError(f"{what} params: {key} must be an integer, got {value!r}")
        typed[key] = kind(value)
    return typed


def _check_image(image: np.ndarray) -> None:
    """Raise BadInputError unless ``image`` is a non-empty uint8 HxWx3 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise BadInputError(f"image must be an HxWx3 numpy array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise BadInputError(f"image must have dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadInputError(f"image is empty, shape {image.shape}")


def _check_bool_2d(array: np.ndarray, name: str, shape: tuple[int, int] | None = None) -> None:
    """Raise BadInputError unless ``array`` is a bool 2-D array (of ``shape`` if given)."""
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype != np.bool_:
        raise BadInputError(
            f"{name} must be a 2-D bool array, got {getattr(array, 'dtype', type(array).__name__)} "
            f"of shape {getattr(array, 'shape', None)}"
        )
    if shape is not None and array.shape != shape:
        raise BadInputError(f"{name} shape {array.shape} differs from the mask's {shape}")


def _translation(tx: float, ty: float) -> np.ndarray:
    """3x3 homogeneous translation."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _rotation(degrees: float) -> np.ndarray:
    """3x3 homogeneous rotation by ``degrees``."""
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


# --- offline augmentation of defect-free images ------------------------------------------------


AUGMENTATION_VERSION = "2"
"""Part of the plan fingerprint: bumped when the same params give other pixels (2: the noise is shared by the
channels; 1 drew it per channel, which put colour noise into grey sources and so into their samples)."""


def sample_augmentation(rng: np.random.Generator) -> dict:
    """Draw augmentation params: crop/zoom 1.0-1.3 with centre offset, rotation -15..15 deg,
    translation up to 10% of a side, gaussian noise std 0-0.03, contrast 0.8-1.2, noise seed."""
    return {
        "zoom": float(rng.uniform(1.0, 1.3)),
        "crop_x": float(rng.uniform(-1.0, 1.0)),
        "crop_y": float(rng.uniform(-1.0, 1.0)),
        "rotation_deg": float(rng.uniform(-15.0, 15.0)),
        "translate_x": float(rng.uniform(-0.1, 0.1)),
        "translate_y": float(rng.uniform(-0.1, 0.1)),
        "noise_std": float(rng.uniform(0.0, 0.03)),
        "contrast": float(rng.uniform(0.8, 1.2)),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def identity_augmentation() -> dict:
    """Augmentation params that return the image unchanged (exactly)."""
    return {
        "zoom": 1.0,
        "crop_x": 0.0,
        "crop_y": 0.0,
        "rotation_deg": 0.0,
        "translate_x": 0.0,
        "translate_y": 0.0,
        "noise_std": 0.0,
        "contrast": 1.0,
        "noise_seed": 0,
    }


def augmentation_matrix(params: Mapping, shape: tuple[int, int]) -> np.ndarray:
    """The 3x3 map from output (x, y) to input (x, y) of the geometric part of ``params``."""
    p = _read_params(params, AUGMENTATION_KEYS, "augmentation")
    if p["zoom"] <= 0:
        raise BadInputError(f"augmentation params: zoom must be > 0, got {p['zoom']}")
    height, width = shape
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    margin = max(0.0, 1.0 - 1.0 / p["zoom"])
    shift_x = p["crop_x"] * margin * width / 2.0 - p["translate_x"] * width
    shift_y = p["crop_y"] * margin * height / 2.0 - p["translate_y"] * height
    zoom = np.diag([1.0 / p["zoom"], 1.0 / p["zoom"], 1.0])
    return _translation(cx + shift_x, cy + shift_y) @ _rotation(p["rotation_deg"]) @ zoom @ _translation(-cx, -cy)


def apply_augmentation(image: np.ndarray, params: Mapping) -> np.ndarray:
    """Apply augmentation ``params`` to a uint8 HxWx3 image; uint8 of the same shape.

    Geometry (zoom into the crop, rotation about the centre, translation) is one bilinear warp
    with reflect padding (no black borders); then contrast about the image mean; then gaussian
    noise drawn from ``noise_seed``, one field for the three channels (luminance noise: it never adds colour,
    so a grey source stays grey). Deterministic given ``params``.
    """
    _check_image(image)
    p = _read_params(params, AUGMENTATION_KEYS, "augmentation")
    if p["noise_std"] < 0 or p["contrast"] < 0:
        raise BadInputError("augmentation params: noise_std and contrast must be >= 0")
    matrix = augmentation_matrix(p, image.shape[:2])
    out = image.astype(np.float64)
    if not np.allclose(matrix, np.eye(3), rtol=0.0, atol=1e-12):
        out = warp(out, AffineTransform(matrix=matrix), order=1, mode="reflect", preserve_range=True)
    if p["contrast"] != 1.0:
        mean = out.mean()
        out = mean + p["contrast"] * (out - mean)
    if p["noise_std"] > 0:
        noise = np.random.default_rng(p["noise_seed"]).normal(0.0, p["noise_std"] * 255.0, out.shape[:2])
        out = out + noise[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- shape perturbation of defect masks ---------------------------------------------------------


def sample_perturbation(rng: np.random.Generator) -> dict:
    """Draw perturbation params: rotation -20..20 deg, scale 0.85-1.15, shear -0.15..0.15,
    translation up to 15% of a side, a small elastic warp (seeded), morphology radius -1/0/1."""
    return {
        "rotation_deg": float(rng.uniform(-20.0, 20.0)),
        "scale": float(rng.uniform(0.85, 1.15)),
        "shear": float(rng.uniform(-0.15, 0.15)),
        "translate_x": float(rng.uniform(-0.15, 0.15)),
        "translate_y": float(rng.uniform(-0.15, 0.15)),
        "elastic_alpha": float(rng.uniform(0.0, 0.02)),
        "elastic_sigma": float(rng.uniform(0.03, 0.08)),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "morph_radius": int(rng.integers(-1, 2)),
    }


def identity_perturbation() -> dict:
    """Perturbation params that return the mask unchanged (exactly)."""
    return {
        "rotation_deg": 0.0,
        "scale": 1.0,
        "shear": 0.0,
        "translate_x": 0.0,
        "translate_y": 0.0,
        "elastic_alpha": 0.0,
        "elastic_sigma": 0.0,
        "elastic_seed": 0,
        "morph_radius": 0,
    }


def _perturb(mask: np.ndarray, p: dict) -> np.ndarray:
    """Affine warp about the mask's bbox centre, elastic warp, then morphology (nearest, no wrap)."""
    height, width = mask.shape
    out = mask
    rows, cols = np.nonzero(mask)
    cx, cy = (cols.min() + cols.max()) / 2.0, (rows.min() + rows.max()) / 2.0
    linear = _rotation(p["rotation_deg"]) @ np.array(
        [[p["scale"], p["shear"] * p["scale"], 0.0], [0.0, p["scale"], 0.0], [0.0, 0.0, 1.0]]
    )
    forward = (
        _translation(cx + p["translate_x"] * width, cy + p["translate_y"] * height) @ linear @ _translation(-cx, -cy)
    )
    if not np.allclose(forward, np.eye(3), rtol=0.0, atol=1e-12):
        inverse = AffineTransform(matrix=np.linalg.inv(forward))
        out = warp(out.astype(np.float64), inverse, order=0, mode="constant", cval=0.0, preserve_range=True) > 0.5
    if p["elastic_alpha"] > 0:
        side = min(height, width)
        field = np.random.default_rng(p["elastic_seed"]).uniform(-1.0, 1.0, (2, height, width))
        field = np.stack([gaussian_filter(f, p["elastic_sigma"] * side, mode="reflect") for f in field])
        peak = np.abs(field).max()
        if peak > 0:
            field *= p["elastic_alpha"] * side / peak
        grid_r, grid_c = np.mgrid[0:height, 0:width].astype(np.float64)
        coords = np.stack([grid_r + field[0], grid_c + field[1]])
        out = map_coordinates(out.astype(np.uint8), coords, order=0, mode="constant", cval=0) > 0
    if p["morph_radius"] > 0 and mean_width(out) >= MIN_WIDTH_TO_DILATE:
        out = dilation(out, disk(p["morph_radius"]))
    elif p["morph_radius"] < 0:
        out = erosion(out, disk(-p["morph_radius"]))
    return np.array(out, dtype=bool, copy=True)


MIN_WIDTH_TO_DILATE = 3.0
"""Masks thinner than this (mean width in pixels) are not dilated: a 1-2 px crack dilated by one pixel
is two to three times as wide as any real one, and the label of a generated sample would be too."""


def mean_width(mask: np.ndarray) -> float:
    """Mean width of a mask in pixels: its area over the length of its skeleton."""
    from skimage.morphology import skeletonize

    length = int(skeletonize(mask).sum())
    return float(mask.sum()) / max(length, 1)


MIN_KEPT_AREA = 0.4
"""A perturbed mask must keep at least this share of the original area, else a milder attempt is used."""


def apply_perturbation(mask: np.ndarray, params: Mapping, roi: np.ndarray | None = None) -> np.ndarray:
    """Perturb a bool HxW mask by ``params``; bool HxW, inside the image, never empty.

    If the result is empty or keeps less than ``MIN_KEPT_AREA`` of the mask's area (erosion of a
    thin crack, a translation off the image, or, with ``roi``, outside the roi), it falls back
    step by step: without the erosion, then also without the translation, then the original
    mask. With ``roi`` (bool HxW) the result is always intersected with it; ValueError if even the
    original mask misses the roi, or if the mask is empty. Deterministic given ``params``.
    """
    _check_bool_2d(mask, "mask")
    if roi is not None:
        _check_bool_2d(roi, "roi", mask.shape)
    if not mask.any():
        raise BadInputError("mask is empty: there is nothing to perturb")
    p = _read_params(params, PERTURBATION_KEYS, "perturbation")
    if p["scale"] <= 0 or p["elastic_sigma"] < 0 or p["elastic_alpha"] < 0:
        raise BadInputError("perturbation params: scale must be > 0, elastic_alpha and elastic_sigma >= 0")
    no_erosion = {**p, "morph_radius": max(0, p["morph_radius"])}
    no_translation = {**no_erosion, "translate_x": 0.0, "translate_y": 0.0}
    attempts = [p]
    for candidate in (no_erosion, no_translation):
        if candidate != attempts[-1]:
            attempts.append(candidate)
    for attempt in attempts:
        out = _perturb(mask, attempt)
        if roi is not None:
            out &= roi
        if out.any() and out.sum() >= MIN_KEPT_AREA * mask.sum():
            return out
    out = mask & roi if roi is not None else mask.copy()
    if not out.any():
        raise BadInputError("mask does not intersect the roi, even unperturbed")
    return out
