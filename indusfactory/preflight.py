"""Preflight: everything a config names, checked in seconds before any work starts.

``check(config, stage)`` returns a list of :class:`Problem` (empty when the run can start): the
adherence scorer and crack styles, scheduler names, the base model (component folders,
safetensors headers, the classes ``model_index.json`` names), the factory root and the sources
(local: present, readable, the root writable and with free space; ``s3://``: endpoint reachable,
credentials accepted, bucket present, the root writable) and the devices. Each problem names the
config key, the place (path, bucket, endpoint, never a credential) and what to check.

A stage checks only what it uses (``STAGE_CHECKS``): ``ingest`` does not need the base model or a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from indusfactory.config import EMBEDDED_BASE_MODEL, FactoryConfig
from indusfactory.infra import failures, storage
from indusfactory.infra.errors import BadInputError, ConfigError
from indusfactory.infra.redact import scrub

PROBE_PREFIX = ".preflight-"
S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2, "mode": "standard"}}
"""botocore settings of the preflight's own S3 client: an unreachable endpoint fails in seconds, not minutes."""
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
SD1_COMPONENTS: dict[str, tuple[str, frozenset[str]]] = {
    "unet": ("diffusers", frozenset({"UNet2DConditionModel"})),
    "vae": ("diffusers", frozenset({"AutoencoderKL"})),
    "text_encoder": ("transformers", frozenset({"CLIPTextModel"})),
    "tokenizer": ("transformers", frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})),
}
"""The classes an SD 1.x pipeline's ``model_index.json`` names for each component (the scheduler: any diffusers one)."""
SD1_PIPELINES = frozenset({"StableDiffusionPipeline"})
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIG_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer.json", "vocab.json"),
}
SAMPLING_SCHEDULERS = frozenset({"dpmsolver++", "dpmsolver++-karras", "unipc", "ddim", "euler"})
"""``generation.scheduler`` names ``indusfactory.learning.models.scheduler_for`` builds."""


@dataclass(frozen=True)
class Problem:
    """One thing that would make the run fail: the config key, the place, and what to check."""

    key: str
    where: str
    message: str

    def __str__(self) -> str:
        place = f" ({self.where})" if self.where and self.where not in self.message else ""
        return scrub(f"{self.key}{place}: {self.message}")


# -- names -----------------------------------------------------------------------------------------


def check_adherence_scorer(config: FactoryConfig) -> list[Problem]:
    """A registered (or entry point) name, an allowed import path, or ``segformer:<folder>`` that exists."""
    from indusfactory.generation import scorers

    name = config.generation.adherence_scorer
    if name is None:
        return []
    if name.startswith(scorers.SEGFORMER_PREFIX):
        folder = name[len(scorers.SEGFORMER_PREFIX) :]
        if _exists(folder, "config.json"):
            return []
        return [
            Problem(
                scorers.KEY,
                folder,
                f"segmentor folder {folder} has no config.json: point it at the "
                "evaluation/<fp>/segmentor folder an evaluation wrote",
            )
        ]
    try:
        scorers.resolve(name)
    except ConfigError as exc:
        return [Problem(scorers.KEY, name, str(exc).removeprefix(f"{scorers.KEY} "))]
    return []


def check_procedural_styles(config: FactoryConfig) -> list[Problem]:
    """Every ``plan.procedural_styles`` value names a crack style."""
    from indusfactory.drivers.cracks import CRACK_STYLES

    return [
        Problem(
            f"plan.procedural_styles.{cls}",
            style,
            f"{style!r} is not a crack style; known: {', '.join(sorted(CRACK_STYLES))}",
        )
        for cls, style in config.plan.procedural_styles.items()
        if style not in CRACK_STYLES
    ]


def check_schedulers(config: FactoryConfig) -> list[Problem]:
    """The sampling scheduler and both learning-rate schedulers are names the code builds."""
    from diffusers.optimization import SchedulerType

    problems = []
    if config.generation.scheduler not in SAMPLING_SCHEDULERS:
        problems.append(
            Problem(
                "generation.scheduler",
                config.generation.scheduler,
                f"unknown sampling scheduler; known: {', '.join(sorted(SAMPLING_SCHEDULERS))}",
            )
        )
    known = {s.value for s in SchedulerType}
    for section in ("concept", "condition"):
        name = getattr(config, section).lr_scheduler
        if name not in known:
            problems.append(
                Problem(
                    f"{section}.lr_scheduler",
                    name,
                    f"unknown learning-rate scheduler; known: {', '.join(sorted(known))}",
                )
            )
    return problems


