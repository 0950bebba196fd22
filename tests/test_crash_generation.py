"""A generation worker killed with SIGKILL in the middle of a shard, then a rerun through the Prefect flow:
the dataset holds exactly the planned samples, each once, no temporary file is left and the shards
finished before the kill are neither regenerated nor rewritten."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import race_behind_a_lock

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent("""
    import json, sys, time
    from indusfactory.infra import storage
    from indusfactory.config import FactoryConfig
    from indusfactory.generation.generate import GenerationContext, generate_shard
    from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord

    args = json.load(open(sys.argv[1]))
    if args["hang_moving"]:
        # Storage that hangs while moving this file into place: the kill lands mid-write, for sure.
        real_filesystem = storage.filesystem

        class Hanging:
            def __init__(self, fs):
                self.fs = fs

            def __getattr__(self, name):
                return getattr(self.fs, name)

            def mv(self, source, target, **kwargs):
                if target.endswith(args["hang_moving"]):
                    time.sleep(3600)
                return self.fs.mv(source, target, **kwargs)

        def filesystem(uri):
            fs, path = real_filesystem(uri)
            return Hanging(fs), path

        storage.filesystem = filesystem
    catalog = CatalogRecord.model_validate(args["catalog"])
    plan = PlanRecord.model_validate(args["plan"])
    ctx = GenerationContext(config=FactoryConfig.model_validate(args["config"]), catalog_uri=catalog.uri,
                            categories=catalog.categories, concept=ModelRecord.model_validate(args["concept"]),
                            condition=ModelRecord.model_validate(args["condition"]))
    records = [generate_shard(ctx, plan, args["dataset_uri"], shard) for shard in range(plan.shards)]
    if args.get("publish"):
        from indusfactory.publishing.publish import publish_dataset

        publish_dataset(ctx.config, catalog, plan, ctx.concept, ctx.condition, args["dataset_uri"], records)
""")


def _start_worker(setup, tmp_path: Path, hang_moving: str | None, publish: bool = False) -> subprocess.Popen:
    args = tmp_path / "worker.json"
    args.write_text(
        json.dumps(
            {
                "config": setup.config.model_dump(mode="json"),
                "catalog": setup.catalog.model_dump(mode="json"),
                "plan": setup.plan.model_dump(mode="json"),
                "concept": setup.concept.model_dump(mode="json"),
                "condition": setup.condition.model_dump(mode="json"),
                "dataset_uri": setup.dataset_uri,
                "hang_moving": hang_moving,
                "publish": publish,
            }
        )
    )
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"worker ended before the kill (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("worker never reached the kill point")
        time.sleep(0.005)


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


@pytest.mark.parametrize("kill_point", ["while-generating", "while-writing"])
def test_sigkill_mid_shard_then_rerun(prefect_api, make_config, prepare_generation, tmp_path, kill_point):
    from pycocotools.coco import COCO

    from flows.generate_dataset import generate_dataset
    from indusfactory.generation.plan import read_plan
    from indusfactory.publishing.publish import shard_name

    config = make_config(generation={"steps": 8, "batch_size": 2, "shard_size": 2})
    setup = prepare_generation(config)
    plan_rows = read_plan(setup.plan)
    assert setup.plan.shards == 3 and len(plan_rows) == 6
    root = Path(setup.dataset_uri)
    names = [shard_name("train", i, 3) for i in range(3)]
    parquet = [root / "data" / f"{name}.parquet" for name in names]

    hang = f"{names[1]}.parquet" if kill_point == "while-writing" else None
    proc = _start_worker(setup, tmp_path, hang)
    if kill_point == "while-generating":
        _wait_for(proc, parquet[0].exists)  # shard 0 complete: shard 1 is being generated now
    else:
        _wait_for(proc, lambda: any((root / "data").glob(f".tmp-*{names[1]}.parquet")))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    # The kill interrupted the run: shard 0 done, shards 1 and 2 not.
    assert [p.exists() for p in parquet] == [True, False, False]
    if kill_point == "while-writing":
        # Shard 1 had written its images and COCO file; its parquet is a temporary file.
        assert list((root / "data").glob(".tmp-*"))
        shard1 = [r["sample_id"] for r in plan_rows if r["shard"] == 1]
        assert all((root / "images" / names[1] / f"{sample}.png").exists() for sample in shard1)
    shard0 = [parquet[0], root / "annotations" / "shards" / f"{names[0]}.json"]
    shard0 += [root / "images" / names[0] / f"{r['sample_id']}.png" for r in plan_rows if r["shard"] == 0]
    before = _snapshot(shard0)

    record = generate_dataset(config=config)
    assert record.uri == setup.dataset_uri

    # Exactly the planned samples, each once, in the shards, the COCO file and the images folder.
    planned = sorted(r["sample_id"] for r in plan_rows)
    df = pd.read_parquet(root / "data")
    assert sorted(df["sample_id"]) == planned
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    assert sorted(img["sample_id"] for img in coco.dataset["images"]) == planned
    assert sorted(coco.getImgIds()) == sorted(r["sample_index"] for r in plan_rows)
    assert sorted(p.stem for p in (root / "images").rglob("*.png")) == planned  # images/<shard>/<sample_id>.png
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == manifest["counts"]["planned"] == 6

    # No temporary file anywhere under the factory root.
    assert not [p for p in Path(config.factory_root).rglob("*") if p.name.startswith(".tmp-")]

    # Shard 0 was not regenerated: same bytes, same mtimes, written by the killed worker.
    assert _snapshot(shard0) == before
    workers = [s["worker"] for s in manifest["shards"]]
    assert workers[0].endswith(f":{proc.pid}") and workers[1].endswith(f":{os.getpid()}")


def test_sigkill_mid_finalisation_then_rerun(prefect_api, make_config, prepare_generation, tmp_path):
    """Killed while the merged COCO file is moved into place: no manifest exists yet (it is written
    last), so no reader sees a version naming a missing shard; the rerun publishes it whole."""
    from flows.generate_dataset import generate_dataset

    config = make_config(generation={"steps": 2, "batch_size": 2, "shard_size": 2})
    setup = prepare_generation(config)
    root = Path(setup.dataset_uri)
    proc = _start_worker(setup, tmp_path, "instances_train.json", publish=True)
    _wait_for(proc, lambda: any((root / "annotations").glob(".tmp-*instances_train.json")))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (root / "manifest.json").exists() and not (root.parent / "latest").exists()
    shards = sorted((root / "data").glob("*.parquet"))
    before = _snapshot(shards)

    record = generate_dataset(config=config)
    manifest = json.loads((root / "manifest.json").read_text())
    assert record.samples == manifest["counts"]["samples"] == 6
    for entry in manifest["shards"]:
        path = root / entry["path"]
        assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert _snapshot(shards) == before, "the shards were not regenerated"
    assert (root.parent / "latest").read_text().strip() == record.version
    assert not [p for p in Path(config.factory_root).rglob("*") if p.name.startswith(".tmp-")]


def test_sigkill_between_manifest_and_latest_then_rerun_repairs_latest(
    prefect_api, make_config, prepare_generation, tmp_path
):
    """Killed while ``latest`` is moved into place, after the manifest: the rerun finds the version published
    and points ``latest`` at it (it named an older version)."""
    from flows.generate_dataset import generate_dataset

    config = make_config(generation={"steps": 2, "batch_size": 2, "shard_size": 2})
    setup = prepare_generation(config)
    root = Path(setup.dataset_uri)
    older = root.parent / "v-older"
    older.mkdir(parents=True)
    (older / "manifest.json").write_text(json.dumps({"created": "2000-01-01T00:00:00+00:00"}))
    (root.parent / "latest").write_text("v-older\n")
    proc = _start_worker(setup, tmp_path, "latest", publish=True)
    _wait_for(proc, lambda: any(root.parent.glob(".tmp-*latest")))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (root / "manifest.json").is_file() and (root.parent / "latest").read_text() == "v-older\n"
    before = _snapshot(sorted(p for p in root.rglob("*") if p.is_file()))

    record = generate_dataset(config=config)
    assert record.reused and record.uri == setup.dataset_uri
    assert (root.parent / "latest").read_text().strip() == record.version
    assert _snapshot(sorted(p for p in root.rglob("*") if p.is_file())) == before, "the version is not rewritten"


RACER = textwrap.dedent("""
    import json, sys
    from indusfactory.config import parse_config
    from flows.generate_dataset import generate_dataset

    record = generate_dataset(config=parse_config(json.loads(sys.argv[1])))
    print("RESULT " + json.dumps({"reused": record.reused, "uri": record.uri}), flush=True)
