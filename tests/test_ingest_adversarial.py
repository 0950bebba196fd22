"""Ingest never falls over: hostile inputs the tests build themselves end as quarantine lines or one
clear error, within caps, in linear time."""

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage.measure import label

from indusfactory.config import SourceConfig
from indusfactory.infra.errors import BadInputError
from indusfactory.layout import QUARANTINE_FILE
from indusfactory.schema import mask_to_rle, rle_to_mask
from indusfactory.sources import ingest as ingest_module
from indusfactory.sources.catalog import read_catalog
from indusfactory.sources.ingest import ingest, rle_string_counts

CATEGORIES = [{"id": 1, "name": "scratch", "supercategory": ""}, {"id": 2, "name": "dent", "supercategory": ""}]
H, W = 40, 48


def _noise(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _box(top: int, left: int, bottom: int, right: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id: int, image_id: int, segmentation, category_id=1, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": segmentation,
        **extra,
    }


def _write(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(_png(content) if isinstance(content, np.ndarray) else content)


def _coco(
    root: Path, images: dict, annotations: list[dict], clean: dict | None = None, text=None, **source
) -> SourceConfig:
    """A COCO source: image i of ``images`` has id i + 1 (None: an entry without a file); ``text`` edits the
    JSON text before writing."""
    _write(root / "images", {n: a for n, a in images.items() if a is not None})
    _write(root / "clean", {"clean.png": _noise(999)} if clean is None else clean)
    entries = [{"id": i + 1, "file_name": name, "height": H, "width": W} for i, name in enumerate(images)]
    doc = json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES})
    (root / "annotations.json").write_text(text(doc) if text else doc)
    return SourceConfig(
        coco_annotations=str(root / "annotations.json"),
        images_dir=str(root / "images"),
        defect_free_dir=str(root / "clean"),
        **source,
    )


def _mask_folder(root: Path, images: dict, masks: dict, **source) -> SourceConfig:
    _write(root / "images", images)
    _write(root / "masks", masks)
    _write(root / "clean", {"clean.png": _noise(999)})
    return SourceConfig(
        format="mask_folder",
        images_dir=str(root / "images"),
        masks_dir=str(root / "masks"),
        mask_values={1: "scratch", 2: "dent"},
        defect_free_dir=str(root / "clean"),
        **source,
    )


def _quarantine(catalog: Path) -> dict[str, dict]:
    """Image quarantine rows by file name."""
    rows = pq.read_table(catalog / QUARANTINE_FILE).to_pylist()
    return {q["source_uri"].rsplit("/", 1)[-1]: q for q in rows if q["item"] == "image"}


def _reconciles(record) -> bool:
    counts = record.annotations
    return record.ingested + record.quarantined + record.duplicates == record.found and counts["found"] == sum(
        v for k, v in counts.items() if k != "found"
    )


def _rows(record) -> dict[str, dict]:
    return {r["file_name"]: r for r in read_catalog(record.uri).to_pylist()}


BOX = _box(5, 5, 15, 15)


# --- 1. every exception of one file or annotation is a quarantine line -------------------------


def test_annotations_that_crashed_ingest_are_quarantined_naming_file_and_annotation(tmp_path):
    huge_run = "P" * 5000 + "1"  # one run of 5001 characters: a 25,000-bit number
    images = {
        f"{name}.png": _noise(10 + i)
        for i, name in enumerate(["good", "list_category", "big_int", "big_float", "huge_run", "bad_size"])
    }
    images["nul\0byte.png"] = None
    anns = [
        _ann(1, 1, _rle(BOX)),
        _ann(2, 2, _rle(BOX), category_id=[1]),  # unhashable category id
        _ann(3, 3, [[1, 1, 10, 1, 10**400, 10]]),  # OverflowError converting to float
        _ann(4, 4, [[1, 1, 10, 1, 424242.5, 10]]),  # becomes 1e400 in the JSON text below
        _ann(5, 5, {"size": [H, W], "counts": huge_run}),
        _ann(6, 6, {"size": [10**400, W], "counts": _rle(BOX)["counts"]}),
        _ann(7, 7, _rle(BOX)),
    ]
    source = _coco(tmp_path / "src", images, anns, text=lambda doc: doc.replace("424242.5", "1e400"))
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"good.png", "clean.png"} and _reconciles(record)
    quarantine = _quarantine(tmp_path / "catalog")
    assert quarantine["list_category.png"]["kind"] == "unknown_category"
    assert "annotation 2 has unknown category id [1]" in quarantine["list_category.png"]["reason"]
    assert quarantine["big_int.png"]["kind"] == quarantine["big_float.png"]["kind"] == "mask_outside"
    assert "annotation 3" in quarantine["big_int.png"]["reason"]
    assert "annotation 5 compressed RLE is corrupt" in quarantine["huge_run.png"]["reason"]
    assert "run of 5001 characters" in quarantine["huge_run.png"]["reason"]
    assert quarantine["bad_size.png"]["kind"] == "mask_size"
    nul = quarantine["nul\\x00byte.png"]
    assert nul["kind"] == "bad_file_name" and "NUL byte" in nul["reason"] and nul["annotation_ids"] == [7]
    assert {name: q["annotation_ids"] for name, q in quarantine.items()} == {
        "list_category.png": [2],
        "big_int.png": [3],
        "big_float.png": [4],
        "huge_run.png": [5],
        "bad_size.png": [6],
        "nul\\x00byte.png": [7],
    }
    report = (tmp_path / "catalog" / "report.md").read_text()
    assert "\0" not in report and "nul\\x00byte.png" in report


