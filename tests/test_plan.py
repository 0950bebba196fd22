import json
import os
from pathlib import Path

import numpy as np
import pytest

from indusfactory.drivers.augment import apply_augmentation
from indusfactory.drivers.topology import class_colour
from indusfactory.generation.plan import (
    SourceImages,
    build_plan,
    build_plan_rows,
    check_references,
    materialise,
    plan_uri_for,
    read_plan,
)
from indusfactory.infra.errors import BadInputError
from indusfactory.layout import PLAN_FILE, PREVIEW_FILE
from indusfactory.sources.ingest import catalog_folder_for, ingest


def test_same_config_same_plan_bytes(make_config, catalog, tmp_path):
    config = make_config(plan={"max_defect_free_images": 4, "augmentations_per_image": 2})
    first = build_plan(config, catalog, str(tmp_path / "a"))
    build_plan(config, catalog, str(tmp_path / "b"))
    assert (tmp_path / "a" / PLAN_FILE).read_bytes() == (tmp_path / "b" / PLAN_FILE).read_bytes()
    assert first.samples == 4 * 2 * 3 and first.shards == 6
    assert (tmp_path / "a" / PREVIEW_FILE).stat().st_size > 0
    rows = read_plan(first)
    assert len({r["sample_id"] for r in rows}) == len(rows)
    assert len({r["seed"] for r in rows}) == len(rows)
    assert [r["shard"] for r in rows] == [i // 4 for i in range(len(rows))]
    assert read_plan(first, shard=1) == rows[4:8]
    other = make_config(plan={"max_defect_free_images": 4, "augmentations_per_image": 2, "seed": 1})
    assert plan_uri_for(other, catalog) != plan_uri_for(config, catalog)


def test_rows_rebuild_driver_and_masks_exactly(make_config, catalog):
    config = make_config(plan={"max_instances_per_image": 3, "images_per_driver": 5})
    from indusfactory.sources.catalog import read_catalog

    rows = build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), SourceImages(catalog.uri, catalog.categories))
    sources = SourceImages(catalog.uri, catalog.categories)
    assert any(len(r["instances"]) > 1 for r in rows)
    for row in rows:
        sample = materialise(row, sources, config)
        again = materialise(row, sources, config)
        assert np.array_equal(sample.driver, again.driver)
        names = [inst["category"] for inst, _ in sample.instances]
        assert all(name in row["prompt"] for name in names)
        last_inst, last_mask = sample.instances[-1]
        assert last_mask.any() and last_mask.shape == (64, 64)
        colour = np.array(class_colour(sources.class_index[last_inst["category_id"]])) / 255
        assert np.allclose(sample.driver[last_mask], colour)


def test_procedural_masks_are_recorded_and_follow_class_styles(make_config, catalog):
    from indusfactory.sources.catalog import read_catalog

    config = make_config(plan={"procedural_fraction": 1.0, "procedural_styles": {"hairline": "branched"}})
    rows = build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), SourceImages(catalog.uri, catalog.categories))
    sources = SourceImages(catalog.uri, catalog.categories)
    for row in rows:
        inst = row["instances"][0]
        assert inst["mask_source"] == "procedural"
        assert inst["mask_source_id"] == "branched"  # hairline is mapped to branched, branched is its own style
        assert "crack_seed" in json.loads(inst["perturbation"])
        assert materialise(row, sources, config).instances[0][1].any()
    bank_only = build_plan_rows(make_config(), read_catalog(catalog.uri).to_pylist(), sources)
    assert {r["instances"][0]["mask_source"] for r in bank_only} == {"bank"}


def test_unknown_style_and_missing_drivers_are_clear_errors(make_config, catalog):
    from indusfactory.sources.catalog import read_catalog

    rows = read_catalog(catalog.uri).to_pylist()
    sources = SourceImages(catalog.uri, catalog.categories)
    config = make_config(plan={"procedural_fraction": 1.0, "procedural_styles": {"hairline": "zigzag"}})
    with pytest.raises(BadInputError, match="zigzag"):
        build_plan_rows(config, rows, sources)
    with pytest.raises(BadInputError, match="no defect-free image"):
        build_plan_rows(make_config(), [r for r in rows if r["defective"]], sources)


@pytest.fixture
def bordered(sample_root, tmp_path, make_config):
    """Sample data whose defect-free images have a black left third, like a borescope border."""
    import shutil

    from PIL import Image

    root = tmp_path / "bordered"
    shutil.copytree(sample_root, root)
    for path in (root / "defect_free").glob("*.png"):
        image = np.asarray(Image.open(path).convert("RGB")).copy()
        image[:, : image.shape[1] // 3] = 0
        Image.fromarray(image).save(path)
    source = {
        "coco_annotations": str(root / "defective" / "annotations.json"),
        "images_dir": str(root / "defective" / "images"),
        "defect_free_dir": str(root / "defect_free"),
    }
    return root, source


@pytest.mark.parametrize("procedural", [0.0, 1.0])
def test_masks_stay_inside_the_region_of_interest(bordered, make_config, procedural):
    from indusfactory.sources.catalog import read_catalog

    root, source = bordered
    config = make_config(
        source=source, plan={"roi_min_intensity": 20, "images_per_driver": 6, "procedural_fraction": procedural}
    )
    catalog = ingest(config.source, catalog_folder_for(config))
    sources = SourceImages(catalog.uri, catalog.categories)

    def dark_region(row):
        image = apply_augmentation(sources.image(row["driver_image_id"], 64), json.loads(row["augmentation"]))
        return image.mean(axis=2) <= 20

    rows = build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), sources)
    for row in rows:
        dark = dark_region(row)
        assert dark.mean() > 0.15  # the border survives the augmentations
        for _, mask in materialise(row, sources, config).instances:
            assert mask.any() and not (mask & dark).any(), "a mask was placed on the black border"
    # Without the constraint, masks do land on the border: the constraint is what keeps them off.
    free = make_config(source=source, plan={"images_per_driver": 6, "procedural_fraction": procedural})
    unconstrained = build_plan_rows(free, read_catalog(catalog.uri).to_pylist(), sources)
    assert any(
        (mask & dark_region(row)).any()
        for row in unconstrained
        for _, mask in materialise(row, sources, free).instances
    )


