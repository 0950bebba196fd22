"""The short run form: named profiles and the few parameters an operator changes, composed into one
``FactoryConfig``.

Composition order (each layer overrides the ones before it, key by key, sections merged deeply):

1. the ``FactoryConfig`` defaults (the embedded demo);
2. the **profile** (``PROFILES``: ``demo``, ``smoke``, ``cpu-128``, ``sd15-gpu``), a named preset;
3. the **YAML file** (``config_file``: a local path or a URI such as ``s3://bucket/nightly.yaml``);
4. the **advanced config** (``config``): only the fields it sets (a full config passed as an object, as
   the tests and older callers do, sets every field and so decides everything below the short parameters);
5. the **short parameters** (dataset name, images per driver, defect-free images, sources, base model,
   factory root): what the operator typed last wins.

Why this order: the more specific and the more recently typed, the later. A profile is a generic preset,
a YAML file is a site's settings, the advanced config is a one-off edit of the full form, and the short
parameters are what a person changes for this run, so they are never silently overridden.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from indusfactory.config import FactoryConfig, parse_config
from indusfactory.infra import storage
from indusfactory.infra.errors import ConfigError

ProfileName = Literal["demo", "smoke", "cpu-128", "sd15-gpu"]

PROFILES: dict[str, dict[str, Any]] = {
    "demo": {},
    "smoke": {
        "concept": {"steps": 10, "validation_images": 1, "validation_inference_steps": 4},
        "condition": {
            "steps": 10,
            "validation_images": 1,
            "validation_inference_steps": 4,
            "validation_probe_samples": 4,
        },
        "plan": {"augmentations_per_image": 1, "images_per_driver": 2, "max_defect_free_images": 4},
        "generation": {"steps": 4, "shard_size": 8},
        "evaluation": {"enabled": False},
    },
    "cpu-128": {"base_model": {"resolution": 128}, "evaluation": {"steps": 400, "finetune_steps": 200}},
    "sd15-gpu": {
        "base_model": {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "resolution": 512},
        "concept": {"steps": 800, "batch_size": 4, "learning_rate": 1.0e-4},
        "condition": {"steps": 10000, "batch_size": 8, "learning_rate": 1.0e-5},
        "plan": {"augmentations_per_image": 10, "images_per_driver": 15},
        "generation": {"steps": 20, "batch_size": 16, "shard_size": 256, "conditioning_scale": 1.0},
        "execution": {"device": "cuda", "precision": "bf16"},
    },
}
"""Named presets of the ``FactoryConfig``: ``demo`` is the defaults (embedded tiny model, CPU, sample data);
``smoke`` checks a chain end to end in minutes (few steps, small plan, no evaluation; not a useful dataset);
``cpu-128`` is the demo's recipe at 128 px, the smallest resolution where the embedded model's VAE keeps thin
cracks: labels follow the images on surfaces it never saw (benchmark label AUC 0.90 grey, 0.87 teal, against
chance 0.52 and 0.50; BENCHMARKS.md), about 11-12 min of training on 2 CPU cores instead of 3; and the
evaluation's segmentor budgets at which its real-only baseline learns at 128 px (400 + 200 steps; at 120 + 60
it did not, and the evaluation could only say "inconclusive");
``sd15-gpu`` is Stable Diffusion 1.5 at 512 px on a CUDA GPU with the paper's plan."""


class RunSources(BaseModel):
    """Where the real data is, for this run (unset fields keep the configured ones)."""

    model_config = ConfigDict(extra="forbid")

    coco_annotations: str | None = Field(None, description="COCO instances file of the annotated defective images.")
    images_dir: str | None = Field(None, description="Folder of the defective images.")
    defect_free_dir: str | None = Field(None, description="Folder of the defect-free images (the drivers).")


def merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, mappings merged key by key (lists and values replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(uri: str) -> dict:
    """A YAML mapping from a local path or a storage URI (credentials from the environment)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {uri} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {uri} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def short_overrides(
    dataset_name: str | None = None,
    images_per_driver: int | None = None,
    defect_free_images: int | None = None,
    sources: RunSources | dict | None = None,
    base_model: str | None = None,
    factory_root: str | None = None,
) -> dict:
    """The config keys the short parameters set (only those given)."""
    src = RunSources.model_validate(sources or {}).model_dump(exclude_none=True)
    layer: dict[str, Any] = {
        "factory_root": factory_root,
        "export": {"dataset_name": dataset_name},
        "plan": {"images_per_driver": images_per_driver, "max_defect_free_images": defect_free_images},
        "base_model": {"pretrained": base_model},
        "source": src,
    }
    return _without_none(layer)


def _without_none(layer: dict) -> dict:
    out = {}
    for key, value in layer.items():
        if isinstance(value, dict):
            value = _without_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def compose_config(
    profile: str | None = None, config_file: str | None = None, config: FactoryConfig | dict | None = None, **short: Any
) -> tuple[FactoryConfig, list[str]]:
    """The run's ``FactoryConfig`` from its layers (see the module's order), and the layers applied, by name.

    With only ``config`` given it is returned as it is (the callers that pass a full config see no change).
    """
    layers = short_overrides(**short)
    if config is not None and profile is None and config_file is None and not layers:
        return (config if isinstance(config, FactoryConfig) else parse_config(config, "config")), ["config"]
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    data: dict = {}
    applied = ["defaults"]
    if profile is not None:
        data, applied = merge(data, PROFILES[profile]), [*applied, f"profile {profile}"]
    if config_file:
        data, applied = merge(data, read_config_file(config_file)), [*applied, f"file {config_file}"]
    if config is not None:
        given = (
            config.model_dump(mode="json", exclude_unset=True) if isinstance(config, FactoryConfig) else dict(config)
        )
        data, applied = merge(data, given), [*applied, "advanced config"]
    if layers:
        data, applied = merge(data, layers), [*applied, "short parameters " + ", ".join(sorted(_keys(layers)))]
    return parse_config(data, origin=" < ".join(applied)), applied


def _keys(layer: dict, prefix: str = "") -> list[str]:
    return [
        k
        for key, value in layer.items()
        for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]
