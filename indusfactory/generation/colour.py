"""Colour matched to the source domain, luminance untouched (``generation.colour_match``).

A small base model draws its own colour noise into every texture: grey sources come out tinted
(median per-pixel RGB spread 18 against 0 on the controllability benchmark), and no training budget
that fits on a laptop removes it. Generation starts from a defect-free source image, so the factory
knows the colour each sample should have; ``match_chroma`` moves a generated image's chroma there:

- around the label, to the chroma statistics (mean and spread of Cb and Cr) of the defect-free
  source image the sample was made from;
- inside the label, to those of the real defects of the training split (a rust spot keeps its
  colour, a crack on grey stays grey); without them, inside gets the surroundings' transform.

Only chroma changes: luma (Rec. 601 Y, the ``adherence.luminance`` that labels are measured by) is
kept exactly before rounding, so what the models drew (where the defect is, how dark) is unchanged, except
for pixels whose new colour falls outside the RGB cube: clipping them changes their luma a little (tinted
sources only; a grey source never clips).
This is Reinhard et al.'s colour transfer (2001) restricted to chroma, the same idea as the colour
correction applied to img2img results in common Stable Diffusion front ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)
_MIN_SPREAD = 1.0
"""Chroma spreads below this (in 0..255 units) count as 1: a flat generated region is moved, not amplified."""


@dataclass(frozen=True)
class ChromaStats:
    """Mean and standard deviation of (Cb, Cr), centred on grey (0 = no colour), over some pixels."""

    mean: tuple[float, float]
    std: tuple[float, float]

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


def to_ycbcr(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB to float Y, Cb, Cr with Cb and Cr centred on 0 (full range, Rec. 601)."""
    return image[..., :3].astype(np.float64) @ _RGB_TO_YCBCR.T


def to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of ``to_ycbcr``, rounded and clipped to uint8."""
    return np.clip(np.rint(ycbcr @ _YCBCR_TO_RGB.T), 0, 255).astype(np.uint8)


def chroma_stats(pixels: np.ndarray) -> ChromaStats:
    """Statistics of an Nx2 array of centred (Cb, Cr) values."""
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    return ChromaStats((float(mean[0]), float(mean[1])), (float(std[0]), float(std[1])))


def image_chroma(image: np.ndarray, where: np.ndarray | None = None) -> ChromaStats | None:
    """Chroma statistics of ``image`` over the pixels ``where`` is true (all by default); None when none are."""
    chroma = to_ycbcr(image)[..., 1:]
    pixels = chroma.reshape(-1, 2) if where is None else chroma[where.astype(bool)]
    return chroma_stats(pixels) if len(pixels) else None


def pooled_chroma(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> ChromaStats | None:
    """Chroma statistics of every masked pixel of (image, mask) pairs pooled; None when no pixel is masked."""
    parts = [to_ycbcr(image)[..., 1:][mask.astype(bool)] for image, mask in pairs]
    parts = [p for p in parts if len(p)]
    return chroma_stats(np.concatenate(parts)) if parts else None


def _transfer(chroma: np.ndarray, where: np.ndarray, target: ChromaStats) -> np.ndarray:
    """``chroma`` moved so its pixels ``where`` have ``target``'s mean and spread (per channel)."""
    own = chroma_stats(chroma[where])
    gain = np.array(target.std) / np.maximum(np.array(own.std), _MIN_SPREAD)
    return np.array(target.mean) + (chroma - np.array(own.mean)) * gain


def match_chroma(
    image: np.ndarray, reference: np.ndarray, label: np.ndarray, defects: ChromaStats | None = None
) -> np.ndarray:
    """``image`` with its chroma matched to the defect-free ``reference`` around the ``label`` and to
    ``defects`` inside it (to the same transform as around it when None). Luma is kept."""
    label = label.astype(bool)
    ycbcr = to_ycbcr(image)
    chroma = ycbcr[..., 1:]
    background = ~label if (~label).any() else np.ones_like(label)
    target = image_chroma(reference)
    assert target is not None  # a reference image has pixels
    out = _transfer(chroma, background, target)
    if defects is not None and label.any():
        out[label] = _transfer(chroma, label, defects)[label]
    ycbcr[..., 1:] = out
    return to_rgb(ycbcr)
