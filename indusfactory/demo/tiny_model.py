"""A tiny Stable Diffusion 1.x pipeline in diffusers layout, small enough for a 2-core CPU.

Same classes, same folder layout and same loading code as Stable Diffusion 1.5 (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, a real CLIP BPE tokenizer, a DDPM-family scheduler), only smaller:
everything downstream loads it with ``from_pretrained`` exactly as it would load SD 1.5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_PROMPT_TOKENS = 77

# Words the factory's prompts use; each becomes one BPE token. Any other text still encodes
# (byte-level fallback), it just takes more tokens.
VOCABULARY_WORDS = (
    "a an the of with and on in image photo picture texture surface close up macro industrial "
    "crack cracks cracked defect defects defective scratch scratches dent pit pits corrosion rust "
    "hairline branched transverse longitudinal diagonal thin wide fine deep "
    "brick bricks gravel grass moon concrete metal steel wall stone rock road asphalt tile ceramic "
    "wood plastic glass blade turbine weld casting sks "
    "spalling stain stains dirt hole holes chip chips burr bubble inclusion porosity blister peeling abrasion "
    "wear tear cut mark marks spot spots line lines edge fabric textile paper leather rubber "
    "person cat cells clock coffee coins colour space text eye rocket shapes pattern grey gray"
).split()


def build_clip_tokenizer(words: tuple[str, ...] | list[str] = VOCABULARY_WORDS) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose vocabulary has one token per word in ``words``."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [BOS, EOS, *alphabet, *(ch + "</w>" for ch in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        # Merges added later rank lower, so they never change how earlier words encode: join
        # whatever the current merges leave of this word, left to right, into one token.
        symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks.setdefault(pair, len(merges))
            if len(ranks) > len(merges):
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1], *symbols[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_tiny_pipeline(seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """A randomly initialised tiny SD 1.x pipeline (VAE downsamples by 4, latents 4 channels)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.5,
    )
    latent_size = sample_size // 4
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a random tiny pipeline in diffusers layout (safetensors) to ``path``."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


# General photographs bundled with scikit-image, none of which the sample data's surfaces are cut from
# (those are brick, gravel, grass and moon; see ``sample_data.SURFACES``), with their captions.
PRETRAIN_PHOTOS = {
    "astronaut": "person", "camera": "person", "cat": "cat", "chelsea": "cat", "cell": "cells", "clock": "clock",
    "coffee": "coffee", "coins": "coins", "colorwheel": "colour", "hubble_deep_field": "space",
    "immunohistochemistry": "cells", "page": "text", "text": "text", "retina": "eye", "rocket": "rocket",
    "horse": "shapes", "binary_blobs": "shapes", "shepp_logan_phantom": "shapes", "checkerboard": "pattern",
}
SHAPES_SHARE = 0.2
"""Share of pretraining pictures that are procedural: coloured shapes on a smooth gradient."""


def _colour_jitter(image, rng):
    """Random per-channel gains and offset, so the VAE learns colour from grey photographs too."""
    import numpy as np

    gains = rng.uniform(0.55, 1.25, size=3)
    offset = rng.uniform(-25, 25, size=3)
    return np.clip(image.astype(np.float32) * gains + offset, 0, 255).astype(np.uint8)


def _random_strokes(image, rng):
    """Generic dark and light strokes (lines and curves of 1-3 px): thin structures a VAE must keep."""
    import numpy as np
    from skimage.draw import bezier_curve
    from skimage.morphology import dilation, disk

    out = image.astype(np.float32)
    size = image.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        points = rng.integers(0, size, size=6)
        rr, cc = bezier_curve(*points[:2], *points[2:4], *points[4:6], weight=float(rng.uniform(0.5, 3)),
                              shape=image.shape[:2])
        stroke = np.zeros(image.shape[:2], dtype=bool)
        stroke[rr, cc] = True
        radius = int(rng.integers(0, 2))
        if radius:
            stroke = dilation(stroke, disk(radius))
        level = rng.uniform(0.05, 0.4) if rng.random() < 0.8 else rng.uniform(1.3, 1.8)
        out[stroke] = np.clip(out[stroke] * level, 0, 255)
    return out.astype(np.uint8)


