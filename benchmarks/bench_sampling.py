"""Cheaper sampling, quality measured side by side (issue 18): each ``generation`` sampling option against the
20-step default, on models trained once.

Not a test. ``bench_controllability.py`` trains the recipe on procedural surfaces the base model never saw and
probes it; training is the expensive part, so this script does not train: it takes the trained concept and
conditioning network of a controllability run (``--models``: a folder holding ``<tint>-concept`` and
``<tint>-condition``, copied from a controllability workdir's ``factory-<tint>/models/{concept,condition}/<fp>``)
and that run's data folder (``--data``: ``data-<tint>`` as ``write_surface_dataset`` wrote it), and probes the
same held-out cases with every sampling variant:

- quality (once per variant, all probe samples): median label AUC against its chance level, share of samples
  darker inside their label, KID with the offline small extractor against the real test images, mean colour;
  the default (and any variant of ``--spread-of``) is also sampled with other noise seeds (``--spread-seeds``):
  the run-to-run spread that a variant's difference is judged against;
- speed (``--repeats`` rounds, the variants interleaved in each round so that the machine's load hits all of them
  alike): wall and process CPU seconds of ``sample_probe`` on ``--timing-samples`` cases, one torch thread by
  default; reported as images/s relative to the default of the same round (median and spread over rounds).

Sampling goes through ``sample_probe``, which calls the pipeline as generation does (``start_latents``,
``guidance_kwargs``), so a variant here is what ``generation.<field>`` gives in production.

    python benchmarks/bench_sampling.py --models /tmp/speed-ctrl/models --data /tmp/speed-ctrl --tints grey

Raw figures go to ``benchmarks/results/sampling-<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_controllability import _load_png, _test_split, source_section  # noqa: E402

from indusfactory.config import parse_config  # noqa: E402
from indusfactory.demo.surfaces import SurfaceDataset  # noqa: E402
from indusfactory.evaluation.features import feature_extractor  # noqa: E402
from indusfactory.evaluation.metrics import kernel_inception_distance  # noqa: E402
from indusfactory.generation.speed import apply_speed_options, speed_key  # noqa: E402
from indusfactory.infra.imaging import fit_square  # noqa: E402
from indusfactory.learning.condition import condition_prompt  # noqa: E402
from indusfactory.learning.controllability import probe_cases, sample_probe  # noqa: E402
from indusfactory.learning.models import load_generation_pipeline, scheduler_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS: dict[str, dict] = {
    "default": {},
    "dpm-10": {"steps": 10},
    "dpm-karras-10": {"scheduler": "dpmsolver++-karras", "steps": 10},
    "unipc-10": {"scheduler": "unipc", "steps": 10},
    "unipc-8": {"scheduler": "unipc", "steps": 8},
    "dpm-20-cut0.5": {"guidance_cutoff": 0.5},
    "dpm-10-cut0.5": {"steps": 10, "guidance_cutoff": 0.5},
    "unipc-10-cut0.5": {"scheduler": "unipc", "steps": 10, "guidance_cutoff": 0.5},
    "unipc-8-cut0.5": {"scheduler": "unipc", "steps": 8, "guidance_cutoff": 0.5},
    "unipc-10-cut0.3": {"scheduler": "unipc", "steps": 10, "guidance_cutoff": 0.3},
    # the speed options (same sampling as the default; a pipeline of their own, loaded and sped up once)
    "fuse-qkv": {"fuse_qkv": True},
    "channels-last": {"channels_last": True},
    "vae-sliced": {"vae_decode": "sliced"},
    "compile": {"compile": "default"},
}
"""Sampling variants: ``generation`` overrides on top of the default config. The speed options are not in the
default list (``--variants`` names them)."""
SPEED_VARIANTS = ("fuse-qkv", "channels-last", "vae-sliced", "compile")


def surface_data(root: Path) -> SurfaceDataset:
    return SurfaceDataset(
        root=root,
        coco_annotations=root / "defective" / "annotations.json",
        images_dir=root / "defective" / "images",
        defect_free_dir=root / "defect_free",
        heldout_defect_free_dir=root / "heldout_defect_free",
    )


def config_for(variant: dict, data: SurfaceDataset):
    return parse_config(
        {"source": source_section(data), "generation": variant},
        origin="bench_sampling",
    )


class Sampler:
    """One loaded pipeline per tint; the scheduler is swapped per variant (as a pipeline load would build it)."""

    def __init__(self, models: Path, tint: str, data: SurfaceDataset):
        self.models, self.tint, self.data = models, tint, data
        self.pipes: dict[tuple, object] = {}

    def pipe_for(self, gen):
        key = speed_key(gen)
        if key not in self.pipes:
            base = config_for({}, self.data)
            pipe = load_generation_pipeline(
                base.base_model,
                str(self.models / f"{self.tint}-concept"),
                str(self.models / f"{self.tint}-condition"),
                "dpmsolver++",
            )
            apply_speed_options(pipe, gen)
            pipe.base_scheduler_config = dict(pipe.scheduler.config)
            self.pipes[key] = pipe
        return self.pipes[key]

    def run(self, config, cases, seed: int):
        import torch

        pipe = self.pipe_for(config.generation)
        pipe.scheduler = scheduler_for(config.generation.scheduler, pipe.base_scheduler_config)
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            result = sample_probe(pipe, config, cases, lambda names: condition_prompt(config, names), seed=seed)
        return result, time.perf_counter() - wall, time.process_time() - cpu


def quality(result, real_images, extract) -> dict:
    summary = result.summary.as_dict()
    kid = kernel_inception_distance(
        extract(result.images), extract(real_images), subset_size=min(len(result.images), len(real_images), 50)
    )
    return {
        "median_auc": round(summary["median_auc"], 4),
        "chance_auc": round(summary["chance_auc"], 4),
        "fraction_darker": round(summary["fraction_darker"], 4),
        "kid": [round(kid[0], 5), round(kid[1], 5)],
        "mean_rgb": np.mean([i.reshape(-1, 3).mean(0) for i in result.images], 0).round(1).tolist(),
    }


def run_tint(tint: str, index: int, args) -> dict:
    data = surface_data(args.data / f"data-{tint}")
    seed = args.seed + index  # as bench_controllability: each tint its own dataset and probe seed
    base = config_for({}, data)
    resolution = base.base_model.resolution
    coco = json.loads(data.coco_annotations.read_text())
    categories = [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    test = _test_split(data, resolution, categories)
    heldout = [fit_square(_load_png(p), resolution) for p in sorted(data.heldout_defect_free_dir.glob("*.png"))]
    masks = [inst for _, instances in test for inst in instances]
    cases = probe_cases(heldout, masks, args.probe, seed=seed)
    real_images = [image for image, _ in test]
    extract = feature_extractor(base.evaluation.feature_extractor)
    sampler = Sampler(args.models, tint, data)
    names = [v for v in args.variants if v in VARIANTS]

    out: dict = {"tint": tint, "probe_samples": len(cases), "variants": {}, "default_seeds": {}}
    for name in names:
        config = config_for(VARIANTS[name], data)
        result, wall, cpu = sampler.run(config, cases, seed)
        gen = config.generation
        out["variants"][name] = {
            "generation": {k: getattr(gen, k) for k in ("scheduler", "steps", "guidance_cutoff", "profile")},
            **quality(result, real_images, extract),
            "quality_pass_wall_s": round(wall, 2),
        }
        print(f"{tint} {name}: {out['variants'][name]}", flush=True)
    out["other_seeds"] = {}
    for name in args.spread_of:
        for extra in args.spread_seeds:
            result, _, _ = sampler.run(config_for(VARIANTS[name], data), cases, seed + extra)
            figures = quality(result, real_images, extract)
            out["other_seeds"].setdefault(name, {})[str(seed + extra)] = figures
            if name == "default":
                out["default_seeds"][str(seed + extra)] = figures
            print(f"{tint} {name}, noise seed {seed + extra}: {figures}", flush=True)

    timing_cases = cases[: args.timing_samples]
    rounds = []
    for repeat in range(args.repeats):
        times = {}
        for name in names:
            _, wall, cpu = sampler.run(config_for(VARIANTS[name], data), timing_cases, seed)
            times[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
        rounds.append(times)
        print(f"{tint} timing round {repeat}: {times} load {os.getloadavg()}", flush=True)
    out["timing_rounds"] = rounds
    for name in names if rounds else []:
        for kind in ("wall_s", "cpu_s"):
            ratios = [r["default"][kind] / r[name][kind] for r in rounds]
            out["variants"][name][f"speedup_{kind[:-2]}"] = {
                "median": round(statistics.median(ratios), 3),
                "min": round(min(ratios), 3),
                "max": round(max(ratios), 3),
            }
        out["variants"][name]["images_per_s_wall"] = [round(len(timing_cases) / r[name]["wall_s"], 3) for r in rounds]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="Folder with <tint>-concept and <tint>-condition.")
    parser.add_argument("--data", type=Path, required=True, help="Folder with data-<tint> (write_surface_dataset).")
    parser.add_argument("--tints", nargs="+", default=["grey"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v for v in VARIANTS if v not in SPEED_VARIANTS],
        help=f"Of: {', '.join(VARIANTS)}.",
    )
    parser.add_argument("--probe", type=int, default=48, help="Held-out probe samples per variant (quality).")
    parser.add_argument(
        "--spread-seeds", type=int, nargs="*", default=[100, 200], help="Extra noise seeds of the default."
    )
    parser.add_argument(
        "--spread-of", nargs="*", default=["default"], help="Variants also sampled with the --spread-seeds."
    )
    parser.add_argument("--timing-samples", type=int, default=16, help="Probe samples per timed pass.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved timing rounds.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="default")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    runs = [run_tint(t, i, args) for i, t in enumerate(args.tints)]
    import diffusers

    report = {
        "label": args.label,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "torch_threads": args.threads,
        "load_avg_at_end": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "models": str(args.models),
        "variants": {name: VARIANTS[name] for name in args.variants if name in VARIANTS},
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sampling-{args.label}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
