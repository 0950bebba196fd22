"""Ingest on messy data the tests build themselves: every bad case, every image mode, both formats."""

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pydantic import ValidationError
from skimage.measure import label

from indusfactory.config import SourceConfig, parse_config
from indusfactory.infra import storage
from indusfactory.infra.errors import BadInputError, ConfigError
from indusfactory.layout import CATALOG_RECORD, QUARANTINE_FILE
from indusfactory.schema import categories_from_metadata, decode_image, rle_to_mask
from indusfactory.sources.catalog import read_catalog
from indusfactory.sources.ingest import ingest, source_listing, split_of

CATEGORIES = [{"id": 1, "name": "scratch", "supercategory": ""}, {"id": 2, "name": "dent", "supercategory": ""}]
ORIENTATION = 0x0112


def _source(root):
    return SourceConfig(
        coco_annotations=str(root / "defective" / "annotations.json"),
        images_dir=str(root / "defective" / "images"),
        defect_free_dir=str(root / "defect_free"),
    )


def _noise(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs, starting with zeros), written independently."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _box(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _ann(ann_id: int, image_id: int, segmentation, category_id: int = 1, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
    }


def _entry(image_id: int, name: str, array: np.ndarray, **extra) -> dict:
    return {"id": image_id, "file_name": name, "height": array.shape[0], "width": array.shape[1], **extra}


