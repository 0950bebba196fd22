"""Stage 1, learn the concept: DreamBooth on the defective training images, prompt ``an image of
a [V]``. LoRA (peft) by default, writing a diffusers-format LoRA that ``pipe.load_lora_weights``
reads in a plain ``StableDiffusionPipeline``; full UNet fine-tuning (the paper's choice) as an
option, writing ``unet/`` (and ``text_encoder/`` when trained) in diffusers layout. Optional
text-encoder training and class-prior preservation with cached class images.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from indusfactory.config import FactoryConfig
from indusfactory.generation.adherence import colourfulness
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.infra.imaging import fit_square, from_model_output, image_grid, to_model_tensor
from indusfactory.layout import ClassImagesFolder, FactoryLayout, ModelFolder
from indusfactory.learning.models import (
    BaseComponents,
    assemble_pipeline,
    base_model_fingerprint,
    configure_torch,
    leaked_latents,
    load_base_components,
)
from indusfactory.learning.prompts import concept_prompt
from indusfactory.learning.training import (
    LatentCache,
    Progress,
    TrainingRuntime,
    copy_validation_images,
    diffusion_loss,
    encode_latents,
    encode_prompts,
    model_card,
    noisy_inputs,
    prepare_frozen,
    remove_checkpoint,
    run_training,
    save_validation_image,
    to_device_and_dtype,
    tokenize,
    validation_due,
    write_model_metadata,
)
from indusfactory.schema import CatalogRecord, ModelRecord, decode_image, encode_png
from indusfactory.sources.catalog import read_catalog

log = logging.getLogger("indusfactory.concept")  # the name operators filter on, kept from the flat layout


def concept_fingerprint(config: FactoryConfig, catalog: CatalogRecord) -> str:
    return fingerprint(
        "concept",
        catalog.content_fingerprint,
        config.base_model,
        base_model_fingerprint(config.base_model),
        config.concept,
        storage.normalise_uri(config.factory_root),
    )


def class_prompt(config: FactoryConfig) -> str:
    return config.concept.class_prompt_template.format(class_noun=config.concept.class_noun)


def training_images(catalog_uri: str, resolution: int) -> list[np.ndarray]:
    """Defective images of the train split, square at ``resolution``, plus their mirror images."""
    table = read_catalog(catalog_uri).to_pylist()
    images = [
        fit_square(decode_image(r["image"]["bytes"]), resolution)
        for r in table
        if r["defective"] and r["split"] == "train"
    ]
    if not images:
        raise BadInputError(f"catalog {catalog_uri} has no defective image in its train split")
    return images + [img[:, ::-1] for img in images]


def validate(config: FactoryConfig) -> None:
    if config.base_model.resolution % 8:
        raise BadInputError(f"base_model.resolution must be divisible by 8, got {config.base_model.resolution}")


def sampling_pipeline(base: BaseComponents) -> StableDiffusionPipeline:
    """A text-to-image pipeline over the live training components (DPM-Solver++ sampling)."""
    return assemble_pipeline(base, DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config))


@torch.no_grad()
def sample_images(
    base: BaseComponents,
    runtime: TrainingRuntime,
    prompt: str,
    seeds: list[int],
    resolution: int,
    steps: int,
    leak_from: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """One uint8 image per seed for ``prompt``, from the components as they are now; with ``leak_from``,
    sampling starts as ``generation.signal_leak: source_mean`` does, from these images in turn."""
    pipe = sampling_pipeline(base)
    was_training = base.unet.training
    base.unet.eval()
    images: list[np.ndarray] = []
    for start in range(0, len(seeds), 8):
        chunk = seeds[start : start + 8]
        generators = [torch.Generator().manual_seed(s) for s in chunk]
        with runtime.autocast():
            latents = None
            if leak_from:
                sources = [leak_from[(start + i) % len(leak_from)] for i in range(len(chunk))]
                latents = leaked_latents(pipe, sources, generators, steps)
            out = pipe(
                prompt,
                num_images_per_prompt=len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                generator=generators,
                latents=latents,
                output_type="np",
            )
        images.extend(from_model_output(out.images))
    base.unet.train(was_training)
    return images


LOOK_SAMPLES = 8
"""Images the trained concept generates to compare its look with its training images."""


def look_of(images: list[np.ndarray]) -> dict:
    """Colourfulness (median per-pixel RGB spread) and mean colour of a set of uint8 images."""
    return {
        "colourfulness": round(float(np.median([colourfulness(i) for i in images])), 2),
        "mean_rgb": np.mean([i.reshape(-1, 3).mean(axis=0) for i in images], axis=0).round(1).tolist(),
    }


def concept_look(
    base: BaseComponents, config: FactoryConfig, runtime: TrainingRuntime, images: list[np.ndarray]
) -> dict:
    """Does the concept reproduce the look of its data (grey sources give grey images)? Samples (at the
    generation's step count and start) vs the training images."""
    leak = images if config.generation.signal_leak == "source_mean" else None
    generated = sample_images(
        base,
        runtime,
        concept_prompt(config),
        list(range(LOOK_SAMPLES)),
        config.base_model.resolution,
        config.generation.steps,
        leak_from=leak,
    )
    look = {"generated": look_of(generated), "sources": look_of(images)}
    gap = abs(look["generated"]["colourfulness"] - look["sources"]["colourfulness"])
    look["colourfulness_gap"] = round(gap, 2)
    log.info(
        "concept look: colourfulness %.1f (sources %.1f), mean RGB %s (sources %s)",
        look["generated"]["colourfulness"],
        look["sources"]["colourfulness"],
        look["generated"]["mean_rgb"],
        look["sources"]["mean_rgb"],
    )
    return look


def class_images_folder_for(config: FactoryConfig) -> ClassImagesFolder:
    """The prior-preservation images of the concept's class prompt: one folder per base model, prompt and count."""
    c = config.concept
    fp = fingerprint(
        "class-images",
        base_model_fingerprint(config.base_model),
        config.base_model,
        class_prompt(config),
        c.num_class_images,
        c.class_image_inference_steps,
        c.seed,
        config.execution.precision if c.precision == "auto" else c.precision,
    )
    return FactoryLayout.of(config.factory_root).class_images(fp)


def class_images_uri_for(config: FactoryConfig) -> str:
    return class_images_folder_for(config).uri


def class_prior_images(config: FactoryConfig, base: BaseComponents, runtime: TrainingRuntime) -> list[np.ndarray]:
    """Images the base model makes for the class prompt, generated once and cached on storage."""
    found = class_images_folder_for(config)
    uri = found.uri
    c = config.concept
    names = [f"class-{i:05d}.png" for i in range(c.num_class_images)]
    if storage.exists(found.marker):
        log.info("class-prior images reused from %s", uri)
        return [decode_image(storage.read_bytes(found.file(n))) for n in names]
    prompt = class_prompt(config)
    log.info("generating %d class-prior images for %r", c.num_class_images, prompt)
    images = sample_images(
        base,
        runtime,
        prompt,
        [c.seed * 100_003 + i for i in range(c.num_class_images)],
        config.base_model.resolution,
        c.class_image_inference_steps,
    )
    with storage.local_copy_for_write(uri, markers=(found.marker_name,)) as folder:
        for name, image in zip(names, images):
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(encode_png(image))
        with open(os.path.join(folder, found.marker_name), "w", encoding="utf-8") as handle:
            handle.write(f'{{"prompt": "{prompt}", "images": {len(images)}}}\n')
    return images


def attach_trainable(base: BaseComponents, config: FactoryConfig) -> list[torch.nn.Parameter]:
    """Make the trained parts trainable (LoRA adapters or all weights, fp32) and return their parameters."""
    c = config.concept
    modules = [base.unet] + ([base.text_encoder] if c.train_text_encoder else [])
    torch.manual_seed(c.seed)  # LoRA init is random: the same config must train the same weights
    if c.method == "lora":
        base.unet.add_adapter(
            LoraConfig(
                r=c.lora_rank,
                lora_alpha=c.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=c.lora_target_modules,
            )
        )
        if c.train_text_encoder:
            base.text_encoder.add_adapter(
                LoraConfig(
                    r=c.lora_rank,
                    lora_alpha=c.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=c.text_encoder_lora_target_modules,
                )
            )
        cast_training_params(modules, dtype=torch.float32)
    else:
        for module in modules:
            to_device_and_dtype(module, next(module.parameters()).device, torch.float32).requires_grad_(True)
    if c.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if c.train_text_encoder:
            base.text_encoder.gradient_checkpointing_enable()
    for module in modules:
        module.train()
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def concept_step(
    base: BaseComponents,
    config: FactoryConfig,
    latents: LatentCache,
    class_latents: LatentCache | None,
    runtime: TrainingRuntime,
):
    """The DreamBooth loss of one micro-batch: instance loss (+ weighted class-prior loss)."""
    c = config.concept
    prompts = [concept_prompt(config)] + ([class_prompt(config)] if class_latents is not None else []) + [""]
    token_ids = tokenize(base, prompts)
    cached_embeds = None if c.train_text_encoder else encode_prompts(base, prompts)
    empty = len(prompts) - 1

    def step(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(index)
        parts = [latents.sample(index, generator)]
        which = torch.zeros(n, dtype=torch.long)
        if c.empty_prompt_probability > 0:  # the unconditional branch of guidance learns the data's look too
            which[torch.rand(n, generator=generator) < c.empty_prompt_probability] = empty
        if class_latents is not None:
            parts.append(
                class_latents.sample(torch.randint(0, len(class_latents), (n,), generator=generator), generator)
            )
            which = torch.cat([which, torch.ones(n, dtype=torch.long)])
        batch = torch.cat(parts).to(runtime.device)
        noisy, timesteps, target = noisy_inputs(base, batch, generator, c.noise_offset)
        embeds = cached_embeds if cached_embeds is not None else base.text_encoder(token_ids)[0]
        hidden = embeds[which.to(embeds.device)]
        prediction = base.unet(noisy, timesteps, hidden).sample
        loss = diffusion_loss(prediction[:n], target[:n], timesteps[:n], base.noise_scheduler, c.snr_gamma)
        if class_latents is not None:
            loss = loss + c.prior_loss_weight * diffusion_loss(
                prediction[n:], target[n:], timesteps[n:], base.noise_scheduler, c.snr_gamma
            )
        return loss

    return step


def concept_validation(base: BaseComponents, config: FactoryConfig, runtime: TrainingRuntime, checkpoint_uri: str):
    """Every validation step: a grid of the instance prompt (and the class prompt with prior preservation)."""
    c = config.concept
    seeds = list(range(c.validation_images))
    prompts = [concept_prompt(config)] + ([class_prompt(config)] if c.prior_preservation else [])

    def on_step(step: int) -> None:
        if not validation_due(c, step):
            return
        rows = [
            sample_images(base, runtime, p, seeds, config.base_model.resolution, c.validation_inference_steps)
            for p in prompts
        ]
        grid = image_grid([img for row in rows for img in row], columns=len(seeds))
        save_validation_image(checkpoint_uri, step, grid)

    return on_step


def train_concept(
    config: FactoryConfig, catalog: CatalogRecord, output: ModelFolder | str, progress: Progress | None = None
) -> ModelRecord:
    """Train the concept into ``output`` (reused when already complete there): the folder ``concept_folder_for``
    names, or any URI (the record's fingerprint is then the concept's fingerprint all the same)."""
    target = output if isinstance(output, ModelFolder) else ModelFolder(output, concept_fingerprint(config, catalog))
    output_uri, fp = target.uri, target.fingerprint
    done = ModelRecord.read_completed(target.marker)
    if done:
        return done
    validate(config)
    configure_torch(config.execution)
    c = config.concept
    runtime = TrainingRuntime.for_stage(config.execution, c)
    images = training_images(catalog.uri, config.base_model.resolution)
    base = load_base_components(config.base_model)
    prepare_frozen(base, runtime)
    class_latents = None
    if c.prior_preservation:
        class_latents = encode_latents(base, to_model_tensor(class_prior_images(config, base, runtime)))
    latents = encode_latents(base, to_model_tensor(images))
    params = attach_trainable(base, config)
    checkpoint_uri = target.checkpoint
    losses, seconds = run_training(
        params,
        c,
        len(images),
        concept_step(base, config, latents, class_latents, runtime),
        "learn-concept",
        progress,
        checkpoint_uri=checkpoint_uri,
        runtime=runtime,
        on_step=concept_validation(base, config, runtime, checkpoint_uri),
    )
    look = concept_look(base, config, runtime, images)
    with storage.local_copy_for_write(output_uri, markers=(target.marker_name,)) as folder:
        save_concept_weights(base, config, folder)
        validation = copy_validation_images(checkpoint_uri, folder)
        record = ModelRecord(
            kind="concept",
            uri=output_uri,
            fingerprint=fp,
            base_model=config.base_model.pretrained,
            steps=c.steps,
            seconds=round(seconds, 2),
            method=c.method,
            validation=validation,
            look=look,
            final_loss=round(float(np.mean(losses[-max(1, len(losses) // 10) :])), 5),
        )
        how = (
            "`pipe.load_lora_weights(folder)` in a `StableDiffusionPipeline` of the base model"
            if c.method == "lora"
            else "`UNet2DConditionModel.from_pretrained(folder, subfolder='unet')` "
            "passed as `unet=` to the base model's `StableDiffusionPipeline.from_pretrained`"
        )
        card = model_card(
            f"indusfactory concept `{fp}`",
            f"DreamBooth ({c.method}) of the defective concept, prompt `{concept_prompt(config)}`. Load with {how}.",
            config.base_model.pretrained,
            c.model_dump(mode="json"),
            catalog.content_fingerprint,
            losses,
            seconds,
            validation=validation,
            extra=(
                f"- look ({LOOK_SAMPLES} samples vs the training images): colourfulness "
                f"{look['generated']['colourfulness']} vs {look['sources']['colourfulness']}, "
                f"mean RGB {look['generated']['mean_rgb']} vs {look['sources']['mean_rgb']}"
            ),
        )
        write_model_metadata(
            folder,
            card,
            {
                "concept": c.model_dump(mode="json"),
                "base_model": config.base_model.model_dump(mode="json"),
                "data_fingerprint": catalog.content_fingerprint,
                "losses": losses,
            },
            record.model_dump_json(exclude={"reused"}),
        )
    remove_checkpoint(checkpoint_uri)
    log.info("concept (%s) trained in %.1f s, written to %s", c.method, seconds, output_uri)
    return record


def save_concept_weights(base: BaseComponents, config: FactoryConfig, folder: str) -> None:
    """LoRA: one diffusers-format safetensors file; full: ``unet/`` (+ ``text_encoder/``) in fp32."""
    c = config.concept
    if c.method == "lora":
        unet_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
        text_lora = (
            convert_state_dict_to_diffusers(get_peft_model_state_dict(base.text_encoder))
            if c.train_text_encoder
            else None
        )
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_lora, text_encoder_lora_layers=text_lora, safe_serialization=True
        )
        return
    base.unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    if c.train_text_encoder:
        base.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)


def concept_folder_for(config: FactoryConfig, catalog: CatalogRecord) -> ModelFolder:
    """The concept's folder under the factory root, with its fingerprint."""
    return FactoryLayout.of(config.factory_root).model("concept", concept_fingerprint(config, catalog))


def concept_uri_for(config: FactoryConfig, catalog: CatalogRecord) -> str:
    return concept_folder_for(config, catalog).uri
