"""Speed and cheaper-sampling options of ``generation`` (issue 18): each applies, the default stays byte for byte
what it was, and the images of a speed option stay within a stated tolerance of the default's."""

from __future__ import annotations

import numpy as np
import pytest

from indusfactory.config import GenerationConfig

SPEED_TOLERANCE = 2
"""Grey levels (of 255) a pixel of a speed option may differ from the default's: the options reorder float
arithmetic only."""


def _images(rows: list[dict]) -> dict[str, np.ndarray]:
    from indusfactory.schema import decode_image

    return {r["sample_id"]: decode_image(r["image"]["bytes"]).astype(int) for r in rows}


@pytest.fixture
def generation_setup(make_config, prepare_generation):
    """Models, plan and rows of a small generation, and a function: generation overrides -> images."""
    from indusfactory.generation import generate
    from indusfactory.generation.plan import read_plan

    def setup_with(**generation):
        base = {"steps": 4, "batch_size": 3, "shard_size": 6}
        return prepare_generation(make_config(generation={**base, **generation}))

    setup = setup_with()
    rows = read_plan(setup.plan)

    def run(**generation):
        other = setup_with(**generation)
        try:
            return _images(generate.generate_rows(other.ctx, rows)), generate.get_pipeline(other.ctx)
        finally:
            generate._PIPELINE_CACHE.clear()

    return run


def test_speed_options_apply_and_keep_the_images_within_tolerance(generation_setup):
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    default, plain = generation_setup()
    assert not plain.vae.use_slicing and not plain.vae.use_tiling
    assert not any(getattr(m, "fused_projections", False) for m in plain.unet.modules())

    fused, pipe = generation_setup(fuse_qkv=True)
    for model in (pipe.unet, pipe.controlnet, pipe.vae):
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        assert attention and all(m.fused_projections for m in attention)
        assert all(isinstance(m.processor, FusedAttnProcessor2_0) for m in attention)

    last, pipe = generation_setup(channels_last=True)
    for model in (pipe.unet, pipe.controlnet, pipe.vae):
        convs = [m.weight for m in model.modules() if m.__class__.__name__ == "Conv2d" and m.weight.shape[-1] > 1]
        assert convs and all(w.is_contiguous(memory_format=__import__("torch").channels_last) for w in convs)

    sliced, pipe = generation_setup(vae_decode="sliced")
    assert pipe.vae.use_slicing
    tiled, pipe = generation_setup(vae_decode="tiled")
    assert pipe.vae.use_tiling

    for name, images in (("fuse_qkv", fused), ("channels_last", last), ("sliced", sliced), ("tiled", tiled)):
        assert images.keys() == default.keys()
        worst = max(int(np.abs(images[k] - default[k]).max()) for k in default)
        assert worst <= SPEED_TOLERANCE, f"{name}: a pixel differs by {worst} grey levels"


