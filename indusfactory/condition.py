"""Stage 2, learn the condition: a ControlNet-style conditioning network, a trainable copy of the
concept-tuned UNet (``ControlNetModel.from_unet`` after fusing the concept LoRA), conditions the
frozen concept model on topological drivers, prompt ``an image of a [V] with a [class] crack``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from diffusers import ControlNetModel, DDPMScheduler

from indusfactory import storage
from indusfactory.config import FactoryConfig
from indusfactory.drivers import extract_topological_driver
from indusfactory.errors import BadInputError
from indusfactory.fingerprint import fingerprint
from indusfactory.imaging import fit_square, to_condition_tensor, to_model_tensor
from indusfactory.ingest import read_catalog
from indusfactory.models import BaseComponents, configure_torch, load_concept_pipeline
from indusfactory.schema import CatalogRecord, ModelRecord, category_index, decode_image, rle_to_mask
from indusfactory.training import (
    checkpoint_uri_for,
    remove_checkpoint,
    Progress,
    diffusion_loss,
    encode_latents,
    encode_prompts,
    model_card,
    noisy_inputs,
    run_training,
    write_model_metadata,
)

log = logging.getLogger(__name__)
RECORD_FILE = "record.json"


def condition_fingerprint(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> str:
    return fingerprint("condition", catalog.content_fingerprint, concept.fingerprint, config.base_model,
                       config.concept.token,
                       config.condition.model_dump(mode="json", exclude={"checkpoint_every"}), config.driver, storage.normalise_uri(config.factory_root))


def condition_prompt(config: FactoryConfig, class_names: list[str]) -> str:
    """``an image of a [V] with a [class] crack``; several classes are joined with 'and'."""
    classes = " and ".join(dict.fromkeys(class_names))
    return config.condition.prompt_template.format(token=config.concept.token, classes=classes)


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Channel widths of the driver encoder: one stride-2 stage per factor of 2 of the VAE."""
    stages = int(math.log2(vae_scale_factor))
    return (16, 32, 96, 256, 256, 256)[: stages + 1]


def training_examples(config: FactoryConfig, catalog: CatalogRecord) -> tuple[list, list, list[str]]:
    """(images, drivers, prompts) of the defective train split, each also mirrored."""
    resolution = config.base_model.resolution
    to_class = category_index(catalog.categories)
    images, drivers, prompts = [], [], []
    for row in read_catalog(catalog.uri).to_pylist():
        if not (row["defective"] and row["split"] == "train" and row["instances"]):
            continue
        image = fit_square(decode_image(row["image"]["bytes"]), resolution)
        instances = [(to_class[i["category_id"]], fit_square(rle_to_mask(i["rle"]), resolution))
                     for i in row["instances"]]
        driver = extract_topological_driver(image, instances, config.driver)
        prompt = condition_prompt(config, [i["category"] for i in row["instances"]])
        images += [image, image[:, ::-1]]
        drivers += [driver, driver[:, ::-1]]
        prompts += [prompt, prompt]
    if not images:
        raise BadInputError(f"catalog {catalog.uri} has no annotated defective image in its train split")
    return images, drivers, prompts


def train_condition(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord, output_uri: str,
                    progress: Progress | None = None) -> ModelRecord:
    """Train the conditioning network into ``output_uri`` (reused when already complete there)."""
    record_uri = storage.join(output_uri, RECORD_FILE)
    done = ModelRecord.read_completed(record_uri)
    if done:
        return done
    configure_torch(config.execution)
    images, drivers, prompts = training_examples(config, catalog)
    with storage.local_copy_for_read(concept.uri) as concept_dir:
        pipe = load_concept_pipeline(config.base_model, concept_dir)
    base = BaseComponents(model_id=config.base_model.pretrained, tokenizer=pipe.tokenizer,
                          text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
                          noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    for module in (base.vae, base.text_encoder, base.unet):
        module.requires_grad_(False)
    latents = encode_latents(base, to_model_tensor(images))
    conditions = to_condition_tensor(drivers)
    unique_prompts = sorted(set(prompts)) + [""]
    embeds = encode_prompts(base, unique_prompts)
    prompt_index = torch.tensor([unique_prompts.index(p) for p in prompts])
    empty_index = len(unique_prompts) - 1
    torch.manual_seed(config.condition.seed)  # the driver encoder is initialised at random
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=conditioning_channels_for(base.vae_scale_factor))
    controlnet.train()
    c = config.condition

    def step(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, target = noisy_inputs(base, latents.sample(index, generator), generator)
        which = prompt_index[index].clone()
        if c.empty_prompt_probability > 0:
            drop = torch.rand(len(index), generator=generator) < c.empty_prompt_probability
            which[drop] = empty_index
        hidden = embeds[which]
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=conditions[index],
                               return_dict=False)
        prediction = base.unet(noisy, timesteps, hidden, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
        return diffusion_loss(prediction, target)

    params = [p for p in controlnet.parameters() if p.requires_grad]
    losses, seconds = run_training(params, c, len(images), step, "learn-condition", progress,
                                   checkpoint_uri=checkpoint_uri_for(output_uri))
    fp = os.path.basename(output_uri.rstrip("/"))
    record = ModelRecord(kind="condition", uri=output_uri, fingerprint=fp, base_model=config.base_model.pretrained,
                         steps=c.steps, seconds=round(seconds, 2))
    with storage.local_copy_for_write(output_uri) as folder:
        controlnet.save_pretrained(folder, safe_serialization=True)
        card = model_card(f"indusfactory conditioning network `{fp}`",
                          "ControlNet-style conditioning network on topological drivers, trained on top of "
                          f"concept `{concept.fingerprint}`; load with `ControlNetModel.from_pretrained`.",
                          config.base_model.pretrained, c.model_dump(mode="json"), catalog.content_fingerprint,
                          losses, seconds, extra=f"- example prompt: `{prompts[0]}`")
        write_model_metadata(folder, card, {"condition": c.model_dump(mode="json"),
                                            "driver": config.driver.model_dump(mode="json"),
                                            "concept_fingerprint": concept.fingerprint,
                                            "data_fingerprint": catalog.content_fingerprint, "losses": losses},
                             record.model_dump_json(exclude={"reused"}), RECORD_FILE)
    remove_checkpoint(checkpoint_uri_for(output_uri))
    log.info("conditioning network trained in %.1f s, written to %s", seconds, output_uri)
    return record



def condition_uri_for(config: FactoryConfig, catalog: CatalogRecord, concept: ModelRecord) -> str:
    return storage.FactoryLayout.of(config.factory_root).model(
        "condition", condition_fingerprint(config, catalog, concept))