def _write(folder: Path, files: dict[str, bytes | np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(content) if isinstance(content, np.ndarray) else content)


def _coco_dataset(
    root: Path, images: dict, entries: list[dict], annotations: list[dict], clean: dict | None = None, **source
) -> SourceConfig:
    """A COCO source under ``root``: images, their COCO file and a defect-free folder."""
    _write(root / "images", images)
    _write(root / "clean", {"clean.png": _noise(999)} if clean is None else clean)
    doc = {"images": entries, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations.json").write_text(json.dumps(doc))
    return SourceConfig(
        coco_annotations=str(root / "annotations.json"),
        images_dir=str(root / "images"),
        defect_free_dir=str(root / "clean"),
        **source,
    )


def _one_defective(root: Path, clean: dict, **source) -> SourceConfig:
    """A COCO source with one good defective image and the given defect-free files."""
    image = _noise(1)
    ann = _ann(1, 1, _rle(_box(40, 48, 5, 5, 20, 30)))
    return _coco_dataset(root, {"d.png": image}, [_entry(1, "d.png", image)], [ann], clean=clean, **source)


def _quarantine(catalog: Path) -> list[dict]:
    return pq.read_table(catalog / QUARANTINE_FILE).to_pylist()


def _reconciles(record) -> bool:
    counts = record.annotations
    return (
        record.ingested + record.quarantined + record.duplicates == record.found
        and counts["found"] == counts["ingested"] + counts["quarantined"] + counts["duplicates"] + counts["orphaned"]
    )


def _rows(record) -> dict[str, dict]:
    return {r["file_name"]: r for r in read_catalog(record.uri).to_pylist()}


# --- the sample data and the foundation's cases ------------------------------------------------


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
        assert decode_image(row["image"]["bytes"]).shape == (image["height"], image["width"], 3)
    assert sum(not r["defective"] for r in table.to_pylist()) == 4
    assert record.annotations["found"] == record.annotations["ingested"] == len(coco.dataset["annotations"])


def test_bad_input_is_quarantined_and_counts_reconcile(messy, tmp_path):
    root, coco = messy
    record = ingest(_source(root), str(tmp_path / "catalog"))
    assert _reconciles(record)
    assert record.quarantined == 4 and record.duplicates == 1
    reasons = _quarantine(tmp_path / "catalog")

    def reason(name):
        return next(r["reason"] for r in reasons if r["source_uri"].endswith(name))

    assert "not a readable image" in reason("/" + coco["images"][0]["file_name"])
    assert "does not exist" in reason("/missing.png")
    assert "would escape" in reason("../escape.png")
    assert "zero-byte" in reason("/empty.png")
    report = (tmp_path / "catalog" / "report.md").read_text()
    assert "quarantined: 4" in report
    assert f"ingested {record.ingested} + quarantined 4 + duplicates 1 = found {record.found}" in report
    assert "copy_of_clean_0000.png" in report.split("## Duplicates dropped")[1]


def test_rerun_reuses_the_catalog(sample_root, tmp_path):
    first = ingest(_source(sample_root), str(tmp_path / "catalog"))
    second = ingest(_source(sample_root), str(tmp_path / "catalog"))
    assert not first.reused and second.reused and second.content_fingerprint == first.content_fingerprint


def test_an_image_rewritten_in_place_at_the_same_size_is_ingested_again(sample_root, tmp_path):
    """Same name, same byte count, other pixels: a new catalog (new content fingerprint), not the old one."""
    from indusfactory.sources.ingest import ingest_fingerprint

    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    image = sorted((root / "defective" / "images").iterdir())[0]
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    Image.fromarray(pixels).save(image, format="PNG", compress_level=0)  # stored: the size depends on the shape
    source = _source(root)
    first = ingest(source, str(tmp_path / "factory" / ingest_fingerprint(source, str(tmp_path))))
    size, mtime = image.stat().st_size, image.stat().st_mtime_ns
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(image, format="PNG", compress_level=0)
    os.utime(image, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))  # a coarse clock still moves
    assert image.stat().st_size == size
    second = ingest(source, str(tmp_path / "factory" / ingest_fingerprint(source, str(tmp_path))))
    assert second.uri != first.uri and not second.reused
    assert second.content_fingerprint != first.content_fingerprint
    # Untouched files: the same catalog again.
    assert ingest(source, str(tmp_path / "factory" / ingest_fingerprint(source, str(tmp_path)))).reused


def test_nothing_usable_is_a_clear_error(sample_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(sample_root, root)
    for image in (root / "defective" / "images").iterdir():
        image.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="no usable defective image") as info:
        ingest(_source(root), str(tmp_path / "catalog"))
    assert "12 unreadable" in str(info.value) and "report.md" in str(info.value)
    assert (tmp_path / "catalog" / "report.md").exists() and not (tmp_path / "catalog" / "catalog.json").exists()


def test_missing_source_folder_is_named(sample_root, tmp_path):
    source = _source(sample_root).model_copy(update={"defect_free_dir": str(tmp_path / "nowhere")})
    with pytest.raises(BadInputError, match="source.defect_free_dir .*nowhere does not exist"):
        source_listing(source)


# --- COCO segmentations equal pycocotools annToMask ---------------------------------------------


def test_polygons_and_both_rle_kinds_equal_ann_to_mask(tmp_path):
    height, width = 40, 48
    image = _noise(1, height, width)
    crowd = _box(height, width, 2, 30, 12, 46) | _box(height, width, 30, 0, 40, 10)
    annotations = [
        _ann(10, 1, [[4, 4, 20, 5, 22, 18, 6, 15], [30.5, 20, 47, 39.5, 30, 39]]),  # two polygons, edges included
        _ann(11, 1, _uncompressed_rle(crowd), category_id=2, iscrowd=1),
        _ann(12, 1, _rle(_box(height, width, 18, 10, 25, 40)), category_id=2),
        _ann(13, 1, [[0, 0, width, 0, width, height, 0, height]]),  # the whole image: vertices on the border
    ]
    source = _coco_dataset(tmp_path / "src", {"a.png": image}, [_entry(1, "a.png", image)], annotations)
    record = ingest(source, str(tmp_path / "catalog"))
    assert record.quarantined == 0 and _reconciles(record)
    coco = COCO(str(tmp_path / "src" / "annotations.json"))
    instances = {i["annotation_id"]: i for i in _rows(record)["a.png"]["instances"]}
    assert set(instances) == {10, 11, 12, 13}
    for ann in coco.dataset["annotations"]:
        expected = coco.annToMask(ann).astype(bool)
        assert expected.any() and np.array_equal(rle_to_mask(instances[ann["id"]]["rle"]), expected)
        assert instances[ann["id"]]["iscrowd"] == bool(ann["iscrowd"])
        assert instances[ann["id"]]["category"] == ("dent" if ann["category_id"] == 2 else "scratch")
    assert instances[11]["area"] == crowd.sum()


# --- every bad case at once --------------------------------------------------------------------


@pytest.fixture
def bad_coco(tmp_path):
    """One good image per case next to one bad image per quarantine reason."""
    root = tmp_path / "bad"
    h, w = 40, 48
    good = {f"good_{i}.png": _noise(100 + i) for i in range(3)}
    images = dict(good)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(_noise(7)))
    bombs = {
        "truncated.png": _png(_noise(8))[:600],
        "garbage.png": b"\x89PNG but not really",
        "empty.png": b"",
        "big.png": _png(_noise(9, 120, 120)),
    }
    images.update(bombs)
    names = [f"img_{i}.png" for i in range(9)]
    images.update({name: _noise(200 + i) for i, name in enumerate(names)})
    entries = [_entry(i + 1, name, _noise(100 + i)) for i, name in enumerate(good)]
    entries += [{"id": 10 + i, "file_name": name, "height": h, "width": w} for i, name in enumerate(bombs)]
    entries += [
        {"id": 20, "file_name": "missing.png", "height": h, "width": w},
        {"id": 21, "file_name": "../outside/secret.png", "height": h, "width": w},
        {"id": 22, "file_name": str(outside / "secret.png"), "height": h, "width": w},
        {"id": 23, "file_name": "link.png", "height": h, "width": w},
        {"id": 24, "file_name": "caf\udce9.png", "height": h, "width": w},
        {"id": 25, "file_name": "no_id_entry.png"},
    ]
    del entries[-1]["file_name"]
    entries += [{"id": 30 + i, "file_name": name, "height": h, "width": w} for i, name in enumerate(names)]
    entries.append({"id": 30, "file_name": "img_0_again.png", "height": h, "width": w})  # duplicate image id 30
    box = _box(h, w, 5, 5, 15, 15)
    anns = [_ann(1, 1, _rle(box)), _ann(2, 2, [[1, 1, 10, 1, 10, 10]]), _ann(3, 3, _rle(box), category_id=2)]
    anns += [_ann(40 + i, 10 + i, _rle(box)) for i in range(len(bombs))]  # annotations of bad images
    anns += [
        _ann(50, 30, _rle(box)),  # image id 30 is used twice
        _ann(51, 31, _rle(_box(h + 1, w, 5, 5, 15, 15))),  # RLE size mismatch
        _ann(52, 32, [[1, 1, 60, 1, 30, 20]]),  # polygon outside the image
        _ann(53, 33, _rle(box), category_id=99),  # unknown category
        _ann(54, 34, _rle(box)),
        _ann(54, 35, _rle(box)),  # duplicate annotation id
        _ann(55, 36, {"size": [h, w], "counts": [5, 10]}),  # uncompressed runs do not cover the image
        _ann(56, 37, {"size": [h, w], "counts": "0000@@@"}),  # corrupt compressed string
        _ann(57, 38, [[1, 1, 5]]),  # degenerate polygon
        _ann(58, 9999, _rle(box)),  # names no image
    ]
    source = _coco_dataset(
        root,
        images,
        entries,
        anns,
        clean={
            "clean_a.png": _noise(300),
            "clean_b.png": _noise(301),
            "copy.png": _noise(300),
            "notes.txt": b"hello",
            "empty.png": b"",
        },
        max_image_pixels=100 * 100,
    )
    os.symlink(outside / "secret.png", root / "images" / "link.png")
    os.symlink(outside / "secret.png", root / "clean" / "link_out.png")
    (root / "clean" / os.fsdecode(b"caf\xe9.png")).write_bytes(_png(_noise(302)))
    return source, set(good) | {"clean_a.png", "clean_b.png"}