def _shapes_picture(size: int, rng):
    """Flat-coloured ellipses and rectangles on a smooth two-colour gradient (grey or coloured)."""
    import numpy as np
    from skimage.draw import ellipse, rectangle

    grey = rng.random() < 0.3
    def colour():
        return np.full(3, rng.uniform(20, 235)) if grey else rng.uniform(0, 255, size=3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    picture = colour() * (1 - ramp) + colour() * ramp
    picture = np.transpose(picture, (1, 0, 2)) if rng.random() < 0.5 else picture
    picture = np.broadcast_to(picture, (size, size, 3)).copy()
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.5:
            rr, cc = ellipse(*rng.uniform(0, size, 2), *rng.uniform(3, size / 2, 2), shape=(size, size),
                             rotation=float(rng.uniform(0, np.pi)))
        else:
            corner = rng.integers(0, size - 4, 2)
            rr, cc = rectangle(tuple(corner), extent=tuple(rng.integers(4, size, 2)), shape=(size, size))
        picture[rr, cc] = colour()
    return np.clip(picture, 0, 255).astype(np.uint8)


def _pretrain_pictures(n: int, size: int, rng) -> tuple[list, list[str]]:
    """Random crops of general ``skimage.data`` photographs (some colour-jittered, some turned grey) and
    procedural shapes, captioned ``a photo of <subject>``."""
    import numpy as np
    import skimage.data
    from PIL import Image

    pictures, captions = [], []
    photos = {}
    for name in PRETRAIN_PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        photo = (photo * 255).astype(np.uint8) if photo.dtype == bool else photo.astype(np.uint8)
        photos[name] = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
    names = list(PRETRAIN_PHOTOS)
    for i in range(n):
        if rng.random() < SHAPES_SHARE:
            pictures.append(_shapes_picture(size, rng))
            captions.append("a photo of shapes")
            continue
        name = names[i % len(names)]
        photo = photos[name]
        side = int(rng.integers(min(size, *photo.shape[:2]), min(4 * size, *photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crop = np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size),
                                                                                              Image.BICUBIC))
        draw = rng.random()
        if draw < 0.6:
            crop = _colour_jitter(crop, rng)
        elif draw < 0.8:
            crop = np.repeat(crop.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)
        pictures.append(crop)
        captions.append(f"a photo of {PRETRAIN_PHOTOS[name]}")
    return pictures, captions


def pretrain_tiny_model(path: str | Path, vae_steps: int = 2500, unet_steps: int = 3000, seed: int = 0,
                        log=print) -> Path:
    """Build the tiny pipeline and pretrain its VAE and UNet on general pictures (see ``_pretrain_pictures``).

    This is how ``indusfactory/assets/tiny-sd`` was made (see README): a stand-in for SD 1.5's pretraining
    that has never seen the sample data's surfaces or the benchmark's procedural textures. The VAE also
    sees generic thin strokes, so that it keeps thin structures; the UNet does not, so it is not taught
    to draw cracks: the factory's concept and condition stages have to learn them.
    """
    import numpy as np
    import torch.nn.functional as F

    from indusfactory.infra.imaging import to_model_tensor

    rng = np.random.default_rng(seed)
    pipe = build_tiny_pipeline(seed)
    pictures, captions = _pretrain_pictures(4096, 64, rng)
    pixels = to_model_tensor(pictures)
    stroked = to_model_tensor([_random_strokes(p, rng) if rng.random() < 0.5 else p for p in pictures])
    generator = torch.Generator().manual_seed(seed)
    vae_opt = torch.optim.AdamW(pipe.vae.parameters(), lr=1e-3)
    for step in range(vae_steps):
        batch = stroked[torch.randint(0, len(stroked), (8,), generator=generator)]
        dist = pipe.vae.encode(batch).latent_dist
        recon = pipe.vae.decode(dist.sample(generator)).sample
        loss = F.l1_loss(recon, batch) + 0.1 * F.mse_loss(recon, batch) + 1e-6 * dist.kl().mean()
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad()
        if step % 100 == 0:
            log(f"vae step {step}/{vae_steps} loss {loss.item():.4f}")
    pipe.vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
        std = float(latents.std())
        pipe.vae.register_to_config(scaling_factor=round(1.0 / std, 4))
        latents = latents / std
        unique = sorted(set(captions))
        tokens = pipe.tokenizer(unique + [""], padding="max_length", max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
    caption_index = torch.tensor([unique.index(c) for c in captions])
    unet_opt = torch.optim.AdamW(list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()), lr=5e-4)
    scheduler = pipe.scheduler
    for step in range(unet_steps):
        index = torch.randint(0, len(latents), (16,), generator=generator)
        hidden = pipe.text_encoder(tokens.input_ids)[0]
        which = caption_index[index].clone()
        which[torch.rand(len(index), generator=generator) < 0.1] = len(unique)  # unconditional, for CFG
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        pred = pipe.unet(scheduler.add_noise(latents[index], noise, t), t, hidden[which]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        unet_opt.step()
        unet_opt.zero_grad()
        if step % 100 == 0:
            log(f"unet step {step}/{unet_steps} loss {loss.item():.4f}")
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