# -- base model ------------------------------------------------------------------------------------


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read, from its header only (None when it can)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes, not even a header)"
            (length,) = struct.unpack("<Q", head)
            if length > min(SAFETENSORS_MAX_HEADER, size - 8):
                return f"{path} is truncated or not safetensors (header of {length} bytes in a {size}-byte file)"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a mapping)"
    end = max(
        (
            t["data_offsets"][1]
            for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2
        ),
        default=0,
    )
    if 8 + length + end > size:
        return f"{path} is truncated: its header needs {8 + length + end} bytes, the file has {size}"
    return None


def _model_folder(config: FactoryConfig) -> Path | None:
    """The local folder of the base model (the hub cache's snapshot for a hub id already downloaded), or None."""
    pretrained = config.base_model.pretrained
    if pretrained == EMBEDDED_BASE_MODEL:
        from indusfactory.learning.models import embedded_model_path

        return embedded_model_path()
    if _looks_local(pretrained):
        return Path(pretrained).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "model_index.json", revision=config.base_model.revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: loading names it
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _index_problems(folder: Path, index: dict) -> list[str]:
    problems = []
    if index.get("_class_name") not in SD1_PIPELINES:
        problems.append(
            f"model_index.json names a {index.get('_class_name')!r}, not a Stable Diffusion 1.x pipeline "
            f"({', '.join(sorted(SD1_PIPELINES))})"
        )
    for component, (library, classes) in SD1_COMPONENTS.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library and entry[1] in classes):
            problems.append(
                f"model_index.json names {entry!r} for {component}, expected "
                f"[{library}, {' or '.join(sorted(classes))}] (an SD 1.x pipeline)"
            )
    scheduler = index.get("scheduler")
    if not (isinstance(scheduler, list) and len(scheduler) == 2 and str(scheduler[1]).endswith("Scheduler")):
        problems.append(f"model_index.json names {scheduler!r} for the scheduler, not a diffusers scheduler")
    return problems


def _component_problems(folder: Path, component: str, allow_pickle: bool) -> list[str]:
    part = folder / component
    if not part.is_dir():
        return [f"component folder {part} is missing"]
    problems = []
    if not any((part / name).is_file() for name in CONFIG_FILES.get(component, ())):
        problems.append(f"{part} lacks {' or '.join(CONFIG_FILES[component])}")
    if component in WEIGHT_FILES:
        weights = sorted(part.glob("*.safetensors"))
        if not weights and not allow_pickle:
            problems.append(
                f"{part} holds no .safetensors weights (pickle weights load only with base_model.allow_pickle_weights)"
            )
        problems += [p for p in map(safetensors_problem, weights) if p]
    return problems


