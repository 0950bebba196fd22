"""One configuration for the whole factory: a pydantic model, loadable from YAML.

Prefect renders these models as forms; the defaults run the embedded demo (local files, CPU,
the tiny model shipped with the package, the sample data made by ``indusfactory sample-data``).
Production differs by configuration only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from indusfactory.infra.errors import ConfigError
from indusfactory.infra.fingerprint import IN_FINGERPRINT_UNLESS_DEFAULT, NOT_IN_FINGERPRINT

EMBEDDED_BASE_MODEL = "embedded:tiny-sd"
"""Sentinel for the tiny Stable Diffusion pipeline shipped inside the package (``assets/tiny-sd``)."""


class Section(BaseModel):
    """Base of every config section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """Where the team's real data lives (local paths or fsspec URIs such as ``s3://``).

    Two formats of annotated defective images: ``coco`` (a COCO instances file naming images in
    ``images_dir``) and ``mask_folder`` (images in ``images_dir``, one PNG mask per image with
    the same relative path and stem in ``masks_dir``, pixel value -> class by ``mask_values``).
    """

    format: Literal["coco", "mask_folder"] = Field(
        "coco", description="How the defective images are annotated: 'coco' or 'mask_folder'."
    )
    coco_annotations: str = Field(
        "./sample-data/defective/annotations.json",
        description="COCO instances file of the annotated defective images (format 'coco' only).",
    )
    images_dir: str = Field(
        "./sample-data/defective/images",
        description="Folder of the defective images (the COCO file names its images relative to it).",
    )
    masks_dir: str | None = Field(
        None,
        description="Format 'mask_folder': folder of mask PNGs, one per image, same relative path and stem.",
    )
    mask_values: dict[int, str] = Field(
        default_factory=dict,
        description="Format 'mask_folder': mask pixel value -> class name (0 is background; every "
        "connected component of a value is one instance; the value is the category id).",
    )
    split_field: str | None = Field(
        None,
        description="Format 'coco': key of each image entry holding its split (train/val/test); "
        "when set, every COCO image must carry a valid one. Default: a seeded split.",
    )
    defect_free_dir: str = Field(
        "./sample-data/defect_free", description="Folder of defect-free images (drivers for generation)."
    )
    split_seed: int = Field(0, description="Seed of the reproducible train/val/test split.")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="Train, val and test fractions of the defective images."
    )
    max_image_pixels: int = Field(
        64_000_000, gt=0, description="Images above this many pixels are refused (decompression bombs)."
    )
    max_file_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Image and mask files larger than this many bytes are refused from their size, unread.",
    )
    max_annotations_per_image: int = Field(
        1000,
        gt=0,
        description="Images with more annotations (COCO) or mask components (mask_folder) are refused.",
    )
    max_polygon_points: int = Field(
        100_000, gt=0, description="COCO annotations whose polygons have more x,y points in all are refused."
    )
    max_rle_length: int = Field(
        10_000_000,
        gt=0,
        description="COCO RLE segmentations with a longer counts string (characters) or list (runs) are refused.",
    )
    bbox_policy: Literal["correct", "refuse"] = Field(
        "correct",
        description="A COCO bbox outside its image or clearly off its mask (IoU < 0.5 and an edge more than "
        "1 px away): 'correct' keeps the bbox computed from the mask and counts a warning in the report; "
        "'refuse' quarantines the image.",
    )
    read_workers: int = Field(
        8,
        ge=1,
        le=64,
        description="Threads reading and decoding images (helps most on s3://); not in the cache key.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    make_sample_data: bool = Field(
        True,
        description="If the sources are missing and laid out as the sample data (R/defective/annotations.json, "
        "R/defective/images, R/defect_free), the ingest stage writes the sample dataset at R (the demo); false: "
        "a missing source is an error. Not in the cache key.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be non-negative and sum to 1, got {value}")
        return value

    @model_validator(mode="after")
    def _fields_of_the_format(self) -> "SourceConfig":
        """Each format names what it needs and refuses the other format's fields."""
        if self.format == "coco":
            if not self.coco_annotations:
                raise ValueError("source.coco_annotations is required when source.format is 'coco'")
            if self.masks_dir is not None or self.mask_values:
                raise ValueError(
                    "source.masks_dir and source.mask_values are only used with format "
                    "'mask_folder' (source.format is 'coco')"
                )
            if self.split_field is not None and not self.split_field.strip():
                raise ValueError("source.split_field must be a non-empty key of the COCO image entries")
            return self
        missing = [
            name
            for name, value in (("source.masks_dir", self.masks_dir), ("source.mask_values", self.mask_values))
            if not value
        ]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} required when source.format is 'mask_folder' "
                "(mask_values maps mask pixel values to class names, e.g. {1: crack})"
            )
        if self.split_field is not None:
            raise ValueError(
                "source.split_field is read from COCO image entries only; format 'mask_folder' uses the seeded split"
            )
        bad = sorted(v for v in self.mask_values if not 1 <= v <= 65535)
        if bad:
            raise ValueError(f"source.mask_values keys must be pixel values 1..65535 (0 is background), got {bad}")
        names = [n.strip() for n in self.mask_values.values()]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"source.mask_values class names must be non-empty and distinct, got {names}")
        return self


