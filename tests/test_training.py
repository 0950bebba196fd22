"""Training stages on the tiny model: exact resume from checkpoints, outputs, bad input."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from indusfactory.infra.errors import BadInputError
from indusfactory.layout import CHECKPOINT_FILE
from indusfactory.learning.concept import concept_fingerprint, train_concept
from indusfactory.learning.condition import train_condition
from indusfactory.learning.models import LORA_WEIGHTS
from indusfactory.learning.training import checkpoint_uri_for
from indusfactory.sources.ingest import catalog_folder_for, ingest


class Crash(Exception):
    """Stands for a worker dying mid-training."""


def _crash_at(step_to_crash: int):
    def progress(step, total, loss):
        if step == step_to_crash:
            raise Crash(f"killed at step {step}")

    return progress


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_concept_resumes_from_its_checkpoint_to_the_same_weights(make_config, catalog, tmp_path):
    config = make_config(concept={"steps": 6, "checkpoint_every": 2})
    train_concept(config, catalog, str(tmp_path / "full"))
    with pytest.raises(Crash):
        train_concept(config, catalog, str(tmp_path / "resumed"), progress=_crash_at(5))
    assert (tmp_path / "resumed.checkpoint" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "resumed").exists(), "a crashed run must not leave a model folder"
    seen = []
    record = train_concept(config, catalog, str(tmp_path / "resumed"), progress=lambda s, t, l: seen.append(s))
    assert seen == [5, 6], "the rerun continues after the last checkpoint (step 4)"
    _assert_same_tensors(load_file(tmp_path / "full" / LORA_WEIGHTS), load_file(tmp_path / "resumed" / LORA_WEIGHTS))
    assert not (tmp_path / "resumed.checkpoint").exists() and record.steps == 6


def test_condition_resumes_from_its_checkpoint_to_the_same_weights(make_config, catalog, tmp_path):
    config = make_config(condition={"steps": 4, "checkpoint_every": 2})
    concept = train_concept(config, catalog, str(tmp_path / "concept"))
    train_condition(config, catalog, concept, str(tmp_path / "full"))
    with pytest.raises(Crash):
        train_condition(config, catalog, concept, str(tmp_path / "resumed"), progress=_crash_at(3))
    train_condition(config, catalog, concept, str(tmp_path / "resumed"))
    weights = "diffusion_pytorch_model.safetensors"
    _assert_same_tensors(load_file(tmp_path / "full" / weights), load_file(tmp_path / "resumed" / weights))
    assert not (tmp_path / "resumed.checkpoint").exists()


def test_checkpoint_frequency_does_not_change_the_model_identity(make_config, catalog):
    a = make_config(concept={"checkpoint_every": 2})
    b = make_config(concept={"checkpoint_every": 50})
    assert concept_fingerprint(a, catalog) == concept_fingerprint(b, catalog)
    c = make_config(concept={"learning_rate": 5e-4})
    assert concept_fingerprint(c, catalog) != concept_fingerprint(a, catalog)
    assert checkpoint_uri_for("/x/models/concept/abc/") == "/x/models/concept/abc.checkpoint"


def test_empty_training_split_is_refused_before_training(make_config, catalog, tmp_path):
    config = make_config(source={"split_fractions": (0.0, 0.5, 0.5)})
    empty = ingest(config.source, catalog_folder_for(config))
    with pytest.raises(BadInputError, match="no defective image in its train split"):
        train_concept(config, empty, str(tmp_path / "concept"))
    assert not (tmp_path / "concept").exists()


def _generate(pipe, prompt="an image of a sks", seed=0):
    import numpy as np

    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    return np.asarray(out)


def test_lora_with_text_encoder_loads_in_a_plain_pipeline(make_config, catalog, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    config = make_config(
        concept={"steps": 3, "train_text_encoder": True, "learning_rate": 1e-2, "validation_images": 0}
    )
    record = train_concept(config, catalog, str(tmp_path / "concept"))
    weights = load_file(tmp_path / "concept" / LORA_WEIGHTS)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    assert record.method == "lora" and record.validation == []

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    ids = pipe.tokenizer(["an image of a sks"], return_tensors="pt").input_ids
    with torch.no_grad():
        before_text, before_image = pipe.text_encoder(ids)[0], _generate(pipe)
    pipe.load_lora_weights(str(tmp_path / "concept"))
    with torch.no_grad():
        after_text, after_image = pipe.text_encoder(ids)[0], _generate(pipe)
    assert not torch.allclose(before_text, after_text), "the text encoder LoRA must be applied"
    assert abs(before_image - after_image).max() > 1e-3, "the UNet LoRA must change the image"


def test_full_fine_tuning_writes_diffusers_unet_and_loads(make_config, catalog, tmp_path, tiny_model_path):
    from diffusers import UNet2DConditionModel

    from indusfactory.learning.models import load_concept_pipeline

    config = make_config(concept={"steps": 2, "method": "full", "learning_rate": 1e-4, "validation_images": 0})
    record = train_concept(config, catalog, str(tmp_path / "concept"))
    folder = tmp_path / "concept"
    assert record.method == "full" and not (folder / LORA_WEIGHTS).exists()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin"))
    tuned = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet")
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > len(list(base.parameters())) // 2, "full fine-tuning updates (nearly) every weight"
    pipe = load_concept_pipeline(config.base_model, str(folder))
    for (name, a), (_, b) in zip(pipe.unet.named_parameters(), tuned.named_parameters()):
        assert torch.equal(a, b), name


def test_prior_preservation_generates_class_images_once(make_config, catalog, tmp_path):
    from indusfactory.learning.concept import class_images_uri_for

    prior = {
        "steps": 2,
        "prior_preservation": True,
        "num_class_images": 3,
        "class_image_inference_steps": 2,
        "validation_images": 0,
    }
    config = make_config(concept=prior)
    train_concept(config, catalog, str(tmp_path / "with-prior"))
    class_dir = class_images_uri_for(config)
    pngs = sorted(p for p in __import__("pathlib").Path(class_dir).iterdir() if p.suffix == ".png")
    assert len(pngs) == 3
    stamps = [p.stat().st_mtime_ns for p in pngs]
    # Another learning rate trains again but reuses the cached class images.
    other = make_config(concept={**prior, "learning_rate": 5e-4})
    assert class_images_uri_for(other) == class_dir
    train_concept(other, catalog, str(tmp_path / "other-lr"))
    assert [p.stat().st_mtime_ns for p in pngs] == stamps
    # The prior term changes what is learned.
    train_concept(make_config(concept={**prior, "prior_preservation": False}), catalog, str(tmp_path / "no-prior"))
    a, b = load_file(tmp_path / "with-prior" / LORA_WEIGHTS), load_file(tmp_path / "no-prior" / LORA_WEIGHTS)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_validation_grids_survive_a_resume_and_land_in_the_model_folder(make_config, catalog, tmp_path):
    from PIL import Image

    config = make_config(
        concept={
            "steps": 4,
            "checkpoint_every": 2,
            "validation_every": 2,
            "validation_images": 2,
            "validation_inference_steps": 2,
            "prior_preservation": True,
            "num_class_images": 2,
            "class_image_inference_steps": 2,
        }
    )
    with pytest.raises(Crash):
        train_concept(config, catalog, str(tmp_path / "concept"), progress=_crash_at(3))
    record = train_concept(config, catalog, str(tmp_path / "concept"))
    assert record.validation == ["validation/step-000002.png", "validation/step-000004.png"]
    grid = Image.open(tmp_path / "concept" / record.validation[-1])
    assert grid.size == (2 * 64, 2 * 64), "two seeds x (instance prompt, class prompt)"
    assert "validation/step-000004.png" in (tmp_path / "concept" / "README.md").read_text()


def test_condition_validation_grid_and_controlnet_pipeline(make_config, catalog, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from indusfactory.learning.models import load_concept_pipeline

    config = make_config(condition={"steps": 2, "validation_images": 2, "validation_inference_steps": 2})
    concept = train_concept(config, catalog, str(tmp_path / "concept"))
    record = train_condition(config, catalog, concept, str(tmp_path / "condition"))
    assert record.validation == ["validation/step-000002.png"]
    grid = Image.open(tmp_path / "condition" / record.validation[0])
    assert grid.size == (3 * 64, 2 * 64), "rows of driver | generated | mask overlay"
    concept_pipe = load_concept_pipeline(config.base_model, concept.uri)
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in concept_pipe.components.items() if k != "image_encoder"},
        controlnet=ControlNetModel.from_pretrained(record.uri),
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "an image of a sks with a hairline crack",
        image=torch.rand(1, 3, 64, 64),
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_weights(make_config, catalog, tmp_path, precision):
    config = make_config(
        concept={"steps": 2, "precision": precision, "validation_images": 1, "validation_inference_steps": 2}
    )
    record = train_concept(config, catalog, str(tmp_path / "concept"))
    weights = load_file(tmp_path / "concept" / LORA_WEIGHTS)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert record.final_loss is not None and record.final_loss == record.final_loss  # not NaN
    cond = train_condition(
        make_config(condition={"steps": 2, "precision": precision, "validation_images": 0}),
        catalog,
        record,
        str(tmp_path / "condition"),
    )
    assert load_file(tmp_path / "condition" / "diffusion_pytorch_model.safetensors")
    assert cond.final_loss == cond.final_loss


def test_gradient_checkpointing_trains_the_same_weights(make_config, catalog, tmp_path):
    plain = make_config(concept={"steps": 2, "validation_images": 0})
    checkpointed = make_config(concept={"steps": 2, "validation_images": 0, "gradient_checkpointing": True})
    train_concept(plain, catalog, str(tmp_path / "plain"))
    train_concept(checkpointed, catalog, str(tmp_path / "checkpointed"))
    a, b = load_file(tmp_path / "plain" / LORA_WEIGHTS), load_file(tmp_path / "checkpointed" / LORA_WEIGHTS)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_averages_micro_batches():
    from indusfactory.config import TrainingConfig
    from indusfactory.learning.training import run_training

    def train(accumulate: int, batch: int):
        weight = torch.nn.Parameter(torch.zeros(3))
        targets = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
        calls = []

        def step(index, generator):
            calls.append(index.tolist())
            return ((weight - targets[index]) ** 2).mean()

        config = TrainingConfig(
            steps=3,
            batch_size=batch,
            gradient_accumulation_steps=accumulate,
            learning_rate=0.1,
            max_grad_norm=100.0,
            validation_images=0,
        )
        losses, _ = run_training([weight], config, len(targets), step, "toy")
        return weight.detach(), calls, losses

    w2, calls, losses = train(accumulate=2, batch=2)
    assert len(calls) == 6 and len(losses) == 3, "two micro-batches per optimiser step"
    # The accumulated gradient equals the gradient of the mean over both micro-batches.
    w_ref = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w_ref], lr=0.1, weight_decay=1e-2)
    targets = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    for first, second in zip(calls[::2], calls[1::2]):
        loss = (((w_ref - targets[first]) ** 2).mean() + ((w_ref - targets[second]) ** 2).mean()) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(w2, w_ref.detach())


def test_min_snr_weighting_matches_the_formula(tiny_model_path):
    from diffusers import DDPMScheduler

    from indusfactory.learning.training import diffusion_loss

    scheduler = DDPMScheduler.from_pretrained(tiny_model_path, subfolder="scheduler")
    timesteps = torch.tensor([10, 500, 990])
    prediction, target = (
        torch.zeros(3, 1, 2, 2),
        torch.ones(3, 1, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1),
    )
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (torch.tensor([1.0, 4.0, 9.0]) * torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=5.0), expected)
    assert diffusion_loss(prediction, target).item() == pytest.approx(14 / 3)


def test_training_settings_are_validated_before_training(make_config):
    from indusfactory.infra.errors import ConfigError

    for bad in (
        {"gradient_accumulation_steps": 0},
        {"lr_scheduler": "warp"},
        {"precision": "fp8"},
        {"method": "dora"},
        {"snr_gamma": -1},
        {"class_prompt_template": "a thing"},
    ):
        with pytest.raises(ConfigError, match="concept"):
            make_config(concept=bad)


def test_noise_offset_adds_one_constant_per_example_and_channel(tiny_model_path):
    """Offset noise (diffusers' --noise_offset): the noise differs from plain noise by a per-channel constant;
    offset 0 draws exactly the plain noise (models trained before the option keep their identity)."""
    from diffusers import DDPMScheduler

    from indusfactory.learning.training import noisy_inputs

    base = SimpleNamespace(noise_scheduler=DDPMScheduler.from_pretrained(tiny_model_path, subfolder="scheduler"))
    latents = torch.zeros(3, 4, 8, 8)
    _, t_plain, plain = noisy_inputs(base, latents, torch.Generator().manual_seed(1))
    _, t_zero, zero = noisy_inputs(base, latents, torch.Generator().manual_seed(1), noise_offset=0.0)
    assert torch.equal(plain, zero) and torch.equal(t_plain, t_zero)
    _, _, offset = noisy_inputs(base, latents, torch.Generator().manual_seed(1), noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # constant over the pixels
    per_channel = shift[:, :, 0, 0]
    assert per_channel.abs().min() > 0 and per_channel.std() > 0.1  # differs between examples and channels


def test_model_cards_load_back_as_hugging_face_cards(make_config, catalog, tmp_path, tiny_model_path):
    """Each stage's README.md is a ``huggingface_hub.ModelCard``: its metadata reads back as ``ModelCardData``."""
    from huggingface_hub import ModelCard

    config = make_config(concept={"steps": 1, "validation_images": 0}, condition={"steps": 1, "validation_images": 0})
    concept = train_concept(config, catalog, str(tmp_path / "concept"))
    condition = train_condition(config, catalog, concept, str(tmp_path / "condition"))
    for record in (concept, condition):
        card = ModelCard.load(f"{record.uri}/README.md")
        assert card.data.library_name == "diffusers"
        assert card.data.base_model == str(tiny_model_path) == config.base_model.pretrained
        assert card.data.tags == ["indusfactory", "text-to-image"]
        assert f"training data fingerprint: `{catalog.content_fingerprint}`" in card.text
        assert card.text.lstrip().startswith("# indusfactory ") and "## Training config" in card.text
