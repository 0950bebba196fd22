"""Benchmark of the generation stage: factory images/s versus a plain diffusers loop, and cache reruns.

Not a test. Side by side in one run, with the same weights, resolution, batch size, sampler
(20 DPM-Solver++ steps, guidance 7.5) and conditioning scale:

- factory: ``generate_shard`` for every shard of a plan, then ``publish_dataset``; that is
  drivers and masks rebuilt from the plan, sampling, QC, PNG encoding, parquet + COCO + images
  written, manifest last;
- plain loop: ``StableDiffusionControlNetPipeline(prompt=[...], image=[PIL drivers], ...)`` per
  batch, prompts as strings every call, images returned as PIL and not saved (what a user of
  diffusers writes; the drivers are made beforehand and not timed).

Also the cache rerun ratio: the generation stage run again on the finished dataset, and (``--flow``)
the whole ``generate-dataset`` flow run twice on an unchanged config through a temporary Prefect API.

Each pass records wall time and the CPU time of the process. On a machine shared with other work,
run with ``--threads 1`` and compare CPU times: one torch thread has no OpenMP waits, so its CPU
time is the work done, whatever else the machine runs; wall times then vary with the load.

The models: the tiny SD 1.x pipeline shipped with the package (pretrained) or, with
``--sd15-architecture``, a pipeline with Stable Diffusion 1.5's architecture (random weights, built
from diffusers/transformers configs, no download); a random concept LoRA (peft, rank 8) and a
conditioning network made with ``ControlNetModel.from_unet``. Random weights time the same as
trained ones. Writes ``benchmarks/results/generate[_<device>_<arch>].json``.

    python benchmarks/bench_generate.py                     # CPU, tiny model, 64 px, 64 samples
    # the shipped fast sampling preset against the plain loop at diffusers' usual 20 steps
    python benchmarks/bench_generate.py --profile fast --plain-defaults --threads 1 --no-flow
    # the issue's GPU comparison: ours (bf16, speed-ups) versus the pipeline as diffusers gives it (fp32),
    # with the fraction of the GPU's bf16 FLOP limit (about 46 TFLOP per image at 512 px, 20 steps)
    python benchmarks/bench_generate.py --device cuda --resolution 512 --sd15-architecture \\
        --precision bf16 --batch-size 16 --shard-size 64 --per-driver 8 --augmentations 8 --no-flow \\
        --plain-defaults [--channels-last] [--compile [--compile-mode reduce-overhead]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from indusfactory.layout import DatasetFolder

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """Where the numbers come from."""
    import diffusers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- models ------------------------------------------------------------------------------------


def write_sd15_architecture(folder: Path) -> Path:
    """A pipeline folder with Stable Diffusion 1.5's architecture and random weights (fp16 on disk)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from indusfactory.demo.tiny_model import MAX_PROMPT_TOKENS, build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def write_random_concept(base: str, folder: Path, rank: int = 8) -> None:
    """A concept LoRA in diffusers format (what ``train_concept`` writes), randomly initialised."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora, safe_serialization=True)


def write_random_condition(base: str, folder: Path) -> None:
    """A conditioning network made from the base UNet (what ``train_condition`` starts from)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from indusfactory.learning.condition import conditioning_channels_for

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels_for(factor)
    ).save_pretrained(folder, safe_serialization=True)


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    config: object
    catalog: object
    plan: object
    concept: object
    condition: object
    rows: list[dict]


def make_config(root: Path, base: str, sample: Path, args, factory: Path | None = None, **generation):
    from indusfactory.config import parse_config

    return parse_config(
        {
            "factory_root": str(factory or root / "factory"),
            "source": {
                "coco_annotations": str(sample / "defective" / "annotations.json"),
                "images_dir": str(sample / "defective" / "images"),
                "defect_free_dir": str(sample / "defect_free"),
            },
            "base_model": {"pretrained": base, "resolution": args.resolution},
            "concept": {"steps": 20, "batch_size": 4},
            "condition": {"steps": 20, "batch_size": 4},
            "plan": {
                "augmentations_per_image": args.augmentations,
                "images_per_driver": args.per_driver,
                "max_defect_free_images": args.drivers,
            },
            "generation": {
                "guidance_scale": 7.5,
                "batch_size": args.batch_size,
                "shard_size": args.shard_size,
                "conditioning_scale": args.conditioning_scale,
                **product_options(args),
                **generation,
            },
            "execution": {"device": args.device, "precision": args.precision, "torch_threads": args.threads},
        }
    )


