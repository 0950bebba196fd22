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


def synthetic_holdout(evaluation, synthetic, passed, test, ids) -> dict:
    """Per seed: a segmentor trained ``evaluation.steps`` steps on 80% of the QC-passed samples, scored on the
    other 20% (synthetic) and on the real test split."""
    import numpy as np

    from indusfactory.evaluation.evaluate import LabelledImages, score_segmentor
    from indusfactory.evaluation.segmentor import build_segmentor, loss_function, train_segmentor

    kept = [i for i, ok in enumerate(passed) if ok]
    rows = []
    for seed in range(evaluation.seed, evaluation.seed + evaluation.seeds):
        order = np.random.default_rng(seed).permutation(kept).tolist()
        cut = int(0.8 * len(order))
        fit, held = order[:cut], order[cut:]
        held_out = LabelledImages(
            synthetic.data.subset(held), [synthetic.instances[i] for i in held], [synthetic.ids[i] for i in held]
        )
        model = build_segmentor(2, evaluation.segmentor_pretrained, seed)
        train_segmentor(
            model,
            synthetic.data.subset(fit),
            evaluation.steps,
            evaluation.batch_size,
            evaluation.learning_rate,
            seed,
            loss_function(True, evaluation.loss),
        )
        on_synthetic, on_real = score_segmentor(model, held_out, ids), score_segmentor(model, test, ids)
        rows.append(
            {
                "seed": seed,
                "train": len(fit),
                "iou_held_out_synthetic": on_synthetic["iou"],
                "iou_real_test": on_real["iou"],
            }
        )
    return {"mode": "synthetic holdout", "steps": evaluation.steps, "rows": rows}


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
    parser.add_argument(
        "--synthetic-holdout",
        action="store_true",
        help="Instead: train on 80%% of the synthetic samples only and score on the other 20%% and on the real "
        "test split (can a segmentor learn the synthetic labels at all, and does that transfer to real images?).",
    )
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
    if args.synthetic_holdout:
        report = synthetic_holdout(evaluation, synthetic, passed, test, ids)
        report.update(label=args.label, dataset=dataset.uri, seconds=round(time.perf_counter() - started, 1))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"segmentor-budget-{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["rows"], indent=1))
        return
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