def base_model_problems(folder: Path, allow_pickle: bool = False) -> list[str]:
    """What is wrong with a local diffusers SD 1.x folder: index, components, weight headers."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return [f"{folder} is not a diffusers pipeline folder: model_index.json is missing"]
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{index_file} cannot be read: {exc}"]
    if not isinstance(index, dict):
        return [f"{index_file} does not hold a mapping"]
    problems = _index_problems(folder, index)
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        problems += _component_problems(folder, component, allow_pickle)
    return problems


def check_base_model(config: FactoryConfig) -> list[Problem]:
    """The base model folder (local, embedded, or a hub id already in the cache); a hub id not yet downloaded
    is left to loading."""
    folder = _model_folder(config)
    if folder is None:
        return []
    key = "base_model.pretrained"
    if not folder.is_dir():
        return [Problem(key, str(folder), f"base model folder {folder} does not exist")]
    return [Problem(key, str(folder), p) for p in base_model_problems(folder, config.base_model.allow_pickle_weights)]


def _looks_local(name: str) -> bool:
    """A local path rather than a hub id, by the rule ``models.resolve_base_model`` uses."""
    return os.path.isdir(os.path.expanduser(name)) or name.startswith((".", "/", "~"))


def check_evaluation_models(config: FactoryConfig, stage: str) -> list[Problem]:
    """Local folders the evaluation names (segmentor backbone, CLIP features) exist, when the stage evaluates."""
    ev = config.evaluation
    if stage != "evaluate-dataset" and not (stage == "generate-dataset" and ev.enabled):
        return []
    named = [("evaluation.segmentor_pretrained", ev.segmentor_pretrained)]
    if ev.feature_extractor.startswith("clip:"):
        named.append(("evaluation.feature_extractor", ev.feature_extractor[len("clip:") :]))
    return [
        Problem(key, value, f"folder {Path(value).expanduser()} does not exist (a hub id has no leading . / ~)")
        for key, value in named
        if value and _looks_local(value) and not Path(value).expanduser().is_dir()
    ]


# -- devices ---------------------------------------------------------------------------------------


def check_devices(config: FactoryConfig) -> list[Problem]:
    """The devices ``execution`` asks for exist (CUDA asked for but absent is named)."""
    from indusfactory.infra.devices import generation_devices

    key = "execution.devices" if config.execution.devices else "execution.device"
    try:
        generation_devices(config.execution)
    except BadInputError as exc:
        return [Problem(key, "", f"{exc}; run on a GPU worker or set execution.device: cpu")]
    return []


# -- storage ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """One location the config names: its key, URI, and what it must be."""

    key: str
    uri: str
    kind: str  # "file", "folder" or "root" (a folder that must be writable, created when missing)


def places(config: FactoryConfig, stage: str) -> list[Place]:
    """The locations a stage reads or writes."""
    src = config.source
    found = [Place("factory_root", config.factory_root, "root")]
    if src.format == "coco":
        found.append(Place("source.coco_annotations", src.coco_annotations, "file"))
    else:
        found.append(Place("source.masks_dir", src.masks_dir or "", "folder"))
    found += [
        Place("source.images_dir", src.images_dir, "folder"),
        Place("source.defect_free_dir", src.defect_free_dir, "folder"),
    ]
    if config.plan.roi_dir and stage in ("generate-dataset", "generate-shards", "evaluate-dataset"):
        found.append(Place("plan.roi_dir", config.plan.roi_dir, "folder"))
    if _sample_data_to_be_made(config):
        found = [p for p in found if p.key == "factory_root"]
    return found


def _sample_data_to_be_made(config: FactoryConfig) -> bool:
    """The sources are missing and laid out as the sample data, which the ingest task writes there."""
    from indusfactory.demo.sample_data import sample_data_root_of

    src = config.source
    if not src.make_sample_data or src.format != "coco":
        return False
    root = sample_data_root_of(src.coco_annotations, src.images_dir, src.defect_free_dir)
    return root is not None and not Path(src.coco_annotations).expanduser().exists()


def _exists(uri: str, *parts: str) -> bool:
    try:
        return storage.exists(storage.join(uri, *parts) if parts else uri)
    except Exception:  # noqa: BLE001 - unreachable or refused: the storage checks name it
        return False


def _local_problems(place: Place, min_free_mb: float) -> list[str]:
    path = Path(storage.normalise_uri(place.uri))
    if place.kind == "root":
        return _local_root_problems(path, min_free_mb)
    if not path.exists():
        return [f"{path} does not exist"]
    wanted_dir = place.kind == "folder"
    if path.is_dir() != wanted_dir:
        found, expected = ("a file", "a folder") if wanted_dir else ("a folder", "a file")
        return [f"{path} is {found}, expected {expected}"]
    if not os.access(path, os.R_OK | (os.X_OK if wanted_dir else 0)):
        return [f"{path} is not readable by this user (uid {os.getuid()}): check its permissions"]
    return []


def _local_root_problems(path: Path, min_free_mb: float) -> list[str]:
    """The factory root exists (or can be made), a test file can be written and removed, and space is free."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        probe.write_bytes(b"preflight")
        probe.unlink()
    except OSError as exc:
        hint = failures.HINTS.get(failures.failure_kind(exc), "check the path and its permissions")
        return [f"{path} is not writable ({exc.strerror or exc}); {hint}"]
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        return [
            f"only {free_mb:.0f} MiB free on the volume of {path} (execution.preflight_min_free_mb: "
            f"{min_free_mb:.0f}); free space or use another volume"
        ]
    return []