def prepare(root: Path, args) -> Setup:
    """Base model, random concept and condition, sample data, catalog and plan under ``root``."""
    from indusfactory.demo.sample_data import write_sample_data
    from indusfactory.generation.plan import build_plan, plan_folder_for, read_plan
    from indusfactory.learning.models import resolve_base_model
    from indusfactory.schema import ModelRecord
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    base = (
        str(write_sd15_architecture(root / "sd15-arch"))
        if args.sd15_architecture
        else resolve_base_model("embedded:tiny-sd")
    )
    write_random_concept(base, root / "concept")
    write_random_condition(base, root / "condition")
    sample = write_sample_data(
        root / "sample", n_defective=12, n_defect_free=args.drivers, size=max(64, args.resolution)
    ).root
    config = make_config(root, base, sample, args)
    catalog = ingest(config.source, catalog_folder_for(config))
    plan = build_plan(config, catalog, plan_folder_for(config, catalog))
    records = [
        ModelRecord(kind=kind, uri=str(root / kind), fingerprint=f"bench-{kind}", base_model=base, steps=0, seconds=0.0)
        for kind in ("concept", "condition")
    ]
    return Setup(
        config=config, catalog=catalog, plan=plan, concept=records[0], condition=records[1], rows=read_plan(plan)
    )


def product_options(args) -> dict:
    """The ``generation`` options of the product this run sets: the sampling profile (or steps and scheduler)
    and the speed options. The factory applies them itself (``get_pipeline``); the like-for-like plain loop gets
    the same speed options through the same function (``apply_speed_options``)."""
    import yaml

    options: dict = {}
    if args.profile:
        options["profile"] = args.profile
    else:
        options.update(steps=20, scheduler="dpmsolver++")
    if args.steps is not None:
        options["steps"] = args.steps
    if args.channels_last:
        options["channels_last"] = True
    if args.compile or args.compile_mode:
        # "reduce-overhead" captures CUDA graphs; "max-autotune" also searches kernels
        options["compile"] = args.compile_mode or "default"
    for item in args.generation:
        key, _, raw = item.partition("=")
        options[key] = yaml.safe_load(raw)
    return options


# Cost of one image in the accounting, at 512x512: per step, the UNet (0.80 TFLOP) and the
# conditioning network (0.28 TFLOP), twice with classifier-free guidance; plus the VAE decode.
UNET_TFLOP_512, CONTROLNET_TFLOP_512, VAE_DECODE_TFLOP_512 = 0.80, 0.28, 2.5
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by GPU name."""


def tflop_per_image(resolution: int, steps: int, guidance_scale: float) -> float:
    """The issue's estimate (about 46 TFLOP at 512 px, 20 steps, guidance), scaled by pixel count."""
    passes = 2 if guidance_scale > 1 else 1
    scale = (resolution / 512) ** 2
    return scale * (steps * passes * (UNET_TFLOP_512 + CONTROLNET_TFLOP_512) + VAE_DECODE_TFLOP_512)


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


# --- the two contestants -------------------------------------------------------------------------


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def factory_pass(setup: Setup, dataset: "DatasetFolder") -> tuple[Clock, list]:
    """Time to generate every shard and publish the dataset in ``dataset``; the shard records."""
    from indusfactory.generation.generate import GenerationContext, generate_shard
    from indusfactory.publishing.publish import publish_dataset

    ctx = GenerationContext(
        config=setup.config,
        catalog_uri=setup.catalog.uri,
        categories=setup.catalog.categories,
        concept=setup.concept,
        condition=setup.condition,
    )
    with Clock() as clock:
        shards = [generate_shard(ctx, setup.plan, dataset.uri, i) for i in range(setup.plan.shards)]
        publish_dataset(setup.config, setup.catalog, setup.plan, setup.concept, setup.condition, dataset, shards)
    return clock, shards


def plain_pipeline(setup: Setup, args):
    """The same models in a plain ``StableDiffusionControlNetPipeline`` (nothing of ours applied).

    ``--plain-defaults``: as a diffusers user gets it, fp32 and no speed-up (the issue's baseline);
    otherwise in our precision with the same speed-ups as ours (a like-for-like loop).
    """
    from indusfactory.generation.speed import apply_speed_options
    from indusfactory.learning.models import load_generation_pipeline, select_device, select_dtype

    gen = plain_generation(setup, args)
    pipe = load_generation_pipeline(setup.config.base_model, setup.concept.uri, setup.condition.uri, gen.scheduler)
    device = select_device(setup.config.execution)
    if args.plain_defaults:
        return pipe.to(device=device, dtype=torch.float32)
    pipe = pipe.to(device=device, dtype=select_dtype(setup.config.execution, device))
    apply_speed_options(pipe, gen)
    return pipe


