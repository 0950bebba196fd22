"""Benchmark of dataset export to S3: the factory's export versus a raw s3fs upload of the same bytes.

Not a test. Builds dataset rows (textured images with a crack mask each, PNG encoded, as generation
makes them; no model involved), then times, against a loopback S3 endpoint (moto's threaded
server, as the tests use):

- export: ``write_shard`` for every shard (images, per-shard COCO, parquet last) and
  ``finalize_dataset`` (checksums re-read, merged COCO, contact sheet, card, manifest, ``latest``);
- raw sequential: ``s3fs`` ``pipe_file`` of every file the export wrote, one after another;
- raw concurrent: one ``s3fs`` ``pipe`` call with all of them (s3fs uploads them concurrently).

Writes ``benchmarks/results/export.json``. The endpoint is in-process Python, so absolute figures are
far below real S3; the ratios are what the benchmark is for.

    python benchmarks/bench_export.py                       # 512 samples of 256 px, shards of 128
    python benchmarks/bench_export.py --samples 64 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "export.json"
CATEGORIES = [{"id": 1, "name": "hairline"}]


def machine() -> dict:
    import s3fs

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "s3fs": s3fs.__version__,
    }


def start_endpoint() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, with the environment s3fs reads."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return server, endpoint


def dataset_rows(count: int, size: int, seed: int = 0) -> list[dict]:
    """Rows of ``schema.DATASET_SCHEMA`` with textured images and one procedural crack each."""
    from indusfactory.drivers.cracks import random_crack_mask
    from indusfactory.schema import encode_png, mask_to_rle, rle_bbox_area

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        base = rng.integers(90, 170, (size // 8, size // 8, 3)).astype(np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), np.uint8)) + rng.integers(0, 12, (size, size, 3)).astype(np.uint8)
        mask = random_crack_mask((size, size), "hairline", rng)
        image[mask] //= 3
        rle = mask_to_rle(mask)
        bbox, area = rle_bbox_area(rle)
        sample_id = f"{index:016x}"
        rows.append(
            {
                "sample_id": sample_id,
                "sample_index": index,
                "image": {"bytes": encode_png(image), "path": f"{sample_id}.png"},
                "width": size,
                "height": size,
                "instances": [
                    {
                        "category_id": 1,
                        "category": "hairline",
                        "rle": rle,
                        "bbox": bbox,
                        "area": area,
                        "mask_source": "procedural",
                    }
                ],
                "driver": {
                    "bytes": encode_png((mask[..., None] * np.array([255, 0, 0])).astype(np.uint8)),
                    "path": f"{sample_id}_driver.png",
                },
                "prompt": "an image of a sks with a hairline crack",
                "seed": index,
                "driver_image_id": "bench",
                "qc_mask_contrast": 0.5,
                "qc_adherence": None,
                "qc_passed": True,
                "base_model": "bench",
                "concept_fingerprint": "bench",
                "condition_fingerprint": "bench",
                "code_version": "bench",
                "worker": "bench",
            }
        )
    return rows


def export(dataset_uri: str, rows: list[dict], shard_size: int) -> float:
    """Seconds to write every shard and finalise the dataset at ``dataset_uri``."""
    from indusfactory.publishing.publish import finalize_dataset, write_shard

    total = (len(rows) + shard_size - 1) // shard_size
    started = time.perf_counter()
    shards = [
        write_shard(dataset_uri, "train", i, total, rows[i * shard_size : (i + 1) * shard_size], CATEGORIES, 0.0)
        for i in range(total)
    ]
    finalize_dataset(
        dataset_uri,
        "bench",
        dataset_uri.rsplit("/", 1)[-1],
        "train",
        shards,
        CATEGORIES,
        {},
        {"base_model": "bench", "concept_fingerprint": "bench", "condition_fingerprint": "bench"},
    )
    return time.perf_counter() - started


def written_files(fs, prefix: str) -> dict[str, bytes]:
    """Every file the export wrote under the dataset's parent folder (``latest`` included)."""
    return {path[len(prefix) :]: fs.cat_file(path) for path in fs.find(prefix)}


def raw_sequential(fs, target: str, files: dict[str, bytes]) -> float:
    started = time.perf_counter()
    for name, data in files.items():
        fs.pipe_file(target + name, data)
    return time.perf_counter() - started


def raw_concurrent(fs, target: str, files: dict[str, bytes]) -> float:
    started = time.perf_counter()
    fs.pipe({target + name: data for name, data in files.items()})
    return time.perf_counter() - started


def main() -> None:
    import s3fs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.perf_counter()
    rows = dataset_rows(args.samples, args.size)
    print(f"made {args.samples} rows of {args.size} px in {time.perf_counter() - started:.1f} s")
    server, endpoint = start_endpoint()
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("bench")
        runs = []
        for repeat in range(args.repeats):
            prefix = f"bench/export-{repeat}/"
            seconds = export(f"s3://{prefix}v1", rows, args.shard_size)
            files = written_files(fs, prefix)
            sequential = raw_sequential(fs, f"bench/raw-seq-{repeat}/", files)
            concurrent = raw_concurrent(fs, f"bench/raw-par-{repeat}/", files)
            size = sum(len(d) for d in files.values())
            assert not [name for name in files if "/.tmp-" in "/" + name], "the export left temporary files"
            runs.append(
                {
                    "export_seconds": round(seconds, 3),
                    "raw_sequential_seconds": round(sequential, 3),
                    "raw_concurrent_seconds": round(concurrent, 3),
                    "files": len(files),
                    "bytes": size,
                }
            )
            print(
                f"repeat {repeat}: export {seconds:.2f} s, raw sequential {sequential:.2f} s, raw concurrent "
                f"{concurrent:.2f} s ({len(files)} files, {size / 1e6:.1f} MB)"
            )
    finally:
        server.stop()
    best = {
        key: min(r[key] for r in runs) for key in ("export_seconds", "raw_sequential_seconds", "raw_concurrent_seconds")
    }
    ratios = {
        "export_over_raw_sequential": round(best["export_seconds"] / best["raw_sequential_seconds"], 3),
        "export_over_raw_concurrent": round(best["export_seconds"] / best["raw_concurrent_seconds"], 3),
    }
    print(
        f"export / raw sequential = {ratios['export_over_raw_sequential']}, export / raw concurrent = "
        f"{ratios['export_over_raw_concurrent']} (best of {args.repeats}; lower is faster)"
    )
    result = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"samples": args.samples, "size": args.size, "shard_size": args.shard_size},
        "runs": runs,
        "best": best,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