def _s3_filesystem():
    """An S3 filesystem for the checks alone: credentials as the factory's (environment), short timeouts."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=S3_TIMEOUTS)
    fs.retries = 2  # s3fs's own retry loop (5 by default, with backoff) on top of botocore's
    return fs


def _s3_error(exc: BaseException, endpoint: str, bucket: str) -> str:
    kind = failures.failure_kind(exc)
    if kind in ("transient", "unknown") and not failures.service_error(exc):
        return (
            f"endpoint {endpoint} cannot be reached ({type(exc).__name__}): check AWS_ENDPOINT_URL, the network "
            "and that the service is up"
        )
    code = (failures.service_error(exc) or (type(exc).__name__, None))[0]
    hint = failures.HINTS.get(kind, "check the endpoint, the bucket and the credentials")
    return f"bucket {bucket!r} on endpoint {endpoint}: {code}; {hint}"


def _s3_bucket_problem(fs, bucket: str, endpoint: str) -> str | None:
    """One request that proves the endpoint answers, the credentials are accepted and the bucket exists."""
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001 - classified and named below
        return _s3_error(exc, endpoint, bucket)
    return None


def _s3_place_problem(fs, place: Place, endpoint: str) -> str | None:
    bucket, key, _ = fs.split_path(place.uri)
    try:
        if place.kind == "file":
            fs.call_s3("head_object", Bucket=bucket, Key=key)
        elif place.kind == "folder":
            listed = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
            if not listed.get("KeyCount"):
                return f"nothing under s3://{bucket}/{key} on endpoint {endpoint}: check the path"
        else:
            probe = "/".join(p for p in (key.rstrip("/"), f"{PROBE_PREFIX}{uuid.uuid4().hex}") if p)
            fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"preflight")
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)
    except Exception as exc:  # noqa: BLE001 - classified and named below
        kind = failures.failure_kind(exc)
        if kind == "no_key":
            return f"s3://{bucket}/{key} does not exist on endpoint {endpoint}: check the path"
        if kind == "denied" and place.kind == "root":
            return (
                f"cannot write to s3://{bucket}/{key} on endpoint {endpoint} (a test object was refused: "
                f"{(failures.service_error(exc) or ('AccessDenied',))[0]}); the credentials need s3:PutObject "
                "and s3:DeleteObject there"
            )
        return _s3_error(exc, endpoint, bucket)
    return None


def check_storage(config: FactoryConfig, stage: str = "generate-dataset") -> list[Problem]:
    """Local places present, readable, the root writable with free space; S3 places reachable, credentials
    accepted, bucket present, the root writable (other fsspec stores are not checked). One problem per bucket
    that cannot be used at all."""
    problems: list[Problem] = []
    named = places(config, stage)
    remote = [p for p in named if storage.is_remote(p.uri)]
    for place in named:
        if not storage.is_remote(place.uri):
            problems += [
                Problem(place.key, place.uri, m) for m in _local_problems(place, config.execution.preflight_min_free_mb)
            ]
    s3_places = [p for p in remote if p.uri.startswith(("s3://", "s3a://"))]
    if s3_places:
        problems += _check_s3(s3_places)
    return problems


def _check_s3(s3_places: list[Place]) -> list[Problem]:
    fs = _s3_filesystem()
    endpoint = storage.endpoint_of(s3_places[0].uri) or "s3"
    problems: list[Problem] = []
    by_bucket: dict[str, list[Place]] = {}
    for place in s3_places:
        by_bucket.setdefault(fs.split_path(place.uri)[0], []).append(place)
    for bucket, group in by_bucket.items():
        problem = _s3_bucket_problem(fs, bucket, endpoint)
        if problem is not None:
            problems.append(Problem(", ".join(p.key for p in group), f"s3://{bucket}", problem))
            if "cannot be reached" in problem:
                break  # the same endpoint serves every bucket: one line says it
            continue
        for place in group:
            problem = _s3_place_problem(fs, place, endpoint)
            if problem is not None:
                problems.append(Problem(place.key, place.uri, problem))
    return problems


# -- all of it -------------------------------------------------------------------------------------

Check = Callable[[FactoryConfig, str], list[Problem]]

CHECKS: dict[str, Check] = {
    "names": lambda c, s: check_procedural_styles(c) + check_schedulers(c) + check_adherence_scorer(c),
    "base_model": lambda c, s: check_base_model(c) + check_evaluation_models(c, s),
    "devices": lambda c, s: check_devices(c),
    "storage": check_storage,
}
STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "ingest": ("storage",),
    "learn-concept": ("names", "base_model", "devices", "storage"),
    "learn-condition": ("names", "base_model", "devices", "storage"),
    "generate-dataset": ("names", "base_model", "devices", "storage"),
    "generate-shards": ("names", "base_model", "devices", "storage"),
    "evaluate-dataset": ("names", "base_model", "devices", "storage"),
}
"""What each flow checks: what it (or a stage it runs) uses."""


def check(config: FactoryConfig, stage: str = "generate-dataset", only: Iterable[str] | None = None) -> list[Problem]:
    """Every problem preflight finds for ``stage`` (empty: the run can start)."""
    names = tuple(only) if only is not None else STAGE_CHECKS.get(stage, tuple(CHECKS))
    problems: list[Problem] = []
    for name in names:
        problems += CHECKS[name](config, stage)
    return problems
