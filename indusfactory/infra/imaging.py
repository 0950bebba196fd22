"""Small image helpers shared by training and generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MASK_COVERAGE = 0.25
"""A downscaled mask pixel is set when at least this share of the source pixels under it is set."""


def fit_square(array: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution`` (bicubic; bool masks see ``resize_mask``)."""
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = array[top : top + side, left : left + side]
    if side == resolution:
        return crop.copy()
    if array.dtype == bool:
        return resize_mask(crop, resolution)
    resample = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(Image.fromarray(crop).resize((resolution, resolution), resample))


def resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A square bool mask at ``resolution``: by area coverage when shrinking, so a thin crack stays one
    connected line (nearest-neighbour sampling breaks it into fragments), by nearest when enlarging.
    A non-empty mask never comes out empty (its best-covered pixel is kept)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if resolution >= mask.shape[0]:
        return np.asarray(image.resize((resolution, resolution), Image.NEAREST)) > 127
    coverage = np.asarray(image.resize((resolution, resolution), Image.BOX), dtype=np.float32) / 255.0
    out = coverage >= MASK_COVERAGE
    if mask.any() and not out.any():
        out.flat[int(np.argmax(coverage))] = True
    return out


def to_model_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float tensor Nx3xHxW in [-1, 1] (what the VAE encodes)."""
    import torch  # here, so that modules using only the array helpers (the plan) do not load torch

    batch = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def to_condition_tensor(drivers: list[np.ndarray]) -> torch.Tensor:
    """float HxWx3 drivers in [0, 1] -> tensor Nx3xHxW (what the conditioning network reads)."""
    import torch

    return torch.from_numpy(np.stack(drivers).astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def from_model_output(images: np.ndarray) -> np.ndarray:
    """Pipeline ``output_type='np'`` floats in [0, 1] -> uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def image_grid(tiles: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """Tile same-sized uint8 images into a grid, padding the last row with black."""
    tiles = list(tiles)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    return np.concatenate([np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)])