def test_every_bad_case_is_quarantined_with_its_reason(bad_coco, tmp_path):
    source, good = bad_coco
    record = ingest(source, str(tmp_path / "catalog"))
    rows = _rows(record)
    assert set(rows) == good and _reconciles(record)
    assert record.duplicates == 1 and record.defective == 3 and record.defect_free == 2
    quarantine = _quarantine(tmp_path / "catalog")
    by_file = {}
    for q in quarantine:
        by_file.setdefault(q["source_uri"].rsplit("/", 1)[-1], []).append(q)

    def kind(name: str) -> str:
        (entry,) = [q for q in by_file[name] if q["item"] == "image"]
        return entry["kind"]

    expected = {
        "truncated.png": "unreadable",
        "garbage.png": "unreadable",
        "big.png": "too_large",
        "missing.png": "missing_file",
        "link.png": "unsafe_path",
        "link_out.png": "unsafe_path",
        "img_1.png": "mask_size",
        "img_2.png": "mask_outside",
        "img_3.png": "unknown_category",
        "img_4.png": "duplicate_annotation_id",
        "img_5.png": "duplicate_annotation_id",
        "img_6.png": "bad_annotation",
        "img_7.png": "bad_annotation",
        "img_8.png": "bad_annotation",
        "img_0.png": "duplicate_image_id",
        "img_0_again.png": "duplicate_image_id",
    }
    for name, want in expected.items():
        assert kind(name) == want, (name, by_file[name])
    assert [q["kind"] for q in by_file["empty.png"]] == ["empty_file", "empty_file"]
    assert {q["kind"] for q in by_file["secret.png"]} == {"unsafe_path"} and len(by_file["secret.png"]) == 2
    assert any(q["kind"] == "bad_entry" and "has no file_name" in q["reason"] for q in quarantine)
    (in_coco,) = [q for q in quarantine if q["kind"] == "bad_file_name" and "/images/" in q["source_uri"]]
    assert in_coco["source_uri"].endswith("caf\\xe9.png")
    (on_disk,) = [q for q in quarantine if q["kind"] == "bad_file_name" and "clean" in q["source_uri"]]
    assert "caf\\xe9.png" in on_disk["source_uri"] and "not valid UTF-8" in on_disk["reason"]
    (orphan,) = [q for q in quarantine if q["item"] == "annotation"]
    assert orphan["kind"] == "orphan_annotation" and orphan["annotation_ids"] == [58]
    # every annotation of a quarantined image is accounted with it
    assert kind("big.png") and by_file["big.png"][0]["annotation_ids"] == [43]
    assert by_file["img_0.png"][0]["annotation_ids"] == [50] and by_file["img_0_again.png"][0]["annotation_ids"] == []
    assert record.annotations == {"found": 17, "ingested": 3, "quarantined": 13, "duplicates": 0, "orphaned": 1}
    assert (record.found, record.ingested, record.quarantined) == (29, 5, 23)
    reasons = {q["source_uri"].rsplit("/", 1)[-1]: q["reason"] for q in quarantine}
    assert "outside" in reasons["link.png"] and "would escape" in reasons["secret.png"]
    assert "above the limit of 10000" in reasons["big.png"] and "unknown category id 99" in reasons["img_3.png"]
    assert "size [41, 48] does not match" in reasons["img_1.png"] and "outside its 48x40 image" in reasons["img_2.png"]
    report = (tmp_path / "catalog" / "report.md").read_text(encoding="utf-8")
    assert f"= found {record.found}" in report and "notes.txt" in report and "orphan_annotation" in report
    assert f"quarantined: {record.quarantined}" in report