class BaseModelConfig(Section):
    """The Stable Diffusion 1.x pipeline everything starts from."""

    pretrained: str = Field(
        EMBEDDED_BASE_MODEL,
        description="A local diffusers folder, a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
        "or 'embedded:tiny-sd' for the tiny model shipped with indusfactory.",
    )
    revision: str | None = Field(None, description="Hub revision, when `pretrained` is a hub id.")
    allow_pickle_weights: bool = Field(
        False,
        description="Also load .bin/.ckpt pickle weights (loaded with weights_only); by default only "
        "safetensors are loaded and a pickle-only component is refused.",
    )
    resolution: int = Field(64, gt=0, description="Training and generation resolution in pixels (512 for SD 1.5).")

    @field_validator("resolution")
    @classmethod
    def _divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be divisible by 8, got {value}")
        return value


class TrainingConfig(Section):
    """Optimisation settings shared by both training stages."""

    steps: int = Field(300, gt=0, description="Optimiser steps.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser step (effective batch = batch_size x this)."
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of the optimiser (AdamW).")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="diffusers' get_scheduler name.")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up before the scheduler's shape.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="Mixed precision of training ('auto' follows execution.precision: fp32 on CPU, "
        "bf16 or fp16 on GPU). Frozen models run in it; trained weights stay fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (recompute activations).")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting (5.0 is the usual choice); None: plain MSE."
    )
    noise_offset: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Offset noise (as diffusers' training scripts' --noise_offset; 0.1 is usual): "
        "each example's noise gets this times a random constant per channel, so the model cannot read an "
        "image's mean brightness and colour off the noisy input and has to learn them (0: plain noise).",
    )
    seed: int = Field(0, description="Seed of the run: weight init, noise, timesteps and data order.")
    checkpoint_every: int = Field(
        100,
        ge=0,
        description="Save a resumable checkpoint every N steps (0: never); a retry resumes from it.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    validation_images: int = Field(
        2,
        ge=0,
        le=16,
        description="Images generated at each validation (0: no validation).",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    validation_every: int = Field(
        0,
        ge=0,
        description="Validate every N steps as well as at the end (0: at the end only).",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    validation_inference_steps: int = Field(
        20, gt=0, description="Sampling steps of the validation images.", json_schema_extra=NOT_IN_FINGERPRINT
    )


def _described(section: type[BaseModel], name: str) -> str | None:
    """The description of a field of ``section``, for a subclass that overrides its default."""
    return section.model_fields[name].description


class ConceptConfig(TrainingConfig):
    """Stage 1: DreamBooth concept learning (LoRA by default, full UNet fine-tuning as the paper)."""

    method: Literal["lora", "full"] = Field(
        "lora", description="'lora': peft LoRA adapters (small file); 'full': fine-tune every UNet weight (the paper)."
    )
    token: str = Field("sks", min_length=1, description="Rare token [V] naming the defective concept.")
    prompt_template: str = Field("an image of a {token}", description="Instance prompt; {token} is replaced.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank (must be > 0).")
    lora_alpha: int = Field(8, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / rank).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet modules that get LoRA adapters (peft target_modules).",
    )
    train_text_encoder: bool = Field(
        False, description="Also train the text encoder (LoRA on its attention, or fully with method 'full')."
    )
    text_encoder_lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="Text-encoder modules that get LoRA adapters when train_text_encoder is on.",
    )
    prior_preservation: bool = Field(
        False,
        description="DreamBooth class-prior preservation: also fit images the base model makes for the "
        "class prompt, so the class keeps its meaning.",
    )
    class_noun: str = Field("surface", min_length=1, description="The class the concept belongs to.")
    class_prompt_template: str = Field("a {class_noun}", description="Class prompt; {class_noun} is replaced.")
    num_class_images: int = Field(50, ge=1, description="Class images generated by the base model (cached).")
    class_image_inference_steps: int = Field(25, gt=0, description="Sampling steps of each class image.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-prior loss.")
    empty_prompt_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of instance examples trained with the empty prompt. Classifier-free guidance pushes "
        "samples away from what the empty prompt makes; when that is still the base model's look (colour, "
        "content), guided samples drift away from it in the other direction (grey sources come out coloured). "
        "Training the empty prompt on the instance images too keeps guided samples in the data's look.",
    )
    # Defaults of this stage; the descriptions are TrainingConfig's (an override would otherwise drop them).
    steps: int = Field(150, gt=0, description=_described(TrainingConfig, "steps"))
    learning_rate: float = Field(1e-3, gt=0, description=_described(TrainingConfig, "learning_rate"))
    noise_offset: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Offset noise (as diffusers' --noise_offset): each example's noise gets this "
        "times a random constant per channel, so the concept has to learn its images' brightness and colour "
        "instead of reading them off the noisy input (0: plain noise). Part of the measured default recipe.",
    )


