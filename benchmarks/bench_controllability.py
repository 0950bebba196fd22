"""Does the factory learn what it is shown? Adherence and fidelity on surfaces it has never seen.

For each dataset (procedural surfaces from ``indusfactory.demo.surfaces``: grey and tinted, three
classes of dark defects 1-4 px wide at 256 px, a test split never used in training), this runs
the recipe of the config (the defaults unless ``--set`` changes them) through the library's
stages (ingest, learn-concept, learn-condition) and then samples the held-out probe: defect-free
images no stage read, each with a test-split mask no stage saw. It reports:

- adherence: median label AUC (a label pixel darker than a ring pixel), the share of samples
  darker inside their label, and the chance level (the same images, other samples' masks);
- the real images' own level at the same resolution (test-split defective images, their masks);
- fidelity: colourfulness (median per-pixel RGB spread) and mean colour of generated vs real
  images, KID with the offline feature extractor (compares runs only);
- seconds per stage.

    python benchmarks/bench_controllability.py                       # grey + teal, default recipe
    python benchmarks/bench_controllability.py --tints grey --set condition.steps=300
    python benchmarks/bench_controllability.py --tints grey --verdict   # + the whole chain's verdict

With ``--verdict`` it then runs the whole chain as a user would (``indusfactory run`` on the same
configuration, in a subprocess: the trained models are reused, a dataset is generated and
published, and the evaluation stage trains the downstream segmentor: real only, synthetic + real,
and the shuffled-labels and empty-mask controls, over its seeds) and records the evaluation's table
and verdict, with the published dataset's own label adherence.

Raw figures go to ``benchmarks/results/controllability-<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indusfactory.config import parse_config  # noqa: E402
from indusfactory.demo.surfaces import write_surface_dataset  # noqa: E402
from indusfactory.evaluation.features import feature_extractor  # noqa: E402
from indusfactory.evaluation.metrics import kernel_inception_distance  # noqa: E402
from indusfactory.generation import adherence  # noqa: E402
from indusfactory.generation.plan import SourceImages  # noqa: E402
from indusfactory.infra.imaging import fit_square  # noqa: E402
from indusfactory.layout import EVALUATION_FILE, MANIFEST_FILE  # noqa: E402
from indusfactory.learning.concept import concept_folder_for, train_concept  # noqa: E402
from indusfactory.learning.condition import condition_folder_for, condition_prompt, train_condition  # noqa: E402
from indusfactory.learning.controllability import probe_cases, sample_probe  # noqa: E402
from indusfactory.learning.models import load_generation_pipeline  # noqa: E402
from indusfactory.schema import category_index  # noqa: E402
from indusfactory.sources.ingest import catalog_folder_for, ingest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _set(data: dict, dotted: str) -> None:
    key, _, raw = dotted.partition("=")
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(raw)


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _test_split(data, resolution: int, categories: list[dict]):
    """(image, [(class index, class name, mask)]) of every test-split defective image at ``resolution``."""
    from pycocotools import mask as mask_utils

    coco = json.loads(data.coco_annotations.read_text())
    to_class = category_index(categories)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = []
    for entry in coco["images"]:
        if entry["split"] != "test":
            continue
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        instances = []
        for a in anns:
            rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
            mask = fit_square(mask_utils.decode(rle).astype(bool), resolution)
            instances.append((to_class[a["category_id"]], names[a["category_id"]], mask))
        out.append((fit_square(_load_png(data.images_dir / entry["file_name"]), resolution), instances))
    return out


def source_section(data) -> dict:
    """The ``source`` config of a surface dataset (its given split, never sample data)."""
    return {
        "coco_annotations": str(data.coco_annotations),
        "images_dir": str(data.images_dir),
        "defect_free_dir": str(data.defect_free_dir),
        "split_field": "split",
        "make_sample_data": False,
    }


def run_dataset(tint: str, overrides: list[str], workdir: Path, probe_count: int, seed: int) -> dict:
    data = write_surface_dataset(workdir / f"data-{tint}", tint=tint, seed=seed)
    raw = {"factory_root": str(workdir / f"factory-{tint}"), "source": source_section(data)}
    for item in overrides:
        _set(raw, item)
    config = parse_config(raw, origin="benchmark")
    (workdir / f"config-{tint}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    resolution = config.base_model.resolution
    timings = {}
    started = time.perf_counter()
    catalog = ingest(config.source, catalog_folder_for(config))
    timings["ingest"] = time.perf_counter() - started
    started = time.perf_counter()
    concept = train_concept(config, catalog, concept_folder_for(config, catalog))
    timings["learn_concept"] = time.perf_counter() - started
    started = time.perf_counter()
    condition = train_condition(config, catalog, concept, condition_folder_for(config, catalog, concept))
    timings["learn_condition"] = time.perf_counter() - started

    test = _test_split(data, resolution, catalog.categories)
    heldout = [fit_square(_load_png(p), resolution) for p in sorted(data.heldout_defect_free_dir.glob("*.png"))]
    masks = [inst for _, instances in test for inst in instances]
    cases = probe_cases(heldout, masks, probe_count, seed=seed)
    started = time.perf_counter()
    pipe = load_generation_pipeline(config.base_model, concept.uri, condition.uri, config.generation.scheduler)
    defects = SourceImages(catalog.uri, catalog.categories).defect_chroma(resolution)
    result = sample_probe(
        pipe, config, cases, lambda names: condition_prompt(config, names), seed=seed, defect_chroma=defects
    )
    timings["probe_generation"] = time.perf_counter() - started
    # the same samples in the models' own colour (generation.colour_match: none), for the record
    own_colour = config.model_copy(update={"generation": config.generation.model_copy(update={"colour_match": "none"})})
    raw = sample_probe(pipe, own_colour, cases, lambda names: condition_prompt(config, names), seed=seed)

    real_images = [image for image, _ in test]
    real_masks = [np.logical_or.reduce([m for _, _, m in instances]) for _, instances in test]
    real = adherence.measure(real_images, real_masks)
    round_trip = _vae_round_trip(pipe, real_images)
    through_vae = adherence.measure(round_trip, real_masks)
    extract = feature_extractor(config.evaluation.feature_extractor)
    kid = kernel_inception_distance(
        extract(result.images), extract(real_images), subset_size=min(len(result.images), len(real_images), 50)
    )
    sheet_path = RESULTS / f"controllability-{tint}.png"
    _contact_sheet(result, sheet_path)
    return {
        "tint": tint,
        "resolution": resolution,
        "probe_samples": len(cases),
        "generated": result.summary.as_dict(),
        "real": real.as_dict(),
        "real_through_vae": through_vae.as_dict(),
        "colourfulness": {
            "generated": float(np.median([adherence.colourfulness(i) for i in result.images])),
            "real": float(np.median([adherence.colourfulness(i) for i in real_images])),
            "real_through_vae": float(np.median([adherence.colourfulness(i) for i in round_trip])),
        },
        "mean_rgb": {
            "generated": np.mean([i.reshape(-1, 3).mean(0) for i in result.images], 0).round(1).tolist(),
            "real": np.mean([i.reshape(-1, 3).mean(0) for i in real_images], 0).round(1).tolist(),
        },
        "kid_small_features": kid,
        "colour_match": config.generation.colour_match,
        "models_own_colour": {
            "generated": raw.summary.as_dict(),
            "colourfulness": float(np.median([adherence.colourfulness(i) for i in raw.images])),
            "mean_rgb": np.mean([i.reshape(-1, 3).mean(0) for i in raw.images], 0).round(1).tolist(),
            "kid_small_features": kernel_inception_distance(
                extract(raw.images), extract(real_images), subset_size=min(len(raw.images), len(real_images), 50)
            ),
        },
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "contact_sheet": sheet_path.name,
    }


def chain_verdict(tint: str, workdir: Path) -> dict:
    """Run ``indusfactory run`` on the dataset's configuration and return its evaluation and adherence."""
    config_file = workdir / f"config-{tint}.yaml"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config_file)], check=True, cwd=REPO)
    seconds = time.perf_counter() - started
    config = parse_config(yaml.safe_load(config_file.read_text()), origin=str(config_file))
    found = sorted(
        Path(config.factory_root).glob(f"datasets/*/*/evaluation/*/{EVALUATION_FILE}"), key=lambda p: p.stat().st_mtime
    )
    evaluation = json.loads(found[-1].read_text())
    manifest = json.loads((found[-1].parents[2] / MANIFEST_FILE).read_text())
    return {
        "seconds": round(seconds, 1),
        "samples": manifest["counts"],
        "adherence": manifest.get("adherence"),
        "evaluation_adherence": evaluation.get("adherence"),
        "comparisons": evaluation.get("comparisons"),
        "results": evaluation["results"],
        "chance": evaluation.get("chance"),
        "baseline": evaluation.get("baseline"),
        "verdict": evaluation.get("verdict"),
        "verdict_reason": evaluation.get("verdict_reason"),
    }


