"""What both training stages share: cached latents and prompt embeddings, the diffusion loss,
the optimiser, and writing a model folder with its card.

Latents are cached as the VAE's posterior moments (mean, std) and sampled each step, which is
exactly what re-encoding every step would draw, at a fraction of the cost.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm

from indusfactory import layout
from indusfactory.config import ExecutionConfig, TrainingConfig
from indusfactory.infra import stopping, storage
from indusfactory.learning.models import BaseComponents, select_device, select_dtype
from indusfactory.schema import encode_png

log = logging.getLogger("indusfactory.training")  # the name operators filter on, kept from the flat layout
Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, total_steps, loss)`` every few steps."""


@dataclass
class LatentCache:
    """VAE posterior moments of every training image, already multiplied by the scaling factor (CPU, fp32)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A latent per index, drawn on the CPU from ``generator`` (the same on every device)."""
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def __len__(self) -> int:
        return len(self.mean)


@torch.no_grad()
def encode_latents(base: BaseComponents, pixels: torch.Tensor, batch_size: int = 16) -> LatentCache:
    """Encode images in [-1, 1] once (on the VAE's device and dtype); keep mean and std of each latent."""
    scale = base.vae.config.scaling_factor
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        stopping.check("latent encoding")
        chunk = pixels[start : start + batch_size].to(base.vae.device, base.vae.dtype)
        dist = base.vae.encode(chunk).latent_dist
        means.append((dist.mean * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
    return LatentCache(torch.cat(means), torch.cat(stds))


def tokenize(base: BaseComponents, prompts: list[str]) -> torch.Tensor:
    """Token ids of each prompt, padded to the tokenizer's maximum length, on the text encoder's device."""
    tokens = base.tokenizer(
        prompts, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids.to(base.text_encoder.device)


@torch.no_grad()
def encode_prompts(base: BaseComponents, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states of each prompt (computed once; reused every step)."""
    return base.text_encoder(tokenize(base, prompts))[0]


@dataclass
class TrainingRuntime:
    """Device and mixed precision of a training run: frozen models run in ``dtype``, trained weights stay fp32."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def for_stage(cls, execution: ExecutionConfig, config: TrainingConfig) -> "TrainingRuntime":
        device = select_device(execution)
        if config.precision == "auto":
            return cls(device, select_dtype(execution, device))
        return cls(device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.precision])

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        """``torch.autocast`` in the run's precision, or nothing at fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.mixed else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, needed by fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def noisy_inputs(
    base: BaseComponents, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise the latents at random timesteps; return (noisy latents, timesteps, regression target).

    Noise and timesteps are drawn on the CPU from ``generator`` (the same on every device), then
    moved to the latents' device. ``noise_offset`` adds a per-example, per-channel constant to the noise.
    """
    scheduler = base.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
        latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    scheduler=None,
    snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE of the prediction; with ``snr_gamma``, each example weighted by Min-SNR (Hang et al. 2023).

    ``weights`` (broadcastable to the prediction, e.g. Nx1xhxw) weights each latent pixel; each
    example's loss is then the weighted mean over its pixels, so the loss keeps its scale.
    """
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weights is None:
        per_example = error.mean(dim=(1, 2, 3))
    else:
        weights = weights.to(error.device, error.dtype).expand_as(error)
        per_example = (error * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_example.mean()
    snr = compute_snr(scheduler, timesteps)
    clamped = torch.clamp(snr, max=snr_gamma)
    clamped = clamped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clamped / snr
    return (per_example * clamped.to(per_example.device)).mean()


def latent_mask_weights(masks: torch.Tensor, scale_factor: int, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights: ``1 + weight`` on latent pixels a defect mask touches (and their
    neighbours, so the defect's edges count too), 1 elsewhere. ``masks``: Nx1xHxW in {0, 1}."""
    touched = F.max_pool2d(masks.float(), kernel_size=scale_factor, stride=scale_factor)
    touched = F.max_pool2d(touched, kernel_size=3, stride=1, padding=1)
    return 1.0 + weight * touched


def checkpoint_uri_for(output_uri: str) -> str:
    """Where a training run keeps its resumable state: next to its output, removed once it is written."""
    return layout.checkpoint_folder(output_uri)


def save_checkpoint(
    uri: str,
    step: int,
    params: list[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    losses: list[float],
) -> None:
    """Everything needed to continue exactly where training stopped (tensors and plain values only)."""
    state = {
        "step": step,
        "params": [p.detach().cpu().clone() for p in params],
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": generator.get_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes_atomic(layout.checkpoint_file(uri), buffer.getvalue())


def load_checkpoint(uri: str) -> dict | None:
    """The last checkpoint under ``uri`` (loaded with ``weights_only=True``: no code runs), or None."""
    path = layout.checkpoint_file(uri)
    if not storage.exists(path):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True, map_location="cpu")


def remove_checkpoint(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _restore(state: dict, params, optimizer, lr_scheduler, scaler, generator) -> tuple[list[float], int]:
    with torch.no_grad():
        for param, saved in zip(params, state["params"], strict=True):
            param.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    return state["losses"].tolist(), int(state["step"]) + 1


def prepare_frozen(base: BaseComponents, runtime: TrainingRuntime) -> None:
    """Freeze VAE, text encoder and UNet and move them to the run's device and precision."""
    for module in (base.vae, base.text_encoder, base.unet):
        module.requires_grad_(False)
        to_device_and_dtype(module, runtime.device, runtime.dtype)


def to_device_and_dtype(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to`` that only casts when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def save_validation_image(checkpoint_uri: str, step: int, grid: np.ndarray) -> str:
    """Keep a validation grid with the run's resumable state (it survives a crash and a resume)."""
    uri = layout.validation_image(checkpoint_uri, step)
    storage.write_bytes_atomic(uri, encode_png(grid))
    log.info("validation grid at step %d: %s", step, uri)
    return uri


def copy_validation_images(checkpoint_uri: str, folder: str) -> list[str]:
    """Copy the run's validation grids into ``folder/validation``; return their relative paths."""
    fs, path = storage.filesystem(storage.join(checkpoint_uri, layout.VALIDATION_DIR))
    if not fs.exists(path):
        return []
    os.makedirs(os.path.join(folder, layout.VALIDATION_DIR), exist_ok=True)
    names = sorted(os.path.basename(f) for f in fs.ls(path, detail=False) if f.endswith(".png"))
    for name in names:
        with open(os.path.join(folder, layout.VALIDATION_DIR, name), "wb") as handle:
            handle.write(fs.cat_file(f"{path}/{name}"))
    return [f"{layout.VALIDATION_DIR}/{name}" for name in names]


def validation_due(config: TrainingConfig, step: int) -> bool:
    """Validate at the last step, and every ``validation_every`` steps when set."""
    if not config.validation_images:
        return False
    return step == config.steps or bool(config.validation_every and step % config.validation_every == 0)


def run_training(
    params: list[torch.nn.Parameter],
    config: TrainingConfig,
    n_items: int,
    step_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    desc: str,
    progress: Progress | None = None,
    checkpoint_uri: str | None = None,
    runtime: TrainingRuntime | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[float], float]:
    """AdamW over ``params`` for ``config.steps`` steps of ``step_fn(batch_index, generator) -> loss``.

    Each optimiser step accumulates ``gradient_accumulation_steps`` micro-batches under the
    runtime's autocast (with loss scaling at fp16). Batches are drawn with a seeded generator, so
    the same config trains the same weights. With ``checkpoint_uri``, state is saved every
    ``config.checkpoint_every`` steps and a rerun resumes from the last checkpoint, ending with
    the same weights as an uninterrupted run. ``on_step(step)`` runs after each step (validation).
    Returns the loss history and the seconds spent.
    """
    runtime = runtime or TrainingRuntime(torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps
    )
    scaler = runtime.grad_scaler()
    losses: list[float] = []
    first = 1
    if checkpoint_uri:  # under the stage's lock: no other writer; a killed write left at most a .tmp- file
        for stale in storage.remove_temporaries(checkpoint_uri):
            log.info("%s: removed a partial file of an interrupted write: %s", desc, stale)
    state = load_checkpoint(checkpoint_uri) if checkpoint_uri else None
    if state is not None:
        losses, first = _restore(state, params, optimizer, lr_scheduler, scaler, generator)
        log.info("%s: resuming from the checkpoint at step %d of %d", desc, first - 1, config.steps)
    started = time.perf_counter()
    report_every = max(1, config.steps // 10)
    accumulate = config.gradient_accumulation_steps
    for step in tqdm(range(first, config.steps + 1), desc=desc, disable=None, leave=False):
        step_loss = 0.0
        for _ in range(accumulate):
            stopping.check(f"{desc}, step {step}")  # a stop resumes from the last checkpoint
            index = torch.randint(0, n_items, (min(config.batch_size, n_items),), generator=generator)
            with runtime.autocast():
                loss = step_fn(index, generator)
            scaler.scale(loss / accumulate).backward()
            step_loss += float(loss.detach()) / accumulate
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if checkpoint_uri and config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(checkpoint_uri, step, params, optimizer, lr_scheduler, scaler, generator, losses)
        if on_step:
            on_step(step)
        if progress and (step % report_every == 0 or step == config.steps):
            window = losses[-report_every:]
            progress(step, config.steps, sum(window) / len(window))
    return losses, time.perf_counter() - started


def model_card(
    title: str,
    description: str,
    base_model: str,
    config: dict,
    data_fingerprint: str,
    losses: list[float],
    seconds: float,
    extra: str = "",
    validation: Sequence[str] = (),
) -> str:
    """A Hugging Face model card (``huggingface_hub.ModelCard``): its metadata from ``ModelCardData`` (library,
    base model, tags), its body the training config, data fingerprint and validation images."""
    tail = losses[-max(1, len(losses) // 10) :]
    images = [f"![{name}]({name})" for name in validation]
    body = "\n".join(
        [
            f"# {title}",
            "",
            description,
            "",
            f"- base model: `{base_model}`",
            f"- training data fingerprint: `{data_fingerprint}`",
            f"- steps: {len(losses)} in {seconds:.1f} s; final loss (mean of last 10%): {sum(tail) / len(tail):.4f}",
            extra,
            "",
            *(["## Validation", "", *images, ""] if images else []),
            "## Training config",
            "",
            "```json",
            json.dumps(config, indent=2, sort_keys=True),
            "```",
            "",
        ]
    )
    data = ModelCardData(library_name="diffusers", base_model=base_model, tags=["indusfactory", "text-to-image"])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_model_metadata(folder: str, card: str, training_config: dict, record_json: str) -> None:
    """Write the model card, the training config and, last, the stage record (the marker) next to the weights."""
    files = {
        layout.MODEL_CARD: card,
        layout.TRAINING_CONFIG: json.dumps(training_config, indent=2, sort_keys=True),
        layout.MODEL_RECORD: record_json,
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