@pytest.mark.parametrize(("mode", "expected"), [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_reaches_torch_compile_with_its_mode_once_per_pipeline_load(
    make_config, prepare_generation, monkeypatch, mode, expected
):
    """torch.compile itself is not run here (minutes on this CPU, see BENCHMARKS.md): a spy checks that the UNet
    and the conditioning network go through it with the configured mode and fixed shapes, once per pipeline
    load, and that every later shard reuses the compiled modules."""
    import torch

    from indusfactory.generation import generate, speed
    from indusfactory.generation.plan import read_plan

    calls = []

    def spy(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return model

    monkeypatch.setattr(speed.torch, "compile", spy)
    setup = prepare_generation(make_config(generation={"steps": 2, "batch_size": 3, "compile": mode}))
    rows = read_plan(setup.plan)
    try:
        generate.generate_rows(setup.ctx, rows[:3])
        generate.generate_rows(setup.ctx, rows[3:])  # the next shard: same worker, same pipeline
        pipe = generate.get_pipeline(setup.ctx)
    finally:
        generate._PIPELINE_CACHE.clear()
    assert calls == [
        ("UNet2DConditionModel", {"mode": expected, "dynamic": False}),
        ("ControlNetModel", {"mode": expected, "dynamic": False}),
    ]
    # the driver cache keys on a tensor's address: it runs outside the compiled graphs
    assert getattr(pipe.controlnet.controlnet_cond_embedding.forward, "__wrapped__", None) is pipe.driver_cache
    assert torch.compile is spy


def test_guidance_cutoff_runs_the_unconditional_pass_in_the_first_steps_only(make_config, prepare_generation):
    from indusfactory.generation import generate
    from indusfactory.generation.plan import read_plan

    batches = {}
    for cutoff in (1.0, 0.5, 0.0):
        setup = prepare_generation(
            make_config(generation={"steps": 4, "batch_size": 3, "shard_size": 6, "guidance_cutoff": cutoff})
        )
        rows = read_plan(setup.plan)[:3]
        pipe = generate.get_pipeline(setup.ctx)
        seen: list[int] = []
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True
        )
        try:
            images = _images(generate.generate_rows(setup.ctx, rows))
        finally:
            hook.remove()
            generate._PIPELINE_CACHE.clear()
        batches[cutoff] = (seen, images)
    assert batches[1.0][0] == [6, 6, 6, 6]
    assert batches[0.5][0] == [6, 6, 3, 3]
    assert batches[0.0][0] == [3, 3, 3, 3]
    full, half, none = (batches[c][1] for c in (1.0, 0.5, 0.0))
    assert all(not np.array_equal(full[k], half[k]) for k in full)  # guidance changed the last steps
    assert all(not np.array_equal(half[k], none[k]) for k in full)


def test_guidance_cutoff_one_is_the_plain_call():
    from indusfactory.learning.models import GuidanceCutoff, guidance_kwargs, guided_steps

    class Pipe:
        _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "image"]

    assert guidance_kwargs(Pipe(), 7.5, 1.0, 20) == {"guidance_scale": 7.5}
    assert guidance_kwargs(Pipe(), 1.0, 0.5, 20) == {"guidance_scale": 1.0}
    assert guidance_kwargs(Pipe(), 7.5, 0.0, 20) == {"guidance_scale": 1.0}
    cut = guidance_kwargs(Pipe(), 7.5, 0.5, 10)
    assert isinstance(cut["callback_on_step_end"], GuidanceCutoff) and cut["callback_on_step_end"].guided == 5
    assert cut["callback_on_step_end_tensor_inputs"] == ["prompt_embeds", "image"]
    assert [guided_steps(10, c) for c in (0.0, 0.04, 0.05, 0.3, 0.5, 0.99, 1.0)] == [0, 0, 1, 3, 5, 10, 10]


@pytest.mark.parametrize(
    ("name", "cls", "karras"),
    [
        ("dpmsolver++", "DPMSolverMultistepScheduler", False),
        ("dpmsolver++-karras", "DPMSolverMultistepScheduler", True),
        ("unipc", "UniPCMultistepScheduler", False),
    ],
)
def test_multistep_schedulers(name, cls, karras):
    from indusfactory.learning.models import embedded_model_path, scheduler_for
    from indusfactory.preflight import SAMPLING_SCHEDULERS

    config = __import__("json").loads((embedded_model_path() / "scheduler" / "scheduler_config.json").read_text())
    scheduler = scheduler_for(name, config)
    assert type(scheduler).__name__ == cls
    assert bool(getattr(scheduler.config, "use_karras_sigmas", False)) is karras
    assert name in SAMPLING_SCHEDULERS
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10


def test_profile_fills_unset_fields_and_the_default_fingerprint_is_unchanged():
    from indusfactory.config import GENERATION_PROFILES, SPEED_FIELDS
    from indusfactory.infra.fingerprint import fingerprint

    fast = GenerationConfig(profile="fast")
    for name, value in GENERATION_PROFILES["fast"].items():
        assert getattr(fast, name) == value
    assert GenerationConfig(profile="fast", steps=14).steps == 14  # explicit fields win
    assert GenerationConfig.model_validate(fast.model_dump()) == fast  # a dumped config reads back the same

    default = GenerationConfig()
    assert (default.profile, default.guidance_cutoff, default.compile, default.channels_last) == (
        "default",
        1.0,
        "off",
        False,
    )
    # the fingerprint of a default config is what it was before these fields existed
    before = fingerprint(
        {
            k: v
            for k, v in default.model_dump(mode="json").items()
            if k not in {"profile", "guidance_cutoff", *SPEED_FIELDS}
        }
    )
    assert fingerprint(default) == before
    assert fingerprint(GenerationConfig(compile="reduce-overhead", fuse_qkv=True)) == before
    assert fingerprint(GenerationConfig(profile="fast")) != before
    with_cutoff = {**default.model_dump(mode="json"), "guidance_cutoff": 0.5}
    kept = {k: v for k, v in with_cutoff.items() if k not in {"profile", *SPEED_FIELDS}}
    assert fingerprint(GenerationConfig(guidance_cutoff=0.5)) == fingerprint(kept)
