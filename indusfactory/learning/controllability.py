"""Held-out probe of a trained condition: defect-free images it never trained on, masks it never saw.

Drivers are built exactly as generation builds them (``extract_topological_driver``) from
defect-free images and annotated masks kept out of training; the concept model with the
conditioning network samples one image per driver; ``adherence.measure`` says whether the
defects sit where the masks say, against the chance pairing of the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from indusfactory.config import FactoryConfig
from indusfactory.drivers.topology import extract_topological_driver
from indusfactory.generation import adherence
from indusfactory.generation.colour import ChromaStats, match_chroma
from indusfactory.infra.imaging import from_model_output, to_condition_tensor
from indusfactory.learning.models import guidance_kwargs, start_latents


@dataclass
class ProbeCase:
    """One held-out sample: a defect-free image and the (class index, class name, mask) it gets."""

    image: np.ndarray
    instances: list[tuple[int, str, np.ndarray]]

    @property
    def union(self) -> np.ndarray:
        return np.logical_or.reduce([mask for _, _, mask in self.instances])


@dataclass
class ProbeResult:
    images: list[np.ndarray]
    drivers: list[np.ndarray]
    masks: list[np.ndarray]
    summary: adherence.AdherenceSummary


def probe_cases(
    defect_free: Sequence[np.ndarray], masks: Sequence[tuple[int, str, np.ndarray]], count: int, seed: int = 0
) -> list[ProbeCase]:
    """``count`` cases pairing defect-free images (cycled) with masks drawn without replacement (cycled)."""
    if not defect_free or not masks:
        return []
    order = np.random.default_rng(seed).permutation(len(masks))
    return [ProbeCase(defect_free[i % len(defect_free)], [masks[order[i % len(masks)]]]) for i in range(count)]


@torch.no_grad()
def sample_probe(
    pipe,
    config: FactoryConfig,
    cases: Sequence[ProbeCase],
    prompt_for,
    batch_size: int = 8,
    seed: int = 0,
    defect_chroma: ChromaStats | None = None,
) -> ProbeResult:
    """Generate one image per case with ``pipe`` (a StableDiffusionControlNetPipeline) and measure it.

    ``prompt_for(class_names)`` gives the condition prompt; sampling follows ``config.generation``, its
    ``colour_match`` included (``defect_chroma``: the training split's real defects, see ``colour``).
    """
    gen, resolution = config.generation, config.base_model.resolution
    drivers = [extract_topological_driver(c.image, [(k, m) for k, _, m in c.instances], config.driver) for c in cases]
    images: list[np.ndarray] = []
    device = pipe.unet.device
    for start in range(0, len(cases), batch_size):
        part = cases[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        latents = start_latents(pipe, gen.signal_leak, [c.image for c in part], generators, gen.steps)
        out = pipe(
            [prompt_for([name for _, name, _ in c.instances]) for c in part],
            image=to_condition_tensor(drivers[start : start + batch_size]).to(device, pipe.unet.dtype),
            height=resolution,
            width=resolution,
            num_inference_steps=gen.steps,
            controlnet_conditioning_scale=gen.conditioning_scale,
            **guidance_kwargs(pipe, gen.guidance_scale, gen.guidance_cutoff, gen.steps),
            generator=generators,
            latents=latents,
            output_type="np",
        )
        images.extend(from_model_output(out.images))
    masks = [c.union for c in cases]
    if gen.colour_match == "source":
        images = [match_chroma(i, c.image, m, defect_chroma) for i, c, m in zip(images, cases, masks)]
    return ProbeResult(images, drivers, masks, adherence.measure(images, masks, margin=gen.adherence_margin))
