"""Loading models: the base Stable Diffusion 1.x pipeline, the concept LoRA and the conditioning
network, always through diffusers/transformers ``from_pretrained`` and always from safetensors.

The same code loads the tiny model shipped with the package, a local SD 1.5 folder or a hub id.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextModel, CLIPTokenizer

from indusfactory.config import EMBEDDED_BASE_MODEL, BaseModelConfig, ExecutionConfig
from indusfactory.infra.devices import generation_devices
from indusfactory.infra.errors import ModelLoadError
from indusfactory.infra.imaging import to_model_tensor

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def embedded_model_path() -> Path:
    """The tiny pretrained SD 1.x pipeline shipped inside the package."""
    return Path(str(resources.files("indusfactory") / "assets" / "tiny-sd"))


def resolve_base_model(pretrained: str) -> str:
    """A local folder or hub id for ``from_pretrained``; local folders are checked for every component."""
    if pretrained == EMBEDDED_BASE_MODEL:
        path = embedded_model_path()
    elif os.path.isdir(os.path.expanduser(pretrained)) or pretrained.startswith((".", "/", "~")):
        path = Path(pretrained).expanduser()
    else:
        return pretrained  # a hub id; from_pretrained resolves it (or fails offline with a clear error)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"base model {path} is not a diffusers pipeline folder: model_index.json is missing")
    missing = [c for c in PIPELINE_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"base model {path} is missing the component folder(s) {', '.join(missing)}")
    return str(path.resolve())


def refuse_pickle_weights(folder: str | Path, components: tuple[str, ...] = WEIGHT_COMPONENTS) -> None:
    """Refuse a local model whose weights exist only as pickles (.bin/.ckpt/.pt/.pth): loading a
    pickle can run code. Set ``base_model.allow_pickle_weights`` to load them (with weights_only)."""
    for component in components:
        part = Path(folder) / component
        if not part.is_dir() or any(part.glob("*.safetensors")):
            continue
        pickles = sorted(f.name for f in part.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{part} holds only pickle weights ({', '.join(pickles)}); indusfactory loads "
                "safetensors only. Convert them, or set base_model.allow_pickle_weights: true "
                "for a source you trust"
            )


def base_model_fingerprint(config: BaseModelConfig) -> dict:
    """What identifies the base model's weights: for a local folder a hash of every config file and
    weight file in it (so a changed folder trains again); for a hub id the id and revision."""
    model_id = resolve_base_model(config.pretrained)
    path = Path(model_id)
    if not path.is_dir():
        return {"hub_id": model_id, "revision": config.revision}
    return {"files": _folder_digest(str(path.resolve()))}


@lru_cache(maxsize=8)
def _folder_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file() and file.suffix in (".json", ".txt", ".safetensors"):
            digest.update(str(file.relative_to(folder)).encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def select_device(execution: ExecutionConfig) -> torch.device:
    """The training device: the first of the devices ``execution`` names (see ``generation_devices``)."""
    return generation_devices(execution)[0]


def select_dtype(execution: ExecutionConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, fp16 otherwise, unless the config says."""
    if execution.precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[execution.precision]


def configure_torch(execution: ExecutionConfig) -> None:
    if execution.torch_threads:
        torch.set_num_threads(execution.torch_threads)


@dataclass
class BaseComponents:
    """The parts of an SD 1.x pipeline that training needs."""

    model_id: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load(what: str, model_id: str, fn):
    try:
        return fn()
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"could not load the {what} of base model {model_id}: {exc}") from exc


def _use_safetensors(config: BaseModelConfig, model_id: str) -> bool | None:
    """True (safetensors only) unless pickles are allowed; local pickle-only folders are refused by name."""
    if config.allow_pickle_weights:
        return None
    if Path(model_id).is_dir():
        refuse_pickle_weights(model_id)
    return True


