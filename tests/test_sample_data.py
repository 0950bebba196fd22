"""Sample data and procedural cracks: deterministic, loadable by pycocotools, cracks really dark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from skimage.morphology import dilation, disk

from indusfactory.demo.sample_data import SampleDataPaths, write_sample_data
from indusfactory.drivers.cracks import CRACK_STYLES, CrackStyle, random_crack_mask


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleDataPaths:
    return write_sample_data(tmp_path_factory.mktemp("sample"), n_defective=12, n_defect_free=5, size=64)


@pytest.fixture(scope="module")
def coco(sample: SampleDataPaths) -> COCO:
    return COCO(str(sample.coco_annotations))


def test_layout_and_returned_paths(sample: SampleDataPaths) -> None:
    assert sample.coco_annotations == sample.root / "defective" / "annotations.json"
    assert sample.images_dir == sample.root / "defective" / "images"
    assert sample.defect_free_dir == sample.root / "defect_free"
    assert sorted(p.name for p in sample.images_dir.iterdir()) == [f"defect_{i:04d}.png" for i in range(12)]


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first = write_sample_data(tmp_path / "a", n_defective=6, n_defect_free=3, size=64, seed=3)
    second = write_sample_data(tmp_path / "b", n_defective=6, n_defect_free=3, size=64, seed=3)
    assert _files(first.root) == _files(second.root)
    assert len(_files(first.root)) == 6 + 3 + 1
    other = write_sample_data(tmp_path / "c", n_defective=6, n_defect_free=3, size=64, seed=4)
    assert _files(other.root) != _files(first.root)


def test_rewriting_a_folder_overwrites_its_own_files(tmp_path: Path) -> None:
    write_sample_data(tmp_path / "x", n_defective=6, n_defect_free=4, size=64, seed=1)
    (tmp_path / "x" / "notes.txt").write_text("not ours")
    rewritten = write_sample_data(tmp_path / "x", n_defective=3, n_defect_free=2, size=64, seed=2)
    fresh = write_sample_data(tmp_path / "y", n_defective=3, n_defect_free=2, size=64, seed=2)
    files = _files(rewritten.root)
    assert files.pop("notes.txt") == b"not ours"
    assert files == _files(fresh.root)


def test_coco_document(sample: SampleDataPaths, coco: COCO) -> None:
    doc = json.loads(sample.coco_annotations.read_text())
    assert doc["categories"] == [
        {"id": 1, "name": "hairline", "supercategory": "crack"},
        {"id": 2, "name": "branched", "supercategory": "crack"},
    ]
    assert len(coco.getImgIds()) == 12
    for image in coco.dataset["images"]:
        assert (sample.images_dir / image["file_name"]).is_file()
        assert (image["width"], image["height"]) == (64, 64)
        assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= 2
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2}
    for ann in coco.dataset["annotations"]:
        assert ann["iscrowd"] == 0
        assert isinstance(ann["segmentation"]["counts"], str)
        assert isinstance(ann["area"], int) and all(isinstance(v, float) for v in ann["bbox"])


def test_masks_are_nonempty_inside_and_consistent(coco: COCO) -> None:
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann).astype(bool)
        assert mask.shape == (image["height"], image["width"])
        assert mask.sum() == ann["area"] > 0
        rows, cols = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)


def test_each_instance_mask_is_painted_dark(sample: SampleDataPaths, coco: COCO) -> None:
    """Mean grey level inside a crack is far below that of the 3-px ring around it."""
    for image in coco.dataset["images"]:
        grey = np.asarray(Image.open(sample.images_dir / image["file_name"]).convert("RGB"), float).mean(axis=2)
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))]
        all_cracks = np.logical_or.reduce(masks)
        for mask in masks:
            ring = dilation(mask, disk(3)) & ~all_cracks
            assert ring.sum() > 0
            assert grey[mask].mean() < 0.6 * grey[ring].mean(), image["file_name"]


def test_images_are_rgb(sample: SampleDataPaths) -> None:
    for path in list(sample.images_dir.iterdir()) + list(sample.defect_free_dir.iterdir()):
        with Image.open(path) as im:
            assert (im.mode, im.size) == ("RGB", (64, 64))


def test_defect_free_images(sample: SampleDataPaths) -> None:
    assert sorted(p.name for p in sample.defect_free_dir.iterdir()) == [f"clean_{i:04d}.png" for i in range(5)]
    # clean crops are surfaces, not blank: they have texture
    for path in sample.defect_free_dir.iterdir():
        assert np.asarray(Image.open(path), float).std() > 5


def test_defaults(tmp_path: Path) -> None:
    paths = write_sample_data(tmp_path)
    assert len(list(paths.images_dir.glob("defect_*.png"))) == 24
    assert len(list(paths.defect_free_dir.glob("clean_*.png"))) == 12
    with Image.open(paths.defect_free_dir / "clean_0000.png") as im:
        assert im.size == (128, 128)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 100}, "size"),
        ({"size": 24}, "size"),
        ({"size": 1024}, "size"),
        ({"n_defective": 0}, "n_defective"),
        ({"n_defect_free": 0}, "n_defect_free"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        write_sample_data(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("style", sorted(CRACK_STYLES))
@pytest.mark.parametrize("shape", [(64, 64), (40, 200), (9, 7)])
def test_crack_mask_is_deterministic_nonempty_and_inside(style: str, shape: tuple[int, int]) -> None:
    for seed in range(5):
        mask = random_crack_mask(shape, style, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == shape and mask.any()
        assert np.array_equal(mask, random_crack_mask(shape, style, np.random.default_rng(seed)))
    a, b = (random_crack_mask(shape, style, np.random.default_rng(s)) for s in (0, 1))
    assert not np.array_equal(a, b)


def test_branched_cracks_are_bigger_than_hairlines() -> None:
    def mean_area(style: str) -> float:
        rng = np.random.default_rng(0)
        return float(np.mean([random_crack_mask((128, 128), style, rng).sum() for _ in range(20)]))

    assert mean_area("branched") > 1.5 * mean_area("hairline")


def test_style_object_accepted_and_validated() -> None:
    style = CrackStyle(length=(0.5, 0.5), width=(1, 1), branches=(0, 0), turn_std=0.0, straightness=0.0, taper=0.0)
    mask = random_crack_mask((50, 50), style, np.random.default_rng(0))
    assert 2 <= mask.sum() <= 60  # a straight 1-px line of about 25 steps (may leave the image early)
    with pytest.raises(ValueError, match="taper"):
        CrackStyle(length=(0.5, 0.5), width=(1, 1), branches=(0, 0), turn_std=0.0, straightness=0.0, taper=2.0)


def test_unknown_style_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'zigzag'.*branched.*hairline"):
        random_crack_mask((32, 32), "zigzag", np.random.default_rng(0))


def test_make_sample_data_false_leaves_missing_sources_missing(tmp_path):
    from indusfactory.config import FactoryConfig, SourceConfig
    from tasks.ingest import _sample_data_if_asked

    root = tmp_path / "sample-data"
    source = SourceConfig(
        coco_annotations=str(root / "defective" / "annotations.json"),
        images_dir=str(root / "defective" / "images"),
        defect_free_dir=str(root / "defect_free"),
        make_sample_data=False,
    )
    assert _sample_data_if_asked(FactoryConfig(source=source)) is None
    assert not root.exists()
