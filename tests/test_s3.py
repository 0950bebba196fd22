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
    config = make_config(
        factory_root=f"{s3_bucket}/factory",
        source={
            "coco_annotations": f"{s3_bucket}/sources/defective/annotations.json",
            "images_dir": f"{s3_bucket}/sources/defective/images",
            "defect_free_dir": f"{s3_bucket}/sources/defect_free",
        },
    )
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


def _model_folder(folder, record: dict) -> None:
    from pathlib import Path

    (Path(folder) / "unet").mkdir()
    (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 70_000)
    (Path(folder) / "README.md").write_text("card")
    (Path(folder) / "record.json").write_text(json.dumps(record))


def _record(uri: str) -> dict:
    return {"kind": "concept", "uri": uri, "fingerprint": "fp", "base_model": "tiny", "steps": 2, "seconds": 1.0}


def test_a_model_upload_cut_mid_way_leaves_no_marker_and_the_marker_goes_last(s3_bucket, monkeypatch):
    import fsspec
    import s3fs

    from indusfactory.infra import storage
    from indusfactory.schema import ModelRecord

    uri = f"{s3_bucket}/factory/models/concept/fp"
    real_put = s3fs.S3FileSystem.put

    def killed_mid_upload(self, lpath, rpath, *args, **kwargs):
        real_put(self, lpath[:1], rpath[:1], *args, **kwargs)  # one weight file made it, then the worker died
        raise ConnectionError("killed mid-upload")

    monkeypatch.setattr(s3fs.S3FileSystem, "put", killed_mid_upload)
    with pytest.raises(ConnectionError):
        with storage.local_copy_for_write(uri) as folder:
            _model_folder(folder, _record(uri))
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.find(uri) and not fs.exists(f"{uri}/record.json"), "no completion marker without its weights"
    assert ModelRecord.read_completed(f"{uri}/record.json") is None

    monkeypatch.setattr(s3fs.S3FileSystem, "put", real_put)
    with storage.local_copy_for_write(uri) as folder:
        _model_folder(folder, _record(uri))
    fs.invalidate_cache()
    modified = {p.rsplit("/", 1)[-1]: info["LastModified"] for p, info in fs.find(uri, detail=True).items()}
    assert modified["record.json"] >= max(modified.values()), "the marker is written last"
    listing = json.loads(fs.cat_file(f"{uri}/files.json"))["files"]
    assert listing["unet/diffusion_pytorch_model.safetensors"]["size"] == 70_000 and "record.json" not in listing
    assert ModelRecord.read_completed(f"{uri}/record.json").reused


def test_listed_marker_without_weights_is_detected_named_and_not_reused(s3_bucket, caplog):
    _marker_without_weights(s3_bucket, caplog, listing=True)


def test_legacy_marker_without_weights_is_detected_named_and_not_reused(s3_bucket, caplog):
    """A folder uploaded before files.json existed: a model record needs a safetensors file next to it."""
    _marker_without_weights(s3_bucket, caplog, listing=False)


def _marker_without_weights(s3_bucket, caplog, listing: bool) -> None:
    import fsspec

    from indusfactory.infra import storage
    from indusfactory.infra.errors import IncompleteOutputError
    from indusfactory.schema import ModelRecord

    uri = f"{s3_bucket}/factory/models/concept/fp"
    with storage.local_copy_for_write(uri) as folder:
        _model_folder(folder, _record(uri))
    fs = fsspec.filesystem("s3")
    fs.rm_file(f"{uri}/unet/diffusion_pytorch_model.safetensors")  # what the old one-batch upload could leave
    if not listing:
        fs.rm_file(f"{uri}/files.json")
    fs.invalidate_cache()
    assert fs.exists(f"{uri}/record.json")
    assert ModelRecord.read_completed(f"{uri}/record.json") is None
    assert uri in caplog.text and "not reused" in caplog.text
    if listing:
        with pytest.raises(IncompleteOutputError, match=uri):
            with storage.local_copy_for_read(uri):
                pass
    else:  # no listing to check against: an error about the local copy names the S3 URI, not a temporary folder
        with pytest.raises(OSError) as info:
            with storage.local_copy_for_read(uri) as local:
                open(f"{local}/unet/diffusion_pytorch_model.safetensors", "rb")
        assert uri in str(info.value) and "/tmp" not in str(info.value)


def test_a_model_whose_weights_went_missing_on_s3_is_trained_again(s3_bucket, make_config):
    import fsspec

    from indusfactory.learning.concept import concept_uri_for, train_concept
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    config = make_config(factory_root=f"{s3_bucket}/factory", concept={"validation_images": 0})
    catalog = ingest(config.source, catalog_folder_for(config))
    uri = concept_uri_for(config, catalog)
    first = train_concept(config, catalog, uri)
    fs = fsspec.filesystem("s3")
    weights = f"{uri}/pytorch_lora_weights.safetensors"
    fs.rm_file(weights)
    fs.invalidate_cache()
    again = train_concept(config, catalog, uri)
    assert not again.reused and again.fingerprint == first.fingerprint
    fs.invalidate_cache()
    assert fs.exists(weights) and train_concept(config, catalog, uri).reused