def test_any_other_exception_of_one_file_or_annotation_is_quarantined(tmp_path, monkeypatch):
    """The safety net: an unforeseen exception refuses only its file (or its annotation's image)."""
    images = {"good.png": _noise(1), "boom_image.png": _noise(2), "boom_ann.png": _noise(3)}
    source = _coco(tmp_path / "src", images, [_ann(1, 1, _rle(BOX)), _ann(2, 2, _rle(BOX)), _ann(3, 3, _rle(BOX))])
    load_oriented, decode_annotation = ingest_module.load_oriented, ingest_module.decode_annotation

    def failing_load(data, name, max_pixels):
        if name.endswith("boom_image.png"):
            raise KeyError("a decoder bug")
        return load_oriented(data, name, max_pixels)

    def failing_decode(ann, height, width, source):
        if ann["id"] == 3:
            raise ZeroDivisionError("a pycocotools bug")
        return decode_annotation(ann, height, width, source)

    monkeypatch.setattr(ingest_module, "load_oriented", failing_load)
    monkeypatch.setattr(ingest_module, "decode_annotation", failing_decode)
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"good.png", "clean.png"} and _reconciles(record)
    quarantine = _quarantine(tmp_path / "catalog")
    assert quarantine["boom_image.png"]["kind"] == "unreadable"
    assert "KeyError: 'a decoder bug'" in quarantine["boom_image.png"]["reason"]
    assert quarantine["boom_ann.png"]["kind"] == "bad_annotation"
    assert "annotation 3 cannot be read: ZeroDivisionError" in quarantine["boom_ann.png"]["reason"]
    assert quarantine["boom_ann.png"]["annotation_ids"] == [3]


def test_huge_or_deeply_nested_values_give_short_reasons(tmp_path):
    """Values anywhere in the COCO file (ids, categories, names) appear in reasons only in brief."""
    images = {"good.png": _noise(1), "long_id.png": _noise(2), "deep_category.png": _noise(3)}
    deep = "[" * 700 + "]" * 700
    anns = [
        _ann(1, 1, _rle(BOX)),
        _ann([0] * 100_000, 2, _rle(BOX)),
        _ann(3, 3, _rle(BOX), category_id="DEEP"),
        _ann(4, "DEEP", _rle(BOX)),
    ]
    source = _coco(
        tmp_path / "src",
        images,
        anns,
        text=lambda doc: doc.replace('"DEEP"', deep).replace(
            '"images": [', '"images": [{"id": 99, "file_name": {"x": 1}}, '
        ),
    )
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"good.png", "clean.png"} and _reconciles(record)
    rows = pq.read_table(tmp_path / "catalog" / QUARANTINE_FILE).to_pylist()
    assert all(len(q["reason"]) < 600 for q in rows)
    kinds = {q["source_uri"].rsplit("/", 1)[-1]: q["kind"] for q in rows}
    assert kinds["long_id.png"] == "bad_annotation" and kinds["deep_category.png"] == "unknown_category"
    assert kinds["annotations.json#images[0]"] == "bad_entry"
    assert kinds["annotations.json#annotations[3]"] == "orphan_annotation"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ('{"images": [], "annotations": [], "categories": [], "x": ' + "7" * 5000 + "}", "not valid JSON"),
    ],
)
def test_an_unparseable_coco_file_is_one_clear_error_naming_it(tmp_path, text, needle):
    source = _coco(tmp_path / "src", {"a.png": _noise(1)}, [], text=lambda doc: text)
    with pytest.raises(BadInputError, match=needle) as info:
        ingest(source, str(tmp_path / "catalog"))
    assert "annotations.json" in str(info.value)


