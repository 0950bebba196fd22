"""Stage 2, learn the condition: a ControlNet-style conditioning network, a trainable copy of the
concept-tuned UNet (``ControlNetModel.from_unet`` after fusing the concept LoRA), conditions the
frozen concept model on topological drivers, prompt ``an image of a [V] with a [class] crack``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel, DDPMScheduler

from indusfactory.config import FactoryConfig
from indusfactory.drivers.topology import extract_topological_driver
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.infra.imaging import fit_square, from_model_output, image_grid, to_condition_tensor, to_model_tensor
from indusfactory.layout import FactoryLayout, ModelFolder
from indusfactory.learning.controllability import probe_cases, sample_probe
from indusfactory.learning.models import (
    BaseComponents,
    assemble_pipeline,
    configure_torch,
    load_concept_pipeline,
    scheduler_for,
)
from indusfactory.learning.prompts import condition_prompt
from indusfactory.learning.training import (
    Progress,
    TrainingRuntime,
    copy_validation_images,
    diffusion_loss,
    encode_latents,
    encode_prompts,
    latent_mask_weights,
    model_card,
    noisy_inputs,
    prepare_frozen,
    remove_checkpoint,
    run_training,
    save_validation_image,
    to_device_and_dtype,
    validation_due,
    write_model_metadata,
)
from indusfactory.schema import CatalogRecord, ModelRecord, category_index, decode_image, rle_to_mask
from indusfactory.sources.catalog import read_catalog

log = logging.getLogger("indusfactory.condition")  # the name operators filter on, kept from the flat layout


def condition_fingerprint(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> str:
    return fingerprint(
        "condition",
        catalog.content_fingerprint,
        concept.fingerprint,
        config.base_model,
        config.concept.token,
        config.condition,
        config.driver,
        storage.normalise_uri(config.factory_root),
    )


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Channel widths of the driver encoder: one stride-2 stage per factor of 2 of the VAE."""
    stages = int(math.log2(vae_scale_factor))
    return (16, 32, 96, 256, 256, 256)[: stages + 1]


@dataclass
class ConditionExamples:
    """Annotated defective images at training resolution, with their drivers, union masks and prompts."""

    images: list[np.ndarray]
    drivers: list[np.ndarray]
    masks: list[np.ndarray]
    prompts: list[str]


def annotated_examples(config: FactoryConfig, catalog: CatalogRecord, split: str) -> ConditionExamples:
    """Every annotated defective image of ``split`` with its topological driver and prompt."""
    resolution = config.base_model.resolution
    to_class = category_index(catalog.categories)
    out = ConditionExamples([], [], [], [])
    for row in read_catalog(catalog.uri).to_pylist():
        if not (row["defective"] and row["split"] == split and row["instances"]):
            continue
        image = fit_square(decode_image(row["image"]["bytes"]), resolution)
        instances = [
            (to_class[i["category_id"]], fit_square(rle_to_mask(i["rle"]), resolution)) for i in row["instances"]
        ]
        out.images.append(image)
        out.drivers.append(extract_topological_driver(image, instances, config.driver))
        out.masks.append(np.logical_or.reduce([mask for _, mask in instances]))
        out.prompts.append(condition_prompt(config, [i["category"] for i in row["instances"]]))
    return out


def dihedral_views(array: np.ndarray, augmentation: str) -> list[np.ndarray]:
    """``array`` under the training augmentation: itself ('none'), + its mirror ('flip'), or the 8
    rotations and mirrors of the square ('dihedral'). Drivers, images and masks get the same views."""
    if augmentation == "none":
        return [array]
    if augmentation == "flip":
        return [array, array[:, ::-1]]
    return [np.rot90(a, k) for a in (array, array[:, ::-1]) for k in range(4)]


def training_examples(config: FactoryConfig, catalog: CatalogRecord) -> ConditionExamples:
    """The defective train split with drivers, masks and prompts, under ``condition.augmentation``."""
    ex = annotated_examples(config, catalog, "train")
    if not ex.images:
        raise BadInputError(f"catalog {catalog.uri} has no annotated defective image in its train split")
    views = config.condition.augmentation
    out = ConditionExamples([], [], [], [])
    for image, driver, mask, prompt in zip(ex.images, ex.drivers, ex.masks, ex.prompts):
        for parts in zip(dihedral_views(image, views), dihedral_views(driver, views), dihedral_views(mask, views)):
            out.images.append(np.ascontiguousarray(parts[0]))
            out.drivers.append(np.ascontiguousarray(parts[1]))
            out.masks.append(np.ascontiguousarray(parts[2]))
            out.prompts.append(prompt)
    return out


def validation_examples(config: FactoryConfig, catalog: CatalogRecord, count: int) -> ConditionExamples:
    """Up to ``count`` examples of the validation split (the train split when it has none)."""
    ex = annotated_examples(config, catalog, "val")
    if not ex.images:
        ex = annotated_examples(config, catalog, "train")
    return ConditionExamples(ex.images[:count], ex.drivers[:count], ex.masks[:count], ex.prompts[:count])