def load_base_components(config: BaseModelConfig) -> BaseComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler from safetensors."""
    model_id = resolve_base_model(config.pretrained)
    kw = {"revision": config.revision} if config.revision else {}
    safe = {"use_safetensors": _use_safetensors(config, model_id), **kw}
    return BaseComponents(
        model_id=model_id,
        tokenizer=_load(
            "tokenizer", model_id, lambda: CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kw)
        ),
        text_encoder=_load(
            "text encoder", model_id, lambda: CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **safe)
        ),
        vae=_load("VAE", model_id, lambda: AutoencoderKL.from_pretrained(model_id, subfolder="vae", **safe)),
        unet=_load("UNet", model_id, lambda: UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", **safe)),
        noise_scheduler=_load(
            "scheduler", model_id, lambda: DDPMScheduler.from_pretrained(model_id, subfolder="scheduler", **kw)
        ),
    )


def load_concept_pipeline(config: BaseModelConfig, concept_dir: str) -> StableDiffusionPipeline:
    """The base pipeline with the concept in it (the paper's concept model).

    A LoRA concept (``pytorch_lora_weights.safetensors``) is fused into the UNet (and text
    encoder when it was trained); a fully fine-tuned concept replaces them (``unet/``,
    ``text_encoder/`` subfolders).
    """
    model_id = resolve_base_model(config.pretrained)
    kw = {"revision": config.revision} if config.revision else {}
    folder = Path(concept_dir)
    replaced = {}
    if (folder / "unet").is_dir():
        replaced["unet"] = _load(
            "fine-tuned UNet",
            str(folder),
            lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True),
        )
    if (folder / "text_encoder").is_dir():
        replaced["text_encoder"] = _load(
            "fine-tuned text encoder",
            str(folder),
            lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True),
        )
    pipe = _load(
        "pipeline",
        model_id,
        lambda: StableDiffusionPipeline.from_pretrained(
            model_id,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=_use_safetensors(config, model_id),
            **replaced,
            **kw,
        ),
    )
    if replaced:
        return pipe
    if not (folder / LORA_WEIGHTS).is_file():
        raise ModelLoadError(f"concept {concept_dir} holds neither {LORA_WEIGHTS} nor a unet/ folder")
    try:
        pipe.load_lora_weights(concept_dir, weight_name=LORA_WEIGHTS)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"concept LoRA {concept_dir} does not fit base model {model_id}: {exc}") from exc
    _check_every_lora_layer_applied(pipe, folder / LORA_WEIGHTS, model_id)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def _check_every_lora_layer_applied(pipe: StableDiffusionPipeline, weights: Path, model_id: str) -> None:
    """diffusers skips LoRA keys that name no module of the model; a LoRA made for another
    architecture would load as (almost) nothing, so compare the layers in the file with those applied."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        in_file = sum(1 for k in keys if k.startswith(prefix) and ("lora_A" in k or "lora.down" in k))
        applied = sum(1 for n, _ in module.named_parameters() if "lora_A" in n)
        if in_file and applied < in_file:
            raise ModelLoadError(
                f"concept LoRA {weights} has {in_file} {prefix.rstrip('.')} layers but only {applied} "
                f"match base model {model_id}: it was made for another architecture"
            )


def scheduler_for(name: str, config: dict):
    """A sampling scheduler built from the base model's scheduler config (``generation.scheduler``)."""
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "dpmsolver++-karras":  # DPM-Solver++ 2M with Karras sigmas
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return EulerDiscreteScheduler.from_config(config)


def load_generation_pipeline(
    config: BaseModelConfig, concept_dir: str, condition_dir: str, scheduler: str
) -> StableDiffusionControlNetPipeline:
    """Concept model (base + fused LoRA) conditioned by the trained conditioning network."""
    concept = load_concept_pipeline(config, concept_dir)
    try:
        controlnet = ControlNetModel.from_pretrained(condition_dir, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"conditioning network {condition_dir} cannot be loaded: {exc}") from exc
    return assemble_pipeline(concept, scheduler_for(scheduler, concept.scheduler.config), controlnet)


def assemble_pipeline(parts, scheduler, controlnet: ControlNetModel | None = None):
    """A quiet SD 1.x pipeline over loaded components (``parts`` has vae, text_encoder, tokenizer and unet):
    text-to-image, or conditioned by ``controlnet``."""
    common = dict(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if controlnet is None:
        pipe = StableDiffusionPipeline(**common)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guided_steps(steps: int, cutoff: float) -> int:
    """How many of ``steps`` sampling steps use classifier-free guidance for ``generation.guidance_cutoff``."""
    return min(steps, max(0, int(cutoff * steps + 0.5)))


class GuidanceCutoff:
    """A ``callback_on_step_end`` that turns classifier-free guidance off after the first ``guided`` steps
    (diffusers' dynamic classifier-free guidance): the pipeline's guidance scale drops to 1, so the later steps
    run the conditional pass only, and the batched tensors of the two passes (prompt embeddings, and the
    conditioning network's driver) keep their conditional half."""

    def __init__(self, guided: int):
        self.guided = guided

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        if step + 1 == self.guided:
            pipe._guidance_scale = 1.0  # do_classifier_free_guidance is guidance_scale > 1
            for name in ("prompt_embeds", "image"):
                if name in tensors:
                    tensors[name] = tensors[name].chunk(2)[1]  # [unconditional, conditional]
        return tensors


def guidance_kwargs(pipe, guidance_scale: float, cutoff: float, steps: int) -> dict:
    """The pipeline-call arguments of ``generation.guidance_scale`` and ``generation.guidance_cutoff``:
    guidance at every step (cut-off 1, or no guidance: the plain call, same bytes as ever), at none
    (cut-off 0: scale 1), or in the first steps only (a ``GuidanceCutoff`` callback)."""
    guided = guided_steps(steps, cutoff)
    if guidance_scale <= 1 or guided >= steps:
        return {"guidance_scale": guidance_scale}
    if guided == 0:
        return {"guidance_scale": 1.0}
    return {
        "guidance_scale": guidance_scale,
        "callback_on_step_end": GuidanceCutoff(guided),
        "callback_on_step_end_tensor_inputs": [
            name for name in ("prompt_embeds", "image") if name in pipe._callback_tensor_inputs
        ],
    }


def start_latents(
    pipe, signal_leak: str, images: list[np.ndarray], generators: list[torch.Generator], steps: int
) -> torch.Tensor | None:
    """The latents sampling starts from: ``None`` (the pipeline draws pure noise) or, for
    ``signal_leak: source_mean``, ``leaked_latents`` of ``images``."""
    return leaked_latents(pipe, images, generators, steps) if signal_leak == "source_mean" else None


@torch.no_grad()
def leaked_latents(pipe, images: list[np.ndarray], generators: list[torch.Generator], steps: int) -> torch.Tensor:
    """Initial latents for ``generation.signal_leak: source_mean``: each row's noise plus the mean latent of its
    source image, noised to the first timestep (what every training example looked like there).

    Each image is encoded alone and each row draws its noise from its own generator, so a row's latents do
    not depend on its batch. Call it under the pipeline's sampling lock (it sets the scheduler's timesteps).
    """
    device, dtype = pipe.unet.device, pipe.unet.dtype
    vae = pipe.vae
    means = (
        torch.cat(
            [
                vae.encode(to_model_tensor([image]).to(device, vae.dtype))
                .latent_dist.mean.float()
                .mean(dim=(2, 3), keepdim=True)
                for image in images
            ]
        )
        * vae.config.scaling_factor
    )
    shape = (
        1,
        pipe.unet.config.in_channels,
        images[0].shape[0] // pipe.vae_scale_factor,
        images[0].shape[1] // pipe.vae_scale_factor,
    )
    noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)
    pipe.scheduler.set_timesteps(steps, device=device)
    first = pipe.scheduler.timesteps[:1].repeat(len(images))
    latents = pipe.scheduler.add_noise(means.expand_as(noise), noise, first) / pipe.scheduler.init_noise_sigma
    return latents.to(dtype)