class ConditionConfig(TrainingConfig):
    """Stage 2: the ControlNet-style conditioning network trained on topological drivers."""

    prompt_template: str = Field(
        "an image of a {token} with a {classes} crack", description="{token} and {classes} are replaced."
    )
    steps: int = Field(
        1000,
        gt=0,
        description="Optimisation steps (1000 at 64 px: about 4.5 min on 2 CPU cores; "
        "600 gave a held-out label AUC of 0.59-0.65, 1000 0.66-0.68, see BENCHMARKS.md).",
    )
    batch_size: int = Field(8, gt=0, description=_described(TrainingConfig, "batch_size"))
    learning_rate: float = Field(3e-4, gt=0, description=_described(TrainingConfig, "learning_rate"))
    empty_prompt_probability: float = Field(
        0.0, ge=0, le=1, description="Share of examples trained with the empty prompt (ControlNet uses 0.5)."
    )
    mask_loss_weight: float = Field(
        4.0,
        ge=0,
        description="Extra weight of the diffusion loss on latent pixels a defect mask touches (1 + this "
        "there, 1 elsewhere; 0: plain loss). A defect covers a few percent of an image, so without it the loss is "
        "spent on the texture and the network learns late where the mask says the defect goes (as in "
        "AnomalyDiffusion and DefectFill).",
    )
    validation_probe_samples: int = Field(
        16,
        ge=0,
        le=512,
        description="After training, samples generated from defect-free images with validation-split "
        "masks (never trained on) to measure whether defects land where the masks say; the verdict goes into the "
        "model card and the run summary (0: no probe).",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    augmentation: Literal["none", "flip", "dihedral"] = Field(
        "dihedral",
        description="Views of each defective training image (with its driver and mask): 'flip' adds "
        "its mirror, 'dihedral' its 8 rotations and mirrors (surfaces have no up), 'none' the image only.",
    )


class DriverConfig(Section):
    """The paper's topological driver recipe."""

    downscale: int | None = Field(
        None,
        ge=1,
        description="Downscale factor before the adaptive threshold. None: scales with the image, "
        "max(2, side // 64): 2 at 64-128 px, 4 at 256 px, 8 at 512 px (the texture pattern keeps its size "
        "relative to the image).",
    )

    def downscale_for(self, side: int) -> int:
        """The downscale factor used for an image of ``side`` pixels."""
        return self.downscale or max(2, side // 64)

    block_size: int = Field(15, ge=3, description="Neighbourhood of skimage's threshold_local (odd).")
    offset: float = Field(0.0, description="Offset of threshold_local (in 0..1 intensity units).")
    background_max: int = Field(50, ge=0, le=255, description="Thresholded background is scaled to 0..this.")

    @field_validator("block_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"block_size must be odd, got {value}")
        return value


class PlanConfig(Section):
    """What to generate: drivers from defect-free images paired with sampled masks."""

    augmentations_per_image: int = Field(
        2, ge=1, description="Offline augmentations per defect-free image (paper: 10)."
    )
    images_per_driver: int = Field(4, ge=1, le=15, description="Images generated per driver (paper: at most 15).")
    max_defect_free_images: int | None = Field(None, gt=0, description="Use at most this many defect-free images.")
    max_instances_per_image: int = Field(1, ge=1, le=8, description="Each sample gets 1..this many defect masks.")
    procedural_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of masks drawn by the procedural crack generator instead of the mask bank."
    )
    procedural_styles: dict[str, str] = Field(
        default_factory=dict,
        description="Crack style (see indusfactory.drivers.cracks.CRACK_STYLES) per class name; a class named like a "
        "style uses it, others default to 'hairline'.",
    )
    roi_min_intensity: int | None = Field(
        None,
        ge=0,
        le=255,
        description="Region of interest: masks are placed only where the (augmented) driver image is brighter "
        "than this grey level, e.g. 20 to keep defects off a black borescope border.",
    )
    roi_dir: str | None = Field(
        None, description="Folder of region-of-interest PNGs named like the defect-free images (non-zero = allowed)."
    )
    seed: int = Field(0, description="Seed of the plan: augmentations, masks, instances and each sample's seed.")


GENERATION_PROFILES: dict[str, dict[str, object]] = {
    "default": {},
    "fast": {"scheduler": "unipc", "steps": 10, "guidance_cutoff": 0.5},
}
"""Sampling presets of ``generation.profile``: the values a profile gives the fields a config leaves unset.
``fast`` is the cheapest setting measured equal to the 20-step default on the controllability benchmark
(BENCHMARKS.md, "Cheaper sampling")."""


SPEED_FIELDS = ("compile", "channels_last", "fuse_qkv", "vae_decode")
"""``generation`` fields that decide how fast a sample is made, not what is made (``generation/speed.py``); each
is marked ``NOT_IN_FINGERPRINT``, like ``execution.precision`` is outside the dataset fingerprint."""


class GenerationConfig(Section):
    """Sampling settings of the generation stage."""

    profile: Literal["default", "fast"] = Field(
        "default",
        description="Sampling preset. 'default': the fields' own defaults (20 DPM-Solver++ steps, guidance at every "
        "step). 'fast': the cheapest sampling measured as good as the default on the controllability benchmark "
        "(UniPC, 10 steps, classifier-free guidance in the first 5; 2.6x the sampling throughput on CPU, "
        "see BENCHMARKS.md). A profile only fills the fields the config leaves unset: an explicit "
        "generation.steps (or scheduler, guidance_cutoff) wins. Not itself in the dataset fingerprint: the "
        "fields it fills are.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    scheduler: Literal["dpmsolver++", "dpmsolver++-karras", "unipc", "ddim", "euler"] = Field(
        "dpmsolver++",
        description="Sampling scheduler: 'dpmsolver++' (diffusers' DPMSolverMultistep, 2nd-order multistep), "
        "'dpmsolver++-karras' (the same with Karras sigmas), 'unipc' (UniPCMultistep, bh2), 'ddim' or 'euler' "
        "(EulerDiscrete). The multistep solvers keep their quality at fewer steps.",
    )
    steps: int = Field(20, gt=0, description="Sampling (denoising) steps per image.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale (1: no guidance).")
    guidance_cutoff: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of the sampling steps that use classifier-free guidance, from the first step; the "
        "rest run the conditional pass only (half the UNet and conditioning-network work per step). 1: guidance "
        "at every step (default, unchanged bytes); 0.5: the first half. Guidance matters most while the layout "
        "forms, in the early, noisy steps.",
        json_schema_extra=IN_FINGERPRINT_UNLESS_DEFAULT,
    )
    conditioning_scale: float = Field(
        2.0,
        ge=0,
        description="Strength of the conditioning network's residuals. The demo's briefly trained network needs 2.0 "
        "for defects to follow the masks; a fully trained SD 1.5 network usually runs at 1.0.",
    )
    signal_leak: Literal["none", "source_mean"] = Field(
        "source_mean",
        description="How sampling starts. 'none': pure noise. 'source_mean': noise plus the mean latent of the "
        "defect-free image the driver was made from, at the first step's signal level, as every training example "
        "carried it at that noise level (the signal-leak bias, Everaert et al. 2024): the sources' brightness and "
        "colour carry over to the samples, which pure noise pulls towards the base model's average (measured on "
        "grey sources of mean 152: 123 with 'none', 148 with 'source_mean'; adherence unchanged).",
    )
    colour_match: Literal["none", "source"] = Field(
        "source",
        description="Colour of the samples. 'source': each sample's chroma (Cb, Cr) is matched to the defect-free "
        "image it was made from around its label, and to the training split's real defects inside it; luma, by "
        "which labels are measured, is kept (generation/colour.py). 'none': the models' own colour. The tiny "
        "base model draws colour noise into grey textures (benchmark: colourfulness 18 for grey sources, 0 with "
        "'source').",
    )
    batch_size: int = Field(8, gt=0, description="Images sampled at once on a device (halved on out-of-memory).")
    shard_size: int = Field(16, gt=0, description="Plan rows per shard (hundreds in production).")
    min_mask_contrast: float = Field(
        0.0, description="Samples whose defect is not this much darker than its surroundings fail QC (qc_passed=false)."
    )
    qc_action: Literal["flag", "drop"] = Field(
        "flag",
        description="What happens to a sample that fails QC: 'flag' keeps it with qc_passed=false, 'drop' "
        "leaves it out of the dataset (counted as dropped in the shard records and the manifest).",
    )
    adherence_scorer: str | None = Field(
        None,
        description="Mask-adherence scorer whose score lands in qc_adherence: a name registered with "
        "indusfactory.generation.scorers.register_adherence_scorer (built in: 'dark_iou'), 'segformer:<folder>' (the "
        "segmentor an evaluation saved in evaluation/<fp>/segmentor) or 'package.module:function'.",
    )
    min_adherence: float | None = Field(
        None, description="Samples whose adherence score is below this fail QC (needs adherence_scorer)."
    )
    min_label_auc: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Samples whose label AUC (how often a pixel inside the label is darker than one in the ring "
        "around it; 0.5 is no relation) is below this fail QC. None: no per-sample threshold.",
    )
    refuse_near_chance: bool = Field(
        False,
        description="Refuse to publish a dataset whose samples do not follow their labels (median label AUC less "
        "than adherence_margin above the chance level): the run fails before the manifest is written, naming the "
        "figures. False: such a dataset is published and marked 'near chance' in its manifest, card and summary.",
    )
    adherence_margin: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="A set of samples follows its labels when its median label AUC (a label pixel darker than "
        "the ring around it) is at least this far above the chance level (the same images with other samples' "
        "masks); otherwise it is marked 'near chance'.",
    )

    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "off",
        description="torch.compile the UNet and the conditioning network with this mode, once per pipeline load "
        "in a worker (the compiled graphs are reused by every later shard; the fixed batch shape means no "
        "recompiles). 'reduce-overhead' also captures CUDA graphs. Needs a C compiler on CPU and pays a compile of "
        "minutes at the first batch; it pays off on GPUs over many shards. Not part of the dataset fingerprint "
        "(like execution.precision): a few pixels may differ by a grey level from an uncompiled run.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    channels_last: bool = Field(
        False,
        description="Keep the UNet, conditioning network and VAE in channels-last memory format (faster "
        "convolutions on GPU tensor cores; slower on this project's CPUs, see BENCHMARKS.md). Not part of the "
        "dataset fingerprint: results equal the default's within float rounding.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    fuse_qkv: bool = Field(
        False,
        description="Fuse the query, key and value projections of every attention layer (UNet, conditioning "
        "network, VAE) into one matrix multiplication (diffusers' fused attention processor). Not part of the "
        "dataset fingerprint: results equal the default's within float rounding.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    vae_decode: Literal["full", "sliced", "tiled"] = Field(
        "full",
        description="How the VAE decodes a batch: 'full' all at once, 'sliced' one image at a time, 'tiled' in "
        "overlapping tiles (for large images when memory-bound). Not part of the dataset fingerprint: 'sliced' "
        "equals 'full' within float rounding; 'tiled' blends tile seams and differs more.",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_fills_unset_fields(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("profile") in GENERATION_PROFILES:
            preset = GENERATION_PROFILES[str(data["profile"])]
            data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _adherence_threshold_needs_scorer(self) -> "GenerationConfig":
        if self.min_adherence is not None and self.adherence_scorer is None:
            raise ValueError("generation.min_adherence needs generation.adherence_scorer")
        return self


class ExportConfig(Section):
    """Where and how the dataset is published."""

    dataset_name: str = Field(
        "demo-cracks",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the dataset: its folder under the factory root and the name on its card.",
    )
    version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Dataset version (a folder name: letters, digits, . _ -); default: derived from plan and models.",
    )
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$", description="Split name of the published shards.")


