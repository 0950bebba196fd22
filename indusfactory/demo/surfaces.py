"""Datasets the factory was not built around: procedural surfaces with dark defects, for measuring learning.

Nothing here comes from the photographs the tiny base model was pretrained on. Surfaces are
procedural (fractal noise, brushed metal, cellular grain, woven tiles), each dataset grey or
tinted in one colour; defects are dark polylines of three classes that differ in width and shape
(``hairline`` 1-2 px, ``crack`` 3-4 px with a branch, ``scratch`` a straight 2-3 px line, at the
256 px source size). Every defective image is COCO-annotated (compressed RLE) with a given split
(``split`` field: train / val / test), so the test masks and the test defect-free images are never
seen in training. Same arguments give byte-identical files.

Layout under ``path``::

    defective/images/*.png, defective/annotations.json (COCO, image field "split")
    defect_free/*.png                 defect-free images for training-time drivers (train)
    heldout_defect_free/*.png         defect-free images no stage ever reads (the benchmark's test drivers)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import gaussian_filter, map_coordinates
from skimage.draw import line
from skimage.morphology import dilation, disk

SURFACE_KINDS = ("fbm", "brushed", "cells", "weave")
DEFECT_CLASSES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "hairline"},
    {"id": 2, "name": "crack"},
    {"id": 3, "name": "scratch"},
)
TINTS = {"grey": (1.0, 1.0, 1.0), "teal": (0.55, 0.85, 0.8), "amber": (1.0, 0.75, 0.45)}


@dataclass(frozen=True)
class SurfaceDataset:
    root: Path
    coco_annotations: Path
    images_dir: Path
    defect_free_dir: Path
    heldout_defect_free_dir: Path


def _normalise(a: np.ndarray) -> np.ndarray:
    low, high = np.percentile(a, [1, 99])
    return np.clip((a - low) / max(high - low, 1e-9), 0, 1)


def surface(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural grey surface in 0..1 (float HxW)."""
    if kind == "fbm":
        out = sum(gaussian_filter(rng.normal(size=(size, size)), s, mode="wrap") * s**0.9 for s in (1, 2, 4, 8, 16))
    elif kind == "brushed":
        noise = gaussian_filter(rng.normal(size=(size, size)), (0.6, 14.0), mode="wrap")
        angle = rng.uniform(0, np.pi)
        rows, cols = np.mgrid[0:size, 0:size] - size / 2
        c, s = np.cos(angle), np.sin(angle)
        coords = np.stack([rows * c - cols * s, rows * s + cols * c]) + size / 2
        out = (
            map_coordinates(noise, coords, order=1, mode="wrap")
            + 0.3 * gaussian_filter(rng.normal(size=(size, size)), 20, mode="wrap") * 20
        )
    elif kind == "cells":
        points = rng.uniform(0, size, size=(int(rng.integers(20, 60)), 2))
        rows, cols = np.mgrid[0:size, 0:size]
        dist = np.min([np.hypot(rows - p[0], cols - p[1]) for p in points], axis=0)
        out = np.sqrt(dist) + 0.15 * gaussian_filter(rng.normal(size=(size, size)), 1.5) * 6
    elif kind == "weave":
        period = rng.uniform(10, 24)
        rows, cols = np.mgrid[0:size, 0:size]
        out = (
            np.sin(2 * np.pi * rows / period) * np.sin(2 * np.pi * cols / period)
            + 0.4 * gaussian_filter(rng.normal(size=(size, size)), 2) * 4
        )
    else:
        raise ValueError(f"unknown surface kind {kind!r}; known: {SURFACE_KINDS}")
    return 0.35 + 0.5 * _normalise(out)


