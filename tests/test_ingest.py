import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from indusfactory.config import SourceConfig
from indusfactory.errors import BadInputError
from indusfactory.ingest import QUARANTINE_FILE, ingest, read_catalog
from indusfactory.schema import categories_from_metadata, rle_to_mask


def _source(root):
    return SourceConfig(coco_annotations=str(root / "defective" / "annotations.json"),
                        images_dir=str(root / "defective" / "images"), defect_free_dir=str(root / "defect_free"))


@pytest.fixture
def messy(sample_root, tmp_path):
    """The sample data plus one of each bad case the foundation handles."""
    root = tmp_path / "messy"
    shutil.copytree(sample_root, root)
    coco_path = root / "defective" / "annotations.json"
    coco = json.loads(coco_path.read_text())
    (root / "defective" / "images" / coco["images"][0]["file_name"]).write_bytes(b"not an image at all")
    next_id = max(i["id"] for i in coco["images"]) + 1
    coco["images"].append({"id": next_id, "file_name": "missing.png", "width": 64, "height": 64})
    coco["images"].append({"id": next_id + 1, "file_name": "../escape.png", "width": 64, "height": 64})
    coco_path.write_text(json.dumps(coco))
    (root / "defect_free" / "empty.png").write_bytes(b"")
    shutil.copy(root / "defect_free" / "clean_0000.png", root / "defect_free" / "copy_of_clean_0000.png")
    return root, coco


def test_catalog_masks_equal_source_masks(sample_root, tmp_path):
    record = ingest(_source(sample_root), str(tmp_path / "catalog"))
    assert record.found == 16 and record.ingested == 16 and record.quarantined == 0
    table = read_catalog(record.uri)
    assert [c["name"] for c in categories_from_metadata(table.schema)] == ["hairline", "branched"]
    coco = COCO(str(sample_root / "defective" / "annotations.json"))
    by_name = {r["file_name"]: r for r in table.to_pylist()}
    for image in coco.dataset["images"]:
        row = by_name[image["file_name"]]
        assert row["defective"] and row["split"] in {"train", "val", "test"}
        source = {a["id"]: coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))}
        assert {i["annotation_id"] for i in row["instances"]} == set(source)
        for inst in row["instances"]:
            assert np.array_equal(rle_to_mask(inst["rle"]), source[inst["annotation_id"]])
    assert sum(not r["defective"] for r in table.to_pylist()) == 4


def test_bad_input_is_quarantined_and_counts_reconcile(messy, tmp_path):
    root, coco = messy
    record = ingest(_source(root), str(tmp_path / "catalog"))
    assert record.ingested + record.quarantined + record.duplicates == record.found
    assert record.quarantined == 4 and record.duplicates == 1
    reasons = pq.read_table(tmp_path / "catalog" / QUARANTINE_FILE).to_pylist()

    def reason(name):
        return next(r["reason"] for r in reasons if r["source_uri"].endswith(name))

    assert "not a readable image" in reason("/" + coco["images"][0]["file_name"])
    assert "does not exist" in reason("/missing.png")
    assert "would escape" in reason("../escape.png")
    assert "zero-byte" in reason("/empty.png")
    assert "quarantined: 4" in (tmp_path / "catalog" / "report.md").read_text()


def test_rerun_reuses_the_catalog(sample_root, tmp_path):
    first = ingest(_source(sample_root), str(tmp_path / "catalog"))
    second = ingest(_source(sample_root), str(tmp_path / "catalog"))
    assert not first.reused and second.reused and second.content_fingerprint == first.content_fingerprint


def test_nothing_usable_is_a_clear_error(sample_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(sample_root, root)
    for image in (root / "defective" / "images").iterdir():
        image.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="no usable defective image"):
        ingest(_source(root), str(tmp_path / "catalog"))


def test_missing_source_folder_is_named(sample_root, tmp_path):
    from indusfactory.ingest import source_listing

    source = _source(sample_root).model_copy(update={"defect_free_dir": str(tmp_path / "nowhere")})
    with pytest.raises(BadInputError, match="source.defect_free_dir .*nowhere does not exist"):
        source_listing(source)
