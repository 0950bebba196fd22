"""Generation: a shard of plan rows becomes images, each labelled by the mask its driver carried.

Models load once per worker process and stay for the next shard.

Batch invariance: a sample's image depends only on its plan row, never on the batch it ran in
(its size, its other rows, the sample's position in it) nor on the process. Three things make it so:

- each sample has its own generator seeded by its row seed (diffusers draws the latents of a
  list of generators one sample at a time, so a neighbour cannot shift a sample's noise);
- the pipeline always runs at the same batch shape, ``generation.batch_size``: a short batch is
  padded with copies of its last row (fresh generators, outputs discarded), so every call picks
  the same kernels;
- two CPU kernels whose result for one sample depends on where it sits in the batch are
  avoided (``make_batch_invariant``). The linear layers that see one vector per sample (the time
  embedding and every ResNet block's ``time_emb_proj``: a matrix of 2 x batch rows) multiply
  each row on its own (``RowInvariantLinear``): a plain small GEMM computes different rows with
  different micro-kernels. And GroupNorm gets contiguous inputs: the VAE's attention hands its
  decoder channels-last tensors, whose GroupNorm kernel splits the sums over batch x pixels
  between threads, so a sample's sums depended on its position (and on the thread count).
  Either one made the same sample at another position come out one grey level apart in a few
  pixels.

What remains: the bytes are the same on every worker with the same CPU kind, library versions and
torch thread count. A different thread count changes how oneDNN blocks some convolutions (measured:
the 1x1 ``proj_in`` convolutions, by 1e-7), which shifts a few pixels by one grey level; workers of
one pool should run with the same ``execution.torch_threads``. The two kernel fixes apply on CPU
only; batch invariance on GPUs has not been verified.

Speed: the options of ``generation`` (compile, channels-last, fused QKV, VAE decode; ``speed.py``) are
applied once per pipeline load; the guidance cut-off (``generation.guidance_cutoff``) drops the unconditional
pass after the first part of the steps. The ControlNet's driver encoder (a stack of convolutions at full
resolution) reads the same driver at every denoising step, so its output is computed at the first step of a
batch and reused (``DriverEncodingCache``); prompt embeddings are computed once per prompt.

Quality control: each sample gets ``qc_mask_contrast`` (how much darker the defect is than the
ring around it) and, when ``generation.adherence_scorer`` names one, ``qc_adherence``; failing
samples are flagged (``qc_passed`` false) or dropped, per ``generation.qc_action``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from indusfactory.config import FactoryConfig
from indusfactory.generation.adherence import label_auc, shard_totals
from indusfactory.generation.colour import match_chroma
from indusfactory.generation.plan import SampleInputs, SourceImages, check_references, materialise, read_plan
from indusfactory.generation.scorers import (  # noqa: F401 - re-exported
    AdherenceScorer,
    adherence_scorer,
    register_adherence_scorer,
)
from indusfactory.generation.speed import apply_speed_options, speed_key
from indusfactory.infra import stopping, storage
from indusfactory.infra.devices import DeviceSlot, device_pool
from indusfactory.infra.fingerprint import CODE_VERSION
from indusfactory.infra.imaging import from_model_output, to_condition_tensor
from indusfactory.learning.models import (
    configure_torch,
    guidance_kwargs,
    load_generation_pipeline,
    select_dtype,
    start_latents,
)
from indusfactory.publishing.publish import (
    check_before_writing,
    check_shard_origin,
    existing_shard,
    generation_fingerprint,
    write_shard,
)
from indusfactory.schema import ModelRecord, PlanRecord, ShardRecord, encode_png, mask_to_rle, rle_bbox_area
from indusfactory.sources.catalog import catalog_version

log = logging.getLogger("indusfactory.generate")  # the name operators filter on, kept from the flat layout
_PIPELINE_CACHE: dict[tuple, object] = {}
_SOURCES_CACHE: dict[tuple | None, SourceImages] = {}


@dataclass
class GenerationContext:
    """Everything a worker needs besides the plan rows."""

    config: FactoryConfig
    catalog_uri: str
    categories: list[dict]
    concept: ModelRecord
    condition: ModelRecord


@dataclass(frozen=True)
class GenerationProgress:
    """``samples`` more plan rows are done, out of ``planned`` in the whole plan.

    ``generated`` is False for the rows of a shard already on storage (reused, not generated);
    a generated shard first reports 0 samples when it starts.
    """

    samples: int
    planned: int
    generated: bool


ProgressListener = Callable[[GenerationProgress], None]
_LISTENERS: list[ProgressListener] = []
_LISTENERS_LOCK = threading.Lock()


@contextmanager
def progress_listener(listener: ProgressListener) -> Iterator[None]:
    """Call ``listener`` for every batch generated (and every shard reused) in this process meanwhile."""
    with _LISTENERS_LOCK:
        _LISTENERS.append(listener)
    try:
        yield
    finally:
        with _LISTENERS_LOCK:
            _LISTENERS.remove(listener)


def _notify_listeners(event: GenerationProgress) -> None:
    with _LISTENERS_LOCK:
        listeners = list(_LISTENERS)
    for listener in listeners:
        listener(event)


def worker_name() -> str:
    """``$INDUSFACTORY_WORKER_NAME`` (set per GPU worker, e.g. ``node3-gpu1``) or ``host:pid``, with the GPU."""
    name = os.environ.get("INDUSFACTORY_WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{name}/cuda:{gpus}" if gpus and torch.cuda.is_available() else name


class RowInvariantLinear(torch.nn.Linear):
    """A ``Linear`` whose 2-D inputs (one vector per sample) are multiplied row by row on CPU, in one
    batched matmul: each row's result is what a batch of one gives, whatever its position and the
    batch size. Other inputs (tokens of attention layers) and other devices use the plain ``Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.device.type != "cpu":
            return super().forward(x)
        rows = x.shape[0]
        weight = self.weight.t().unsqueeze(0).expand(rows, -1, -1)
        if self.bias is None:
            return torch.bmm(x.unsqueeze(1), weight).squeeze(1)
        return torch.baddbmm(self.bias.view(1, 1, -1).expand(rows, 1, -1), x.unsqueeze(1), weight).squeeze(1)