def plain_generation(setup: Setup, args):
    """The sampling of the plain loop: with ``--plain-defaults`` diffusers' usual 20 DPM-Solver++ steps with guidance
    at every step whatever the factory runs (the issue's baseline); otherwise the factory's own settings."""
    from indusfactory.config import GenerationConfig

    if args.plain_defaults:
        return GenerationConfig(steps=20, scheduler="dpmsolver++", guidance_scale=7.5)
    return setup.config.generation


def plain_batches(setup: Setup) -> list[tuple[list[str], list, int]]:
    """(prompts, PIL drivers, seed) per batch: the inputs a diffusers user would have ready."""
    from PIL import Image

    from indusfactory.generation.plan import SourceImages, materialise

    sources = SourceImages(setup.catalog.uri, setup.catalog.categories)
    size = setup.config.generation.batch_size
    batches = []
    for start in range(0, len(setup.rows), size):
        rows = setup.rows[start : start + size]
        drivers = [
            Image.fromarray((materialise(r, sources, setup.config).driver * 255).round().astype(np.uint8)) for r in rows
        ]
        batches.append(([r["prompt"] for r in rows], drivers, rows[0]["seed"]))
    return batches


def plain_pass(pipe, batches, setup: Setup, args) -> Clock:
    """Time of the plain loop over every batch."""
    from indusfactory.learning.models import guidance_kwargs

    gen = plain_generation(setup, args)
    resolution = setup.config.base_model.resolution
    with Clock() as clock:
        for prompts, drivers, seed in batches:
            pipe(
                prompt=prompts,
                image=drivers,
                height=resolution,
                width=resolution,
                num_inference_steps=gen.steps,
                controlnet_conditioning_scale=gen.conditioning_scale,
                **guidance_kwargs(pipe, gen.guidance_scale, gen.guidance_cutoff, gen.steps),
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
            )
        _sync(args)
    return clock


def bench_throughput(root: Path, setup: Setup, args) -> dict:
    """Factory versus plain loop, interleaved ``args.repeats`` times; plus the generation-stage rerun."""
    from indusfactory.generation.generate import GenerationContext, generate_rows
    from indusfactory.layout import DatasetFolder

    ctx = GenerationContext(
        config=setup.config,
        catalog_uri=setup.catalog.uri,
        categories=setup.catalog.categories,
        concept=setup.concept,
        condition=setup.condition,
    )
    generate_rows(ctx, setup.rows[: setup.config.generation.batch_size])  # warm-up: load, compile, caches
    pipe, batches = plain_pipeline(setup, args), plain_batches(setup)
    plain_pass(pipe, batches[:1], setup, args)  # warm-up
    samples = len(setup.rows)
    factory, plain, rerun = [], [], None
    for repeat in range(args.repeats):
        uri = DatasetFolder(str(root / "factory" / "datasets" / "bench" / f"run-{repeat}"), f"run-{repeat}", "bench")
        clock, shards = factory_pass(setup, uri)
        factory.append(clock)
        if repeat == 0:
            rerun, again = factory_pass(setup, uri)
            assert all(s.reused for s in again), "the rerun regenerated a shard"
        plain.append(plain_pass(pipe, batches, setup, args))
        print(
            f"repeat {repeat}: factory {samples / factory[-1].wall:.2f} images/s (CPU {factory[-1].cpu:.1f} s), "
            f"plain loop {samples / plain[-1].wall:.2f} images/s (CPU {plain[-1].cpu:.1f} s)"
        )
    result = {
        "samples": samples,
        "factory_wall_seconds": [round(c.wall, 3) for c in factory],
        "factory_cpu_seconds": [round(c.cpu, 3) for c in factory],
        "plain_loop_wall_seconds": [round(c.wall, 3) for c in plain],
        "plain_loop_cpu_seconds": [round(c.cpu, 3) for c in plain],
    }
    for kind in ("wall", "cpu"):
        best_factory = samples / min(getattr(c, kind) for c in factory)
        best_plain = samples / min(getattr(c, kind) for c in plain)
        result[f"factory_images_per_{kind}_s"] = round(best_factory, 3)
        result[f"plain_loop_images_per_{kind}_s"] = round(best_plain, 3)
        result[f"ratio_factory_over_plain_{kind}"] = round(best_factory / best_plain, 3)
        print(f"factory / plain loop, {kind} time: {best_factory / best_plain:.3f} (best of {args.repeats})")
    result["generation_stage_rerun"] = {
        "first_seconds": round(factory[0].wall, 3),
        "rerun_seconds": round(rerun.wall, 4),
        "ratio": round(rerun.wall / factory[0].wall, 5),
    }
    print(f"generation-stage rerun {rerun.wall:.3f} s = {rerun.wall / factory[0].wall:.5f} of the first run")
    if not args.sd15_architecture:  # the FLOP accounting is SD 1.5's; the tiny model's is much smaller
        return result
    gen = setup.config.generation
    per_image = tflop_per_image(setup.config.base_model.resolution, gen.steps, gen.guidance_scale)
    peak = peak_tflops(args)
    result["tflop_per_image_estimate"] = round(per_image, 2)
    result["achieved_tflops"] = round(result["factory_images_per_wall_s"] * per_image, 1)
    if peak:
        result["peak_bf16_tflops"] = peak
        result["fraction_of_bf16_limit"] = round(result["achieved_tflops"] / peak, 3)
        print(
            f"factory: {result['achieved_tflops']} TFLOP/s of {peak} (bf16 limit) = "
            f"{result['fraction_of_bf16_limit']:.1%}, at {per_image:.1f} TFLOP per image"
        )
    return result