def probe_masks(config: FactoryConfig, catalog: CatalogRecord) -> tuple[list[tuple[int, str, np.ndarray]], str]:
    """Every instance mask of the validation split (the train split when it has none), with where they came from."""
    for split in ("val", "train"):
        masks = []
        to_class = category_index(catalog.categories)
        for row in read_catalog(catalog.uri).to_pylist():
            if row["defective"] and row["split"] == split:
                masks += [
                    (
                        to_class[i["category_id"]],
                        i["category"],
                        fit_square(rle_to_mask(i["rle"]), config.base_model.resolution),
                    )
                    for i in row["instances"]
                ]
        if masks:
            return masks, split
    return [], "none"


def defect_free_images(config: FactoryConfig, catalog: CatalogRecord, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` defect-free catalog images at training resolution (the condition never trains on them)."""
    rows = [r for r in read_catalog(catalog.uri).to_pylist() if not r["defective"]][:limit]
    return [fit_square(decode_image(r["image"]["bytes"]), config.base_model.resolution) for r in rows]


def control_pipeline(base: BaseComponents, controlnet: ControlNetModel, scheduler: str):
    return assemble_pipeline(base, scheduler_for(scheduler, base.noise_scheduler.config), controlnet)


@torch.no_grad()
def held_out_adherence(
    base: BaseComponents,
    controlnet: ControlNetModel,
    config: FactoryConfig,
    catalog: CatalogRecord,
    runtime: TrainingRuntime,
) -> dict:
    """Probe the trained network on defect-free images with validation masks; the summary as a dict."""
    count = config.condition.validation_probe_samples
    masks, split = probe_masks(config, catalog)
    images = defect_free_images(config, catalog, count)
    if not count or not masks or not images:
        return {}
    controlnet.eval()
    with runtime.autocast():
        result = sample_probe(
            control_pipeline(base, controlnet, config.generation.scheduler),
            config,
            probe_cases(images, masks, count, seed=config.condition.seed),
            lambda names: condition_prompt(config, names),
        )
    controlnet.train()
    summary = {**result.summary.as_dict(), "mask_split": split}
    log.info("held-out adherence of the conditioning network (%s masks): %s", split, result.summary.headline())
    return summary


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0), alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def condition_validation(
    base: BaseComponents,
    controlnet: ControlNetModel,
    config: FactoryConfig,
    examples: ConditionExamples,
    runtime: TrainingRuntime,
    checkpoint_uri: str,
):
    """Every validation step: a grid with one row per example, driver | generated | mask overlay."""
    c = config.condition

    @torch.no_grad()
    def on_step(step: int) -> None:
        if not validation_due(c, step) or not examples.images:
            return
        pipe = control_pipeline(base, controlnet, "dpmsolver++")
        controlnet.eval()
        resolution = config.base_model.resolution
        with runtime.autocast():
            out = pipe(
                examples.prompts,
                image=to_condition_tensor(examples.drivers).to(runtime.device),
                height=resolution,
                width=resolution,
                num_inference_steps=c.validation_inference_steps,
                controlnet_conditioning_scale=config.generation.conditioning_scale,
                generator=[torch.Generator().manual_seed(i) for i in range(len(examples.images))],
                output_type="np",
            )
        controlnet.train()
        tiles = []
        for driver, generated, mask in zip(examples.drivers, from_model_output(out.images), examples.masks):
            tiles += [(driver * 255).round().astype(np.uint8), generated, mask_overlay(generated, mask)]
        save_validation_image(checkpoint_uri, step, image_grid(tiles, columns=3))

    return on_step


def train_condition(
    config: FactoryConfig,
    catalog: CatalogRecord,
    concept: ModelRecord,
    output: ModelFolder | str,
    progress: Progress | None = None,
) -> ModelRecord:
    """Train the conditioning network into ``output`` (reused when already complete there): the folder
    ``condition_folder_for`` names, or any URI (the record's fingerprint is the network's all the same)."""
    target = (
        output
        if isinstance(output, ModelFolder)
        else ModelFolder(output, condition_fingerprint(config, catalog, concept))
    )
    output_uri, fp = target.uri, target.fingerprint
    done = ModelRecord.read_completed(target.marker)
    if done:
        return done
    configure_torch(config.execution)
    c = config.condition
    runtime = TrainingRuntime.for_stage(config.execution, c)
    examples = training_examples(config, catalog)
    images, drivers, prompts = examples.images, examples.drivers, examples.prompts
    with storage.local_copy_for_read(concept.uri) as concept_dir:
        pipe = load_concept_pipeline(config.base_model, concept_dir)
    base = BaseComponents(
        model_id=config.base_model.pretrained,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )
    prepare_frozen(base, runtime)
    latents = encode_latents(base, to_model_tensor(images))
    conditions = to_condition_tensor(drivers)
    mask_weights = latent_mask_weights(
        torch.from_numpy(np.stack(examples.masks))[:, None], base.vae_scale_factor, c.mask_loss_weight
    )
    unique_prompts = sorted(set(prompts)) + [""]
    embeds = encode_prompts(base, unique_prompts)
    prompt_index = torch.tensor([unique_prompts.index(p) for p in prompts])
    empty_index = len(unique_prompts) - 1
    torch.manual_seed(c.seed)  # the driver encoder is initialised at random
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=conditioning_channels_for(base.vae_scale_factor)
    )
    to_device_and_dtype(controlnet, runtime.device, torch.float32).train()
    if c.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()

    def step(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, target = noisy_inputs(
            base, latents.sample(index, generator).to(runtime.device), generator, c.noise_offset
        )
        which = prompt_index[index].clone()
        if c.empty_prompt_probability > 0:
            drop = torch.rand(len(index), generator=generator) < c.empty_prompt_probability
            which[drop] = empty_index
        hidden = embeds[which.to(embeds.device)]
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=hidden,
            controlnet_cond=conditions[index].to(runtime.device),
            return_dict=False,
        )
        prediction = base.unet(
            noisy, timesteps, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        return diffusion_loss(
            prediction,
            target,
            timesteps,
            base.noise_scheduler,
            c.snr_gamma,
            weights=mask_weights[index] if c.mask_loss_weight else None,
        )

    params = [p for p in controlnet.parameters() if p.requires_grad]
    checkpoint_uri = target.checkpoint
    on_step = condition_validation(
        base, controlnet, config, validation_examples(config, catalog, c.validation_images), runtime, checkpoint_uri
    )
    losses, seconds = run_training(
        params,
        c,
        len(images),
        step,
        "learn-condition",
        progress,
        checkpoint_uri=checkpoint_uri,
        runtime=runtime,
        on_step=on_step,
    )
    adherence = held_out_adherence(base, controlnet, config, catalog, runtime)
    with storage.local_copy_for_write(output_uri, markers=(target.marker_name,)) as folder:
        controlnet.save_pretrained(folder, safe_serialization=True)
        validation = copy_validation_images(checkpoint_uri, folder)
        record = ModelRecord(
            kind="condition",
            uri=output_uri,
            fingerprint=fp,
            base_model=config.base_model.pretrained,
            steps=c.steps,
            seconds=round(seconds, 2),
            method="controlnet",
            validation=validation,
            adherence=adherence,
            final_loss=round(float(np.mean(losses[-max(1, len(losses) // 10) :])), 5),
        )
        card = model_card(
            f"indusfactory conditioning network `{fp}`",
            "ControlNet-style conditioning network on topological drivers, trained on top of "
            f"concept `{concept.fingerprint}`; load with `ControlNetModel.from_pretrained` and use it "
            "in a `StableDiffusionControlNetPipeline` with the concept model. Validation grids: "
            "driver | generated | mask overlay.",
            config.base_model.pretrained,
            c.model_dump(mode="json"),
            catalog.content_fingerprint,
            losses,
            seconds,
            extra="\n".join([f"- example prompt: `{prompts[0]}`", *probe_card_lines(adherence)]),
            validation=validation,
        )
        write_model_metadata(
            folder,
            card,
            {
                "condition": c.model_dump(mode="json"),
                "driver": config.driver.model_dump(mode="json"),
                "concept_fingerprint": concept.fingerprint,
                "data_fingerprint": catalog.content_fingerprint,
                "losses": losses,
            },
            record.model_dump_json(exclude={"reused"}),
        )
    remove_checkpoint(checkpoint_uri)
    log.info("conditioning network trained in %.1f s, written to %s", seconds, output_uri)
    return record


def probe_card_lines(adherence: dict) -> list[str]:
    if not adherence:
        return ["- held-out adherence: not measured (no probe samples, masks or defect-free images)"]
    line = (
        f"- held-out adherence ({adherence['samples']} samples, defect-free images with {adherence['mask_split']}"
        f"-split masks): **{adherence['verdict']}**, median label AUC {adherence['median_auc']:.3f} vs chance "
        f"{adherence['chance_auc']:.3f}, {adherence['fraction_darker']:.0%} darker inside the mask"
    )
    if adherence["verdict"] != "follows labels":
        line += (
            "\n\n> **Warning**: this network does not put defects where the masks say; datasets made with it "
            "will have labels that do not match their images."
        )
    return [line]


def condition_folder_for(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> ModelFolder:
    """The conditioning network's folder under the factory root, with its fingerprint."""
    return FactoryLayout.of(config.factory_root).model("condition", condition_fingerprint(config, catalog, concept))


def condition_uri_for(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> str:
    return condition_folder_for(config, catalog, concept).uri
