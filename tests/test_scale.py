"""Publishing scales with shards, not bytes: a shard reads its own plan rows, checksums are recorded at the write
and checked from metadata, the merged COCO is streamed, images are spread over one folder per shard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from indusfactory.infra import storage

CATEGORIES = [{"id": 1, "name": "hairline"}]
LINEAGE = {"base_model": "m", "concept_fingerprint": "c", "condition_fingerprint": "k"}


def plan_rows(samples: int, shard_size: int) -> list[dict]:
    return [
        {
            "sample_id": f"{i:016x}",
            "sample_index": i,
            "shard": i // shard_size,
            "driver_image_id": "d",
            "augmentation_index": 0,
            "augmentation": "{}",
            "instances": [],
            "prompt": "an image of a sks",
            "seed": i,
        }
        for i in range(samples)
    ]


def dataset_rows(start: int, count: int, size: int = 16) -> list[dict]:
    from indusfactory.schema import encode_png, mask_to_rle, rle_bbox_area

    rng = np.random.default_rng(start)
    rows = []
    for index in range(start, start + count):
        mask = np.zeros((size, size), bool)
        mask[2 : 4 + index % 5, 3:9] = True
        rle = mask_to_rle(mask)
        bbox, area = rle_bbox_area(rle)
        instance = {"category_id": 1, "category": "hairline", "rle": rle, "bbox": bbox, "area": area}
        rows.append(
            {
                "sample_id": f"{index:016x}",
                "sample_index": index,
                "image": {"bytes": encode_png(rng.integers(0, 255, (size, size, 3), np.uint8)), "path": f"{index}.png"},
                "width": size,
                "height": size,
                "instances": [{**instance, "mask_source": "procedural"}],
                "driver": {"bytes": encode_png(mask.astype(np.uint8) * 255), "path": f"{index}_driver.png"},
                "prompt": "p",
                "seed": index,
                "driver_image_id": "d",
                "qc_mask_contrast": 0.5,
                "qc_adherence": None,
                "qc_label_auc": 0.9,
                "qc_chance_auc": 0.5,
                "qc_passed": index % 3 != 0,
                "base_model": "m",
                "concept_fingerprint": "c",
                "condition_fingerprint": "k",
                "code_version": "v",
                "worker": "w",
            }
        )
    return rows


def write_shards(dataset_uri: str, shards: int, per_shard: int = 3) -> list:
    from indusfactory.publishing.publish import write_shard

    return [
        write_shard(dataset_uri, "train", i, shards, dataset_rows(i * per_shard, per_shard), CATEGORIES, 0.0)
        for i in range(shards)
    ]


class CountingReads:
    """Every byte read through ``storage.filesystem``'s filesystems, per path (``cat_file`` and open handles)."""

    def __init__(self, monkeypatch):
        self.bytes: Counter[str] = Counter()
        real = storage.filesystem
        counter = self

        class Handle:
            def __init__(self, handle, path):
                self._handle, self._path = handle, path

            def read(self, *args):
                data = self._handle.read(*args)
                counter.bytes[self._path] += len(data)
                return data

            def __getattr__(self, name):
                return getattr(self._handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._handle.close()

        class FS:
            def __init__(self, fs):
                self._fs = fs

            def cat_file(self, path, *args, **kwargs):
                data = self._fs.cat_file(path, *args, **kwargs)
                counter.bytes[str(path)] += len(data)
                return data

            def open(self, path, mode="rb", **kwargs):
                handle = self._fs.open(path, mode, **kwargs)
                return Handle(handle, str(path)) if "r" in mode else handle

            def __getattr__(self, name):
                return getattr(self._fs, name)

        monkeypatch.setattr(storage, "filesystem", lambda uri: (lambda fs, path: (FS(fs), path))(*real(uri)))

    def of(self, part: str) -> int:
        return sum(n for path, n in self.bytes.items() if part in path)


def test_a_shard_reads_its_own_plan_rows_at_the_same_cost_whatever_the_plan_size(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from indusfactory import layout
    from indusfactory.generation import plan as plan_module
    from indusfactory.schema import PlanRecord

    read: dict[int, int] = {}
    for samples in (40, 4000):
        uri = str(tmp_path / f"plan-{samples}")
        rows = plan_rows(samples, 4)
        storage.write_bytes_atomic(storage.join(uri, layout.PLAN_FILE), plan_module.plan_bytes(rows))
        storage.write_many_atomic(plan_module.plan_shard_files(layout.PlanFolder(uri, "f"), rows))
        record = PlanRecord(uri=uri, fingerprint="f", samples=samples, shards=samples // 4)
        with monkeypatch.context() as patch:
            reads = CountingReads(patch)
            assert plan_module.read_plan(record, shard=7) == rows[28:32]
            read[samples] = sum(reads.bytes.values())
            assert reads.of(layout.PLAN_FILE) == 0  # only the shard's own file
        # plan.parquet: one row group per shard; a plan without shard files reads only shard 7's row group
        metadata = pq.read_metadata(Path(uri) / layout.PLAN_FILE)
        assert metadata.num_row_groups == samples // 4 and metadata.row_group(7).num_rows == 4
        for path in (Path(uri) / layout.PLAN_SHARDS).iterdir():
            path.unlink()
        groups = []
        real = pq.ParquetFile.read_row_groups
        monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, g, **kw: groups.append(g) or real(self, g))
        assert plan_module.read_plan(record, shard=7) == rows[28:32] and groups == [[7]]
        monkeypatch.undo()
    assert read[40] == read[4000] > 0


def test_publish_and_the_reuse_check_read_no_shard_back(tmp_path, monkeypatch):
    from indusfactory.publishing.publish import (
        existing_shard,
        existing_shards,
        finalize_dataset,
        present_shards,
        shard_uri,
    )

    dataset = str(tmp_path / "datasets" / "d" / "v1")
    shards = write_shards(dataset, 12, per_shard=2)
    parquet = {s.uri: Path(s.uri).read_bytes() for s in shards}
    for shard in shards:  # recorded at the write, from the bytes in hand
        assert shard.bytes == len(parquet[shard.uri]) and shard.sha256 == storage.sha256_bytes(parquet[shard.uri])
    reads = CountingReads(monkeypatch)
    assert present_shards(dataset, "train", 12) == set(range(12))
    again = existing_shards(dataset, "train", 12)
    assert [again[i].sha256 for i in range(12)] == [s.sha256 for s in shards] and all(r.reused for r in again.values())
    assert existing_shard(dataset, "train", 1, 12).flagged == shards[1].flagged
    assert not reads.of(".parquet"), "the reuse check and the dispatcher read shard metadata only"
    record = finalize_dataset(dataset, "d", "v1", "train", shards, CATEGORIES, {}, LINEAGE)
    assert record.samples == 24
    # publish reads the 16 samples of the contact sheet (the first 8 shards here), never a shard to hash it
    assert [reads.of(Path(s.uri).name) for s in shards[8:]] == [0] * 4, reads.bytes
    manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s.sha256 for s in shards]
    assert manifest["counts"]["annotations"] == 24

    # A shard rewritten behind the record's back (other bytes, same name) is not trusted: read and hashed again.
    monkeypatch.undo()
    other = tmp_path / "other"
    write_shards(str(other), 4, per_shard=2)
    target = Path(shard_uri(str(tmp_path / "datasets" / "d" / "v2"), "train", 0, 4))
    write_shards(str(target.parent.parent), 4)
    target.write_bytes((other / "data" / target.name).read_bytes())
    reread = existing_shard(str(target.parent.parent), "train", 0, 4)
    assert reread.rows == 2 and reread.sha256 == storage.sha256_bytes(target.read_bytes())

    # A shard without its record (a crash between the parquet and the record): read once, its record written.
    record_file = target.parent.parent / "shards" / "train-00001-of-00004.json"
    record_file.unlink()
    assert existing_shard(str(target.parent.parent), "train", 1, 4).rows == 3 and record_file.is_file()


def test_publish_refuses_a_shard_changed_after_its_write(tmp_path):
    from indusfactory.infra.errors import IndusfactoryError
    from indusfactory.publishing.publish import finalize_dataset

    dataset = tmp_path / "v1"
    shards = write_shards(str(dataset), 2)
    path = Path(shards[1].uri)
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # same size, other bytes: a new mtime
    with pytest.raises(IndusfactoryError, match="rewritten after it was written"):
        finalize_dataset(str(dataset), "d", "v1", "train", shards, CATEGORIES, {}, LINEAGE)
    assert not (dataset / "manifest.json").exists()


def test_the_merged_coco_is_streamed_equals_the_whole_document_and_loads(tmp_path):
    from pycocotools.coco import COCO

    from indusfactory.publishing.publish import merge_coco
    from indusfactory.schema import coco_document

    dataset = tmp_path / "v1"
    shards = write_shards(str(dataset), 3)
    docs = [json.loads(Path(s.coco_uri).read_text()) for s in shards]
    merged = dataset / "annotations" / "merged.json"
    assert merge_coco(str(merged), [s.coco_uri for s in shards], CATEGORIES, "d v1") == 9
    whole = coco_document(
        [i for d in docs for i in d["images"]], [a for d in docs for a in d["annotations"]], CATEGORIES, "d v1"
    )
    assert json.loads(merged.read_text()) == whole  # what publish wrote before, as one JSON string
    coco = COCO(str(merged))
    assert len(coco.getImgIds()) == 9 and len(coco.getAnnIds()) == 9
    for image in coco.loadImgs(coco.getImgIds()):
        assert (dataset / "images" / image["file_name"]).is_file()
    assert merge_coco(str(tmp_path / "empty.json"), [], CATEGORIES, "e") == 0
    assert json.loads((tmp_path / "empty.json").read_text()) == coco_document([], [], CATEGORIES, "e")

    # A merge that fails half-way leaves neither the file nor a temporary one.
    with pytest.raises(FileNotFoundError):
        merge_coco(str(tmp_path / "cut.json"), [shards[0].coco_uri, str(tmp_path / "gone.json")], CATEGORIES, "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "v1"]


def test_images_are_spread_over_one_folder_per_shard(tmp_path):
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO

    from indusfactory.publishing.publish import finalize_dataset

    dataset = tmp_path / "v1"
    shards = write_shards(str(dataset), 3)
    finalize_dataset(str(dataset), "d", "v1", "train", shards, CATEGORIES, {}, LINEAGE)
    images = dataset / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"train-0000{i}-of-00003" for i in range(3)]
    assert all(len(list(folder.iterdir())) == 3 for folder in images.iterdir())
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    paths = pq.read_table(dataset / "data", columns=["sample_index", "image"]).to_pylist()
    for row in paths:  # the parquet's image path is the COCO file_name, relative to images/
        (image,) = coco.loadImgs([row["sample_index"]])
        assert row["image"]["path"] == image["file_name"]
        assert (images / image["file_name"]).read_bytes() == row["image"]["bytes"]


@pytest.mark.slow
def test_on_s3_publish_checks_etags_streams_coco_and_reads_no_shard_back(s3_bucket, monkeypatch):
    import fsspec
    from pycocotools.coco import COCO

    from indusfactory.publishing.publish import existing_shards, finalize_dataset

    dataset = f"{s3_bucket}/datasets/d/v1"
    shards = write_shards(dataset, 3)
    fs = fsspec.filesystem("s3")
    for shard in shards:  # the MD5 computed at the write is the object's ETag, recorded as its version
        assert fs.info(shard.uri)["ETag"].strip('"') == shard.md5 == shard.version.strip('"')
    reads = CountingReads(monkeypatch)
    assert set(existing_shards(dataset, "train", 3)) == {0, 1, 2}
    assert not reads.of(".parquet"), "the reuse check reads shard metadata only"
    finalize_dataset(dataset, "d", "v1", "train", shards, CATEGORIES, {}, LINEAGE)
    assert reads.of(".parquet") <= sum(s.bytes for s in shards), "at most the contact sheet's rows, once"
    monkeypatch.undo()
    local = Path(str(s3_bucket).replace("s3://", "/tmp/") + "-coco.json")
    local.write_bytes(fs.cat_file(f"{dataset}/annotations/instances_train.json"))
    try:
        assert len(COCO(str(local)).getAnnIds()) == 9
    finally:
        local.unlink()
    keys = [k.split("/images/")[1] for k in fs.find(f"{dataset}/images")]
    assert {k.split("/")[0] for k in keys} == {f"train-0000{i}-of-00003" for i in range(3)}

    # a shard replaced on S3 (same size, other bytes) is refused by its ETag, without a download
    from indusfactory.infra.errors import IndusfactoryError

    other = f"{s3_bucket}/datasets/d/v2"
    replaced = write_shards(other, 1)
    data = fs.cat_file(replaced[0].uri)
    fs.pipe_file(replaced[0].uri, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndusfactoryError, match="rewritten after it was written"):
        finalize_dataset(other, "d", "v2", "train", replaced, CATEGORIES, {}, LINEAGE)


def test_the_readmes_loading_recipes_read_the_new_layout(tmp_path):
    """pandas, datasets, duckdb and pycocotools on a version with shard records and image folders: exactly the
    manifest's rows (the extra ``shards/`` records and ``images/<shard>/`` folders are seen by none of them)."""
    import datasets
    import duckdb
    import pandas as pd
    from pycocotools.coco import COCO

    from indusfactory.publishing.publish import finalize_dataset

    root = tmp_path / "datasets" / "d" / "v1"
    finalize_dataset(str(root), "d", "v1", "train", write_shards(str(root), 3), CATEGORIES, {}, LINEAGE)
    rows = json.loads((root / "manifest.json").read_text())["counts"]["samples"]
    assert rows == 9 and len(pd.read_parquet(root / "data")) == rows
    assert datasets.load_dataset(str(root), split="train").num_rows == rows
    assert duckdb.sql(f"select count(*) from read_parquet('{root}/data/*.parquet')").fetchall() == [(rows,)]
    assert len(COCO(str(root / "annotations" / "instances_train.json")).getImgIds()) == rows


def test_the_dataset_card_loads_back_as_a_hugging_face_card(tmp_path):
    """README.md is a ``huggingface_hub.DatasetCard``: its ``configs`` name exactly the manifest's shards."""
    from huggingface_hub import DatasetCard

    from indusfactory.publishing.publish import finalize_dataset

    root = tmp_path / "datasets" / "d" / "v1"
    finalize_dataset(str(root), "d", "v1", "train", write_shards(str(root), 2), CATEGORIES, {}, LINEAGE)
    manifest = json.loads((root / "manifest.json").read_text())
    card = DatasetCard.load(root / "README.md")
    assert card.data.configs == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": [shard["path"] for shard in manifest["shards"]]}],
        }
    ]
    assert card.data.configs[0]["data_files"][0]["path"] == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert card.data.task_categories == ["image-segmentation"]
    assert card.data.tags == ["synthetic", "industrial-inspection", "indusfactory"]
    assert card.text.lstrip().startswith("# d v1") and "samples: 6 in 2 shards" in card.text