# --- 2. file type and size before reading ------------------------------------------------------


def test_a_fifo_named_like_an_image_is_quarantined_without_opening_it(tmp_path):
    source = _coco(tmp_path / "src", {"a.png": _noise(1)}, [_ann(1, 1, _rle(BOX))])
    fifo = tmp_path / "src" / "clean" / "x.png"
    os.mkfifo(fifo)
    done, unblocked = threading.Event(), []

    def watchdog():  # if ingest blocks opening the FIFO, a writer unblocks it (and the test fails)
        if not done.wait(30):
            unblocked.append(True)
            with open(fifo, "wb") as handle:
                handle.write(b"garbage")

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        record = ingest(source, str(tmp_path / "catalog"))
    finally:
        done.set()
        thread.join()
    assert not unblocked, "ingest opened the FIFO"
    quarantine = _quarantine(tmp_path / "catalog")
    assert quarantine["x.png"]["kind"] == "not_a_file" and "not a regular file" in quarantine["x.png"]["reason"]
    assert record.ingested == 2 and _reconciles(record)
    coco_fifo = tmp_path / "fifo.json"
    os.mkfifo(coco_fifo)
    with pytest.raises(BadInputError, match="fifo.json is not a regular file"):
        ingest(source.model_copy(update={"coco_annotations": str(coco_fifo)}), str(tmp_path / "catalog2"))


def test_paths_the_os_cannot_open_are_quarantined(tmp_path):
    """A name under a file (ENOTDIR), a symlink loop (ELOOP), a name too long (ENAMETOOLONG)."""
    images = {"good.png": _noise(1), "good.png/inside.png": None, "loop.png": None, "n" * 300 + ".png": None}
    anns = [_ann(i + 1, i + 1, _rle(BOX)) for i in range(len(images))]
    source = _coco(tmp_path / "src", images, anns)
    os.symlink("loop.png", tmp_path / "src" / "images" / "loop.png")
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"good.png", "clean.png"} and _reconciles(record)
    quarantine = _quarantine(tmp_path / "catalog")
    assert quarantine["inside.png"]["kind"] == "missing_file"
    assert quarantine["loop.png"]["kind"] == "unreadable" and "symbolic links" in quarantine["loop.png"]["reason"]
    assert quarantine["n" * 300 + ".png"]["kind"] == "unreadable"


def test_a_file_above_max_file_bytes_is_refused_from_its_size_unread(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    big = _noise(5, 200, 200)  # about 120 kB of incompressible PNG
    source = _coco(
        tmp_path / "src",
        {"a.png": _noise(1)},
        [_ann(1, 1, _rle(BOX))],
        clean={"clean.png": _noise(999), "big.png": big},
        max_file_bytes=50_000,
    )
    read = []
    original = LocalFileSystem.cat_file
    monkeypatch.setattr(
        LocalFileSystem, "cat_file", lambda self, path, *a, **k: read.append(path) or original(self, path, *a, **k)
    )
    record = ingest(source, str(tmp_path / "catalog"))
    entry = _quarantine(tmp_path / "catalog")["big.png"]
    assert entry["kind"] == "too_large" and "above the limit of 50000 (source.max_file_bytes)" in entry["reason"]
    assert not any(p.endswith("big.png") for p in read) and any(p.endswith("clean.png") for p in read)
    assert record.ingested == 2 and _reconciles(record)


# --- 3. caps, and compressed RLE parsed in linear time -----------------------------------------


def test_caps_on_annotations_polygon_points_and_rle_length(tmp_path):
    images = {
        "good.png": _noise(1),
        "many.png": _noise(2),
        "points.png": _noise(3),
        "long_rle.png": _noise(4),
        "long_list.png": _noise(5),
    }
    rle, ring = _rle(BOX), _rle(_box(3, 3, 30, 30) ^ BOX)
    assert len(rle["counts"]) <= 30 < len(ring["counts"])
    anns = [
        _ann(1, 1, rle),
        _ann(2, 2, rle),
        _ann(3, 2, rle),
        _ann(4, 2, rle),
        _ann(5, 3, [[1, 1, 10, 1, 10, 10, 5, 12, 1, 10]]),
        _ann(6, 4, ring),
        _ann(7, 5, {"size": [H, W], "counts": [0] * 40 + [H * W]}),
    ]
    source = _coco(tmp_path / "src", images, anns, max_annotations_per_image=2, max_polygon_points=4, max_rle_length=30)
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"good.png", "clean.png"} and _reconciles(record)
    quarantine = _quarantine(tmp_path / "catalog")
    assert {q["kind"] for q in quarantine.values()} == {"annotation_limit"}
    assert "3 annotations, above the limit of 2 (source.max_annotations_per_image)" in quarantine["many.png"]["reason"]
    assert "5 polygon points, above the limit of 4 (source.max_polygon_points)" in quarantine["points.png"]["reason"]
    assert "(source.max_rle_length)" in quarantine["long_rle.png"]["reason"]
    assert "length 41" in quarantine["long_list.png"]["reason"]
    assert SourceConfig.model_fields["max_rle_length"].description


