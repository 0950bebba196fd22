"""The whole chain through a real Prefect API on the tiny model: what a user of the demo gets."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO

pytestmark = pytest.mark.slow


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_generate_dataset_end_to_end_and_rerun_from_cache(prefect_api, make_config):
    from flows.generate_dataset import generate_dataset
    from indusfactory.generation.plan import SourceImages, materialise, read_plan
    from indusfactory.schema import PlanRecord

    config = make_config()
    record = generate_dataset(config=config)
    root = Path(record.uri)
    manifest = json.loads((root / "manifest.json").read_text())

    # Parquet shards, named the Hugging Face way, read by pandas; counts match the manifest.
    shards = sorted((root / "data").glob("*.parquet"))
    assert [p.name for p in shards] == [f"train-{i:05d}-of-00002.parquet" for i in range(2)]
    df = pd.read_parquet(root / "data")
    assert len(df) == manifest["counts"]["samples"] == record.samples == 6
    assert sorted(df["sample_id"]) == sorted(set(df["sample_id"]))
    assert [s["rows"] for s in manifest["shards"]] == [4, 2]

    # Hugging Face datasets reads the folder through its card and decodes images; duckdb reads the shards.
    import datasets
    import duckdb

    ds = datasets.load_dataset(str(root), split="train")
    assert ds.num_rows == 6 and ds[0]["image"].size == (64, 64)
    assert duckdb.sql(f"select count(*) from read_parquet('{root}/data/*.parquet')").fetchall() == [(6,)]

    # COCO loads in pycocotools; every mask decodes to the mask the plan painted into the driver.
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 6 and manifest["counts"]["annotations"] == len(coco.getAnnIds())
    plan_uri = Path(config.factory_root) / "plans"
    plan_dir = next(plan_uri.iterdir())
    plan = PlanRecord.model_validate_json((plan_dir / "plan.json").read_text())
    catalog_dir = next((Path(config.factory_root) / "catalog").iterdir())
    categories = json.loads((catalog_dir / "catalog.json").read_text())["categories"]
    sources = SourceImages(str(catalog_dir), categories)
    for row in read_plan(plan):
        expected = materialise(row, sources, config).instances[0][1]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[row["sample_index"]]))
        assert len(anns) == 1 and anns[0]["category_id"] == row["instances"][0]["category_id"]
        assert np.array_equal(coco.annToMask(anns[0]).astype(bool), expected)
        image_file = root / "images" / coco.loadImgs([row["sample_index"]])[0]["file_name"]
        assert image_file.is_file()

    # The manifest is the commit marker: written after everything it describes.
    mtimes = _files(root)
    assert mtimes["manifest.json"] >= max(t for name, t in mtimes.items() if name != "manifest.json")
    assert (root.parent / "latest").read_text().strip() == record.version

    # The run left its summary, per-shard table and a finished progress artifact in the Prefect API.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    kinds = {a.type for a in artifacts}
    assert {"markdown", "table", "progress"} <= kinds
    validation = {a.key: a for a in artifacts if a.key in ("concept-validation", "condition-validation")}
    assert set(validation) == {"concept-validation", "condition-validation"}, "each training shows its grids"
    assert all("data:image/png;base64," in a.data for a in validation.values())
    progress = [a for a in artifacts if a.type == "progress"]
    assert any(a.data == 100.0 and "6 / 6 samples" in (a.description or "") for a in progress)

    # Second run: nothing is trained, generated or published again.
    before = _files(Path(config.factory_root))
    again = generate_dataset(config=config)
    assert again.uri == record.uri and again.reused
    assert _files(Path(config.factory_root)) == before


def test_trained_models_load_with_plain_diffusers(prefect_api, make_config):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from flows.learn_condition import learn_condition

    config = make_config()
    condition = learn_condition(config=config)
    concept_dir = next((Path(config.factory_root) / "models" / "concept").iterdir())
    assert (concept_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "training data fingerprint" in (concept_dir / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(config.base_model.pretrained, safety_checker=None)
    pipe.load_lora_weights(str(concept_dir))
    controlnet = ControlNetModel.from_pretrained(condition.uri)
    control_pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k not in ("image_encoder",)}, controlnet=controlnet
    )
    control_pipe.set_progress_bar_config(disable=True)
    out = control_pipe(
        "an image of a sks with a hairline crack",
        image=torch.rand(1, 3, 64, 64),
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert not [p for p in Path(config.factory_root).rglob("*") if p.suffix in (".bin", ".ckpt", ".pkl")]


def test_stage_flows_run_alone_and_share_the_cache(prefect_api, make_config):
    from flows.ingest import ingest
    from flows.learn_concept import learn_concept

    config = make_config()
    catalog = ingest(config=config)
    assert catalog.ingested == 16 and not catalog.reused
    concept = learn_concept(config=config)
    assert not concept.reused
    assert learn_concept(config=config).reused
    changed = config.model_copy(update={"concept": config.concept.model_copy(update={"learning_rate": 5e-4})})
    retrained = learn_concept(config=changed)
    assert not retrained.reused and retrained.fingerprint != concept.fingerprint


def test_unreadable_image_is_reported_by_name(prefect_api, make_config, sample_root, tmp_path):
    import shutil

    from flows.ingest import ingest

    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    bad = root / "defective" / "images" / "defect_0003.png"
    bad.write_bytes(b"\x89PNG truncated")
    config = make_config(
        source={
            "coco_annotations": str(root / "defective" / "annotations.json"),
            "images_dir": str(root / "defective" / "images"),
            "defect_free_dir": str(root / "defect_free"),
        }
    )
    record = ingest(config=config)
    assert record.quarantined == 1
    report = (Path(record.uri) / "report.md").read_text()
    assert os.fspath(bad) in report and "not a readable image" in report
