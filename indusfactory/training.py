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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from indusfactory import storage
from indusfactory.config import TrainingConfig
from indusfactory.models import BaseComponents

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, total_steps, loss)`` every few steps."""


@dataclass
class LatentCache:
    """VAE posterior moments of every training image, already multiplied by the scaling factor."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


@torch.no_grad()
def encode_latents(base: BaseComponents, pixels: torch.Tensor, batch_size: int = 16) -> LatentCache:
    """Encode images in [-1, 1] once; keep mean and std of each latent."""
    scale = base.vae.config.scaling_factor
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = base.vae.encode(pixels[start : start + batch_size]).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return LatentCache(torch.cat(means), torch.cat(stds))


@torch.no_grad()
def encode_prompts(base: BaseComponents, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states of each prompt, padded to the tokenizer's maximum length."""
    tokens = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return base.text_encoder(tokens.input_ids)[0]


def noisy_inputs(base: BaseComponents, latents: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise the latents at random timesteps; return (noisy latents, timesteps, regression target)."""
    scheduler = base.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def checkpoint_uri_for(output_uri: str) -> str:
    """Where a training run keeps its resumable state: next to its output, removed once it is written."""
    return output_uri.rstrip("/") + ".checkpoint"


def save_checkpoint(uri: str, step: int, params: list[torch.nn.Parameter], optimizer, lr_scheduler,
                    generator: torch.Generator, losses: list[float]) -> None:
    """Everything needed to continue exactly where training stopped (tensors and plain values only)."""
    state = {"step": step, "params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "generator": generator.get_state(),
             "losses": torch.tensor(losses, dtype=torch.float64)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes_atomic(storage.join(uri, CHECKPOINT_FILE), buffer.getvalue())


def load_checkpoint(uri: str) -> dict | None:
    """The last checkpoint under ``uri`` (loaded with ``weights_only=True``: no code runs), or None."""
    path = storage.join(uri, CHECKPOINT_FILE)
    if not storage.exists(path):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)


def remove_checkpoint(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def run_training(params: list[torch.nn.Parameter], config: TrainingConfig, n_items: int,
                 step_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], desc: str,
                 progress: Progress | None = None, checkpoint_uri: str | None = None) -> tuple[list[float], float]:
    """AdamW over ``params`` for ``config.steps`` steps of ``step_fn(batch_index, generator) -> loss``.

    Batches are drawn with a seeded generator, so the same config trains the same weights. With
    ``checkpoint_uri``, state is saved every ``config.checkpoint_every`` steps and a rerun resumes
    from the last checkpoint, ending with the same weights as an uninterrupted run.
    Returns the loss history and the seconds spent.
    """
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
    losses: list[float] = []
    first = 1
    state = load_checkpoint(checkpoint_uri) if checkpoint_uri else None
    if state is not None:
        with torch.no_grad():
            for param, saved in zip(params, state["params"], strict=True):
                param.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        generator.set_state(state["generator"])
        losses, first = state["losses"].tolist(), int(state["step"]) + 1
        log.info("%s: resuming from the checkpoint at step %d of %d", desc, first - 1, config.steps)
    started = time.perf_counter()
    report_every = max(1, config.steps // 10)
    for step in tqdm(range(first, config.steps + 1), desc=desc, disable=None, leave=False):
        index = torch.randint(0, n_items, (min(config.batch_size, n_items),), generator=generator)
        loss = step_fn(index, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if checkpoint_uri and config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(checkpoint_uri, step, params, optimizer, lr_scheduler, generator, losses)
        if progress and (step % report_every == 0 or step == config.steps):
            window = losses[-report_every:]
            progress(step, config.steps, sum(window) / len(window))
    return losses, time.perf_counter() - started


def model_card(title: str, description: str, base_model: str, config: dict, data_fingerprint: str,
               losses: list[float], seconds: float, extra: str = "") -> str:
    """A Hugging Face style model card with the training config and data fingerprint."""
    tail = losses[-max(1, len(losses) // 10):]
    return "\n".join([
        "---", "library_name: diffusers", f"base_model: {base_model}", "tags:", "- indusfactory",
        "- text-to-image", "---", "", f"# {title}", "", description, "",
        f"- base model: `{base_model}`", f"- training data fingerprint: `{data_fingerprint}`",
        f"- steps: {len(losses)} in {seconds:.1f} s; final loss (mean of last 10%): {sum(tail) / len(tail):.4f}",
        extra, "", "## Training config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
    ])


def write_model_metadata(folder: str, card: str, training_config: dict, record_json: str, record_file: str) -> None:
    """Write the model card, the training config and the stage record next to the weights."""
    files = {"README.md": card, "training_config.json": json.dumps(training_config, indent=2, sort_keys=True),
             record_file: record_json}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
