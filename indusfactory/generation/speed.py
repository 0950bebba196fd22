"""Speed options of the generation pipeline (``generation.compile``, ``channels_last``, ``fuse_qkv``,
``vae_decode``), applied once when a worker loads its pipeline (``generate.get_pipeline``).

The pipeline is cached per device slot and process, so whatever is applied here, compiled graphs
included, serves every later shard of that worker. Every option is off by default and the default
pipeline is left exactly as it was (same bytes). None of them changes what is sampled, only how the
arithmetic is laid out, so they are not part of the dataset fingerprint (as ``execution.precision``
is not): results equal the default's within float rounding (see the tests and BENCHMARKS.md).

Order: QKV fusion first (it adds layers), then the memory format, the VAE's decode mode and last
``torch.compile`` (lazy: the graphs are built at the first batch, over the modules as they are then).
"""

from __future__ import annotations

import logging

import torch

from indusfactory.config import SPEED_FIELDS, GenerationConfig

log = logging.getLogger("indusfactory.generate")


def speed_key(gen: GenerationConfig) -> tuple:
    """The speed options a cached pipeline was built with (part of its cache key)."""
    return tuple(getattr(gen, name) for name in SPEED_FIELDS)


def fuse_qkv_projections(model: torch.nn.Module) -> int:
    """Fuse every diffusers ``Attention`` of ``model``: one projection for query, key and value (self-attention),
    one for key and value (cross-attention), run by ``FusedAttnProcessor2_0``. Returns how many were fused.

    The same as ``UNet2DConditionModel.fuse_qkv_projections``, for any model (the conditioning network and the
    VAE's attention too). The unfused layers stay (the state dict keeps its keys)."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    fused = 0
    for module in model.modules():
        if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
            if getattr(module, "add_k_proj", None) is not None:
                continue  # added KV projections (not in SD 1.x) have no fused processor
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            fused += 1
    return fused


def apply_speed_options(pipe, gen: GenerationConfig) -> None:
    """Apply ``gen``'s speed options to a loaded ``StableDiffusionControlNetPipeline`` in place.

    With every option off nothing is touched. ``torch.compile`` wraps the UNet and the conditioning network
    (``pipe.unet`` and ``pipe.controlnet`` become compiled modules, as diffusers expects them: its denoising
    loop then marks each step for CUDA graphs); compiling is lazy, at the first batch.
    """
    models = {"unet": pipe.unet, "controlnet": pipe.controlnet, "vae": pipe.vae}
    if gen.fuse_qkv:
        counts = {name: fuse_qkv_projections(model) for name, model in models.items()}
        log.info("fused QKV projections: %s attention layers", counts)
    if gen.channels_last:
        for model in models.values():
            model.to(memory_format=torch.channels_last)
    if gen.vae_decode == "sliced":
        pipe.vae.enable_slicing()
    elif gen.vae_decode == "tiled":
        pipe.vae.enable_tiling()
    if gen.compile != "off":
        mode = None if gen.compile == "default" else gen.compile
        # fixed shapes: the batch shape never changes (padding), so each shape compiles once and never again
        cache = getattr(pipe, "driver_cache", None)
        if cache is not None:  # keyed on the driver tensor's address: runs eagerly, between two compiled graphs
            cache.encoder.forward = torch.compiler.disable(cache)
        pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
        pipe.controlnet = torch.compile(pipe.controlnet, mode=mode, dynamic=False)
        log.info("torch.compile (mode %s) of the UNet and the conditioning network: built at the first batch", mode)
