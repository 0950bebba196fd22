"""The best label AUC any generated sample can reach at a resolution: the benchmark's real test images after a
round trip through the base model's VAE (``python benchmarks/bench_vae_ceiling.py [--resolutions 64 96 128]``).

Uses the grey surface dataset of ``bench_controllability.py`` (same seed); writes
``benchmarks/results/vae-ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_controllability import RESULTS, _test_split  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from indusfactory.demo.surfaces import write_surface_dataset  # noqa: E402
from indusfactory.generation import adherence  # noqa: E402
from indusfactory.infra.imaging import from_model_output, to_model_tensor  # noqa: E402
from indusfactory.learning.models import embedded_model_path  # noqa: E402


@torch.no_grad()
def round_trip(vae: AutoencoderKL, image: np.ndarray) -> np.ndarray:
    decoded = vae.decode(vae.encode(to_model_tensor([image])).latent_dist.mean).sample.clamp(-1, 1)
    return from_model_output(((decoded + 1) / 2).permute(0, 2, 3, 1).numpy())[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--tint", default="grey")
    args = parser.parse_args()
    data = write_surface_dataset(Path(tempfile.mkdtemp(prefix="vae-ceiling-")), tint=args.tint, seed=0)
    coco = json.loads(data.coco_annotations.read_text())
    categories = [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    vae = AutoencoderKL.from_pretrained(str(embedded_model_path()), subfolder="vae").eval()
    rows = []
    for resolution in args.resolutions:
        test = _test_split(data, resolution, categories)
        images = [image for image, _ in test]
        masks = [np.logical_or.reduce([m for _, _, m in instances]) for _, instances in test]
        through = [round_trip(vae, image) for image in images]
        rows.append(
            {
                "resolution": resolution,
                "images": len(images),
                "real": adherence.measure(images, masks).as_dict(),
                "real_through_vae": adherence.measure(through, masks).as_dict(),
                "colourfulness_through_vae": float(np.median([adherence.colourfulness(i) for i in through])),
            }
        )
        print(
            f"{resolution:4d} px: real AUC {rows[-1]['real']['median_auc']:.3f}, through the VAE "
            f"{rows[-1]['real_through_vae']['median_auc']:.3f}, colourfulness {rows[-1]['colourfulness_through_vae']}"
        )
    report = {"machine": f"{platform.machine()} x{os.cpu_count()}", "tint": args.tint, "runs": rows}
    (RESULTS / "vae-ceiling.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