def test_too_large_is_refused_from_the_header(tmp_path, monkeypatch):
    """Headers claiming huge sizes (no pixel data behind them) are refused without decoding."""

    def header_only_png(width: int, height: int) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
        )

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    source = _one_defective(
        tmp_path / "src",
        {"ok.png": _noise(5), "bomb.png": header_only_png(100_000, 100_000), "big.png": header_only_png(9_000, 9_000)},
    )
    from PIL import ImageFile

    original = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: no_decoding(self) if self.size[0] > 1000 else original(self)
    )
    record = ingest(source, str(tmp_path / "catalog"))
    quarantine = {q["source_uri"].rsplit("/", 1)[-1]: q for q in _quarantine(tmp_path / "catalog")}
    assert quarantine["bomb.png"]["kind"] == quarantine["big.png"]["kind"] == "too_large"
    assert "above the limit of 64000000" in quarantine["big.png"]["reason"]
    assert record.ingested == 2 and _reconciles(record)


# --- image modes and EXIF orientation ----------------------------------------------------------


def _modes() -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded image of each mode and the RGB ingest must store for it."""
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    indices = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 100, 50]
    modes = {}
    modes["grey.png"] = (_png(grey), np.repeat(grey[:, :, None], 3, axis=2))
    modes["sixteen.png"] = (_png(sixteen), np.repeat(np.round(sixteen / 257.0).astype(np.uint8)[:, :, None], 3, 2))
    assert Image.open(io.BytesIO(modes["sixteen.png"][0])).mode.startswith("I")
    rgba = np.dstack([rgb, alpha])
    on_black = np.round(rgb.astype(np.float64) * alpha[:, :, None] / 255.0).astype(np.uint8)
    modes["rgba.png"] = (_png(rgba), on_black)
    modes["grey_alpha.png"] = (
        _png(np.dstack([grey, alpha])),
        np.repeat(np.round(grey * (alpha / 255.0)).astype(np.uint8)[:, :, None], 3, 2),
    )
    colours = np.array(palette, dtype=np.uint8).reshape(-1, 3)
    image = Image.frombytes("P", (30, 20), indices.tobytes())
    image.putpalette(palette)
    modes["palette.png"] = (_save(image, "PNG"), colours[indices])
    transparent = colours[indices].copy()
    transparent[indices == 1] = 0
    modes["palette_transparent.png"] = (_save(image, "PNG", transparency=1), transparent)
    cmyk_rgb = np.round((255.0 - cmyk[:, :, :3]) * (255.0 - cmyk[:, :, 3:]) / 255.0)
    modes["cmyk.tif"] = (_save(Image.frombytes("CMYK", (30, 20), cmyk.tobytes()), "TIFF"), cmyk_rgb.astype(np.uint8))
    bits = grey > 128
    white = np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, 2)
    modes["bits.png"] = (_save(Image.fromarray(bits), "PNG"), white)
    modes["plain.bmp"] = (_save(Image.fromarray(rgb), "BMP"), rgb)
    return modes


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_every_image_mode_becomes_the_expected_rgb(tmp_path):
    modes = _modes()
    source = _one_defective(tmp_path / "src", {name: data for name, (data, _) in modes.items()})
    record = ingest(source, str(tmp_path / "catalog"))
    rows = _rows(record)
    assert record.quarantined == 0 and set(modes) <= set(rows)
    for name, (_, expected) in modes.items():
        stored = decode_image(rows[name]["image"]["bytes"])
        tolerance = 1 if name == "cmyk.tif" else 0  # Pillow's CMYK rounding
        assert stored.shape == expected.shape, name
        assert np.abs(stored.astype(int) - expected.astype(int)).max() <= tolerance, name
        assert (rows[name]["width"], rows[name]["height"]) == (30, 20)


def test_unsupported_mode_is_quarantined(tmp_path):
    floats = _save(Image.fromarray(np.ones((8, 8), dtype=np.float32)), "TIFF")
    source = _one_defective(tmp_path / "src", {"float.tif": floats})
    ingest(source, str(tmp_path / "catalog"))
    (entry,) = _quarantine(tmp_path / "catalog")
    assert entry["kind"] == "unsupported_mode" and "mode F" in entry["reason"]


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
        (5, lambda a: np.transpose(a, (1, 0, 2))),
    ],
)
def test_exif_orientation_is_applied_and_annotations_are_in_the_oriented_frame(tmp_path, orientation, turn):
    raw = _noise(11, 30, 50)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = _png(raw, exif=exif)
    oriented = turn(raw)
    height, width = oriented.shape[:2]
    mask = _box(height, width, 2, 3, 12, 9)
    raw_entry = {"id": 2, "file_name": "raw_frame.png", "height": raw.shape[0], "width": raw.shape[1]}
    source = _coco_dataset(
        tmp_path / "src",
        {"turned.png": data, "raw_frame.png": data},
        [_entry(1, "turned.png", oriented), raw_entry],
        [_ann(1, 1, _rle(mask))],
    )
    record = ingest(source, str(tmp_path / "catalog"))
    row = _rows(record)["turned.png"]
    assert np.array_equal(decode_image(row["image"]["bytes"]), oriented)
    assert (row["width"], row["height"]) == (width, height)
    assert np.array_equal(rle_to_mask(row["instances"][0]["rle"]), mask)
    if orientation in (5, 6, 8):  # the raw frame differs: its COCO size is refused, with the hint
        (entry,) = _quarantine(tmp_path / "catalog")
        assert entry["kind"] == "size_mismatch" and "before EXIF orientation" in entry["reason"]
    else:
        assert record.duplicates == 1


def test_exif_orientation_of_a_jpeg(tmp_path):
    raw = np.zeros((30, 50, 3), dtype=np.uint8)
    raw[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = _save(Image.fromarray(raw), "JPEG", exif=exif, quality=95)
    source = _one_defective(tmp_path / "src", {"photo.jpg": data})
    row = _rows(ingest(source, str(tmp_path / "catalog")))["photo.jpg"]
    stored = decode_image(row["image"]["bytes"])
    assert stored.shape == (50, 30, 3) and stored[:10].mean() > 200 and stored[20:].mean() < 30


# --- splits ------------------------------------------------------------------------------------


def test_split_is_reproducible_by_seed(sample_root, tmp_path):
    first = {
        r["image_id"]: r["split"]
        for r in read_catalog(ingest(_source(sample_root), str(tmp_path / "a")).uri).to_pylist()
    }
    again = {
        r["image_id"]: r["split"]
        for r in read_catalog(ingest(_source(sample_root), str(tmp_path / "b")).uri).to_pylist()
    }
    assert first == again and set(first.values()) <= {"train", "val", "test"}
    assert all(split_of(i, 0, (0.7, 0.15, 0.15)) == s for i, s in first.items())
    other = [split_of(i, 1, (0.7, 0.15, 0.15)) for i in first]
    assert other != list(first.values())


def test_given_split_is_used_and_validated(tmp_path):
    images = {f"i{k}.png": _noise(400 + k) for k in range(6)}
    splits = ["train", "val", "test", "Test", "validation", None]
    entries = [
        _entry(k + 1, f"i{k}.png", images[f"i{k}.png"], **({"subset": s} if s else {})) for k, s in enumerate(splits)
    ]
    annotations = [_ann(k + 1, k + 1, _rle(_box(40, 48, 1, 1, 9, 9))) for k in range(6)]
    source = _coco_dataset(tmp_path / "src", images, entries, annotations, split_field="subset")
    record = ingest(source, str(tmp_path / "catalog"))
    rows = _rows(record)
    assert {n: rows[n]["split"] for n in ("i0.png", "i1.png", "i2.png", "i3.png")} == {
        "i0.png": "train",
        "i1.png": "val",
        "i2.png": "test",
        "i3.png": "test",
    }
    bad = {q["source_uri"].rsplit("/", 1)[-1]: q for q in _quarantine(tmp_path / "catalog")}
    assert set(bad) == {"i4.png", "i5.png"} and {q["kind"] for q in bad.values()} == {"bad_split"}
    assert "subset='validation'" in bad["i4.png"]["reason"] and "train, val, test" in bad["i4.png"]["reason"]
    assert bad["i5.png"]["annotation_ids"] == [6] and _reconciles(record)


# --- the mask-folder format --------------------------------------------------------------------


def _label_map(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    """Two separate blobs of value 1 (one touching diagonally only), one of value 2."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[2:8, 2:10] = 1
    labels[20:30, 30:40] = 1
    labels[30, 40] = 1  # diagonal neighbour: the same 8-connected component
    labels[12:18, 5 + seed : 25 + seed] = 2
    return labels


