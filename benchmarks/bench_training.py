"""Benchmark of the two training stages: our step time versus a plain reference loop.

Not a test. On the tiny model shipped with the package (``embedded:tiny-sd``) and the sample
data, it times, side by side in one run:

- ours: ``train_concept`` (DreamBooth LoRA) and ``train_condition`` (conditioning network), with
  latents encoded once (VAE posterior moments) and prompt embeddings computed once;
- reference: the loop of diffusers' example scripts (``train_dreambooth_lora.py``,
  ``train_controlnet.py``): every step normalises the pixel batch, encodes it with the VAE, runs
  the text encoder on the prompt tokens, then the same noise, forward, loss and AdamW step.

Both use the same model, data, batch size, LoRA settings and seed. Writes
``benchmarks/results/training.json``. With ``--sd15 --device cuda`` it instead measures steps/s
and peak memory at 512x512 with Stable Diffusion 1.5's architecture (random weights).

    python benchmarks/bench_training.py                   # CPU, tiny model
    python benchmarks/bench_training.py --sd15 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _config(root: Path, steps: int, batch: int):
    from indusfactory.config import parse_config

    sample = root / "sample"
    return parse_config(
        {
            "factory_root": str(root / "factory"),
            "source": {
                "coco_annotations": str(sample / "defective" / "annotations.json"),
                "images_dir": str(sample / "defective" / "images"),
                "defect_free_dir": str(sample / "defect_free"),
                "split_fractions": (1.0, 0.0, 0.0),
            },
            "concept": {"steps": steps, "batch_size": batch, "validation_images": 0, "checkpoint_every": 0},
            "condition": {"steps": steps, "batch_size": batch, "validation_images": 0, "checkpoint_every": 0},
        }
    )


def reference_concept_loop(config, catalog, steps: int) -> float:
    """DreamBooth LoRA the way diffusers' example does it: VAE and text encoder on every step."""
    import numpy as np
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from indusfactory.learning.concept import concept_prompt, training_images
    from indusfactory.learning.models import load_base_components

    c = config.concept
    images = training_images(catalog.uri, config.base_model.resolution)
    pixels_uint8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    base = load_base_components(config.base_model)
    for module in (base.vae, base.text_encoder, base.unet):
        module.requires_grad_(False)
    torch.manual_seed(c.seed)
    base.unet.add_adapter(
        LoraConfig(
            r=c.lora_rank, lora_alpha=c.lora_alpha, init_lora_weights="gaussian", target_modules=c.lora_target_modules
        )
    )
    cast_training_params(base.unet, dtype=torch.float32)
    params = [p for p in base.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=1e-2)
    tokens = base.tokenizer(
        [concept_prompt(config)],
        padding="max_length",
        max_length=base.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    base.unet.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(images), (c.batch_size,), generator=generator)
        pixel_values = pixels_uint8[index].float() / 127.5 - 1.0
        latents = base.vae.encode(pixel_values).latent_dist.sample() * base.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (len(index),))
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = base.text_encoder(tokens.repeat(len(index), 1))[0]
        loss = torch.nn.functional.mse_loss(base.unet(noisy, timesteps, hidden).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def reference_condition_loop(config, catalog, concept, steps: int) -> float:
    """ControlNet training the way diffusers' ``train_controlnet.py`` does it."""
    import numpy as np
    from diffusers import ControlNetModel, DDPMScheduler

    from indusfactory.infra import storage
    from indusfactory.infra.imaging import to_condition_tensor
    from indusfactory.learning.condition import conditioning_channels_for, training_examples
    from indusfactory.learning.models import load_concept_pipeline

    c = config.condition
    examples = training_examples(config, catalog)
    images, drivers, prompts = examples.images, examples.drivers, examples.prompts
    pixels_uint8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    conditions = to_condition_tensor(drivers)
    with storage.local_copy_for_read(concept.uri) as folder:
        pipe = load_concept_pipeline(config.base_model, folder)
    vae, text_encoder, unet, tokenizer = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    torch.manual_seed(c.seed)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(scale))
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=c.learning_rate, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(images), (c.batch_size,), generator=generator)
        pixel_values = pixels_uint8[index].float() / 127.5 - 1.0
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        tokens = tokenizer(
            [prompts[i] for i in index.tolist()],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = text_encoder(tokens)[0]
        down, mid = controlnet(
            noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=conditions[index], return_dict=False
        )
        prediction = unet(
            noisy, timesteps, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_cpu_tiny(steps: int, batch: int, defective: int) -> dict:
    from indusfactory.demo.sample_data import write_sample_data
    from indusfactory.learning.concept import concept_folder_for, train_concept
    from indusfactory.learning.condition import condition_folder_for, train_condition
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_sample_data(root / "sample", n_defective=defective, n_defect_free=4, size=64)
        config = _config(root, steps, batch)
        catalog = ingest(config.source, catalog_folder_for(config))
        rows = {}
        # Warm up both code paths once (allocator, oneDNN kernels), then time.
        reference_concept_loop(config, catalog, 2)
        wall = time.perf_counter()
        concept = train_concept(config, catalog, concept_folder_for(config, catalog))
        ours_concept_wall = time.perf_counter() - wall
        ref_concept = reference_concept_loop(config, catalog, steps)
        rows["concept"] = {
            "ours_s_per_step": concept.seconds / steps,
            "ours_wall_s_incl_setup": ours_concept_wall,
            "reference_s_per_step": ref_concept / steps,
        }
        reference_condition_loop(config, catalog, concept, 2)  # warm-up
        wall = time.perf_counter()
        condition = train_condition(config, catalog, concept, condition_folder_for(config, catalog, concept))
        ours_condition_wall = time.perf_counter() - wall
        ref_condition = reference_condition_loop(config, catalog, concept, steps)
        rows["condition"] = {
            "ours_s_per_step": condition.seconds / steps,
            "ours_wall_s_incl_setup": ours_condition_wall,
            "reference_s_per_step": ref_condition / steps,
        }
    for name, row in rows.items():
        row["speedup"] = round(row["reference_s_per_step"] / row["ours_s_per_step"], 2)
        for key in ("ours_s_per_step", "reference_s_per_step", "ours_wall_s_incl_setup"):
            row[key] = round(row[key], 4)
        print(
            f"{name:9s} ours {row['ours_s_per_step'] * 1000:7.1f} ms/step   reference "
            f"{row['reference_s_per_step'] * 1000:7.1f} ms/step   speed-up x{row['speedup']}"
        )
    return {
        "model": "embedded:tiny-sd (64 px, VAE factor 4)",
        "steps": steps,
        "batch_size": batch,
        "training_images": defective,
        "stages": rows,
    }


def sd15_unet():
    """Stable Diffusion 1.5's UNet architecture with random weights (no download)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def bench_sd15(
    device: str, precision: str, batch: int, steps: int, gradient_checkpointing: bool, warmup: int = 3
) -> dict:
    """Steps/s and peak memory of both stages at 512x512 (64x64 latents) with SD 1.5's architecture."""
    from diffusers import ControlNetModel, DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    dev = torch.device(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(batch, 4, 64, 64, device=dev)
    hidden = torch.randn(batch, 77, 768, device=dev, dtype=dtype)
    drivers = torch.rand(batch, 3, 512, 512, device=dev, dtype=dtype)
    results = {}
    for stage in ("concept-lora", "condition"):
        unet = sd15_unet().to(dev, dtype).requires_grad_(False)
        if stage == "concept-lora":
            unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            cast_training_params(unet, dtype=torch.float32)
            trained, params = unet, [p for p in unet.parameters() if p.requires_grad]
        else:
            trained = ControlNetModel.from_unet(unet).to(dev, torch.float32)
            params = list(trained.parameters())
        if gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None

        def step():
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=dev)
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                if stage == "condition":
                    down, mid = trained(
                        noisy, t, encoder_hidden_states=hidden, controlnet_cond=drivers, return_dict=False
                    )
                    pred = unet(
                        noisy, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid
                    ).sample
                else:
                    pred = unet(noisy, t, hidden).sample
            torch.nn.functional.mse_loss(pred.float(), noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[stage] = {
            "steps_per_s": round(steps / seconds, 3),
            "images_per_s": round(steps * batch / seconds, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
        }
        print(stage, results[stage])
        unet = trained = optimizer = None  # free GPU memory before the next stage
    return {
        "architecture": "SD 1.5 (random weights)",
        "resolution": 512,
        "batch_size": batch,
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "stages": results,
    }


def median_stages(runs: list[dict]) -> dict:
    """Per stage, the median of each figure over the runs (the speed-up of the medians)."""
    stages = {}
    for name in runs[0]:
        row = {
            key: round(statistics.median(r[name][key] for r in runs), 4)
            for key in ("ours_s_per_step", "reference_s_per_step", "ours_wall_s_incl_setup")
        }
        row["speedup"] = round(row["reference_s_per_step"] / row["ours_s_per_step"], 2)
        stages[name] = row
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--defective", type=int, default=24, help="training images in the sample data")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 architecture at 512 px (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (--sd15)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU runs, each in a fresh factory; medians reported")
    args = parser.parse_args()
    if args.sd15:
        result = bench_sd15(
            args.device, args.precision, args.batch, args.steps, args.gradient_checkpointing, args.warmup
        )
        out = RESULTS / f"training_sd15_{args.device}.json"
    else:
        runs = [bench_cpu_tiny(args.steps, args.batch, args.defective) for _ in range(args.repeats)]
        result = {**runs[0], "repeats": args.repeats, "stages": median_stages([r["stages"] for r in runs])}
        result["speedups_per_run"] = {
            stage: [r["stages"][stage]["speedup"] for r in runs] for stage in runs[0]["stages"]
        }
        for name, row in result["stages"].items():
            print(
                f"median of {args.repeats}: {name:9s} ours {row['ours_s_per_step'] * 1000:7.1f} ms/step   "
                f"reference {row['reference_s_per_step'] * 1000:7.1f} ms/step   speed-up x{row['speedup']}"
            )
        out = RESULTS / "training.json"
    result["machine"] = machine()
    result["date"] = time.strftime("%Y-%m-%d")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
