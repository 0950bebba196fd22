import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from indusfactory.config import EMBEDDED_BASE_MODEL, BaseModelConfig
from indusfactory.demo.tiny_model import VOCABULARY_WORDS, build_clip_tokenizer
from indusfactory.infra.errors import ModelLoadError
from indusfactory.learning.models import embedded_model_path, load_base_components, resolve_base_model


def test_tokenizer_has_one_token_per_factory_word():
    tokenizer = build_clip_tokenizer()
    for word in VOCABULARY_WORDS:
        assert len(tokenizer.tokenize(word)) == 1, word
    ids = tokenizer("an image of a sks with a hairline crack").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 11
    assert tokenizer.decode(ids, skip_special_tokens=True) == "an image of a sks with a hairline crack"
    # Words outside the vocabulary still encode (byte-level fallback), they just take more tokens.
    assert len(tokenizer.tokenize("zyxw")) > 1


def test_written_model_loads_like_sd15(tiny_model_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "an image of a sks",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert sorted(p.name for p in tiny_model_path.iterdir() if p.is_dir()) == [
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert not list(tiny_model_path.rglob("*.bin")), "weights must be safetensors only"
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 96))
    assert controlnet.config.block_out_channels == pipe.unet.config.block_out_channels


def test_bad_base_model_folders_are_named(tmp_path, tiny_model_path):
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        resolve_base_model(str(tmp_path))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="missing the component folder.*vae"):
        resolve_base_model(str(broken))


def test_embedded_model_is_pretrained_not_random():
    """The shipped tiny model reconstructs a texture through its VAE far better than a random one."""
    import skimage.data
    from PIL import Image

    from indusfactory.demo.tiny_model import build_tiny_pipeline
    from indusfactory.infra.imaging import to_model_tensor

    assert (embedded_model_path() / "model_index.json").is_file()
    crop = np.asarray(Image.fromarray(skimage.data.gravel()[100:228, 300:428]).resize((64, 64)).convert("RGB"))
    pixels = to_model_tensor([crop])
    shipped = load_base_components(BaseModelConfig(pretrained=EMBEDDED_BASE_MODEL)).vae
    random_vae = build_tiny_pipeline(seed=1).vae
    with torch.no_grad():
        errors = [
            float((vae.decode(vae.encode(pixels).latent_dist.mean).sample - pixels).abs().mean())
            for vae in (shipped, random_vae)
        ]
    assert errors[0] < 0.15 < errors[1], errors


def test_base_model_fingerprint_follows_the_weights(tmp_path, tiny_model_path):
    """A changed local base model (same path, other weights) must not reuse models trained on the old one."""
    import shutil

    from indusfactory.demo.tiny_model import write_tiny_model
    from indusfactory.learning.models import base_model_fingerprint

    folder = tmp_path / "base"
    shutil.copytree(tiny_model_path, folder)
    config = BaseModelConfig(pretrained=str(folder))
    before = base_model_fingerprint(config)
    assert base_model_fingerprint(BaseModelConfig(pretrained=str(tiny_model_path))) == before  # content, not path
    other = write_tiny_model(tmp_path / "other", seed=5)
    assert base_model_fingerprint(BaseModelConfig(pretrained=str(other))) != before
    assert base_model_fingerprint(BaseModelConfig(pretrained="org/model", revision="v2")) == {
        "hub_id": "org/model",
        "revision": "v2",
    }


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_model_path):
    from diffusers import UNet2DConditionModel

    folder = _copy(tiny_model_path, tmp_path / "pickled")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    with pytest.raises(ModelLoadError, match=r"unet holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_base_components(BaseModelConfig(pretrained=str(folder)))
    allowed = load_base_components(BaseModelConfig(pretrained=str(folder), allow_pickle_weights=True))
    assert torch.equal(next(allowed.unet.parameters()), next(unet.parameters()))


def test_truncated_safetensors_are_named(tmp_path, tiny_model_path):
    folder = _copy(tiny_model_path, tmp_path / "truncated")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load the VAE.*vae/diffusion_pytorch_model.safetensors"):
        load_base_components(BaseModelConfig(pretrained=str(folder)))


def test_lora_for_another_architecture_is_refused(tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from indusfactory.learning.models import load_concept_pipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    config = BaseModelConfig(pretrained=str(tiny_model_path))
    fitting = tmp_path / "fitting"
    StableDiffusionPipeline.save_lora_weights(fitting, unet_lora_layers=layers, safe_serialization=True)
    assert load_concept_pipeline(config, str(fitting)) is not None
    # Another UNet layout (other block names): diffusers would skip these keys silently.
    foreign = tmp_path / "foreign"
    StableDiffusionPipeline.save_lora_weights(
        foreign,
        unet_lora_layers={k.replace("down_blocks", "encoder_stages"): v for k, v in layers.items()},
        safe_serialization=True,
    )
    with pytest.raises(ModelLoadError, match="made for another architecture"):
        load_concept_pipeline(config, str(foreign))
    # Same names, other shapes (another width).
    resized = tmp_path / "resized"
    StableDiffusionPipeline.save_lora_weights(
        resized,
        unet_lora_layers={
            k: torch.zeros(v.shape[0], 2 * v.shape[1]) if ("lora_A" in k or "lora.down" in k) else v
            for k, v in layers.items()
        },
        safe_serialization=True,
    )
    with pytest.raises(ModelLoadError, match="does not fit base model"):
        load_concept_pipeline(config, str(resized))