def _mask_folder(root: Path, images: dict, masks: dict, clean: dict | None = None) -> SourceConfig:
    _write(root / "images", images)
    _write(root / "masks", masks)
    _write(root / "clean", {"clean.png": _noise(999)} if clean is None else clean)
    return SourceConfig(
        format="mask_folder",
        images_dir=str(root / "images"),
        masks_dir=str(root / "masks"),
        mask_values={1: "scratch", 2: "dent"},
        defect_free_dir=str(root / "clean"),
    )


def _expected_instances(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    expected = []
    for value in (1, 2):
        components = label(labels == value, connectivity=2)
        expected += [(value, components == n) for n in range(1, components.max() + 1)]
    return expected


def _check_mask_rows(rows: dict, labels_of: dict[str, np.ndarray]) -> None:
    for name, labels in labels_of.items():
        instances = rows[name]["instances"]
        expected = _expected_instances(labels)
        assert len(instances) == len(expected) == 3
        for inst, (value, mask) in zip(instances, expected):
            assert inst["category_id"] == value and inst["category"] == {1: "scratch", 2: "dent"}[value]
            assert np.array_equal(rle_to_mask(inst["rle"]), mask)
        assert [i["annotation_id"] for i in instances] == [1, 2, 3]


def test_mask_folder_instances_equal_the_masks(tmp_path):
    labels = {f"sub/m{k}": _label_map(k) for k in range(3)}
    images = {f"{stem}.{'jpg' if k == 2 else 'png'}": _noise(500 + k) for k, stem in enumerate(labels)}
    images["sub/m2.jpg"] = _save(Image.fromarray(_noise(502)), "JPEG")
    masks = {f"{stem}.png": _png(lab) for stem, lab in labels.items()}
    palette = Image.frombytes("P", (48, 40), labels["sub/m1"].tobytes())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    masks["sub/m1.png"] = _save(palette, "PNG")  # palette indices are the values
    masks["sub/m0.png"] = _png(labels["sub/m0"].astype(np.uint16))  # 16-bit mask
    source = _mask_folder(tmp_path / "src", images, masks)
    record = ingest(source, str(tmp_path / "catalog"))
    assert record.found == 4 and record.ingested == 4 and record.quarantined == 0
    table = read_catalog(record.uri)
    assert categories_from_metadata(table.schema) == [
        {"id": 1, "name": "scratch", "supercategory": ""},
        {"id": 2, "name": "dent", "supercategory": ""},
    ]
    rows = {r["file_name"]: r for r in table.to_pylist()}
    names = {f"{stem}.{'jpg' if k == 2 else 'png'}": lab for k, (stem, lab) in enumerate(labels.items())}
    _check_mask_rows(rows, names)
    assert record.annotations["ingested"] == 9


def test_mask_folder_bad_cases(tmp_path):
    good = _label_map(0)
    rotated = np.rot90(_label_map(1), -1).copy()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    images = {
        "good.png": _noise(600),
        "turned.png": _png(_noise(601), exif=exif),
        "small_mask.png": _noise(602),
        "unknown_value.png": _noise(603),
        "no_mask.png": _noise(604),
        "colour_mask.png": _noise(605),
        "broken_mask.png": _noise(606),
        "zdup.png": _noise(600),
        "twin.png": _noise(607),
        "twin.jpg": _save(Image.fromarray(_noise(608)), "JPEG"),
        "broken.png": b"\x89PNG",
    }
    masks = {
        "good.png": _png(good),
        "turned.png": _png(rotated),
        "small_mask.png": _png(good[:-1]),
        "unknown_value.png": _png(np.where(good == 2, 7, good).astype(np.uint8)),
        "colour_mask.png": _png(_noise(1)),
        "broken_mask.png": b"\x89PNG garbage",
        "zdup.png": _png(good),
        "twin.png": _png(good),
        "broken.png": _png(good),
        "orphan.png": _png(good),
        "readme.txt": b"x",
    }
    source = _mask_folder(tmp_path / "src", images, masks)
    record = ingest(source, str(tmp_path / "catalog"))
    rows = _rows(record)
    assert set(rows) == {"good.png", "turned.png", "clean.png"}
    _check_mask_rows(rows, {"good.png": good, "turned.png": rotated})
    assert record.duplicates == 1 and record.ingested + record.quarantined + record.duplicates == record.found == 12
    assert record.annotations == {"found": 9, "ingested": 6, "quarantined": 0, "duplicates": 3, "orphaned": 0}
    kinds = {
        q["source_uri"].rsplit("/", 1)[-1]: (q["item"], q["kind"], q["reason"])
        for q in _quarantine(tmp_path / "catalog")
    }
    assert {name: k[:2] for name, k in kinds.items()} == {
        "small_mask.png": ("image", "mask_size"),
        "unknown_value.png": ("image", "unknown_mask_value"),
        "no_mask.png": ("image", "missing_mask"),
        "colour_mask.png": ("image", "bad_mask"),
        "broken_mask.png": ("image", "bad_mask"),
        "twin.png": ("image", "ambiguous_mask"),
        "twin.jpg": ("image", "ambiguous_mask"),
        "broken.png": ("image", "unreadable"),
        "orphan.png": ("mask", "orphan_mask"),
    }
    assert "values [7]" in kinds["unknown_value.png"][2] and "48x39" in kinds["small_mask.png"][2]
    report = (tmp_path / "catalog" / "report.md").read_text()
    assert "readme.txt" in report and "= found 12" in report


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"format": "mask_folder"}, "source.masks_dir and source.mask_values required"),
        ({"format": "mask_folder", "masks_dir": "m"}, "source.mask_values required"),
        ({"format": "mask_folder", "masks_dir": "m", "mask_values": {0: "bg"}}, "0 is background"),
        ({"format": "mask_folder", "masks_dir": "m", "mask_values": {1: "a", 2: "a"}}, "distinct"),
        (
            {"format": "mask_folder", "masks_dir": "m", "mask_values": {1: "a"}, "split_field": "s"},
            "COCO image entries",
        ),
        ({"masks_dir": "m"}, "only used with format 'mask_folder'"),
        ({"format": "masks"}, "source.format"),
    ],
)
def test_source_config_names_what_the_format_needs(data, needle):
    with pytest.raises(ConfigError, match="source") as info:
        parse_config({"source": data})
    assert needle in str(info.value)


