"""Benchmark of the stages that need no model, at growing dataset sizes: plan, shard generation with a stand-in
sampler, reuse check and publish; locally and on a loopback S3 endpoint (moto's threaded server).

Not a test. For each store and size, each stage runs in its own Python process (so its peak memory is its own:
``ru_maxrss``, reported with the process's size before the stage), in order:

- ``plan``: N plan rows (stand-ins for ``build_plan_rows``: the same columns and sizes) written as the factory
  writes them (``plan.parquet`` in one row group per shard, plus one file per shard); then the time to read one
  shard's rows with ``read_plan`` (median of the first, middle and last shard), and the same read the way the
  factory did before (one row group, a filtered read of the whole plan);
- ``generate``: every shard: ``read_plan`` of its rows, a stand-in sampler (a textured image of ``--image-size``
  px with a procedural crack, its driver and RLE; no model; 256 distinct samples made, their bytes reused under
  each row's ids) and ``write_shard`` (images, COCO, parquet, its record);
- ``reuse``: ``existing_shards`` (what a rerun and the work-pool dispatcher do: one listing and each shard's
  record, no shard read);
- ``publish``: ``finalize_dataset`` (metadata checks, streamed COCO merge, contact sheet, card, manifest, latest).

Writes ``benchmarks/results/scale-<store>.json`` (one file per store; sizes merged into it).

    python benchmarks/bench_scale.py --sizes 1000 10000 --stores local s3
    python benchmarks/bench_scale.py --sizes 100000 --stores local --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's indusfactory, also in the stage processes (PYTHONPATH below)
RESULTS = Path(__file__).parent / "results"
CATEGORIES = [{"id": 1, "name": "hairline"}]
LINEAGE = {"base_model": "bench", "concept_fingerprint": "bench", "condition_fingerprint": "bench"}
STAGES = ("plan", "generate", "reuse", "publish")


def rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_rows(samples: int, shard_size: int) -> list[dict]:
    """Stand-in plan rows: the columns of ``schema.PLAN_SCHEMA`` with values of the factory's sizes."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(samples):
        augmentation = {"angle": float(rng.uniform(-20, 20)), "zoom": float(rng.uniform(1, 1.3)), "flip": bool(i % 2)}
        rows.append(
            {
                "sample_id": f"{rng.integers(0, 2**63):016x}",
                "sample_index": i,
                "shard": i // shard_size,
                "driver_image_id": f"{i % 1000:016x}",
                "augmentation_index": i % 10,
                "augmentation": json.dumps(augmentation, sort_keys=True),
                "instances": [
                    {
                        "category_id": 1,
                        "category": "hairline",
                        "mask_source": "procedural",
                        "mask_source_id": "hairline",
                        "perturbation": json.dumps({"crack_seed": int(rng.integers(0, 2**31 - 1))}),
                    }
                ],
                "prompt": "an image of a sks with a hairline crack",
                "seed": int(rng.integers(0, 2**31 - 1)),
            }
        )
    return rows


