"""A small industrial-style sample dataset made offline from the photographs scikit-image ships.

Surfaces are random crops of ``skimage.data`` brick, gravel, grass and moon, tinted to look like
industrial materials. Defective images get one or two procedural cracks (``indusfactory.drivers.cracks``)
painted dark; each crack's painted mask is its COCO instance (compressed RLE). Defect-free
images are crops of the same surfaces without cracks. Same arguments give byte-identical files.

Layout under ``path``::

    defective/images/defect_0000.png ...
    defective/annotations.json          COCO instances, categories hairline (1) and branched (2)
    defect_free/clean_0000.png ...
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata
from skimage.morphology import dilation
from skimage.transform import resize

from indusfactory.drivers.cracks import random_crack_mask
from indusfactory.infra.errors import BadInputError

SURFACES: tuple[str, ...] = ("brick", "gravel", "grass", "moon")
"""The ``skimage.data`` photographs used as surfaces, cycled through in this order."""

SURFACE_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.0, 0.86, 0.74),  # rusty steel / fired clay
    "gravel": (0.92, 0.93, 0.96),  # cast concrete
    "grass": (0.96, 0.93, 0.82),  # sand-blasted stone
    "moon": (0.84, 0.9, 1.0),  # brushed metal
}

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "hairline", "supercategory": "crack"},
    {"id": 2, "name": "branched", "supercategory": "crack"},
]

SOURCE_SIDE = 512
"""Side of every ``skimage.data`` surface photograph; the largest crop possible."""

RIM_FOOTPRINT = np.ones((3, 3), dtype=bool)
"""Neighbourhood of the soft 1-px rim painted around each crack."""

DEMO_SIZE = 64
"""Side of the sample images the embedded demo makes (the tiny model's resolution)."""

DEFECT_PATTERN = re.compile(r"defect_\d{4,}\.png")
CLEAN_PATTERN = re.compile(r"clean_\d{4,}\.png")


@dataclass(frozen=True)
class SampleDataPaths:
    """Where ``write_sample_data`` put things."""

    root: Path
    coco_annotations: Path
    images_dir: Path
    defect_free_dir: Path


@dataclass(frozen=True)
class _Crack:
    """One painted crack: its mask and category id."""

    mask: np.ndarray
    category_id: int


def _validate(n_defective: int, n_defect_free: int, size: int) -> None:
    """Raise a ``ValueError`` naming the first bad argument."""
    if not isinstance(size, int) or size < 32 or size % 8 or size > SOURCE_SIDE:
        raise BadInputError(f"size must be an int divisible by 8 in [32, {SOURCE_SIDE}], got {size!r}")
    for name, value in (("n_defective", n_defective), ("n_defect_free", n_defect_free)):
        if not isinstance(value, int) or value < 1:
            raise BadInputError(f"{name} must be an int >= 1, got {value!r}")


@lru_cache(maxsize=None)
def _surface(name: str) -> np.ndarray:
    """A surface photograph as float grey levels, contrast-stretched to [0.2, 0.9]."""
    grey = getattr(skdata, name)().astype(np.float64) / 255.0
    low, high = np.percentile(grey, [1, 99])
    return 0.2 + 0.7 * np.clip((grey - low) / (high - low), 0.0, 1.0)


def _crop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a surface (side ``size``..``2*size``), resized and tinted to RGB."""
    source = _surface(name)
    side = int(rng.integers(size, min(2 * size, SOURCE_SIDE) + 1))
    top, left = (int(rng.integers(0, SOURCE_SIDE - side + 1)) for _ in range(2))
    patch = source[top : top + side, left : left + side]
    if side != size:
        patch = resize(patch, (size, size), order=1, anti_aliasing=True, mode="reflect")
    return patch[..., None] * np.asarray(SURFACE_TINTS[name])


def _cracks(size: int, index: int, rng: np.random.Generator) -> list[_Crack]:
    """One or two cracks; the first alternates hairline/branched so both classes always occur."""
    cracks = []
    for k in range(int(rng.integers(1, 3))):
        category_id = 1 + index % 2 if k == 0 else int(rng.integers(1, 3))
        style = CATEGORIES[category_id - 1]["name"]
        cracks.append(_Crack(random_crack_mask((size, size), style, rng), category_id))
    return cracks


def _darkening(cracks: list[_Crack], rng: np.random.Generator) -> np.ndarray:
    """Per-pixel multiplier: ~0.15-0.35 on crack pixels, halfway on a 1-px rim, 1 elsewhere."""
    factor = np.ones(cracks[0].mask.shape)
    for crack in cracks:
        depth = rng.uniform(0.15, 0.35)
        inside = np.clip(depth + rng.normal(0.0, 0.03, crack.mask.shape), 0.1, 0.4)
        rim = dilation(crack.mask, RIM_FOOTPRINT) & ~crack.mask
        factor = np.minimum(factor, np.where(crack.mask, inside, 1.0))
        factor = np.minimum(factor, np.where(rim, (1.0 + depth) / 2.0, 1.0))
    return factor


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] to uint8."""
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of a boolean mask, as pycocotools returns it (``counts`` in bytes)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _annotation(ann_id: int, image_id: int, crack: _Crack) -> dict[str, Any]:
    """One COCO instance annotation for a painted crack."""
    rle = _rle(crack.mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": crack.category_id,
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def _remove_stale(folder: Path, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Delete files this module owns (by name pattern) left over from an earlier, larger run."""
    for path in folder.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _write_defective(images_dir: Path, n: int, size: int, rng: np.random.Generator) -> dict[str, Any]:
    """Write the defective images; return their COCO instances document."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(n):
        surface = _crop(SURFACES[index % len(SURFACES)], size, rng)
        cracks = _cracks(size, index, rng)
        file_name = f"defect_{index:04d}.png"
        Image.fromarray(_to_uint8(surface * _darkening(cracks, rng)[..., None])).save(images_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
        for crack in cracks:
            annotations.append(_annotation(len(annotations) + 1, index + 1, crack))
    _remove_stale(images_dir, DEFECT_PATTERN, {image["file_name"] for image in images})
    info = {"description": "indusfactory sample data: cracks on skimage.data surfaces", "version": "1.0"}
    return {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}


def _write_defect_free(folder: Path, n: int, size: int, rng: np.random.Generator) -> None:
    """Write the defect-free crops."""
    names = set()
    for index in range(n):
        name = f"clean_{index:04d}.png"
        Image.fromarray(_to_uint8(_crop(SURFACES[index % len(SURFACES)], size, rng))).save(folder / name)
        names.add(name)
    _remove_stale(folder, CLEAN_PATTERN, names)


def write_sample_data(
    path: str | os.PathLike[str],
    n_defective: int = 24,
    n_defect_free: int = 12,
    size: int = 128,
    seed: int = 0,
) -> SampleDataPaths:
    """Write the sample dataset under ``path`` (overwriting the files it owns) and return where."""
    _validate(n_defective, n_defect_free, size)
    root = Path(path)
    paths = SampleDataPaths(
        root=root,
        coco_annotations=root / "defective" / "annotations.json",
        images_dir=root / "defective" / "images",
        defect_free_dir=root / "defect_free",
    )
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    paths.defect_free_dir.mkdir(parents=True, exist_ok=True)
    defective_rng, clean_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    coco = _write_defective(paths.images_dir, n_defective, size, defective_rng)
    _write_defect_free(paths.defect_free_dir, n_defect_free, size, clean_rng)
    paths.coco_annotations.write_text(json.dumps(coco, indent=1) + "\n")
    return paths


def sample_data_root_of(coco_annotations: str, images_dir: str, defect_free_dir: str) -> Path | None:
    """The root R if the three sources are laid out as ``write_sample_data(R)`` writes them, else None."""
    root = Path(defect_free_dir).expanduser().resolve().parent
    expected = (root / "defective" / "annotations.json", root / "defective" / "images", root / "defect_free")
    given = tuple(Path(p).expanduser().resolve() for p in (coco_annotations, images_dir, defect_free_dir))
    return root if given == expected and "://" not in coco_annotations else None


def ensure_sample_data(coco_annotations: str, images_dir: str, defect_free_dir: str) -> Path | None:
    """Write the sample dataset where the sources point if they are missing and laid out as sample data."""
    root = sample_data_root_of(coco_annotations, images_dir, defect_free_dir)
    if root is None or Path(coco_annotations).expanduser().exists():
        return None
    write_sample_data(root, size=DEMO_SIZE)
    return root