def _polyline_mask(size: int, rng: np.random.Generator, straight: bool, width: int, branch: bool) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    point = rng.uniform(0.15 * size, 0.85 * size, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.35, 0.7) * size
    step = size / 24
    points = [point.copy()]
    for _ in range(int(length / step)):
        if not straight:
            heading += rng.normal(0, 0.35)
        point = point + step * np.array([np.sin(heading), np.cos(heading)])
        points.append(point.copy())
    if branch and len(points) > 4:
        start = points[len(points) // 2].copy()
        h = heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
        tail = [start]
        for _ in range(len(points) // 2):
            h += rng.normal(0, 0.35)
            tail.append(tail[-1] + step * np.array([np.sin(h), np.cos(h)]))
        segments = [points, tail]
    else:
        segments = [points]
    for seg in segments:
        for a, b in zip(seg, seg[1:]):
            rr, cc = line(int(round(a[0])), int(round(a[1])), int(round(b[0])), int(round(b[1])))
            keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            mask[rr[keep], cc[keep]] = True
    if width > 1:
        mask = dilation(mask, disk(width // 2)) if width % 2 else dilation(mask, np.ones((width, width), bool))
    return mask


def defect_mask(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect of one class at ``size`` px (widths given at 256 px, scaled with the size)."""
    scale = size / 256
    if category == "hairline":
        return _polyline_mask(size, rng, False, max(1, round(rng.integers(1, 3) * scale)), False)
    if category == "crack":
        return _polyline_mask(size, rng, False, max(1, round(rng.integers(3, 5) * scale)), True)
    if category == "scratch":
        return _polyline_mask(size, rng, True, max(1, round(rng.integers(2, 4) * scale)), False)
    raise ValueError(f"unknown defect class {category!r}")


def _rgb(grey: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    return np.round(np.clip(grey[..., None] * np.asarray(tint), 0, 1) * 255).astype(np.uint8)


def write_surface_dataset(
    path: str | Path,
    n_defective: int = 60,
    n_defect_free: int = 30,
    n_heldout: int = 16,
    size: int = 256,
    tint: str = "grey",
    kinds: tuple[str, ...] = SURFACE_KINDS,
    split_fractions: tuple[float, float] = (0.6, 0.15),
    seed: int = 0,
) -> SurfaceDataset:
    """Write a dataset of ``tint`` surfaces with 1-2 dark defects per defective image (see module doc)."""
    root = Path(path)
    data = SurfaceDataset(
        root,
        root / "defective" / "annotations.json",
        root / "defective" / "images",
        root / "defect_free",
        root / "heldout_defect_free",
    )
    for folder in (data.images_dir, data.defect_free_dir, data.heldout_defect_free_dir):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = TINTS[tint]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    n_train = round(split_fractions[0] * n_defective)
    n_val = round(split_fractions[1] * n_defective)
    for index in range(n_defective):
        grey = surface(kinds[index % len(kinds)], size, rng)
        factor = np.ones_like(grey)
        for k in range(int(rng.integers(1, 3))):
            category = DEFECT_CLASSES[(index + k) % len(DEFECT_CLASSES)]
            mask = defect_mask(category["name"], size, rng)
            if not mask.any():
                continue
            depth = rng.uniform(0.25, 0.5)
            factor = np.minimum(factor, np.where(mask, depth + rng.normal(0, 0.04, mask.shape), 1.0))
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category["id"],
                    "iscrowd": 0,
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                }
            )
        name = f"defect_{index:04d}.png"
        Image.fromarray(_rgb(grey * factor, colour)).save(data.images_dir / name)
        split = "train" if index < n_train else "val" if index < n_train + n_val else "test"
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size, "split": split})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="defect") for c in DEFECT_CLASSES],
    }
    data.coco_annotations.write_text(json.dumps(coco) + "\n")
    for folder, count, prefix in (
        (data.defect_free_dir, n_defect_free, "clean"),
        (data.heldout_defect_free_dir, n_heldout, "heldout"),
    ):
        for index in range(count):
            grey = surface(kinds[index % len(kinds)], size, rng)
            Image.fromarray(_rgb(grey, colour)).save(folder / f"{prefix}_{index:04d}.png")
    return data