""")


def test_two_runs_of_one_version_at_once_generate_and_publish_it_once(
    prefect_api, make_config, prepare_generation, tmp_path
):
    """Two processes run generate-dataset on one config at the same time, both released at once: one
    generates and publishes, the other waits for the version's lock and reuses it; every shard in the
    manifest is the file on storage, written by one run."""
    import re

    from indusfactory.layout import FactoryLayout
    from indusfactory.publishing.publish import shard_name

    config = make_config(generation={"steps": 2, "batch_size": 2, "shard_size": 2}, execution={"torch_threads": 1})
    setup = prepare_generation(config)
    root = Path(setup.dataset_uri)
    uri = FactoryLayout.of(config.factory_root).lock(f"dataset-{config.export.dataset_name}-{root.name}")
    outputs, status = race_behind_a_lock(RACER, config, uri, tmp_path)
    assert all(code == 0 for code in status.values()), outputs
    results = {name: json.loads(re.search(r"RESULT (.*)", out).group(1)) for name, out in outputs.items()}
    assert sorted(r["reused"] for r in results.values()) == [False, True], results
    maker = next(name for name, r in results.items() if not r["reused"])
    reuser = next(name for name in results if name != maker)
    assert f"held by {maker} pid" in outputs[reuser], "the second run waited for the first one's version lock"

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == setup.plan.samples
    for entry in manifest["shards"]:
        assert hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert {entry["worker"] for entry in manifest["shards"]} == {maker}, "one run wrote every shard"
    assert sorted(p.name for p in (root / "data").iterdir()) == [
        f"{shard_name('train', i, setup.plan.shards)}.parquet" for i in range(setup.plan.shards)
    ]
    df = pd.read_parquet(root / "data")
    assert sorted(df["sample_id"]) == sorted(set(df["sample_id"])) and len(df) == setup.plan.samples
    assert (root.parent / "latest").read_text().strip() == root.name and not Path(uri).exists()