def test_compressed_rle_runs_equal_pycocotools_and_a_huge_run_is_refused_at_once():
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = rng.integers(1, 40, 2)
        mask = rng.random((height, width)) < rng.random()
        counts = _rle(mask)["counts"]
        runs = rle_string_counts(counts)
        uncompressed = mask_utils.frPyObjects(
            {"size": [int(height), int(width)], "counts": runs.tolist()}, int(height), int(width)
        )
        assert uncompressed["counts"].decode("ascii") == counts  # the runs re-encode to the same string
        assert runs.sum() == height * width
    # One run of a million characters: a pure-Python big-integer parse would take minutes.
    with pytest.raises(ValueError, match="run of 1000001 characters"):
        rle_string_counts("P" * 1_000_000 + "1")
    with pytest.raises(ValueError, match="ends inside a run"):
        rle_string_counts("1P")


# --- 4. half a pixel beyond the border ---------------------------------------------------------


def test_vertices_within_half_a_pixel_of_the_border_are_valid(tmp_path):
    images = {"edge.png": _noise(1), "left.png": _noise(2), "bottom.png": _noise(3)}
    anns = [
        _ann(1, 1, [[-0.5, -0.5, W + 0.5, -0.5, W + 0.5, H + 0.5, -0.5, H + 0.5]]),
        _ann(2, 2, [[-0.6, 1, 10, 1, 10, 10]]),
        _ann(3, 3, [[1, 1, 10, 1, 10, H + 0.6]]),
    ]
    source = _coco(tmp_path / "src", images, anns)
    record = ingest(source, str(tmp_path / "catalog"))
    (instance,) = _rows(record)["edge.png"]["instances"]
    expected = COCO(str(tmp_path / "src" / "annotations.json")).annToMask(anns[0]).astype(bool)
    assert np.array_equal(rle_to_mask(instance["rle"]), expected) and expected.all()
    quarantine = _quarantine(tmp_path / "catalog")
    assert quarantine["left.png"]["kind"] == quarantine["bottom.png"]["kind"] == "mask_outside"
    assert "x in -0.6..10" in quarantine["left.png"]["reason"]


# --- 5. bbox against mask ----------------------------------------------------------------------


def _bbox_source(root: Path, policy: str) -> SourceConfig:
    images = {"agrees.png": _noise(1), "off.png": _noise(2), "outside.png": _noise(3), "junk.png": _noise(4)}
    anns = [
        _ann(1, 1, _rle(BOX), bbox=[5.4, 4.6, 10, 10.5]),  # within a pixel: agrees
        _ann(2, 2, _rle(BOX), bbox=[25, 25, 10, 10]),  # no overlap with the mask's box
        _ann(3, 3, _rle(BOX), bbox=[5, 5, 60, 10]),  # beyond the right border
        _ann(4, 4, _rle(BOX), bbox="5,5,10,10"),
    ]
    return _coco(root, images, anns, bbox_policy=policy)


def test_bbox_off_its_mask_is_corrected_by_default(tmp_path):
    record = ingest(_bbox_source(tmp_path / "src", "correct"), str(tmp_path / "catalog"))
    rows = _rows(record)
    assert record.quarantined == 0 and _reconciles(record)
    for name in ("agrees.png", "off.png", "outside.png", "junk.png"):
        assert rows[name]["instances"][0]["bbox"] == [5.0, 5.0, 10.0, 10.0]
    report = (tmp_path / "catalog" / "report.md").read_text()
    assert "bboxes corrected from their masks: 3" in report
    corrected = report.split("## Bboxes corrected")[1]
    assert "off.png" in corrected and "IoU 0.00" in corrected and "outside its 48x40 image" in corrected
    assert "agrees.png" not in corrected


def test_bbox_off_its_mask_is_quarantined_when_refused(tmp_path):
    record = ingest(_bbox_source(tmp_path / "src", "refuse"), str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"agrees.png", "clean.png"} and _reconciles(record)
    quarantine = _quarantine(tmp_path / "catalog")
    assert {n: q["kind"] for n, q in quarantine.items()} == {
        "off.png": "bbox_mismatch",
        "outside.png": "bbox_mismatch",
        "junk.png": "bbox_mismatch",
    }
    assert "source.bbox_policy: refuse" in quarantine["off.png"]["reason"]
    assert "not [x, y, width, height]" in quarantine["junk.png"]["reason"]