def test_mask_values_from_yaml_strings_are_ints():
    source = SourceConfig(format="mask_folder", masks_dir="m", mask_values={"1": "crack", "255": "dent"})
    assert source.mask_values == {1: "crack", 255: "dent"}
    with pytest.raises(ValidationError):
        SourceConfig(format="mask_folder", masks_dir="m", mask_values={"one": "crack"})


@pytest.mark.slow
def test_mask_folder_from_s3(s3_bucket, tmp_path):
    import fsspec

    labels = {f"m{k}": _label_map(k) for k in range(3)}
    local = _mask_folder(
        tmp_path / "src",
        {f"{s}.png": _noise(700 + k) for k, s in enumerate(labels)},
        {f"{s}.png": _png(lab) for s, lab in labels.items()} | {"orphan.png": _png(labels["m0"])},
        clean={"clean.png": _noise(710), "bad.png": b"nope"},
    )
    fsspec.filesystem("s3").put(str(tmp_path / "src") + "/", f"{s3_bucket}/src/", recursive=True)
    source = local.model_copy(
        update={
            "images_dir": f"{s3_bucket}/src/images",
            "masks_dir": f"{s3_bucket}/src/masks",
            "defect_free_dir": f"{s3_bucket}/src/clean",
        }
    )
    assert source_listing(source)["masks"][0][0] == "m0.png"
    record = ingest(source, f"{s3_bucket}/catalog")
    assert record.found == 5 and record.ingested == 4 and record.quarantined == 1
    rows = _rows(record)
    assert rows["m0.png"]["source_uri"] == f"{s3_bucket}/src/images/m0.png"
    _check_mask_rows(rows, {f"{s}.png": lab for s, lab in labels.items()})
    with fsspec.open(f"{s3_bucket}/catalog/{QUARANTINE_FILE}") as handle:
        kinds = sorted((q["item"], q["kind"]) for q in pq.read_table(handle).to_pylist())
    assert kinds == [("image", "unreadable"), ("mask", "orphan_mask")]