class ExecutionConfig(Section):
    """Where the work runs."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where training and generation run: 'auto' uses the GPUs when CUDA sees one, else the CPU."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="Precision of the frozen models and of sampling: 'auto' is fp32 on CPU, bf16 on GPUs "
        "that support it, else fp16.",
    )
    devices: list[Annotated[str, StringConstraints(pattern=r"^(cpu|cuda(:[0-9]+)?)$")]] | None = Field(
        None,
        min_length=1,
        description="Devices the local fan-out generates on, one shard at a time each (e.g. "
        "['cuda:0', 'cuda:1']; 'cpu' twice runs two CPU shards at once); training uses the first. Default: every "
        "visible GPU for device auto/cuda, else the CPU.",
    )
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: torch's choice).")
    fan_out: Literal["local", "work_pool"] = Field(
        "local",
        description="'local': shards run inside the flow, one at a time per device; 'work_pool': the flow "
        "dispatches groups of shards as runs of `shard_deployment` on a work pool (one worker per GPU) and waits.",
    )
    shard_deployment: str = Field(
        "generate-shards/gpu",
        pattern=r"^[^/]+/[^/]+$",
        description="'flow-name/deployment-name' of the child deployment that generates a group of shards.",
    )
    shards_per_run: int = Field(1, ge=1, description="Shards per child flow run (fan_out 'work_pool').")
    lock_stale_seconds: float = Field(
        600.0,
        gt=0,
        description="A training lock (<factory_root>/locks/) whose holder sent no heartbeat for this "
        "long is taken over (its holder died). The holder beats every quarter of it.",
    )
    lock_wait_seconds: float | None = Field(
        None,
        gt=0,
        description="Fail instead of waiting longer than this for a training lock held by another "
        "run (default: wait until it is released or goes stale).",
    )
    preflight_min_free_mb: float = Field(
        512.0,
        ge=0,
        description="Preflight refuses a local factory root whose volume has less free space than "
        "this many MiB (0: no check).",
    )


Control = Literal["shuffled labels", "empty masks"]
CONTROLS: tuple[Control, ...] = ("shuffled labels", "empty masks")


class EvaluationConfig(Section):
    """Flow ``evaluate-dataset``: is the synthetic data worth it for a downstream segmentor?"""

    enabled: bool = Field(
        True, description="Evaluate every dataset generate-dataset publishes.", json_schema_extra=NOT_IN_FINGERPRINT
    )
    real_fractions: list[float] = Field(
        default_factory=lambda: [0.1, 1.0],
        min_length=1,
        description="Fractions of the real training split each regime is trained with (paper: 10% and 100%).",
    )
    segmentor_pretrained: str | None = Field(
        None,
        description="A SegFormer checkpoint (e.g. nvidia/mit-b0 or a local folder); None: a small seeded "
        "SegFormer trained from scratch (CPU-sized).",
    )
    resolution: int | None = Field(None, gt=0, description="Segmentor input size (default: base_model.resolution).")
    steps: int = Field(120, gt=0, description="Training steps on synthetic data (pre-training, and synthetic only).")
    finetune_steps: int = Field(
        60,
        gt=0,
        description="Fine-tuning steps on real data after synthetic pre-training. "
        "The real-only baseline gets the same total budget: steps + finetune_steps.",
    )
    binary: bool = Field(
        True,
        description="Train a defect-vs-background head (IoU of the defect pixels is the "
        "headline); False: one output per category (argmax over background and classes).",
    )
    loss: Literal["dice_bce", "dice_focal"] = Field(
        "dice_bce", description="Loss of the binary head: soft Dice plus BCE, or plus focal loss (gamma 2)."
    )
    seeds: int = Field(
        3,
        ge=1,
        description="Every regime is trained with seeds seed, seed+1, ...; tables and plots "
        "show mean and std, and a verdict needs a difference beyond that spread (two seeds or more).",
    )
    controls: list[Control] = Field(
        default_factory=lambda: list(CONTROLS),
        description="Control pre-trainings fine-tuned on real data like synthetic + real: the synthetic images "
        "with their labels shuffled between images (a derangement), and with empty masks. 'synthetic helps' "
        "needs synthetic + real to beat real only and the shuffled-labels control.",
    )
    synthetic_ratios: list[float] | None = Field(
        None,
        description="Synthetic:real ratio sweep: synthetic images per real training image for synthetic + "
        "real (capped by the QC-passed samples); None: every QC-passed sample, one setting.",
    )
    chance_margin: float = Field(
        0.05,
        ge=0,
        description="The real-only baseline has learned when its mean defect IoU minus its std exceeds "
        "the chance IoU (best of an empty, an all-defect and a shuffled-mask prediction) by this much; otherwise "
        "the evaluation is 'inconclusive: the baseline did not learn'.",
    )
    min_difference: float = Field(
        0.02,
        ge=0,
        description="Smallest mean defect-IoU difference a verdict counts, on top of the spread rule "
        "(difference of means greater than the larger of the two stds).",
    )
    batch_size: int = Field(8, gt=0, description="Segmentor training batch size.")
    learning_rate: float = Field(1e-3, gt=0, description="Segmentor learning rate.")
    max_synthetic_images: int | None = Field(None, gt=0, description="Use at most this many synthetic images.")
    feature_extractor: str = Field(
        "small",
        description="FID/KID features: 'small' (seeded random CNN, no weights; offline demo) or "
        "'clip:<folder or hub id>'.",
    )
    kid_subset_size: int = Field(100, ge=2, description="Images per subset of the kernel inception distance.")
    seed: int = Field(0, description="First segmentor seed (see seeds); also seeds the features and the pairings.")

    @field_validator("synthetic_ratios")
    @classmethod
    def _ratios(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(r <= 0 for r in value)):
            raise ValueError(f"synthetic_ratios must be positive numbers (or null), got {value}")
        return sorted(set(value)) if value else value

    @field_validator("real_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in value):
            raise ValueError(f"real_fractions must be in (0, 1], got {value}")
        return sorted(set(value))


class FactoryConfig(Section):
    """Everything that decides a dataset."""

    factory_root: str = Field("./factory", description="Local path or fsspec URI (s3://bucket/prefix).")
    source: SourceConfig = Field(
        default_factory=SourceConfig,
        description="The annotated defect images and the defect-free images to start from.",
    )
    base_model: BaseModelConfig = Field(
        default_factory=BaseModelConfig, description="The Stable Diffusion 1.x base model and its resolution."
    )
    concept: ConceptConfig = Field(
        default_factory=ConceptConfig, description="Stage learn-concept: DreamBooth on the defect images."
    )
    condition: ConditionConfig = Field(
        default_factory=ConditionConfig,
        description="Stage learn-condition: the conditioning network on topological drivers.",
    )
    driver: DriverConfig = Field(
        default_factory=DriverConfig, description="How a topological driver is made from an image and its masks."
    )
    plan: PlanConfig = Field(
        default_factory=PlanConfig, description="Stage build-plan: one row per sample to generate."
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Stage generate-shards: sampling and per-sample QC."
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="Stage publish-dataset: the dataset's name, version and split."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig,
        description="Stage evaluate-dataset: does the synthetic data help a segmentor?",
    )
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig, description="Where the work runs: devices, precision, fan-out, locks."
    )

    @model_validator(mode="after")
    def _prompts_name_their_fields(self) -> "FactoryConfig":
        if "{token}" not in self.concept.prompt_template:
            raise ValueError("concept.prompt_template must contain {token}")
        if "{classes}" not in self.condition.prompt_template:
            raise ValueError("condition.prompt_template must contain {classes}")
        if "{class_noun}" not in self.concept.class_prompt_template:
            raise ValueError("concept.class_prompt_template must contain {class_noun}")
        return self


def load_config(path: str | Path) -> FactoryConfig:
    """Read a YAML file into a validated ``FactoryConfig``; errors name the file and the bad keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1]
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}: {bad!r}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a configuration") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    try:
        return parse_config(data, origin=str(path))
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a configuration") from None


def parse_config(data: dict, origin: str = "config") -> FactoryConfig:
    """Validate a mapping into a ``FactoryConfig`` with an error listing every bad key and why."""
    try:
        return FactoryConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{origin} is invalid: {problems}") from exc