# --- 6. same pixels, other annotations ---------------------------------------------------------


def test_same_pixels_with_other_annotations_is_a_conflicting_duplicate(tmp_path):
    image = _noise(1)
    images = {"a.png": image, "same.png": image, "other.png": image, "other_class.png": image}
    anns = [
        _ann(1, 1, _rle(BOX)),
        _ann(2, 2, _rle(BOX)),
        _ann(3, 3, _rle(_box(20, 20, 30, 30))),
        _ann(4, 4, _rle(BOX), category_id=2),
    ]
    record = ingest(_coco(tmp_path / "src", images, anns), str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"a.png", "clean.png"} and _reconciles(record)
    assert record.duplicates == 1 and record.annotations["duplicates"] == 1
    quarantine = _quarantine(tmp_path / "catalog")
    assert {n: (q["kind"], q["annotation_ids"]) for n, q in quarantine.items()} == {
        "other.png": ("conflicting_duplicate", [3]),
        "other_class.png": ("conflicting_duplicate", [4]),
    }
    assert "same pixels as" in quarantine["other.png"]["reason"] and "a.png" in quarantine["other.png"]["reason"]
    assert "same.png" in (tmp_path / "catalog" / "report.md").read_text().split("## Duplicates dropped")[1]


def test_same_pixels_with_another_mask_is_a_conflicting_duplicate_in_a_mask_folder(tmp_path):
    image = _noise(1)
    one, other = BOX.astype(np.uint8), _box(20, 20, 30, 30).astype(np.uint8) * 2
    source = _mask_folder(
        tmp_path / "src", {"a.png": image, "b.png": image, "c.png": image}, {"a.png": one, "b.png": one, "c.png": other}
    )
    record = ingest(source, str(tmp_path / "catalog"))
    assert set(_rows(record)) == {"a.png", "clean.png"} and record.duplicates == 1
    assert _quarantine(tmp_path / "catalog")["c.png"]["kind"] == "conflicting_duplicate"
    assert record.ingested + record.quarantined + record.duplicates == record.found


# --- 7. mask folders: one labelling per value, no full-image mask per component ----------------


def test_mask_folder_with_many_components_is_labelled_once_per_value(tmp_path, monkeypatch):
    size = 256
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[:-2:2, ::2] = 1  # 16,256 one-pixel components (8-connectivity needs the gaps)
    labels[1:-2:4, 1::4] = 2  # 4,096 more, of the other value, between the dots
    labels[-1, :] = 2  # one along the bottom border and up the last column: its runs cross columns
    labels[:, -1] = 2
    small = BOX.astype(np.uint8)
    calls = []
    monkeypatch.setattr(ingest_module, "label", lambda *a, **k: calls.append(1) or label(*a, **k))
    monkeypatch.setattr(ingest_module, "mask_to_rle", lambda mask: pytest.fail("a full-image mask was encoded"))
    images = {"dots.png": _noise(1, size, size), "small.png": _noise(2)}
    source = _mask_folder(
        tmp_path / "src", images, {"dots.png": labels, "small.png": small}, max_annotations_per_image=30_000
    )
    record = ingest(source, str(tmp_path / "catalog"))
    instances = _rows(record)["dots.png"]["instances"]
    assert len(calls) == 3  # once per value per image
    components = {v: label(labels == v, connectivity=2) for v in (1, 2)}
    expected = [(v, n) for v in (1, 2) for n in range(1, components[v].max() + 1)]
    assert len(instances) == len(expected) > 20_000
    border = expected.index((2, components[2][-1, 0]))  # the component along two borders
    for index in list(range(0, len(expected), 997)) + [len(expected) - 1, border]:  # a sample
        value, number = expected[index]
        assert instances[index]["category_id"] == value and instances[index]["annotation_id"] == index + 1
        assert instances[index]["rle"] == mask_to_rle(components[value] == number)
    assert instances[border]["area"] == 2 * size - 1
    capped = ingest(source.model_copy(update={"max_annotations_per_image": 1000}), str(tmp_path / "capped"))
    entry = _quarantine(tmp_path / "capped")["dots.png"]
    assert entry["kind"] == "annotation_limit" and "source.max_annotations_per_image" in entry["reason"]
    assert capped.ingested + capped.quarantined + capped.duplicates == capped.found
