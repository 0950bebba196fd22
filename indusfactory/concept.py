"""Stage 1, learn the concept: DreamBooth with LoRA (peft) on the defective training images,
prompt ``an image of a [V]``. Writes a diffusers-format LoRA that ``pipe.load_lora_weights``
reads in a plain ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from indusfactory import storage
from indusfactory.config import FactoryConfig
from indusfactory.errors import BadInputError
from indusfactory.fingerprint import fingerprint
from indusfactory.imaging import fit_square, to_model_tensor
from indusfactory.ingest import read_catalog
from indusfactory.models import base_model_fingerprint, configure_torch, load_base_components
from indusfactory.schema import CatalogRecord, ModelRecord, decode_image
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
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
RECORD_FILE = "record.json"


def concept_fingerprint(config: FactoryConfig, catalog: CatalogRecord) -> str:
    return fingerprint("concept", catalog.content_fingerprint, config.base_model,
                       base_model_fingerprint(config.base_model),
                       config.concept.model_dump(mode="json", exclude={"checkpoint_every"}),
                       storage.normalise_uri(config.factory_root))


def concept_prompt(config: FactoryConfig) -> str:
    return config.concept.prompt_template.format(token=config.concept.token)


def training_images(catalog_uri: str, resolution: int) -> list[np.ndarray]:
    """Defective images of the train split, square at ``resolution``, plus their mirror images."""
    table = read_catalog(catalog_uri).to_pylist()
    images = [fit_square(decode_image(r["image"]["bytes"]), resolution)
              for r in table if r["defective"] and r["split"] == "train"]
    if not images:
        raise BadInputError(f"catalog {catalog_uri} has no defective image in its train split")
    return images + [img[:, ::-1] for img in images]


def validate(config: FactoryConfig) -> None:
    if config.base_model.resolution % 8:
        raise BadInputError(f"base_model.resolution must be divisible by 8, got {config.base_model.resolution}")


def train_concept(config: FactoryConfig, catalog: CatalogRecord, output_uri: str,
                  progress: Progress | None = None) -> ModelRecord:
    """Train the concept LoRA into ``output_uri`` (reused when already complete there)."""
    record_uri = storage.join(output_uri, RECORD_FILE)
    done = ModelRecord.read_completed(record_uri)
    if done:
        return done
    validate(config)
    configure_torch(config.execution)
    images = training_images(catalog.uri, config.base_model.resolution)
    base = load_base_components(config.base_model)
    for module in (base.vae, base.text_encoder, base.unet):
        module.requires_grad_(False)
    latents = encode_latents(base, to_model_tensor(images))
    prompt_embeds = encode_prompts(base, [concept_prompt(config)])
    c = config.concept
    torch.manual_seed(c.seed)  # the LoRA init is random: the same config must train the same weights
    base.unet.add_adapter(LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, init_lora_weights="gaussian",
                                     target_modules=c.lora_target_modules))
    params = [p for p in base.unet.parameters() if p.requires_grad]
    base.unet.train()

    def step(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, target = noisy_inputs(base, latents.sample(index, generator), generator)
        hidden = prompt_embeds.expand(len(index), -1, -1)
        return diffusion_loss(base.unet(noisy, timesteps, hidden).sample, target)

    losses, seconds = run_training(params, c, len(images), step, "learn-concept", progress,
                                   checkpoint_uri=checkpoint_uri_for(output_uri))
    fp = os.path.basename(output_uri.rstrip("/"))
    record = ModelRecord(kind="concept", uri=output_uri, fingerprint=fp, base_model=config.base_model.pretrained,
                         steps=c.steps, seconds=round(seconds, 2))
    with storage.local_copy_for_write(output_uri) as folder:
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True)
        card = model_card(f"indusfactory concept LoRA `{fp}`",
                          f"DreamBooth LoRA of the defective concept, prompt `{concept_prompt(config)}`.",
                          config.base_model.pretrained, c.model_dump(mode="json"), catalog.content_fingerprint,
                          losses, seconds)
        write_model_metadata(folder, card, {"concept": c.model_dump(mode="json"),
                                            "base_model": config.base_model.model_dump(mode="json"),
                                            "data_fingerprint": catalog.content_fingerprint, "losses": losses},
                             record.model_dump_json(exclude={"reused"}), RECORD_FILE)
    remove_checkpoint(checkpoint_uri_for(output_uri))
    log.info("concept LoRA trained in %.1f s, written to %s", seconds, output_uri)
    return record


def concept_uri_for(config: FactoryConfig, catalog: CatalogRecord) -> str:
    return storage.FactoryLayout.of(config.factory_root).model("concept", concept_fingerprint(config, catalog))
