"""Generation: a shard of plan rows becomes images, each labelled by the mask its driver carried.

Models load once per worker process and stay for the next shard; prompt embeddings are computed
once per prompt; each sample has its own seeded generator, so its image does not depend on the
batch it ran in.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch

from indusfactory import storage
from indusfactory.config import FactoryConfig
from indusfactory.fingerprint import CODE_VERSION
from indusfactory.imaging import from_model_output, to_condition_tensor
from indusfactory.models import configure_torch, load_generation_pipeline, select_device, select_dtype
from indusfactory.export import existing_shard, write_shard
from indusfactory.plan import SourceImages, materialise, read_plan
from indusfactory.schema import ModelRecord, PlanRecord, ShardRecord, encode_png, mask_to_rle, rle_bbox_area

log = logging.getLogger(__name__)
_PIPELINE_CACHE: dict[tuple, object] = {}
_SOURCES_CACHE: dict[str, SourceImages] = {}


@dataclass
class GenerationContext:
    """Everything a worker needs besides the plan rows."""

    config: FactoryConfig
    catalog_uri: str
    categories: list[dict]
    concept: ModelRecord
    condition: ModelRecord


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def get_pipeline(ctx: GenerationContext):
    """The generation pipeline, loaded once per process for a given pair of models."""
    device = select_device(ctx.config.execution)
    dtype = select_dtype(ctx.config.execution, device)
    key = (ctx.config.base_model.model_dump_json(), ctx.concept.uri, ctx.condition.uri,
           ctx.config.generation.scheduler, str(device), str(dtype))
    if key not in _PIPELINE_CACHE:
        _PIPELINE_CACHE.clear()
        with storage.local_copy_for_read(ctx.concept.uri) as concept_dir, \
                storage.local_copy_for_read(ctx.condition.uri) as condition_dir:
            pipe = load_generation_pipeline(ctx.config.base_model, concept_dir, condition_dir,
                                            ctx.config.generation.scheduler)
        _PIPELINE_CACHE[key] = pipe.to(device=device, dtype=dtype)
    return _PIPELINE_CACHE[key]


def get_sources(ctx: GenerationContext) -> SourceImages:
    if ctx.catalog_uri not in _SOURCES_CACHE:
        _SOURCES_CACHE.clear()
        _SOURCES_CACHE[ctx.catalog_uri] = SourceImages(ctx.catalog_uri, ctx.categories)
    return _SOURCES_CACHE[ctx.catalog_uri]


def mask_contrast(image: np.ndarray, mask: np.ndarray, ring: int = 3) -> float:
    """How much darker the defect is than the ring around it: (ring - inside) / ring, in luminance."""
    from scipy.ndimage import binary_dilation

    gray = image.astype(np.float64).mean(axis=2)
    around = binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or not around.any():
        return 0.0
    ring_mean = gray[around].mean()
    return float((ring_mean - gray[mask].mean()) / max(ring_mean, 1.0))


@torch.no_grad()
def _prompt_embeds(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    embeds = {}
    for prompt in sorted(set(prompts)) + [""]:
        tokens = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        embeds[prompt] = pipe.text_encoder(tokens.input_ids.to(device))[0].to(pipe.unet.dtype)
    return embeds


def generate_rows(ctx: GenerationContext, rows: list[dict]) -> list[dict]:
    """Generate every plan row and return dataset rows (see ``schema.DATASET_SCHEMA``)."""
    configure_torch(ctx.config.execution)
    gen = ctx.config.generation
    pipe = get_pipeline(ctx)
    sources = get_sources(ctx)
    device = pipe.unet.device
    embeds = _prompt_embeds(pipe, [r["prompt"] for r in rows], device)
    resolution = ctx.config.base_model.resolution
    out: list[dict] = []
    worker = worker_name()
    for start in range(0, len(rows), gen.batch_size):
        batch = rows[start : start + gen.batch_size]
        inputs = [materialise(r, sources, ctx.config) for r in batch]
        result = pipe(
            prompt_embeds=torch.cat([embeds[r["prompt"]] for r in batch]),
            negative_prompt_embeds=embeds[""].expand(len(batch), -1, -1),
            image=to_condition_tensor([i.driver for i in inputs]).to(device, pipe.unet.dtype),
            height=resolution, width=resolution, num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
            controlnet_conditioning_scale=gen.conditioning_scale,
            generator=[torch.Generator(device="cpu").manual_seed(r["seed"]) for r in batch],
            output_type="np",
        )
        images = from_model_output(result.images)
        for row, sample, image in zip(batch, inputs, images):
            out.append(_dataset_row(ctx, row, sample, image, worker))
    return out


def _dataset_row(ctx: GenerationContext, row: dict, sample, image: np.ndarray, worker: str) -> dict:
    instances, union = [], np.zeros(image.shape[:2], dtype=bool)
    for inst, mask in sample.instances:
        rle = mask_to_rle(mask)
        bbox, area = rle_bbox_area(rle)
        instances.append({"category_id": inst["category_id"], "category": inst["category"], "rle": rle,
                          "bbox": bbox, "area": area, "mask_source": inst["mask_source"]})
        union |= mask
    contrast = mask_contrast(image, union)
    return {
        "sample_id": row["sample_id"], "sample_index": row["sample_index"],
        "image": {"bytes": encode_png(image), "path": f"{row['sample_id']}.png"},
        "width": image.shape[1], "height": image.shape[0], "instances": instances,
        "driver": {"bytes": encode_png((sample.driver * 255).round().astype(np.uint8)),
                   "path": f"{row['sample_id']}_driver.png"},
        "prompt": row["prompt"], "seed": row["seed"], "driver_image_id": row["driver_image_id"],
        "qc_mask_contrast": contrast, "qc_passed": contrast >= ctx.config.generation.min_mask_contrast,
        "base_model": ctx.config.base_model.pretrained, "concept_fingerprint": ctx.concept.fingerprint,
        "condition_fingerprint": ctx.condition.fingerprint, "code_version": CODE_VERSION, "worker": worker,
    }


def generate_shard(ctx: GenerationContext, plan: PlanRecord, dataset_uri: str, shard: int) -> ShardRecord:
    """Generate and write one shard of the plan; a shard already on storage is returned as is."""
    split = ctx.config.export.split
    done = existing_shard(dataset_uri, split, shard, plan.shards)
    if done:
        return done
    started = time.perf_counter()
    rows = generate_rows(ctx, read_plan(plan, shard))
    return write_shard(dataset_uri, split, shard, plan.shards, rows, ctx.categories, time.perf_counter() - started)