def test_roi_files_constrain_placement(bordered, make_config, tmp_path):
    from PIL import Image

    from indusfactory.sources.catalog import read_catalog

    root, source = bordered
    roi_dir = tmp_path / "roi"
    roi_dir.mkdir()
    for path in (root / "defect_free").glob("*.png"):
        allowed = np.zeros((64, 64), dtype=np.uint8)
        allowed[:, 32:] = 255  # only the right half
        Image.fromarray(allowed).save(roi_dir / path.name)
    config = make_config(source=source, plan={"roi_dir": str(roi_dir), "images_per_driver": 6})
    catalog = ingest(config.source, catalog_folder_for(config))
    sources = SourceImages(catalog.uri, catalog.categories)
    for row in build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), sources):
        for _, mask in materialise(row, sources, config).instances:
            assert mask.any() and not mask[:, :16].any(), "a mask left the allowed right half"
    # A ROI file redrawn in place is a new plan (its contents decide the placements).
    from indusfactory.generation.plan import plan_fingerprint

    before = plan_fingerprint(config, catalog)
    roi_file = sorted(roi_dir.iterdir())[0]
    mtime = roi_file.stat().st_mtime_ns
    allowed = np.zeros((64, 64), dtype=np.uint8)
    allowed[:, :32] = 255
    Image.fromarray(allowed).save(roi_file)
    os.utime(roi_file, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
    assert plan_fingerprint(config, catalog) != before
    missing = make_config(source=source, plan={"roi_dir": str(tmp_path / "empty-roi")})
    (tmp_path / "empty-roi").mkdir()
    with pytest.raises(BadInputError, match="region-of-interest file"):
        build_plan_rows(missing, read_catalog(catalog.uri).to_pylist(), sources)


def test_an_roi_file_is_decoded_once_per_version_whatever_the_rows(bordered, make_config, tmp_path, monkeypatch):
    """Every row and augmentation of an image warps the same decoded ROI; a file redrawn in place is read again."""
    from PIL import Image

    from indusfactory.infra import storage as storage_module
    from indusfactory.sources.catalog import read_catalog

    root, source = bordered
    roi_dir = tmp_path / "roi"
    roi_dir.mkdir()
    for path in (root / "defect_free").glob("*.png"):
        Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(roi_dir / path.name)
    config = make_config(source=source, plan={"roi_dir": str(roi_dir), "images_per_driver": 6})
    catalog = ingest(config.source, catalog_folder_for(config))
    sources = SourceImages(catalog.uri, catalog.categories)
    reads: list[str] = []
    real = storage_module.read_bytes
    monkeypatch.setattr(storage_module, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    rows = build_plan_rows(config, read_catalog(catalog.uri).to_pylist(), sources)
    for row in rows:
        materialise(row, sources, config)
    roi_reads = [u for u in reads if u.startswith(str(roi_dir))]
    assert len(rows) > len(set(roi_reads)) and len(roi_reads) == len(set(roi_reads)), "each ROI file read once"

    redrawn = Path(roi_reads[0])
    mtime = redrawn.stat().st_mtime_ns
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(redrawn)
    os.utime(redrawn, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
    reads.clear()
    for row in rows:
        materialise(row, sources, config)
    assert [u for u in reads if u.startswith(str(roi_dir))] == [str(redrawn)], "only the redrawn file again"


def test_plan_references_that_do_not_exist_are_named(make_config, catalog, tmp_path):
    config = make_config()
    plan = build_plan(config, catalog, str(tmp_path / "plan"))
    with pytest.raises(BadInputError, match=f"shard {plan.shards} is outside plan"):
        read_plan(plan, shard=plan.shards)
    sources = SourceImages(catalog.uri, catalog.categories)
    rows = read_plan(plan, shard=0)
    check_references(rows, sources)  # a sound plan passes
    bad_image = [{**rows[0], "driver_image_id": "no-such-image"}]
    with pytest.raises(BadInputError, match=f"plan row {rows[0]['sample_id']} references image no-such-image"):
        check_references(bad_image, sources)
    bank = next(r for r in read_plan(plan) if r["instances"][0]["mask_source"] != "procedural")
    bad_mask = [{**bank, "instances": [{**bank["instances"][0], "mask_source_id": "ghost:99"}]}]
    with pytest.raises(BadInputError, match="references mask ghost:99"):
        check_references(bad_mask, sources)
    # A damaged plan file whose shard has lost its rows.
    import pyarrow.parquet as pq

    path = tmp_path / "plan" / PLAN_FILE
    table = pq.read_table(path)
    pq.write_table(table.filter(pq.read_table(path).column("shard").to_numpy() != 0), path)
    (tmp_path / "plan" / "shards" / "shard-00000.parquet").unlink()  # read from plan.parquet instead
    with pytest.raises(BadInputError, match="shard 0 of plan .* has no rows"):
        read_plan(plan, shard=0)


def test_the_plan_loads_no_model_code():
    """Planning is data work: importing it loads neither torch nor a training module (a work-pool process that
    only plans or dispatches shards pays no model import)."""
    import subprocess
    import sys

    probe = (
        "import sys, indusfactory.generation.plan; "
        "print(sorted(m for m in ('torch', 'diffusers', 'indusfactory.learning.condition') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