def test_duplicate_defective_image_accounts_its_annotations(tmp_path):
    image = _noise(800)
    box = _rle(_box(40, 48, 3, 3, 9, 9))
    source = _coco_dataset(
        tmp_path / "src",
        {"a.png": image, "b.png": image},
        [_entry(1, "a.png", image), _entry(2, "b.png", image)],
        [_ann(1, 1, box), _ann(2, 2, box), _ann(3, 2, box)],
    )
    record = ingest(source, str(tmp_path / "catalog"))
    assert record.duplicates == 1 and set(_rows(record)) == {"a.png", "clean.png"}
    assert record.annotations == {"found": 3, "ingested": 1, "quarantined": 0, "duplicates": 2, "orphaned": 0}


def test_cache_key_ignores_threads_and_names_missing_masks_dir(tmp_path):
    from indusfactory.sources.ingest import ingest_fingerprint

    source = _mask_folder(tmp_path / "src", {"a.png": _noise(1)}, {"a.png": _png(_label_map(0))})
    assert ingest_fingerprint(source, str(tmp_path)) == ingest_fingerprint(
        source.model_copy(update={"read_workers": 1}), str(tmp_path)
    )
    assert ingest_fingerprint(source, str(tmp_path)) != ingest_fingerprint(
        source.model_copy(update={"mask_values": {1: "scratch", 2: "gouge"}}), str(tmp_path)
    )
    with pytest.raises(BadInputError, match="source.masks_dir .*nowhere does not exist"):
        source_listing(source.model_copy(update={"masks_dir": str(tmp_path / "nowhere")}))


