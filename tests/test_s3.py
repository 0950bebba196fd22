"""The factory against a real S3 endpoint over HTTP (moto server on loopback)."""

import json

import pandas as pd
import pytest
from pycocotools.coco import COCO

pytestmark = pytest.mark.slow


def test_ingest_from_s3_sources_and_publish_to_s3(prefect_api, s3_bucket, sample_root, make_config, tmp_path):
    import fsspec

    from flows.generate_dataset import generate_dataset

    fs = fsspec.filesystem("s3")
    fs.put(str(sample_root) + "/", f"{s3_bucket}/sources/", recursive=True)
    config = make_config(factory_root=f"{s3_bucket}/factory", source={
        "coco_annotations": f"{s3_bucket}/sources/defective/annotations.json",
        "images_dir": f"{s3_bucket}/sources/defective/images",
        "defect_free_dir": f"{s3_bucket}/sources/defect_free"})
    record = generate_dataset(config=config)
    assert record.uri.startswith(f"{s3_bucket}/factory/datasets/demo-cracks/")

    with fsspec.open(f"{record.uri}/manifest.json") as handle:
        manifest = json.load(handle)
    df = pd.read_parquet(f"{record.uri}/data/")
    assert len(df) == manifest["counts"]["samples"] == 6
    local = tmp_path / "coco.json"
    fs.get(f"{record.uri}/annotations/instances_train.json", str(local))
    coco = COCO(str(local))
    assert len(coco.getAnnIds()) == 6
    assert not [p for p in fs.find(f"{s3_bucket}/factory") if "/.tmp-" in p]
    # The models were uploaded in diffusers layout and a rerun reuses everything from S3.
    assert fs.exists(f"{s3_bucket}/factory/models/concept")
    assert generate_dataset(config=config).reused