def _vae_round_trip(pipe, images: list[np.ndarray]) -> list[np.ndarray]:
    """The real images encoded and decoded by the base model's VAE: the best any generated sample can look."""
    import torch

    from indusfactory.infra.imaging import from_model_output, to_model_tensor

    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(to_model_tensor(images)).latent_dist.mean).sample
    return list(from_model_output(((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()))


def _contact_sheet(result, path: Path) -> None:
    from indusfactory.infra.imaging import image_grid
    from indusfactory.learning.condition import mask_overlay
    from indusfactory.schema import encode_png

    tiles = []
    for driver, image, mask in list(zip(result.drivers, result.images, result.masks))[:8]:
        tiles += [(driver * 255).round().astype(np.uint8), image, mask_overlay(image, mask)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image_grid(tiles, columns=6)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tints", nargs="+", default=["grey", "teal"], help="Datasets to run (surface tints).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Config override, e.g. condition.steps=300 (YAML value).",
    )
    parser.add_argument("--probe", type=int, default=48, help="Held-out probe samples per dataset.")
    parser.add_argument("--seed", type=int, default=0, help="Dataset seed.")
    parser.add_argument("--label", default="default", help="Name of the results file.")
    parser.add_argument(
        "--verdict", action="store_true", help="Then run the whole chain and record the evaluation's verdict."
    )
    parser.add_argument("--workdir", default=None, help="Keep data and models here (default: a temp folder).")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("indusfactory").setLevel(logging.INFO)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-controllability-"))
    # each tint its own dataset (seed + its position), so the grey and colour runs share no geometry
    runs = [run_dataset(t, args.overrides, workdir, args.probe, args.seed + i) for i, t in enumerate(args.tints)]
    if args.verdict:
        for run in runs:
            run["chain"] = chain_verdict(run["tint"], workdir)
    report = {
        "label": args.label,
        "overrides": args.overrides,
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "load_avg": os.getloadavg(),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"controllability-{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")
    for run in runs:
        g, r = run["generated"], run["real"]
        v = run["real_through_vae"]
        print(
            f"{run['tint']:>5}: AUC {g['median_auc']:.3f} (chance {g['chance_auc']:.3f}, real {r['median_auc']:.3f}, "
            f"real through the VAE {v['median_auc']:.3f}) "
            f"darker {g['fraction_darker']:.0%} | colour {run['colourfulness']['generated']:.1f} vs real "
            f"{run['colourfulness']['real']:.1f} | KID {run['kid_small_features']} | {run['seconds']}"
        )
        own = run["models_own_colour"]
        print(
            f"       models' own colour: AUC {own['generated']['median_auc']:.3f} colour {own['colourfulness']:.1f} "
            f"mean RGB {own['mean_rgb']} KID {own['kid_small_features']}"
        )
        if "chain" in run:
            chain = run["chain"]
            for row in chain["results"]:
                print(
                    f"       {row['regime']:24s} real {row['real_fraction']:.1f}: IoU {row['iou']} ± {row['iou_std']}"
                )
            print(f"       verdict: {chain['verdict']} ({chain['verdict_reason']}); {chain['seconds']} s")


if __name__ == "__main__":
    main()