def bench_flow_rerun(root: Path, setup: Setup, args) -> dict:
    """The whole ``generate-dataset`` flow twice on an unchanged config (temporary Prefect API)."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.generate_dataset import generate_dataset

    sample = Path(setup.config.source.images_dir).parents[1]
    config = make_config(root, setup.config.base_model.pretrained, sample, args, factory=root / "flow-factory")

    @flow
    def warm_up() -> None:
        """Start the temporary API before timing."""

    with prefect_test_harness(server_startup_timeout=120):
        warm_up()
        times = []
        for _ in range(2):
            started = time.perf_counter()
            record = generate_dataset(config=config)
            times.append(time.perf_counter() - started)
    assert record.reused, "the second flow run did not reuse the published dataset"
    print(
        f"flow: first run {times[0]:.1f} s (ingest, 2 x 20 training steps, {record.samples} images, publish"
        f"{', evaluate' if config.evaluation.enabled else ''}), "
        f"rerun {times[1]:.1f} s = {times[1] / times[0]:.4f}"
    )
    return {
        "first_seconds": round(times[0], 2),
        "rerun_seconds": round(times[1], 2),
        "ratio": round(times[1] / times[0], 4),
        "samples": record.samples,
        "evaluation": config.evaluation.enabled,
        "training_steps": {"concept": config.concept.steps, "condition": config.condition.steps},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sd15-architecture", action="store_true", help="SD 1.5's architecture, random weights")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the ControlNet")
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=[None, "default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode ('reduce-overhead' uses CUDA graphs)",
    )
    parser.add_argument(
        "--plain-defaults",
        action="store_true",
        help="the plain loop as diffusers gives it: fp32, no speed-ups (the issue's GPU baseline)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: known by name)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, or the profile's)")
    parser.add_argument("--profile", choices=["default", "fast"], help="generation.profile of the factory")
    parser.add_argument(
        "--generation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other generation option of the factory (YAML value), e.g. fuse_qkv=true, vae_decode=sliced",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--conditioning-scale", type=float, default=1.0)
    parser.add_argument("--drivers", type=int, default=4, help="defect-free images")
    parser.add_argument("--augmentations", type=int, default=2, help="augmentations per defect-free image")
    parser.add_argument("--per-driver", type=int, default=8, help="images per driver (samples = product of the 3)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (execution.torch_threads); 1 on a shared machine")
    parser.add_argument(
        "--flow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the whole flow twice (cache rerun ratio)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    arch = "sd15-architecture" if args.sd15_architecture else "tiny-sd"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        setup = prepare(root, args)
        print(
            f"prepared {arch} at {args.resolution} px, {len(setup.rows)} samples in {setup.plan.shards} shards "
            f"in {time.perf_counter() - started:.1f} s"
        )
        throughput = bench_throughput(root, setup, args)
        setup_generation = setup.config.generation.model_dump(mode="json")
        flow = bench_flow_rerun(root, setup, args) if args.flow else None
    result = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "generation": setup_generation,
            "device": args.device,
            "precision": args.precision,
            "model": arch,
            "resolution": args.resolution,
            "steps": setup_generation["steps"],
            "scheduler": setup_generation["scheduler"],
            "guidance_scale": 7.5,
            "conditioning_scale": args.conditioning_scale,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "plain_defaults": args.plain_defaults,
            "torch_threads": torch.get_num_threads(),
        },
        "throughput": throughput,
        "flow_rerun": flow,
    }
    default = (
        "generate.json"
        if args.device == "cpu" and not args.sd15_architecture
        else f"generate_{args.device}_{arch}.json"
    )
    out = args.out or RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