def _contiguous_input_on_cpu(module: torch.nn.Module, args: tuple) -> tuple | None:
    if args[0].device.type != "cpu":
        return None  # CUDA's GroupNorm reduces each (sample, group) in one block: nothing to fix
    return (args[0].contiguous(), *args[1:])


def make_batch_invariant(model: torch.nn.Module) -> None:
    """Make each sample's result independent of its batch neighbours and position (same weights and
    state dict): every plain ``nn.Linear`` becomes a ``RowInvariantLinear`` and every ``GroupNorm``
    reads a contiguous input on CPU (its channels-last CPU kernel splits sums across samples)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = RowInvariantLinear
        elif isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(_contiguous_input_on_cpu)


class DriverEncodingCache:
    """Reuses the ControlNet's driver encoding across the denoising steps of one pipeline call.

    The pipeline passes the same driver tensor at every step; the encoder's output for it is kept
    until ``clear()`` (called around every pipeline call, so a new tensor at a reused address can
    never hit a stale entry). Installed on the encoder instance: the state dict is unchanged.
    """

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder
        self.compute = encoder.forward
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None
        encoder.forward = self

    def __call__(self, conditioning: torch.Tensor) -> torch.Tensor:
        key = (conditioning.data_ptr(), tuple(conditioning.shape), conditioning.dtype, conditioning.device)
        if key != self.key:
            self.key, self.value = None, self.compute(conditioning)
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


_PIPELINE_CACHE_LOCK = threading.Lock()


def get_pipeline(ctx: GenerationContext, slot: DeviceSlot | None = None):
    """The generation pipeline of a device slot (default: the first), loaded once per process for a
    given pair of models.

    Pipelines of other models are dropped; each slot keeps its own copy (one per GPU), with a lock
    so that only one batch at a time uses it (its scheduler and driver cache are per call).
    """
    slot = slot or device_pool(ctx.config.execution).slots[0]
    dtype = select_dtype(ctx.config.execution, slot.device)
    models = (
        ctx.config.base_model.model_dump_json(),
        ctx.concept.uri,
        ctx.condition.uri,
        ctx.config.generation.scheduler,
        str(dtype),
        speed_key(ctx.config.generation),
    )
    key = (models, slot.name)
    with _PIPELINE_CACHE_LOCK:
        for stale in [k for k in _PIPELINE_CACHE if k[0] != models]:
            del _PIPELINE_CACHE[stale]
        if key not in _PIPELINE_CACHE:
            with (
                storage.local_copy_for_read(ctx.concept.uri) as concept_dir,
                storage.local_copy_for_read(ctx.condition.uri) as condition_dir,
            ):
                pipe = load_generation_pipeline(
                    ctx.config.base_model, concept_dir, condition_dir, ctx.config.generation.scheduler
                )
            for model in (pipe.unet, pipe.controlnet, pipe.vae):
                make_batch_invariant(model)
            pipe.driver_cache = DriverEncodingCache(pipe.controlnet.controlnet_cond_embedding)
            pipe.sampling_lock = threading.Lock()
            pipe = pipe.to(device=slot.device, dtype=dtype)
            apply_speed_options(pipe, ctx.config.generation)  # once per load: compiled graphs serve every shard
            _PIPELINE_CACHE[key] = pipe
        return _PIPELINE_CACHE[key]


def get_sources(ctx: GenerationContext) -> SourceImages:
    """The decoded catalog images of ``ctx`` (one per process and version of the catalog file)."""
    key = catalog_version(ctx.catalog_uri)
    if key is None or key not in _SOURCES_CACHE:
        _SOURCES_CACHE.clear()
        _SOURCES_CACHE[key] = SourceImages(ctx.catalog_uri, ctx.categories)
    return _SOURCES_CACHE[key]


# --- quality control -----------------------------------------------------------------------------


def mask_contrast(image: np.ndarray, mask: np.ndarray, ring: int = 3) -> float:
    """How much darker the defect is than the ring around it: (ring - inside) / ring, in luminance."""
    from scipy.ndimage import binary_dilation

    gray = image.astype(np.float64).mean(axis=2)
    around = binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or not around.any():
        return 0.0
    ring_mean = gray[around].mean()
    return float((ring_mean - gray[mask].mean()) / max(ring_mean, 1.0))


@register_adherence_scorer("dark_iou")
def dark_iou(images: list[np.ndarray], masks: list[np.ndarray], ring: int = 3) -> list[float]:
    """IoU of each mask with the pixels near it that are darker than the median of the ring around it."""
    from scipy.ndimage import binary_dilation

    scores = []
    for image, mask in zip(images, masks):
        near = binary_dilation(mask, iterations=ring)
        if not mask.any() or not (near & ~mask).any():
            scores.append(0.0)
            continue
        gray = image.astype(np.float64).mean(axis=2)
        dark = near & (gray < np.median(gray[near & ~mask]))
        scores.append(float((dark & mask).sum() / (dark | mask).sum()))
    return scores


def qc_verdict(ctx: GenerationContext, contrast: float, adherence: float | None, label_auc: float = 1.0) -> bool:
    """Whether a sample passes QC: defect dark enough, darker than its ring often enough (label AUC) and,
    when a threshold is set, adherent enough by the configured scorer."""
    gen = ctx.config.generation
    if contrast < gen.min_mask_contrast:
        return False
    if gen.min_label_auc is not None and label_auc < gen.min_label_auc:
        return False
    return gen.min_adherence is None or (adherence is not None and adherence >= gen.min_adherence)


def apply_qc_action(rows: list[dict], action: str) -> tuple[list[dict], int]:
    """The rows to write and how many were dropped: 'flag' keeps every row, 'drop' the passing ones."""
    if action == "flag":
        return rows, 0
    kept = [row for row in rows if row["qc_passed"]]
    return kept, len(rows) - len(kept)


# --- sampling --------------------------------------------------------------------------------------


@torch.no_grad()
def _prompt_embeds(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    embeds = {}
    for prompt in sorted(set(prompts)) + [""]:
        tokens = pipe.tokenizer(
            prompt,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds[prompt] = pipe.text_encoder(tokens.input_ids.to(device))[0].to(pipe.unet.dtype)
    return embeds


def padded(items: list, size: int) -> list:
    """``items`` followed by copies of its last item up to ``size`` (a fixed batch shape)."""
    return items + [items[-1]] * (size - len(items))


def sample_batch(
    ctx: GenerationContext,
    pipe,
    embeds: dict[str, torch.Tensor],
    rows: list[dict],
    inputs: list[SampleInputs],
    shape: int | None = None,
) -> np.ndarray:
    """uint8 images of up to ``shape`` rows (default ``batch_size``), always sampled at that batch shape."""
    gen = ctx.config.generation
    resolution = ctx.config.base_model.resolution
    shape = shape or gen.batch_size
    full_rows = padded(rows, shape)
    drivers = padded([i.driver for i in inputs], shape)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    cache = getattr(pipe, "driver_cache", None)
    with getattr(pipe, "sampling_lock", nullcontext()):  # its scheduler and the driver cache are per call
        if cache:
            cache.clear()
        try:
            generators = [torch.Generator(device="cpu").manual_seed(r["seed"]) for r in full_rows]
            images = padded([i.image for i in inputs], shape)
            latents = start_latents(pipe, gen.signal_leak, images, generators, gen.steps)
            guidance = guidance_kwargs(pipe, gen.guidance_scale, gen.guidance_cutoff, gen.steps)
            # a stop request ends the batch within one step, after the guidance cut-off's own callback
            step_end = _then_stop(guidance.pop("callback_on_step_end", None))
            result = pipe(
                prompt_embeds=torch.cat([embeds[r["prompt"]] for r in full_rows]),
                negative_prompt_embeds=embeds[""].expand(len(full_rows), -1, -1),
                image=to_condition_tensor(drivers).to(device, dtype),
                height=resolution,
                width=resolution,
                num_inference_steps=gen.steps,
                controlnet_conditioning_scale=gen.conditioning_scale,
                **guidance,
                # one generator per row, padding included: a shared one would shift the real rows' noise
                generator=generators,
                latents=latents,
                output_type="np",
                callback_on_step_end=step_end,
            )
        finally:
            if cache:
                cache.clear()
    return from_model_output(result.images[: len(rows)])


def _then_stop(step_end: Callable | None) -> Callable:
    """A pipeline step-end callback that runs ``step_end`` (if any), then honours a stop request."""

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step_end is not None:
            callback_kwargs = step_end(pipe, step, timestep, callback_kwargs)
        stopping.check("generation")
        return callback_kwargs

    return callback


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def sample_splitting_on_oom(
    ctx: GenerationContext,
    pipe,
    embeds: dict[str, torch.Tensor],
    rows: list[dict],
    inputs: list[SampleInputs],
    shape: int,
) -> tuple[np.ndarray, int]:
    """``sample_batch`` at batch shape ``shape``; out of memory halves the shape and retries the rows in
    smaller batches. Returns the images and the shape that fitted (kept for the rest of the shard)."""
    try:
        return sample_batch(ctx, pipe, embeds, rows, inputs, shape), shape
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc) or shape == 1:
            raise
    smaller = shape // 2
    log.warning(
        "out of memory sampling %d rows at batch size %d: splitting into batches of %d", len(rows), shape, smaller
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    images, start = [], 0
    while start < len(rows):
        part, smaller = sample_splitting_on_oom(
            ctx, pipe, embeds, rows[start : start + smaller], inputs[start : start + smaller], smaller
        )
        images.append(part)
        start += len(part)
    return np.concatenate(images), smaller


def generate_rows(
    ctx: GenerationContext, rows: list[dict], on_batch: Callable[[int], None] | None = None
) -> list[dict]:
    """Generate every plan row and return dataset rows (see ``schema.DATASET_SCHEMA``), QC included.

    The rows are sampled on a device slot leased for the whole call (two callers never share a GPU).
    ``on_batch(n)`` is called after each batch of ``n`` rows.
    """
    configure_torch(ctx.config.execution)
    sources = get_sources(ctx)
    check_references(rows, sources)  # a damaged plan fails here, before a model loads
    pool = device_pool(ctx.config.execution)
    with pool.lease() as slot:
        worker = worker_name() + (f"/{slot.name}" if len(pool.slots) > 1 else "")
        return _generate_on(ctx, rows, slot, sources, worker, on_batch)


def _generate_on(
    ctx: GenerationContext,
    rows: list[dict],
    slot: DeviceSlot,
    sources: SourceImages,
    worker: str,
    on_batch: Callable[[int], None] | None,
) -> list[dict]:
    gen = ctx.config.generation
    scorer = adherence_scorer(gen.adherence_scorer)
    pipe = get_pipeline(ctx, slot)
    embeds = _prompt_embeds(pipe, [r["prompt"] for r in rows], pipe.unet.device)
    out: list[dict] = []
    chance = ChancePairing()
    shape = gen.batch_size
    for start in range(0, len(rows), gen.batch_size):
        stopping.check("generation")  # a stop leaves the shard unwritten: a rerun generates it again
        batch = rows[start : start + gen.batch_size]
        inputs = [materialise(r, sources, ctx.config) for r in batch]
        images, shape = sample_splitting_on_oom(ctx, pipe, embeds, batch, inputs, shape)
        unions = [_union(sample, image.shape[:2]) for sample, image in zip(inputs, images)]
        matched = matched_colour(ctx, sources, list(images), inputs, unions)
        scores = scorer(matched, unions) if scorer else [None] * len(batch)
        for row, sample, image, union, score in zip(batch, inputs, matched, unions, scores):
            out.append(_dataset_row(ctx, row, sample, image, union, score, worker, chance.next(image, union)))
        if on_batch:
            on_batch(len(batch))
    if len(out) > 1:
        out[0]["qc_chance_auc"] = chance.close()
    return out


def matched_colour(
    ctx: GenerationContext,
    sources: SourceImages,
    images: list[np.ndarray],
    inputs: list[SampleInputs],
    unions: list[np.ndarray],
) -> list[np.ndarray]:
    """The sampled images with ``generation.colour_match`` applied (see ``colour.match_chroma``)."""
    if ctx.config.generation.colour_match == "none":
        return images
    defects = sources.defect_chroma(ctx.config.base_model.resolution)
    return [
        match_chroma(image, sample.image, union, defects) if sample.image is not None else image
        for image, sample, union in zip(images, inputs, unions)
    ]


class ChancePairing:
    """The chance level of a shard: each sample's image scored with the previous sample's mask (the first
    with the last one's), so it depends on the shard's rows only, never on how they were batched."""

    def __init__(self) -> None:
        self.first_image: np.ndarray | None = None
        self.last_mask: np.ndarray | None = None

    def next(self, image: np.ndarray, mask: np.ndarray) -> float | None:
        score = None if self.last_mask is None else label_auc(image, self.last_mask)
        if self.first_image is None:
            self.first_image = image
        self.last_mask = mask
        return score

    def close(self) -> float | None:
        """The first sample's chance score (needs the last sample's mask)."""
        if self.first_image is None or self.last_mask is None:
            return None
        return label_auc(self.first_image, self.last_mask)


def _union(sample: SampleInputs, shape: tuple[int, int]) -> np.ndarray:
    union = np.zeros(shape, dtype=bool)
    for _, mask in sample.instances:
        union |= mask
    return union


def _dataset_row(
    ctx: GenerationContext,
    row: dict,
    sample: SampleInputs,
    image: np.ndarray,
    union: np.ndarray,
    adherence: float | None,
    worker: str,
    chance_auc: float | None = None,
) -> dict:
    instances = []
    for inst, mask in sample.instances:
        rle = mask_to_rle(mask)
        bbox, area = rle_bbox_area(rle)
        instances.append(
            {
                "category_id": inst["category_id"],
                "category": inst["category"],
                "rle": rle,
                "bbox": bbox,
                "area": area,
                "mask_source": inst["mask_source"],
            }
        )
    contrast = mask_contrast(image, union)
    auc = label_auc(image, union)
    adherence = None if adherence is None else float(adherence)
    return {
        "sample_id": row["sample_id"],
        "sample_index": row["sample_index"],
        "image": {"bytes": encode_png(image), "path": f"{row['sample_id']}.png"},
        "width": image.shape[1],
        "height": image.shape[0],
        "instances": instances,
        "driver": {
            "bytes": encode_png((sample.driver * 255).round().astype(np.uint8)),
            "path": f"{row['sample_id']}_driver.png",
        },
        "prompt": row["prompt"],
        "seed": row["seed"],
        "driver_image_id": row["driver_image_id"],
        "qc_mask_contrast": contrast,
        "qc_adherence": adherence,
        "qc_label_auc": auc,
        "qc_chance_auc": chance_auc,
        "qc_passed": qc_verdict(ctx, contrast, adherence, auc),
        "base_model": ctx.config.base_model.pretrained,
        "concept_fingerprint": ctx.concept.fingerprint,
        "condition_fingerprint": ctx.condition.fingerprint,
        "code_version": CODE_VERSION,
        "worker": worker,
    }


def generate_shard(ctx: GenerationContext, plan: PlanRecord, dataset_uri: str, shard: int) -> ShardRecord:
    """Generate and write one shard of the plan; a shard already on storage is returned as is.

    A shard that another plan or config made, or a missing shard of a published version, is refused
    (``VersionConflictError``): a version is never mixed nor written into once published.
    Progress goes to the listeners of ``progress_listener`` (per batch, and once for a reused shard).
    """
    split = ctx.config.export.split
    made_by = generation_fingerprint(ctx.config, plan, ctx.concept, ctx.condition)
    done = existing_shard(dataset_uri, split, shard, plan.shards)
    if done:
        check_shard_origin(done, made_by, dataset_uri)
        _notify_listeners(GenerationProgress(done.planned, plan.samples, generated=False))
        return done
    check_before_writing(dataset_uri, split, plan.shards)
    started = time.perf_counter()
    _notify_listeners(GenerationProgress(0, plan.samples, generated=True))
    rows = generate_rows(
        ctx,
        read_plan(plan, shard),
        on_batch=lambda n: _notify_listeners(GenerationProgress(n, plan.samples, generated=True)),
    )
    kept, dropped = apply_qc_action(rows, ctx.config.generation.qc_action)
    worker = rows[0]["worker"] if rows else worker_name()
    totals = shard_totals(
        [r["qc_label_auc"] for r in rows],
        [r["qc_chance_auc"] for r in rows if r["qc_chance_auc"] is not None],
        [r["qc_mask_contrast"] for r in rows],
    )
    return write_shard(
        dataset_uri,
        split,
        shard,
        plan.shards,
        kept,
        ctx.categories,
        time.perf_counter() - started,
        dropped=dropped,
        worker=worker,
        adherence=totals,
        generation_fingerprint=made_by,
    )
