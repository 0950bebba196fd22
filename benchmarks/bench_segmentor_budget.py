"""Does the downstream segmentor learn from the synthetic data when it is given a larger budget?

The evaluation's default budgets (120 synthetic steps, 60 real fine-tuning steps, 180 real-only steps) were
chosen so the demo stays within minutes. This reruns the evaluation's protocol (the library's
``run_protocol``: same data, seeds, regimes, spread rule and verdict) on an already published dataset with
other budgets, without writing an evaluation, and records the table and the verdict.

    python benchmarks/bench_segmentor_budget.py /work/bench-128/config-grey.yaml --steps 400 --finetune-steps 200 \\
        --fractions 0.1 --controls "shuffled labels" --label grey-128-400

Raw figures go to ``benchmarks/results/segmentor-budget-<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indusfactory.config import parse_config  # noqa: E402
from indusfactory.evaluation.evaluate import (  # noqa: E402
    ProtocolData,
    published_dataset,
    real_split,
    run_protocol,
    synthetic_images,
)
from indusfactory.learning.models import configure_torch  # noqa: E402
from indusfactory.publishing.catalogue import find_version  # noqa: E402
from indusfactory.schema import CatalogRecord  # noqa: E402
from indusfactory.sources.ingest import catalog_folder_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_file", help="The YAML config the dataset was made with (its factory root).")
    parser.add_argument("--dataset", default=None, help="name or name/version (default: export.dataset_name).")
    parser.add_argument("--steps", type=int, required=True, help="evaluation.steps (synthetic pre-training).")
    parser.add_argument("--finetune-steps", type=int, required=True, help="evaluation.finetune_steps.")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0], help="evaluation.real_fractions.")
    parser.add_argument("--controls", nargs="*", default=["shuffled labels"], help="evaluation.controls.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label", required=True)
    args = parser.parse_args()

    config = parse_config(yaml.safe_load(Path(args.config_file).read_text()), origin=args.config_file)
    evaluation = config.evaluation.model_copy(
        update={
            "steps": args.steps,
            "finetune_steps": args.finetune_steps,
            "real_fractions": args.fractions,
            "controls": args.controls,
            "seeds": args.seeds,
        }
    )
    configure_torch(config.execution)
    catalog = CatalogRecord.read_completed(catalog_folder_for(config).marker)
    if catalog is None:
        raise SystemExit(f"no catalog for {args.config_file}: run the chain on it first")
    dataset = published_dataset(find_version(config.factory_root, args.dataset or config.export.dataset_name).uri)
    resolution = evaluation.resolution or config.base_model.resolution
    train, test = real_split(catalog, "train", resolution), real_split(catalog, "test", resolution)
    synthetic, passed = synthetic_images(dataset, catalog.categories, resolution, evaluation.max_synthetic_images)
    training = synthetic.data.subset([i for i, ok in enumerate(passed) if ok])
    ids = [c["id"] for c in sorted(catalog.categories, key=lambda c: c["id"])]
    started = time.perf_counter()
    protocol, _ = run_protocol(evaluation, ProtocolData(train, test, training, ids))
    seconds = time.perf_counter() - started
    report = {
        "label": args.label,
        "dataset": dataset.uri,
        "evaluation": evaluation.model_dump(mode="json"),
        "resolution": resolution,
        "train_images": len(train.data),
        "test_images": len(test.data),
        "synthetic_images": len(training),
        "results": protocol["results"],
        "chance": protocol["chance"],
        "baseline": protocol["baseline"],
        "comparisons": protocol["comparisons"],
        "verdict": protocol["verdict"],
        "verdict_reason": protocol["verdict_reason"],
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "load_avg": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"segmentor-budget-{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")
    for row in protocol["results"]:
        print(
            f"{row['regime']:24s} real {row['real_fraction']:.1f}: IoU {row['iou']} ± {row['iou_std']} "
            f"per seed {row['iou_per_seed']}"
        )
    print(f"verdict: {protocol['verdict']} ({protocol['verdict_reason']}); {seconds:.0f} s")


if __name__ == "__main__":
    main()