def stand_in_sample(row: dict, size: int) -> dict:
    """A dataset row for a plan row, without a model: a textured image darkened along a procedural crack."""
    from indusfactory.drivers.cracks import random_crack_mask
    from indusfactory.schema import encode_png, mask_to_rle, rle_bbox_area

    rng = np.random.default_rng(row["seed"])
    base = rng.integers(90, 170, (max(size // 8, 1), max(size // 8, 1), 3)).astype(np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), np.uint8))[:size, :size] + rng.integers(0, 12, (size, size, 3)).astype(
        np.uint8
    )
    mask = random_crack_mask((size, size), "hairline", rng)
    image[mask] //= 3
    rle = mask_to_rle(mask)
    bbox, area = rle_bbox_area(rle)
    instance = {"category_id": 1, "category": "hairline", "rle": rle, "bbox": bbox, "area": area}
    return {
        "sample_id": row["sample_id"],
        "sample_index": row["sample_index"],
        "image": {"bytes": encode_png(image), "path": f"{row['sample_id']}.png"},
        "width": size,
        "height": size,
        "instances": [{**instance, "mask_source": "procedural"}],
        "driver": {
            "bytes": encode_png((mask[..., None] * np.array([255, 0, 0])).astype(np.uint8)),
            "path": f"{row['sample_id']}_driver.png",
        },
        "prompt": row["prompt"],
        "seed": row["seed"],
        "driver_image_id": row["driver_image_id"],
        "qc_mask_contrast": 0.5,
        "qc_adherence": None,
        "qc_label_auc": 0.9,
        "qc_chance_auc": 0.5,
        "qc_passed": True,
        "base_model": "bench",
        "concept_fingerprint": "bench",
        "condition_fingerprint": "bench",
        "code_version": "bench",
        "worker": "bench",
    }


POOL = 256
_pool: dict[int, dict] = {}


def pooled_sample(row: dict, size: int) -> dict:
    """``stand_in_sample`` of one of ``POOL`` seeds, with the row's own ids: the bytes of 256 distinct samples
    repeat (what is measured is storage and publishing, not image making; 100k samples fit in minutes)."""
    key = row["sample_index"] % POOL
    if key not in _pool:
        _pool[key] = stand_in_sample({**row, "seed": key}, size)
    made = _pool[key]
    return {
        **made,
        "sample_id": row["sample_id"],
        "sample_index": row["sample_index"],
        "image": {**made["image"], "path": f"{row['sample_id']}.png"},
        "driver": {**made["driver"], "path": f"{row['sample_id']}_driver.png"},
        "seed": row["seed"],
    }


def plan_record(root: str, samples: int, shard_size: int):
    from indusfactory.infra import storage
    from indusfactory.schema import PlanRecord

    return PlanRecord(
        uri=storage.join(root, "plans", "bench"),
        fingerprint="bench",
        samples=samples,
        shards=(samples + shard_size - 1) // shard_size,
    )


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def stage_plan(root: str, samples: int, shard_size: int, image_size: int) -> dict:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from indusfactory.generation.plan import plan_bytes, plan_folder, plan_shard_files, read_plan
    from indusfactory.infra import storage
    from indusfactory.schema import PLAN_SCHEMA

    plan = plan_record(root, samples, shard_size)
    started = time.perf_counter()
    rows = plan_rows(samples, shard_size)
    made = time.perf_counter() - started
    write = _timed(
        lambda: (
            storage.write_bytes_atomic(plan_folder(plan).table, plan_bytes(rows)),
            storage.write_many_atomic(plan_shard_files(plan_folder(plan), rows)),
        )
    )
    picks = sorted({0, plan.shards // 2, plan.shards - 1})
    reads = [_timed(lambda s=s: read_plan(plan, s)) for s in picks]
    # Before: one row group, the whole plan read and filtered for each shard.
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA), sink)
    old_uri = storage.join(plan.uri, "plan-one-row-group.parquet")
    storage.write_bytes_atomic(old_uri, sink.getvalue().to_pybytes())

    def old_read(shard: int) -> None:
        data = storage.read_bytes(old_uri)
        pq.read_table(io.BytesIO(data), filters=[("shard", "=", shard)]).to_pylist()

    old_reads = [_timed(lambda s=s: old_read(s)) for s in picks]
    return {
        "rows_made_seconds": round(made, 3),
        "seconds": round(write, 3),
        "read_plan_shard_seconds": round(float(np.median(reads)), 5),
        "read_plan_shard_seconds_before": round(float(np.median(old_reads)), 5),
        "plan_bytes": len(storage.read_bytes(plan_folder(plan).table)),
    }


def stage_generate(root: str, samples: int, shard_size: int, image_size: int) -> dict:
    from indusfactory.generation.plan import read_plan
    from indusfactory.infra import storage
    from indusfactory.publishing.publish import write_shard

    plan = plan_record(root, samples, shard_size)
    dataset = storage.join(root, "datasets", "bench", "v1")
    read = sample = write = 0.0
    written = 0
    for shard in range(plan.shards):
        started = time.perf_counter()
        rows = read_plan(plan, shard)
        read += time.perf_counter() - started
        started = time.perf_counter()
        out = [pooled_sample(row, image_size) for row in rows]
        sample += time.perf_counter() - started
        started = time.perf_counter()
        record = write_shard(dataset, "train", shard, plan.shards, out, CATEGORIES, 0.0)
        write += time.perf_counter() - started
        written += record.bytes + sum(len(r["image"]["bytes"]) for r in out)
    return {
        "seconds": round(read + sample + write, 3),
        "read_plan_seconds": round(read, 3),
        "stand_in_sampler_seconds": round(sample, 3),
        "write_shard_seconds": round(write, 3),
        "bytes_written": written,
    }


def stage_reuse(root: str, samples: int, shard_size: int, image_size: int) -> dict:
    from indusfactory.infra import storage
    from indusfactory.publishing.publish import existing_shards

    plan = plan_record(root, samples, shard_size)
    dataset = storage.join(root, "datasets", "bench", "v1")
    started = time.perf_counter()
    found = existing_shards(dataset, "train", plan.shards)
    seconds = time.perf_counter() - started
    assert len(found) == plan.shards, f"{len(found)} of {plan.shards} shards found"
    return {"seconds": round(seconds, 3)}


def stage_publish(root: str, samples: int, shard_size: int, image_size: int) -> dict:
    from indusfactory.infra import storage
    from indusfactory.layout import DatasetLayout
    from indusfactory.publishing.publish import existing_shards, finalize_dataset

    plan = plan_record(root, samples, shard_size)
    dataset = storage.join(root, "datasets", "bench", "v1")
    found = existing_shards(dataset, "train", plan.shards)
    shards = [found[i] for i in range(plan.shards)]
    before = rss_mb()
    started = time.perf_counter()
    record = finalize_dataset(dataset, "bench", "v1", "train", shards, CATEGORIES, {}, LINEAGE)
    seconds = time.perf_counter() - started
    assert record.samples == samples and not record.reused
    coco = storage.info(DatasetLayout(dataset).coco("train")) or {}
    return {"seconds": round(seconds, 3), "rss_before_finalize_mb": round(before, 1), "coco_bytes": coco.get("size")}


def run_stage(args: argparse.Namespace) -> None:
    """One stage in this process; prints one JSON line with its figures and this process's peak memory."""
    fn = globals()[f"stage_{args.stage}"]
    import indusfactory.generation.plan  # noqa: F401 - the imports' memory, before the stage
    import indusfactory.publishing.publish  # noqa: F401

    baseline = rss_mb()
    result = fn(args.root, args.size, args.shard_size, args.image_size)
    print(json.dumps({**result, "rss_after_imports_mb": round(baseline, 1), "peak_rss_mb": round(rss_mb(), 1)}))


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }


def measure(store: str, size: int, args: argparse.Namespace, root: str) -> dict:
    figures: dict = {"samples": size, "shards": (size + args.shard_size - 1) // args.shard_size}
    for stage in STAGES:
        command = [sys.executable, __file__, "--stage", stage, "--root", root, "--size", str(size)]
        command += ["--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            raise RuntimeError(f"{store} {size} {stage} failed:\n{done.stderr[-3000:]}")
        figures[stage] = {
            **json.loads(done.stdout.strip().splitlines()[-1]),
            "wall_with_start": time.perf_counter() - started,
        }
        print(f"  {store} {size:>7} {stage:<8} {json.dumps(figures[stage])}", flush=True)
    figures["load_average_after"] = os.getloadavg()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/bench-scale")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args)
        return

    server = None
    if "s3" in args.stores:
        import s3fs
        from bench_export import start_endpoint  # moto's server on loopback, the environment s3fs reads

        server, endpoint = start_endpoint()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    try:
        for store in args.stores:
            out = RESULTS / f"scale-{store}.json"
            result = json.loads(out.read_text()) if out.exists() else {"runs": []}
            result["machine"] = machine()
            settings = {"shard_size": args.shard_size, "image_size": args.image_size}
            for size in args.sizes:
                for repeat in range(args.repeats):
                    if store == "local":
                        root = str(Path(args.workdir) / f"{size}-{repeat}")
                        shutil.rmtree(root, ignore_errors=True)
                    else:
                        bucket = f"bench-{size}-{repeat}-{int(time.time())}"
                        fs.mkdir(bucket)
                        root = f"s3://{bucket}/factory"
                    figures = measure(store, size, args, root)
                    figures.update(settings, when=time.strftime("%Y-%m-%dT%H:%M:%S%z"), repeat=repeat)
                    result["runs"].append(figures)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(result, indent=2) + "\n")
                    if store == "local":
                        shutil.rmtree(root, ignore_errors=True)
                    else:
                        fs.rm(bucket, recursive=True)
            print(f"wrote {out}")
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
