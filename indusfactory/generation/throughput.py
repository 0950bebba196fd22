"""Measured generation throughput, kept per device kind, and the estimates made from it before spending.

After each run that generated images, one small JSON record goes to
``<factory_root>/throughput/<device kind>/<created>-<dataset>-<version>.json``: images generated, wall
seconds of the generation stage, images/s, and what decides the speed (base model, resolution, sampling
steps, batch size). Before the next run generates, ``estimate`` reads the records of the same device kind,
base model and resolution, scales each rate by its model evaluations per image (sampling steps, two per
step while guidance runs: the time per image grows with them) and takes the median of the last few: the
expected images/s and the time the plan will take.
"""

from __future__ import annotations

import posixpath
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone

from indusfactory.config import ExecutionConfig, FactoryConfig, GenerationConfig
from indusfactory.infra import storage
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.layout import FactoryLayout

RECENT_RUNS = 5


@dataclass(frozen=True)
class Estimate:
    device: str
    images: int
    images_per_s: float
    runs: int
    """How many earlier runs it is made from."""

    @property
    def seconds(self) -> float:
        return self.images / self.images_per_s

    def text(self) -> str:
        return (
            f"{self.images} images at {self.images_per_s:.2f} images/s on {self.device}: about "
            f"{duration(self.seconds)} (median of {self.runs} earlier run{'s' if self.runs != 1 else ''})"
        )


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def device_kind(execution: ExecutionConfig) -> str:
    """What the generation of ``execution`` runs on: ``cpu x1``, ``cuda:NVIDIA H200 x2`` (this process's
    devices), or ``work pool generate-shards/gpu`` (the workers of the shard deployment)."""
    if execution.fan_out == "work_pool":
        return f"work pool {execution.shard_deployment}"
    import torch

    from indusfactory.infra.devices import generation_devices

    devices = generation_devices(execution)
    names = sorted({"cpu" if d.type == "cpu" else f"cuda:{torch.cuda.get_device_name(d)}" for d in devices})
    return f"{'+'.join(names)} x{len(devices)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "device"


def _folder(root: str, device: str) -> str:
    return FactoryLayout.of(root).throughput(_slug(device))


def unet_passes(gen: GenerationConfig) -> float:
    """Model evaluations per image: a step with classifier-free guidance costs two (conditional and
    unconditional), one without (after ``guidance_cutoff``, or with guidance scale 1)."""
    guided_share = gen.guidance_cutoff if gen.guidance_scale > 1 else 0.0
    return gen.steps * (1 + guided_share)


def _conditions(config: FactoryConfig) -> dict:
    return {
        "base_model": config.base_model.pretrained,
        "resolution": config.base_model.resolution,
        "steps": config.generation.steps,
        "unet_passes": unet_passes(config.generation),
        "batch_size": config.generation.batch_size,
    }


def _passes_of(run: dict) -> float:
    """A record's model evaluations per image (records from before ``unet_passes``: guidance at every step)."""
    return float(run.get("unet_passes") or 2 * run["steps"])


def record(config: FactoryConfig, device: str, dataset_uri: str, images: int, seconds: float) -> str | None:
    """Keep one run's measured throughput; None (nothing written) when it generated nothing."""
    if images <= 0 or seconds <= 0:
        return None
    created = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{created}-{fingerprint('throughput', dataset_uri, length=8)}"  # the record says which dataset
    uri = storage.join(_folder(config.factory_root, device), f"{name}.json")
    storage.write_json_atomic(
        uri,
        {
            "device": device,
            "dataset_uri": dataset_uri,
            "created": created,
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": images / seconds,
            **_conditions(config),
        },
    )
    return uri


def history(root: str, device: str) -> list[dict]:
    """The throughput records of ``device``, oldest first."""
    folder = _folder(root, device)
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith(".json"))
    return [storage.read_json(storage.join(folder, name)) for name in names]


def estimate(config: FactoryConfig, device: str, images: int) -> Estimate | None:
    """Expected images/s and time of ``images`` images on ``device`` from earlier runs with the same base model
    and resolution (rates scaled by model evaluations per image); None without such a run."""
    if images <= 0:
        return None
    now = _conditions(config)
    matching = [
        r
        for r in history(config.factory_root, device)
        if r.get("base_model") == now["base_model"]
        and r.get("resolution") == now["resolution"]
        and r.get("images_per_s", 0) > 0
        and r.get("steps", 0) > 0
    ][-RECENT_RUNS:]
    if not matching:
        return None
    rates = [r["images_per_s"] * _passes_of(r) / now["unet_passes"] for r in matching]
    return Estimate(device=device, images=images, images_per_s=statistics.median(rates), runs=len(matching))
