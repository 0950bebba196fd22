"""The downstream crack segmentor of the evaluation: SegFormer (transformers).

By default a *binary* head (background vs defect, two logits) trained with soft Dice plus BCE or
focal loss on the defect logit: thin cracks are a tiny share of the pixels, and defect classes that
differ only by shape split the defect probability so that argmax is always background. With
``binary=False`` the semantic classes are background + one per category (cross-entropy + soft Dice).

``evaluation.segmentor_pretrained`` names a SegFormer checkpoint (e.g. ``nvidia/mit-b0``, a
local folder); without one a small SegFormer is initialised from a seed, which runs on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from indusfactory.infra.errors import ModelLoadError

log = logging.getLogger("indusfactory.segmentor")  # the name operators filter on, kept from the flat layout


@dataclass
class SegmentationSet:
    """Images (uint8 HxWx3) and class maps (int HxW, 0 = background) of one resolution."""

    images: list[np.ndarray]
    labels: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: list[int]) -> "SegmentationSet":
        return SegmentationSet([self.images[i] for i in indices], [self.labels[i] for i in indices])

    def __add__(self, other: "SegmentationSet") -> "SegmentationSet":
        return SegmentationSet(self.images + other.images, self.labels + other.labels)


def build_segmentor(n_classes: int, pretrained: str | None, seed: int) -> SegformerForSemanticSegmentation:
    """A SegFormer with ``n_classes`` outputs: from a checkpoint (new head) or a small seeded one."""
    torch.manual_seed(seed)
    if pretrained:
        try:
            return SegformerForSemanticSegmentation.from_pretrained(
                pretrained, num_labels=n_classes, ignore_mismatched_sizes=True, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"segmentor {pretrained} cannot be loaded: {exc}") from exc
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 2, 1],
        hidden_sizes=[16, 32, 64, 128],
        num_attention_heads=[1, 2, 4, 8],
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[2, 2, 2, 2],
        decoder_hidden_size=64,
        num_labels=n_classes,
    )
    return SegformerForSemanticSegmentation(config)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0)
    return batch.permute(0, 3, 1, 2).contiguous()


def _logits(model: SegformerForSemanticSegmentation, pixels: torch.Tensor) -> torch.Tensor:
    """Class logits at the input resolution (SegFormer predicts at a lower one)."""
    logits = model(pixel_values=pixels).logits
    return F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the defect classes (thin cracks are a tiny share of pixels)."""
    ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + 1)
    return ce + dice.mean()


def binary_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "dice_bce") -> torch.Tensor:
    """Soft Dice plus BCE (``dice_bce``) or focal loss (``dice_focal``, gamma 2) on defect vs background.

    The defect logit is the difference of the two class logits, so a two-class softmax at inference
    gives the same probability as the sigmoid trained here.
    """
    z = logits[:, 1] - logits[:, 0]
    target = (labels > 0).float()
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    if kind == "dice_focal":
        p_true = torch.exp(-bce)
        bce = (1 - p_true) ** 2 * bce
    elif kind != "dice_bce":
        raise ValueError(f"unknown segmentor loss {kind!r}")
    probs = torch.sigmoid(z)
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return bce.mean() + dice


def loss_function(binary: bool, kind: str = "dice_bce"):
    """The training loss of a binary or a per-class head."""
    if binary:
        return lambda logits, labels: binary_loss(logits, labels, kind)
    return segmentation_loss


def train_segmentor(
    model: SegformerForSemanticSegmentation,
    data: SegmentationSet,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    loss_fn=segmentation_loss,
) -> list[float]:
    """AdamW for ``steps`` steps on random flipped batches of ``data``; returns the losses."""
    if not len(data):
        raise ValueError("no training images for the segmentor")
    generator = torch.Generator().manual_seed(seed)
    pixels = _to_tensor(data.images)
    labels = torch.from_numpy(np.stack(data.labels).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=generator)
        x, y = pixels[index], labels[index]
        if torch.rand(1, generator=generator).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand(1, generator=generator).item() < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        loss = loss_fn(_logits(model, x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def predict(
    model: SegformerForSemanticSegmentation, images: list[np.ndarray], batch_size: int = 32
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Class maps (argmax) and class probabilities (K x H x W) of each image."""
    model.eval()
    maps, probs = [], []
    for start in range(0, len(images), batch_size):
        p = _logits(model, _to_tensor(images[start : start + batch_size])).softmax(dim=1).numpy()
        probs.extend(p)
        maps.extend(p.argmax(axis=1).astype(np.int64))
    return maps, probs
