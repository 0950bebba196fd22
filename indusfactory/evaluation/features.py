"""Pluggable image feature extractors for FID / KID.

``clip:<folder or hub id>`` uses a CLIP vision tower from transformers (its image embeddings);
``small`` is a fixed, seeded random convolutional network that needs no weights: it is what the
tests and the offline demo use, and its numbers are only comparable with themselves. (Inception,
the FID standard, needs torchvision's compiled ops, which this project does not depend on.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from indusfactory.infra.errors import ConfigError, ModelLoadError

FeatureExtractor = Callable[[list[np.ndarray]], np.ndarray]
"""uint8 HxWx3 images -> N x D float64 features."""


def small_extractor(seed: int = 0, dims: int = 32) -> FeatureExtractor:
    """A seeded random conv net (4 stride-2 stages, global average and std pooling)."""
    generator = torch.Generator().manual_seed(seed)
    widths = [3, 16, 32, 32, dims // 2]
    layers: list[torch.nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        conv = torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (9 * c_in)) ** 0.5)
            conv.bias.zero_()
        layers += [conv, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers).eval()

    @torch.no_grad()
    def extract(images: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        maps = net(batch)
        return torch.cat([maps.mean(dim=(2, 3)), maps.std(dim=(2, 3))], dim=1).double().numpy()

    return extract


def clip_extractor(model_id: str, batch_size: int = 32) -> FeatureExtractor:
    """CLIP image embeddings (``CLIPVisionModelWithProjection``) from a local folder or hub id."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        processor = CLIPImageProcessor.from_pretrained(model_id)
        model = CLIPVisionModelWithProjection.from_pretrained(model_id, use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"CLIP feature extractor {model_id} cannot be loaded: {exc}") from exc

    @torch.no_grad()
    def extract(images: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            inputs = processor(images=list(images[start : start + batch_size]), return_tensors="pt")
            out.append(model(**inputs).image_embeds.double().numpy())
        return np.concatenate(out)

    return extract


def feature_extractor(spec: str, seed: int = 0) -> FeatureExtractor:
    """The extractor named by ``evaluation.feature_extractor``: ``small`` or ``clip:<model>``."""
    if spec == "small":
        return small_extractor(seed)
    if spec.startswith("clip:") and len(spec) > 5:
        return clip_extractor(spec[5:])
    raise ConfigError(f"evaluation.feature_extractor must be 'small' or 'clip:<folder or hub id>', got {spec!r}")