def _catalog_reads(monkeypatch) -> list[str]:
    """The catalog files parquet actually reads from now on (every ``pyarrow.parquet.read_table`` of one)."""
    reads: list[str] = []
    real = pq.read_table

    def counting(source, *args, **kwargs):
        path = str(getattr(source, "path", source))
        if path.endswith("catalog.parquet"):
            reads.append(path)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting)
    return reads


def test_every_stage_of_a_process_is_handed_the_catalog_read_once(make_config, catalog, monkeypatch):
    """Concept, condition, plan and evaluation each read the catalog; one process reads its file once."""
    from indusfactory.evaluation.evaluate import real_split
    from indusfactory.generation.plan import SourceImages
    from indusfactory.learning.concept import training_images
    from indusfactory.learning.condition import defect_free_images, probe_masks, training_examples

    config = make_config()
    reads = _catalog_reads(monkeypatch)
    images = training_images(catalog.uri, 64)
    examples = training_examples(config, catalog)
    masks, _ = probe_masks(config, catalog)
    free = defect_free_images(config, catalog, 2)
    sources = SourceImages(catalog.uri, catalog.categories)
    real = real_split(catalog, "train", 64)
    assert images and examples.images and masks and free and real.ids
    assert all(sources.has_image(i) for i in real.ids)
    assert reads == [storage.filesystem(storage.join(catalog.uri, "catalog.parquet"))[1]]
    assert read_catalog(catalog.uri) is read_catalog(catalog.uri) and len(reads) == 1


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_catalog_written_again_at_its_uri_is_read_again(where, sample_root, tmp_path, monkeypatch, request):
    """A re-ingest at the same URI (its record removed) writes another file: no stage is handed the old one
    (a new modification time and inode here, a new ETag on S3)."""
    from types import SimpleNamespace

    from indusfactory.generation.generate import get_sources
    from indusfactory.sources import catalog as catalog_module

    uri = f"{tmp_path if where == 'local' else request.getfixturevalue('s3_bucket')}/catalog"
    first = ingest(_source(sample_root), uri)
    reads = _catalog_reads(monkeypatch)
    before = {r["image_id"]: r["split"] for r in read_catalog(uri).to_pylist()}
    ctx = SimpleNamespace(catalog_uri=uri, categories=first.categories)
    sources = get_sources(ctx)
    assert get_sources(ctx) is sources and len(reads) == 1

    fs, record = storage.filesystem(storage.join(uri, CATALOG_RECORD))
    fs.rm_file(record)
    second = ingest(_source(sample_root).model_copy(update={"split_seed": 1}), uri)
    assert second.uri == first.uri and second.content_fingerprint != first.content_fingerprint
    after = {r["image_id"]: r["split"] for r in read_catalog(uri).to_pylist()}
    assert after.keys() == before.keys() and after != before, "the new file's splits, not the cached ones"
    assert get_sources(ctx) is not sources and len(reads) == 2
    assert read_catalog(uri).to_pylist() == read_catalog(uri).to_pylist() and len(reads) == 2
    assert len(catalog_module._CATALOGS) <= catalog_module.CATALOGS_KEPT
