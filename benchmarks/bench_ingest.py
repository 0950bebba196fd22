"""Benchmark of the data-in stage: ingest throughput and topological-driver throughput.

Not a test. Makes the sample dataset (defective images with COCO compressed RLE cracks plus
defect-free images, ``indusfactory.demo.sample_data``) in a temporary folder, times ``ingest`` on it
(images/s, for a few reader-thread counts) and ``extract_topological_driver`` at 128 and 512 px
(drivers/s), and writes ``benchmarks/results/ingest.json`` with the machine it ran on.

    python benchmarks/bench_ingest.py                      # 2000 defective + 1000 defect-free
    python benchmarks/bench_ingest.py --defective 200 --defect-free 100   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from indusfactory.config import DriverConfig, SourceConfig
from indusfactory.demo.sample_data import write_sample_data
from indusfactory.drivers.topology import extract_topological_driver
from indusfactory.schema import rle_to_mask
from indusfactory.sources.ingest import ingest

RESULTS = Path(__file__).parent / "results" / "ingest.json"


def machine() -> dict:
    """Where the numbers come from."""
    import PIL
    import skimage

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "pillow": PIL.__version__,
        "scikit_image": skimage.__version__,
    }


def bench_ingest(root: Path, workers: list[int], size: int) -> list[dict]:
    """Time ``ingest`` of the sample data at ``root`` once per reader-thread count."""
    results = []
    for count in workers:
        source = SourceConfig(
            coco_annotations=str(root / "defective" / "annotations.json"),
            images_dir=str(root / "defective" / "images"),
            defect_free_dir=str(root / "defect_free"),
            read_workers=count,
        )
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            record = ingest(source, str(Path(out) / "catalog"))
            seconds = time.perf_counter() - start
        results.append(
            {
                "read_workers": count,
                "images": record.found,
                "ingested": record.ingested,
                "instances": record.annotations.get("ingested"),
                "image_size": size,
                "seconds": round(seconds, 3),
                "images_per_s": round(record.found / seconds, 1),
            }
        )
        print(
            f"ingest  {record.found} images of {size} px, {count} threads: {seconds:.2f} s "
            f"= {record.found / seconds:.0f} images/s"
        )
    return results


def bench_drivers(size: int, count: int, config: DriverConfig) -> dict:
    """Time ``extract_topological_driver`` on ``count`` random ``size`` px images with two masks each."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(min(count, 16))]
    masks = [(i % 2, rng.random((size, size)) > 0.97) for i in range(2)]
    extract_topological_driver(images[0], masks, config)  # warm-up (imports, caches)
    start = time.perf_counter()
    for index in range(count):
        extract_topological_driver(images[index % len(images)], masks, config)
    seconds = time.perf_counter() - start
    print(
        f"drivers {count} at {size} px (downscale {config.downscale_for(size)}): {seconds:.2f} s "
        f"= {count / seconds:.0f} drivers/s"
    )
    return {
        "size": size,
        "drivers": count,
        "downscale": config.downscale_for(size),
        "block_size": config.block_size,
        "seconds": round(seconds, 3),
        "drivers_per_s": round(count / seconds, 1),
    }


def check_catalog_sample(root: Path) -> None:
    """Sanity: the benchmark data decodes (one RLE) so the timings measure real work."""
    coco = json.loads((root / "defective" / "annotations.json").read_text())
    assert rle_to_mask(coco["annotations"][0]["segmentation"]).any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defective", type=int, default=2000)
    parser.add_argument("--defect-free", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8], help="reader-thread counts to time")
    parser.add_argument("--drivers", type=int, default=300, help="drivers timed per size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_sample_data(
            Path(tmp) / "data", n_defective=args.defective, n_defect_free=args.defect_free, size=args.size
        )
        made = time.perf_counter() - start
        print(f"made {args.defective} + {args.defect_free} images of {args.size} px in {made:.1f} s")
        check_catalog_sample(paths.root)
        ingest_results = bench_ingest(paths.root, args.workers, args.size)
    drivers = [
        bench_drivers(128, args.drivers, DriverConfig(downscale=2)),
        bench_drivers(512, max(args.drivers // 8, 10), DriverConfig(downscale=2)),
        bench_drivers(512, max(args.drivers // 8, 10), DriverConfig(downscale=8)),
    ]
    result = {
        "machine": machine(),
        "data": {
            "defective": args.defective,
            "defect_free": args.defect_free,
            "size": args.size,
            "seconds_to_make": round(made, 1),
        },
        "ingest": ingest_results,
        "drivers": drivers,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
