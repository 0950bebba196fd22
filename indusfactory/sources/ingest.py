"""Ingest: a team's annotated defective images and a folder of defect-free images become the catalog.

Sources (local paths or fsspec URIs such as ``s3://``):

- ``format: coco``: a COCO instances file naming images in ``images_dir``; segmentations as
  polygons, uncompressed RLE (``iscrowd``) or compressed RLE.
- ``format: mask_folder``: images in ``images_dir`` and one mask PNG per image in ``masks_dir``
  (same relative path and stem). Mask pixel value ``v`` is class ``mask_values[v]`` (the
  category id is ``v``), 0 is background, and each 8-connected component of a value is one
  instance. Masks are single-channel (L, P palette indices, I;16, 1-bit read as 0/255; an RGB
  mask with three equal channels is read as grey).
- ``defect_free_dir``: every file with an image extension, any depth.

Images are normalised to 8-bit RGB at their original size:

- EXIF orientation is applied first. The stored image is the oriented one, and **every
  annotation and mask is taken to be relative to the oriented image** (what annotation tools
  display). A COCO entry's ``width``/``height``, an RLE ``size`` and a mask's size must match it.
- grey (L, 1) is replicated to three channels; 16-bit grey (I;16*, I) is scaled linearly from
  0..65535 to 0..255 (``round(v / 257)``, values outside clipped), the same for every image, so
  a camera's brightness is comparable across images; palette (P) is expanded; CMYK, YCbCr are
  converted by Pillow (no ICC colour management); images with alpha (RGBA, LA, P with
  transparency) are **composited on black** (``rgb * alpha / 255``). Other modes (e.g. float F)
  are quarantined.

Every image is keyed by a hash of its pixels; exact duplicates are dropped (the first one in
source order is kept: COCO or mask-folder images before defect-free ones) and reported. A later
copy carrying other annotations than the kept one (other masks or classes) is quarantined as
``conflicting_duplicate`` rather than dropped. The split is taken from a COCO image field
(``split_field``) when configured, otherwise derived reproducibly from the hash and ``split_seed``.

Only regular files are read, and only below ``source.max_file_bytes`` (both checked from the
file's metadata before it is opened); the pixel count is checked from the header before decoding.
COCO annotations are capped per image, in polygon points and in RLE length (``source.max_*``);
polygon vertices may lie half a pixel beyond the border; a ``bbox`` that disagrees with its mask
is recomputed from the mask (and reported) or refused, by ``source.bbox_policy``.

What cannot be used is quarantined with a kind and a reason (``quarantine.parquet`` and
``report.md``) while the good rows go on; an image with one bad annotation is quarantined
whole (dropping the annotation would teach its defect as background). Always
``ingested + quarantined + duplicates = found`` (images), and for COCO every annotation is
accounted: ``found = ingested + quarantined (with its image) + duplicates + orphaned``. Any
exception while reading one file or annotation quarantines it (kind and reason naming the file and
annotation id); only I/O and memory errors, which a retry may cure, are raised.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from skimage.measure import label

from indusfactory.config import SourceConfig
from indusfactory.infra import stopping, storage
from indusfactory.infra.errors import BadInputError
from indusfactory.infra.fingerprint import fingerprint
from indusfactory.layout import CatalogFolder, FactoryLayout
from indusfactory.schema import (
    CATALOG_SCHEMA,
    QUARANTINE_SCHEMA,
    CatalogRecord,
    encode_png,
    mask_to_rle,
    rle_bbox_area,
    with_metadata,
)

log = logging.getLogger("indusfactory.ingest")  # the name operators filter on, kept from the flat layout

INGEST_VERSION = "3"
"""Part of the ingest cache key: bumped when the same sources would give a different catalog."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png",)
SPLITS = ("train", "val", "test")
CATALOG_PNG_LEVEL = 1
"""zlib level of the catalog's PNGs: ~4x faster than 6 on photographs, about the same size."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
PLAIN_MODES = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
PATH_ERRNOS = (errno.ELOOP, errno.ENAMETOOLONG)
"""Errors of a source path itself (a symlink loop, a name too long): quarantined, never transient."""


class Refusal(BadInputError):
    """An input item that cannot be used: ``kind`` is a stable short label, the message says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- names and paths ---------------------------------------------------------------------------


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: undecodable file-name bytes and NUL become ``\\xNN`` escapes."""
    name = name.replace("\0", "\\x00")
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return name.encode("utf-8", "backslashreplace").decode("ascii")


def check_name(name: str, where: str) -> None:
    """Refuse a file name that holds a NUL byte or is not valid UTF-8 (no file can have it, or it could not
    be stored or shown faithfully)."""
    if "\0" in name:
        raise Refusal(
            "bad_file_name", f"file name '{printable(name)}' in {where} holds a NUL byte (no file can have this name)"
        )
    if printable(name) != name:
        raise Refusal("bad_file_name", f"file name '{printable(name)}' in {where} is not valid UTF-8 (rename the file)")


def check_inside(uri: str, root: str) -> None:
    """Refuse a local file whose real path (symlinks resolved) lies outside ``root``."""
    if storage.is_remote(root):
        return
    real_root = os.path.realpath(root)
    real = os.path.realpath(uri)
    if os.path.commonpath([real, real_root]) != real_root:
        raise Refusal("unsafe_path", f"{printable(uri)} resolves to {printable(real)}, outside {root}")


def safe_join(root: str, name: str) -> str:
    """``root/name``, refusing absolute names, ``..`` parts and non-UTF-8 names."""
    check_name(name, root)
    if not name or name.endswith("/"):
        raise Refusal("bad_entry", f"file name {name!r} does not name a file in {root}")
    try:
        return storage.join(root, name)
    except BadInputError as exc:
        raise Refusal("unsafe_path", str(exc)) from exc


def brief(value: object, limit: int = 80) -> str:
    """A short ``repr`` of a value taken from an input file, for messages (never the whole of it)."""
    if isinstance(value, (list, dict, str)) and len(value) > limit:
        return f"<{type(value).__name__} of length {len(value)}>"
    try:
        text = repr(value)
    except (RecursionError, ValueError) as exc:
        return f"<{type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_files(root: str) -> list[str]:
    """Paths relative to ``root`` of every file under it, sorted (names may hold surrogate escapes)."""
    fs, path = storage.filesystem(root)
    return sorted(posixpath.relpath(p, path) for p in fs.find(path))


# --- images ------------------------------------------------------------------------------------


def _open_checked(data: bytes, name: str, max_pixels: int, what: str = "image") -> Image.Image:
    """Open image bytes reading only the header; refuse empty files and too many pixels."""
    unreadable = "unreadable" if what == "image" else "bad_mask"
    if not data:
        raise Refusal("empty_file" if what == "image" else "bad_mask", f"{name} is an empty (zero-byte) file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Refusal("too_large", f"{name} is refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise Refusal(unreadable, f"{name} is not a readable {what}: not a format Pillow recognises") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Refusal(unreadable, f"{name} is not a readable {what}: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise Refusal(
            "too_large",
            f"{name} has {width}x{height} pixels, above the limit of {max_pixels} "
            "(source.max_image_pixels); refused before decoding",
        )
    return image


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """uint8 HxWx3 of a decoded image of any supported mode (see the module docstring)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)
        return ((rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255).astype(np.uint8)
    if mode in PLAIN_MODES:
        return np.asarray(image.convert("RGB"))
    raise Refusal(
        "unsupported_mode",
        f"{name} has pixel mode {mode}, which is not supported "
        f"(supported: {', '.join(PLAIN_MODES + ALPHA_MODES + ('P',) + SIXTEEN_BIT_MODES)})",
    )


@contextmanager
def _decode_errors(name: str, what: str = "image") -> Iterator[None]:
    """Turn decoder failures (truncated or corrupt data) into a Refusal naming the file."""
    try:
        yield
    except Refusal:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "unreadable" if what == "image" else "bad_mask"
        raise Refusal(kind, f"{name} is not a readable {what}: {exc}") from exc


def load_oriented(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 of image bytes with EXIF orientation applied, and its (width, height) before."""
    image = _open_checked(data, name, max_pixels)
    with image, _decode_errors(name):
        raw_size = image.size
        oriented = ImageOps.exif_transpose(image)
        return _to_rgb(oriented, name), raw_size


def load_mask(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Integer HxW label values of a mask file, EXIF orientation applied."""
    image = _open_checked(data, name, max_pixels, "mask")
    with image, _decode_errors(name, "mask"):
        image = ImageOps.exif_transpose(image)
        if image.mode == "1":
            return np.asarray(image.convert("L")).astype(np.int64)
        if image.mode in ("L", "P") + SIXTEEN_BIT_MODES:
            return np.asarray(image).astype(np.int64)
        if image.mode == "RGB":
            rgb = np.asarray(image)
            if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
                return rgb[:, :, 0].astype(np.int64)
        raise Refusal(
            "bad_mask",
            f"mask {name} has pixel mode {image.mode}: a mask must be single-channel "
            "(L, P, I;16 or 1-bit; RGB only with three equal channels)",
        )


def split_of(image_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Reproducible train/val/test assignment from the content hash and a seed."""
    value = int(hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if value < fractions[0]:
        return "train"
    return "val" if value < fractions[0] + fractions[1] else "test"


def content_id(rgb: np.ndarray) -> str:
    """The content-hash id of normalised pixels."""
    return hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()[:20]


# --- COCO segmentations ------------------------------------------------------------------------

RLE_MAX_RUN_CHARS = 6
"""Characters of one compressed-RLE run that pycocotools decodes exactly (30 bits: runs below 2**29)."""
BORDER_SLACK = 0.5
"""Polygon vertices may lie up to half a pixel outside the image (pixel-centre contours, e.g. skimage's)."""
BBOX_MIN_IOU = 0.5
"""A COCO bbox with a lower IoU with its mask's box (and an edge more than 1 px away) disagrees with it."""


def rle_string_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, vectorised: linear time).

    Validating them before pycocotools decodes matters: its C decoder does not check that the
    runs fit the mask and would write past the buffer. A run written in more than
    ``RLE_MAX_RUN_CHARS`` characters is refused (pycocotools itself would overflow on it).
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    chars = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    invalid = np.flatnonzero((chars < 0) | (chars >= 64))
    if invalid.size:
        raise ValueError(f"compressed RLE string holds an invalid character {chr(data[invalid[0]])!r}")
    if not chars.size:
        return np.zeros(0, dtype=np.int64)
    last = (chars & 0x20) == 0  # the last character of each run
    if not last[-1]:
        raise ValueError("compressed RLE string ends inside a run")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > RLE_MAX_RUN_CHARS:
        raise ValueError(
            f"compressed RLE string has a run of {lengths.max()} characters (at most "
            f"{RLE_MAX_RUN_CHARS}: runs below 2**29 pixels)"
        )
    shifts = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shifts, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()  # from the fourth run on, each is stored relative to the one two before
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _list_runs(counts: list, height: int, width: int, ann_id: object) -> np.ndarray:
    """The runs of an uncompressed RLE: integers between 0 and the image's pixel count."""
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise Refusal("bad_annotation", f"annotation {ann_id} RLE counts are not all integers")
    if not all(0 <= c <= height * width for c in counts):
        raise Refusal(
            "bad_annotation",
            f"annotation {ann_id} RLE has a run length outside 0..{height * width} (negative or longer than its image)",
        )
    return np.asarray(counts, dtype=np.int64)


def _check_runs(runs: np.ndarray, height: int, width: int, ann_id: object) -> None:
    if (runs < 0).any():
        raise Refusal("bad_annotation", f"annotation {ann_id} RLE has a negative run length")
    if int(runs.sum()) != height * width:
        raise Refusal(
            "bad_annotation",
            f"annotation {ann_id} RLE covers {int(runs.sum())} pixels, its image "
            f"has {height}x{width} = {height * width}",
        )


def _check_polygons(polygons: list, height: int, width: int, ann_id: object, max_points: int) -> list[list[float]]:
    """Refuse malformed polygons, more than ``max_points`` points in all, and vertices more than half a
    pixel outside the image (``-0.5 <= x <= width + 0.5``, the same for y)."""
    if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in polygons):
        raise Refusal(
            "bad_annotation", f"annotation {ann_id} has a polygon that is not a flat list of at least 3 x,y points"
        )
    points = sum(len(p) for p in polygons) // 2
    if points > max_points:
        raise Refusal(
            "annotation_limit",
            f"annotation {ann_id} has {points} polygon points, above the limit "
            f"of {max_points} (source.max_polygon_points)",
        )
    checked = []
    for polygon in polygons:
        if not all(type(v) in (int, float) for v in polygon):
            raise Refusal("bad_annotation", f"annotation {ann_id} has a non-numeric polygon")
        try:
            coords = np.asarray(polygon, dtype=np.float64)
        except OverflowError as exc:
            raise Refusal(
                "mask_outside",
                f"annotation {ann_id} has a polygon coordinate too large to be a "
                f"pixel position of its {width}x{height} image",
            ) from exc
        xs, ys = coords[0::2], coords[1::2]
        low, x_high, y_high = -BORDER_SLACK, width + BORDER_SLACK, height + BORDER_SLACK
        if not np.isfinite(coords).all() or xs.min() < low or ys.min() < low or xs.max() > x_high or ys.max() > y_high:
            raise Refusal(
                "mask_outside",
                f"annotation {ann_id} has polygon points outside its {width}x{height} "
                f"image (x in {xs.min():g}..{xs.max():g}, y in {ys.min():g}..{ys.max():g}; "
                f"{BORDER_SLACK:g} px beyond the border is allowed)",
            )
        checked.append(coords.tolist())
    return checked


def _check_rle_length(counts: object, ann_id: object, max_length: int) -> None:
    if isinstance(counts, (list, str, bytes)) and len(counts) > max_length:
        raise Refusal(
            "annotation_limit",
            f"annotation {ann_id} RLE counts have length {len(counts)}, above the "
            f"limit of {max_length} (source.max_rle_length)",
        )


def _rle_of(segmentation: dict, height: int, width: int, ann_id: object, max_length: int) -> dict:
    """The pycocotools RLE of an uncompressed or compressed COCO RLE, validated against the image size."""
    try:
        size = [int(v) for v in segmentation.get("size", [])]
    except (TypeError, ValueError, OverflowError):
        size = []
    if size != [height, width]:
        raise Refusal(
            "mask_size",
            f"annotation {ann_id} RLE size {brief(segmentation.get('size'))} does not "
            f"match its image (height x width = {height}x{width})",
        )
    counts = segmentation.get("counts")
    _check_rle_length(counts, ann_id, max_length)
    if isinstance(counts, list):
        _check_runs(_list_runs(counts, height, width, ann_id), height, width, ann_id)
        return mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    if isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_counts(counts)
        except (ValueError, UnicodeEncodeError) as exc:
            raise Refusal("bad_annotation", f"annotation {ann_id} compressed RLE is corrupt: {exc}") from exc
        _check_runs(runs, height, width, ann_id)
        return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise Refusal("bad_annotation", f"annotation {ann_id} RLE has no counts")


def decode_annotation(ann: dict, height: int, width: int, source: SourceConfig) -> np.ndarray:
    """The boolean mask of a COCO annotation (polygons, uncompressed or compressed RLE), validated
    against the (oriented) image size and the source's limits; equal to ``pycocotools.coco.COCO.annToMask``."""
    ann_id = brief(ann.get("id"))
    segmentation = ann.get("segmentation")
    if segmentation is None or segmentation == [] or segmentation == {}:
        raise Refusal("bad_annotation", f"annotation {ann_id} has no segmentation")
    if isinstance(segmentation, list):
        polygons = _check_polygons(segmentation, height, width, ann_id, source.max_polygon_points)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        rle = _rle_of(segmentation, height, width, ann_id, source.max_rle_length)
    else:
        raise Refusal(
            "bad_annotation", f"annotation {ann_id} has an unknown segmentation type {type(segmentation).__name__}"
        )
    return mask_utils.decode(rle).astype(bool)


def _bbox_problem(given: object, mask_box: list[float], height: int, width: int) -> str | None:
    """Why a COCO ``bbox`` cannot stand for its mask's box; None when it agrees with it."""
    if not isinstance(given, list) or len(given) != 4 or not all(type(v) in (int, float) for v in given):
        return f"has a bbox {brief(given)} that is not [x, y, width, height]"
    try:
        x, y, w, h = (float(v) for v in given)
    except OverflowError:
        return f"has a bbox {brief(given)} with a number too large"
    if not np.isfinite([x, y, w, h]).all() or w < 0 or h < 0:
        return f"has a bbox {brief(given)} with a non-finite or negative value"
    if x < -BORDER_SLACK or y < -BORDER_SLACK or x + w > width + BORDER_SLACK or y + h > height + BORDER_SLACK:
        return f"has a bbox {brief(given)} outside its {width}x{height} image"
    mx, my, mw, mh = mask_box
    overlap = max(0.0, min(x + w, mx + mw) - max(x, mx)) * max(0.0, min(y + h, my + mh) - max(y, my))
    union = w * h + mw * mh - overlap
    iou = overlap / union if union > 0 else 0.0
    edge = max(abs(x - mx), abs(y - my), abs(x + w - mx - mw), abs(y + h - my - mh))
    if iou < BBOX_MIN_IOU and edge > 1.0:
        return f"has a bbox {brief(given)} that disagrees with its mask's {[int(v) for v in mask_box]} (IoU {iou:.2f})"
    return None


def _rle_instance(rle: dict, annotation_id: int, category_id: int, category: str, iscrowd: bool) -> dict:
    bbox, area = rle_bbox_area(rle)
    return {
        "annotation_id": annotation_id,
        "category_id": category_id,
        "category": category,
        "rle": rle,
        "bbox": bbox,
        "area": area,
        "iscrowd": iscrowd,
    }


def _instance(mask: np.ndarray, annotation_id: int, category_id: int, category: str, iscrowd: bool) -> dict:
    return _rle_instance(mask_to_rle(mask), annotation_id, category_id, category, iscrowd)


def coco_instances(
    anns: list[dict], categories: dict[int, str], height: int, width: int, source: SourceConfig
) -> tuple[list[dict], list[str]]:
    """Catalog instances of one image's COCO annotations, and the bbox corrections made; any bad
    annotation (whatever its fault) refuses the image."""
    if len(anns) > source.max_annotations_per_image:
        raise Refusal(
            "annotation_limit",
            f"the image has {len(anns)} annotations, above the limit of "
            f"{source.max_annotations_per_image} (source.max_annotations_per_image)",
        )
    instances, corrections = [], []
    for ann in anns:
        try:
            instance, correction = _coco_instance(ann, categories, height, width, source)
        except (Refusal, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever an annotation holds, it refuses only its image
            raise Refusal(
                "bad_annotation",
                f"annotation {brief(ann.get('id'))} cannot be read: {type(exc).__name__}: {str(exc)[:200]}",
            ) from exc
        instances.append(instance)
        corrections += [correction] if correction else []
    return instances, corrections


def _coco_instance(
    ann: dict, categories: dict[int, str], height: int, width: int, source: SourceConfig
) -> tuple[dict, str | None]:
    """One annotation's instance, and the bbox correction made (None when its bbox agrees or is absent)."""
    category_id = ann.get("category_id")
    if not isinstance(category_id, int) or isinstance(category_id, bool) or category_id not in categories:
        raise Refusal(
            "unknown_category",
            f"annotation {brief(ann.get('id'))} has unknown category id "
            f"{brief(category_id)} (known: {sorted(categories)})",
        )
    mask = decode_annotation(ann, height, width, source)
    if not mask.any():
        raise Refusal("bad_annotation", f"annotation {ann.get('id')} has an empty mask")
    instance = _instance(mask, int(ann["id"]), category_id, categories[category_id], bool(ann.get("iscrowd", 0)))
    problem = _bbox_problem(ann["bbox"], instance["bbox"], height, width) if "bbox" in ann else None
    if problem is None:
        return instance, None
    if source.bbox_policy == "refuse":
        raise Refusal("bbox_mismatch", f"annotation {ann['id']} {problem} (source.bbox_policy: refuse)")
    return instance, f"annotation {ann['id']} {problem}: the bbox was recomputed from the mask"


def _component_rles(numbered: np.ndarray, count: int) -> list[dict]:
    """Compressed RLEs of components ``1..count`` of a labelled image, from one column-major pass
    (time linear in the pixels plus the runs, however many components there are)."""
    height, width = numbered.shape
    flat = numbered.ravel(order="F")
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [flat.size]])
    owners = flat[starts]
    order = np.argsort(owners, kind="stable")  # each component's runs, in pixel order
    starts, ends, owners = starts[order], ends[order], owners[order]
    bounds = np.searchsorted(owners, np.arange(1, count + 2))
    rles = []
    for number in range(count):
        low, high = bounds[number], bounds[number + 1]
        edges = np.empty(2 * (high - low) + 2, dtype=np.int64)
        edges[0], edges[-1] = 0, flat.size
        edges[1:-1:2], edges[2:-1:2] = starts[low:high], ends[low:high]
        counts = np.diff(edges)
        counts = counts[:-1] if counts[-1] == 0 else counts
        encoded = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
        rles.append({"size": [height, width], "counts": encoded["counts"].decode("ascii")})
    return rles


def mask_instances(labels: np.ndarray, mask_values: dict[int, str], name: str, max_instances: int) -> list[dict]:
    """One instance per 8-connected component of each mask value; annotation ids 1..n per image.

    Each value is labelled once and its components encoded in one pass (no full-image mask per
    component); more than ``max_instances`` components refuse the image."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    unknown = [v for v in present if v not in mask_values]
    if unknown:
        raise Refusal(
            "unknown_mask_value",
            f"mask {name} holds values {unknown[:10]} that are not in "
            f"source.mask_values ({sorted(mask_values)}; 0 is background)",
        )
    if len(present) > max_instances:  # each value has a component: refused before labelling any
        raise Refusal(
            "annotation_limit",
            f"mask {name} has {len(present)} values, so more than {max_instances} "
            "connected components (source.max_annotations_per_image)",
        )
    instances: list[dict] = []
    for value in present:
        numbered, count = label(labels == value, connectivity=2, return_num=True)
        if len(instances) + count > max_instances:
            raise Refusal(
                "annotation_limit",
                f"mask {name} has more than {max_instances} connected components (source.max_annotations_per_image)",
            )
        for rle in _component_rles(numbered, count):
            instances.append(_rle_instance(rle, len(instances) + 1, value, mask_values[value], False))
    return instances


# --- the items ingest tries --------------------------------------------------------------------


@dataclass
class Candidate:
    """One source image to read: where it is, where it must stay, and what annotates it."""

    uri: str
    name: str
    root: str
    defective: bool
    split: str | None = None
    annotations: list[dict] = field(default_factory=list)
    expected_size: tuple[int, int] | None = None  # (width, height) from a COCO entry
    mask_uri: str | None = None
    mask_root: str | None = None

    @property
    def annotation_ids(self) -> list[int | None]:
        return [a.get("id") if isinstance(a.get("id"), int) else None for a in self.annotations]


@dataclass
class Loaded:
    """A readable, normalised image with its instances."""

    image_id: str
    width: int
    height: int
    png: bytes
    instances: list[dict]
    corrections: list[str] = field(default_factory=list)

    @property
    def defects(self) -> frozenset[tuple[int, str]]:
        """What the image is annotated with, ids aside: its (category id, mask) pairs."""
        return frozenset((i["category_id"], i["rle"]["counts"]) for i in self.instances)


@dataclass
class IngestResult:
    """Everything ingest saw: catalog rows, quarantine rows, duplicates and ignored files."""

    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    duplicates: int = 0
    found: int = 0
    duplicate_of: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    annotations_found: int = 0
    annotations_of_duplicates: int = 0
    corrected: list[tuple[str, str]] = field(default_factory=list)

    def reject(
        self,
        source_uri: str,
        kind: str,
        reason: str,
        item: str = "image",
        annotation_ids: list[int | None] | None = None,
    ) -> None:
        """Quarantine one item (an image unless said otherwise) with its kind and reason."""
        source_uri, reason = printable(source_uri), printable(reason)
        log.warning("quarantined %s %s: %s", item, source_uri, reason)
        self.quarantine.append(
            {
                "source_uri": source_uri,
                "kind": kind,
                "reason": reason,
                "item": item,
                "annotation_ids": list(annotation_ids or []),
            }
        )

    @property
    def quarantined_images(self) -> int:
        return sum(q["item"] == "image" for q in self.quarantine)

    def annotation_counts(self) -> dict[str, int]:
        """COCO annotation accounting (mask folders: the components of the masks that were read)."""
        ingested = sum(len(r["instances"]) for r in self.rows)
        with_image = sum(len(q["annotation_ids"]) for q in self.quarantine if q["item"] == "image")
        orphaned = sum(len(q["annotation_ids"]) for q in self.quarantine if q["item"] == "annotation")
        return {
            "found": self.annotations_found,
            "ingested": ingested,
            "quarantined": with_image,
            "duplicates": self.annotations_of_duplicates,
            "orphaned": orphaned,
        }


def _load(candidate: Candidate, source: SourceConfig, categories: dict[int, str]) -> Loaded | Refusal:
    """Read, normalise and annotate one candidate (thread-safe; no shared state).

    Whatever goes wrong with one file becomes a Refusal naming it (never a crash of the whole ingest,
    nor a retry of it), except I/O and memory errors, which may be transient (see ``_read``). A stop
    request ends the reads still queued at once."""
    stopping.check("ingest")
    try:
        return _load_checked(candidate, source, categories)
    except Refusal as exc:
        return exc
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the ingest
        return Refusal("unreadable", f"{candidate.uri} cannot be read: {type(exc).__name__}: {str(exc)[:200]}")


def _load_checked(candidate: Candidate, source: SourceConfig, categories: dict[int, str]) -> Loaded:
    """``_load`` without the safety net: raises a Refusal for what cannot be used."""
    check_inside(candidate.uri, candidate.root)
    data = _read(candidate.uri, candidate.name, source.max_file_bytes)
    rgb, raw_size = load_oriented(data, candidate.uri, source.max_image_pixels)
    height, width = rgb.shape[:2]
    _check_expected_size(candidate, (width, height), raw_size)
    corrections: list[str] = []
    if candidate.mask_uri is not None:
        instances = _mask_file_instances(candidate, source, height, width)
    else:
        instances, corrections = coco_instances(candidate.annotations, categories, height, width, source)
    return Loaded(
        content_id(rgb), width, height, encode_png(rgb, compress_level=CATALOG_PNG_LEVEL), instances, corrections
    )


def _mask_file_instances(candidate: Candidate, source: SourceConfig, height: int, width: int) -> list[dict]:
    """The instances of a candidate's mask file, which must have its image's (oriented) size."""
    mask_uri = candidate.mask_uri or ""
    check_inside(mask_uri, candidate.mask_root or "")
    labels = load_mask(_read(mask_uri, mask_uri, source.max_file_bytes), mask_uri, source.max_image_pixels)
    if labels.shape != (height, width):
        raise Refusal(
            "mask_size",
            f"mask {mask_uri} is {labels.shape[1]}x{labels.shape[0]}, "
            f"its image is {width}x{height} (after EXIF orientation)",
        )
    return mask_instances(labels, source.mask_values, mask_uri, source.max_annotations_per_image)


def _read(uri: str, name: str, max_bytes: int) -> bytes:
    """The bytes of a regular source file of at most ``max_bytes``, checked from its metadata before it
    is opened (a FIFO would block, a huge file would fill the memory); otherwise a Refusal.

    Other I/O errors (network, permissions) are raised, not quarantined: they may be transient,
    and a cached catalog must not keep a loss a retry would have avoided.
    """
    fs, path = storage.filesystem(uri)
    try:
        info = fs.info(path)
        _check_regular(uri, info, max_bytes)
        return fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise Refusal("missing_file", f"{uri} does not exist (named as {brief(name)})") from exc
    except IsADirectoryError as exc:
        raise Refusal("missing_file", f"{uri} is a folder, not an image file") from exc
    except OSError as exc:
        if exc.errno not in PATH_ERRNOS:
            raise
        raise Refusal("unreadable", f"{uri} cannot be opened: {exc.strerror}") from exc


def _check_regular(uri: str, info: dict, max_bytes: int) -> None:
    """Refuse what is not a regular file (folder, FIFO, socket, device) and files above ``max_bytes``."""
    kind = info.get("type")
    if kind == "directory":
        raise Refusal("missing_file", f"{uri} is a folder, not an image file")
    if kind != "file":
        raise Refusal(
            "not_a_file",
            f"{uri} is not a regular file (type {kind!r}: a FIFO, socket or device); only regular files are read",
        )
    size = info.get("size")
    if isinstance(size, int) and size > max_bytes:
        raise Refusal(
            "too_large",
            f"{uri} is {size} bytes, above the limit of {max_bytes} "
            "(source.max_file_bytes); refused without reading it",
        )


def _check_expected_size(candidate: Candidate, size: tuple[int, int], raw_size: tuple[int, int]) -> None:
    """A COCO entry's width/height must be the oriented image's (annotations are relative to it)."""
    expected = candidate.expected_size
    if expected is None or expected == size:
        return
    hint = (
        " (it matches the image before EXIF orientation: annotations must be relative to the oriented image)"
        if expected == raw_size
        else ""
    )
    raise Refusal(
        "size_mismatch",
        f"{candidate.uri} is {size[0]}x{size[1]} after EXIF orientation but its "
        f"COCO entry says {expected[0]}x{expected[1]}{hint}",
    )


# --- listing the sources -----------------------------------------------------------------------


def read_coco(uri: str) -> dict:
    """The parsed COCO file; a clear error when it is not a COCO instances document (not a regular file,
    invalid JSON, nested too deep for the parser, an integer too long to convert)."""
    fs, path = storage.filesystem(uri)
    try:
        kind = fs.info(path).get("type")
    except FileNotFoundError as exc:
        raise BadInputError(f"COCO file {uri} does not exist") from exc
    if kind != "file":
        raise BadInputError(f"COCO file {uri} is not a regular file (type {kind!r})")
    try:
        coco = json.loads(fs.cat_file(path).decode("utf-8"))
    except RecursionError as exc:
        raise BadInputError(f"COCO file {uri} is nested too deeply to be read as JSON: {exc}") from exc
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, an integer above Python's digit limit
        raise BadInputError(f"COCO file {uri} is not valid JSON: {exc}") from exc
    if not isinstance(coco, dict):
        raise BadInputError(f"COCO file {uri} must hold a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise BadInputError(f"COCO file {uri} has no '{key}' list")
    return coco


def coco_categories(coco: dict, uri: str) -> list[dict]:
    """Id-sorted categories; malformed or repeated category ids stop ingest (nothing is attributable)."""
    categories, seen = [], set()
    for entry in coco["categories"]:
        cid = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(entry.get("name"), str):
            raise BadInputError(f"COCO file {uri} has a category without an integer id and a name: {brief(entry)}")
        if cid in seen:
            raise BadInputError(f"COCO file {uri} uses category id {cid} twice")
        seen.add(cid)
        categories.append({"id": cid, "name": entry["name"], "supercategory": entry.get("supercategory", "")})
    return sorted(categories, key=lambda c: c["id"])


def _is_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _given_split(entry: dict, source: SourceConfig) -> str | None:
    """The split a COCO entry carries in ``source.split_field`` (None when not configured)."""
    if source.split_field is None:
        return None
    value = entry.get(source.split_field)
    split = value.strip().lower() if isinstance(value, str) else None
    if split not in SPLITS:
        raise Refusal(
            "bad_split",
            f"image {brief(entry.get('file_name'))} has {source.split_field}={brief(value)}; "
            f"source.split_field requires one of {', '.join(SPLITS)}",
        )
    return split


def _entry_size(entry: dict) -> tuple[int, int] | None:
    width, height = entry.get("width"), entry.get("height")
    if isinstance(width, int) and isinstance(height, int) and not isinstance(width, bool):
        return width, height
    return None


def coco_candidates(source: SourceConfig, coco: dict, result: IngestResult) -> list[Candidate]:
    """Candidates of a COCO file's image entries; bad entries and orphan annotations are quarantined."""
    coco_uri = source.coco_annotations
    entries = coco["images"]
    id_counts = Counter(e.get("id") for e in entries if isinstance(e, dict) and _is_id(e.get("id")))
    anns_by_image: dict[object, list[dict]] = {}
    for index, ann in enumerate(coco["annotations"]):
        result.annotations_found += 1
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not _is_id(image_id) or image_id not in id_counts:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            result.reject(
                f"{coco_uri}#annotations[{index}]",
                "orphan_annotation",
                f"annotation {brief(ann_id)} names image id {brief(image_id)}, which no image entry has",
                item="annotation",
                annotation_ids=[ann_id if isinstance(ann_id, int) else None],
            )
            continue
        anns_by_image.setdefault(image_id, []).append(ann)
    candidates, claimed = [], set()
    for index, entry in enumerate(entries):
        result.found += 1
        image_id = entry.get("id") if isinstance(entry, dict) and _is_id(entry.get("id")) else None
        anns = [] if image_id in claimed else anns_by_image.get(image_id, [])
        claimed.add(image_id)
        name = entry.get("file_name") if isinstance(entry, dict) else None
        candidate = Candidate(
            uri="", name=name if isinstance(name, str) else "", root=source.images_dir, defective=True, annotations=anns
        )
        try:
            _fill_candidate(candidate, entry, index, source, id_counts)
        except Refusal as exc:
            where = candidate.uri or _label(source.images_dir, candidate.name) or f"{coco_uri}#images[{index}]"
            result.reject(where, exc.kind, str(exc), annotation_ids=candidate.annotation_ids)
            continue
        candidates.append(candidate)
    return candidates


def _fill_candidate(candidate: Candidate, entry: object, index: int, source: SourceConfig, id_counts: Counter) -> None:
    """Set a candidate's URI, split and expected size from its COCO entry; any fault is a Refusal."""
    try:
        candidate.uri = _check_coco_entry(entry, index, source, id_counts)
        checked = cast(dict, entry)  # a dict, once checked
        candidate.split = _given_split(checked, source)
        candidate.expected_size = _entry_size(checked)
    except (Refusal, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one malformed entry must not stop the ingest
        raise Refusal(
            "bad_entry",
            f"image entry {index} of {source.coco_annotations} cannot be read: {type(exc).__name__}: {str(exc)[:200]}",
        ) from exc


def _label(root: str, name: str) -> str:
    """How to name a file that may not be joined safely (only for reports)."""
    if not name or name.startswith("/"):
        return name
    return f"{root.rstrip('/')}/{name}"


def _check_coco_entry(entry: object, index: int, source: SourceConfig, id_counts: Counter) -> str:
    """The URI of a well-formed COCO image entry; a Refusal naming what is wrong otherwise."""
    if not isinstance(entry, dict) or not _is_id(entry.get("id")):
        raise Refusal("bad_entry", f"image entry {index} of {source.coco_annotations} has no id")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise Refusal(
            "bad_entry", f"image entry {index} (id {brief(entry['id'])}) of {source.coco_annotations} has no file_name"
        )
    uri = safe_join(source.images_dir, file_name)
    if id_counts[entry["id"]] > 1:
        raise Refusal(
            "duplicate_image_id",
            f"image id {brief(entry['id'])} is used by {id_counts[entry['id']]} image "
            "entries: its annotations cannot be attributed (they are counted with the first entry)",
        )
    return uri


def _check_annotation_ids(candidate: Candidate, ann_id_counts: Counter) -> None:
    """Every annotation needs an integer id used by no other annotation."""
    for ann in candidate.annotations:
        ann_id = ann.get("id")
        if not isinstance(ann_id, int) or isinstance(ann_id, bool):
            raise Refusal(
                "bad_annotation", f"an annotation of {brief(candidate.name)} has no integer id ({brief(ann_id)})"
            )
        if ann_id_counts[ann_id] > 1:
            raise Refusal(
                "duplicate_annotation_id",
                f"annotation id {ann_id} of {brief(candidate.name)} is used by {ann_id_counts[ann_id]} annotations",
            )


def mask_folder_candidates(source: SourceConfig, result: IngestResult) -> list[Candidate]:
    """Candidates of an image folder with a parallel mask folder; orphan masks are quarantined."""
    masks_dir = source.masks_dir or ""
    masks: dict[str, str] = {}
    for name in list_files(masks_dir):
        if name.lower().endswith(MASK_EXTENSIONS):
            masks.setdefault(posixpath.splitext(name)[0], name)
        else:
            result.ignored.append((storage.join(masks_dir, name), "not a .png mask"))
    images = [n for n in list_files(source.images_dir) if _is_image_name(n, source.images_dir, result)]
    stems = Counter(posixpath.splitext(n)[0] for n in images)
    candidates = []
    for name in images:
        result.found += 1
        stem = posixpath.splitext(name)[0]
        try:
            uri = safe_join(source.images_dir, name)
            if stems[stem] > 1:
                raise Refusal(
                    "ambiguous_mask",
                    f"{uri}: {stems[stem]} images share the stem {stem!r}, so the mask cannot be attributed",
                )
            if stem not in masks:
                raise Refusal("missing_mask", f"{uri} has no mask {stem}.png in {masks_dir}")
            mask_uri = safe_join(masks_dir, masks[stem])
        except Refusal as exc:
            result.reject(storage.join(source.images_dir, name), exc.kind, str(exc))
            continue
        candidates.append(
            Candidate(
                uri=uri, name=name, root=source.images_dir, defective=True, mask_uri=mask_uri, mask_root=masks_dir
            )
        )
    for stem, name in masks.items():
        if stem not in stems:
            result.reject(
                storage.join(masks_dir, name),
                "orphan_mask",
                f"mask {printable(name)!r} has no image {printable(stem)}.* in {source.images_dir}",
                item="mask",
            )
    return candidates


def _is_image_name(name: str, root: str, result: IngestResult) -> bool:
    """True for image extensions; other files are listed as ignored in the report."""
    if name.lower().endswith(IMAGE_EXTENSIONS):
        return True
    result.ignored.append((storage.join(root, name), "no image extension"))
    return False


def defect_free_candidates(source: SourceConfig, result: IngestResult) -> list[Candidate]:
    """Candidates of every image file under ``defect_free_dir``."""
    candidates = []
    for name in list_files(source.defect_free_dir):
        if not _is_image_name(name, source.defect_free_dir, result):
            continue
        result.found += 1
        try:
            uri = safe_join(source.defect_free_dir, name)
        except Refusal as exc:
            result.reject(storage.join(source.defect_free_dir, name), exc.kind, str(exc))
            continue
        candidates.append(Candidate(uri=uri, name=name, root=source.defect_free_dir, defective=False))
    return candidates


def _unnamed_coco_images(source: SourceConfig, coco: dict, result: IngestResult) -> None:
    """List files of ``images_dir`` the COCO file does not name (ignored, but reported)."""
    named = {
        posixpath.normpath(e["file_name"])
        for e in coco["images"]
        if isinstance(e, dict) and isinstance(e.get("file_name"), str) and e["file_name"]
    }
    for name in list_files(source.images_dir):
        if posixpath.normpath(name) not in named and name.lower().endswith(IMAGE_EXTENSIONS):
            result.ignored.append((storage.join(source.images_dir, name), "not named by the COCO file"))


# --- putting it together -----------------------------------------------------------------------


def collect(source: SourceConfig) -> tuple[IngestResult, list[dict]]:
    """Read every source image: catalog rows, quarantine rows, duplicates and the categories."""
    result = IngestResult()
    if source.format == "coco":
        coco = read_coco(source.coco_annotations)
        categories = coco_categories(coco, source.coco_annotations)
        candidates = coco_candidates(source, coco, result)
        ann_id_counts = Counter(
            a.get("id") for a in coco["annotations"] if isinstance(a, dict) and isinstance(a.get("id"), int)
        )
        candidates = _drop_bad_annotation_ids(candidates, ann_id_counts, result)
        _unnamed_coco_images(source, coco, result)
    else:
        categories = [{"id": v, "name": n.strip(), "supercategory": ""} for v, n in sorted(source.mask_values.items())]
        candidates = mask_folder_candidates(source, result)
    candidates += defect_free_candidates(source, result)
    names = {c["id"]: c["name"] for c in categories}
    with ThreadPoolExecutor(max_workers=source.read_workers) as pool:
        outcomes = pool.map(lambda c: _load(c, source, names), candidates)
        seen: dict[str, tuple[str, Loaded]] = {}
        for candidate, outcome in zip(candidates, outcomes):
            _accept(result, seen, source, candidate, outcome)
    if source.format == "mask_folder":  # instances exist only where a mask could be read
        result.annotations_found = sum(len(r["instances"]) for r in result.rows) + result.annotations_of_duplicates
    return result, categories


def _drop_bad_annotation_ids(candidates: list[Candidate], counts: Counter, result: IngestResult) -> list[Candidate]:
    kept = []
    for candidate in candidates:
        try:
            _check_annotation_ids(candidate, counts)
        except Refusal as exc:
            result.reject(candidate.uri, exc.kind, str(exc), annotation_ids=candidate.annotation_ids)
            continue
        kept.append(candidate)
    return kept


def _accept(
    result: IngestResult,
    seen: dict[str, tuple[str, Loaded]],
    source: SourceConfig,
    candidate: Candidate,
    outcome: Loaded | Refusal,
) -> None:
    """Catalog a loaded image, or count it as a duplicate or quarantined.

    An image with the pixels of one already kept is dropped as an exact duplicate when dropping it
    loses no annotation: it has none (a defect-free file, a COCO entry without annotations) or the
    same defects (category and mask, ids aside). When it carries other annotations the two
    disagree, and the later one is quarantined as ``conflicting_duplicate``."""
    if isinstance(outcome, Refusal):
        result.reject(candidate.uri, outcome.kind, str(outcome), annotation_ids=candidate.annotation_ids)
        return
    if outcome.image_id in seen:
        first_uri, first = seen[outcome.image_id]
        if outcome.instances and outcome.defects != first.defects:
            result.reject(
                candidate.uri,
                "conflicting_duplicate",
                f"{candidate.uri} has the same pixels as "
                f"{first_uri} but other annotations ({len(outcome.defects)} distinct defects against "
                f"{len(first.defects)}, or other masks or classes)",
                annotation_ids=candidate.annotation_ids,
            )
            return
        result.duplicates += 1
        result.annotations_of_duplicates += len(outcome.instances if candidate.mask_uri else candidate.annotations)
        result.duplicate_of.append((candidate.uri, first_uri))
        log.warning("dropped %s: exact duplicate of %s", candidate.uri, first_uri)
        return
    seen[outcome.image_id] = (candidate.uri, outcome)
    result.corrected += [(candidate.uri, note) for note in outcome.corrections]
    result.rows.append(
        {
            "image_id": outcome.image_id,
            "source_uri": candidate.uri,
            "file_name": candidate.name,
            "width": outcome.width,
            "height": outcome.height,
            "split": candidate.split or split_of(outcome.image_id, source.split_seed, source.split_fractions),
            "defective": candidate.defective,
            "image": {"bytes": outcome.png, "path": f"{outcome.image_id}.png"},
            "instances": outcome.instances,
        }
    )


def _cell(text: str) -> str:
    return printable(str(text)).replace("|", "\\|").replace("\n", " ")


def _report_markdown(result: IngestResult, source: SourceConfig) -> str:
    """The human-readable account of an ingest: counts that reconcile, then every refused item."""
    defective = sum(r["defective"] for r in result.rows)
    ingested, quarantined = len(result.rows), result.quarantined_images
    where = source.coco_annotations if source.format == "coco" else f"{source.images_dir} + {source.masks_dir}"
    lines = [
        "# Ingest report",
        "",
        f"- format: {source.format} ({where}); defect-free: {source.defect_free_dir}",
        f"- found: {result.found} images",
        f"- ingested: {ingested} ({defective} defective, {ingested - defective} defect-free)",
        f"- duplicates dropped: {result.duplicates}",
        f"- quarantined: {quarantined}",
        f"- reconciliation: ingested {ingested} + quarantined {quarantined} + duplicates {result.duplicates} "
        f"= found {result.found}",
    ]
    counts = result.annotation_counts()
    if source.format == "coco":
        lines.append(
            f"- annotations: found {counts['found']} = ingested {counts['ingested']} + quarantined with "
            f"their image {counts['quarantined']} + dropped with duplicates {counts['duplicates']} + "
            f"orphaned {counts['orphaned']}"
        )
    else:
        lines.append(
            f"- instances (connected mask components): ingested {counts['ingested']}, dropped with "
            f"duplicates {counts['duplicates']} (masks of quarantined images are not decomposed)"
        )
    if result.corrected:
        lines.append(
            f"- bboxes corrected from their masks: {len(result.corrected)} (source.bbox_policy: correct; listed below)"
        )
    others = [q for q in result.quarantine if q["item"] != "image"]
    if others:
        lines.append(f"- also refused: {len(others)} annotations or masks that belong to no image (listed below)")
    if result.quarantine:
        lines += ["", "## Quarantined", "", "| item | file | kind | reason |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {q['item']} | {_cell(q['source_uri'])} | {q['kind']} | {_cell(q['reason'])} |"
            for q in result.quarantine
        ]
    if result.corrected:
        lines += ["", "## Bboxes corrected", "", "| file | correction |", "| --- | --- |"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in result.corrected]
    if result.duplicate_of:
        lines += ["", "## Duplicates dropped", "", "| file | same pixels as |", "| --- | --- |"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in result.duplicate_of]
    if result.ignored:
        lines += ["", "## Ignored files (not counted as found)", "", "| file | why |", "| --- | --- |"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in result.ignored]
    return "\n".join(lines) + "\n"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_quarantine(folder: CatalogFolder, result: IngestResult, source: SourceConfig) -> None:
    quarantine = pa.Table.from_pylist(result.quarantine, schema=QUARANTINE_SCHEMA)
    storage.write_bytes_atomic(folder.quarantine, _parquet_bytes(quarantine))
    storage.write_bytes_atomic(folder.report, _report_markdown(result, source).encode("utf-8"))


def _nothing_usable(result: IngestResult, source: SourceConfig, folder: CatalogFolder) -> BadInputError:
    kinds = Counter(q["kind"] for q in result.quarantine if q["item"] == "image")
    summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "none"
    where = source.coco_annotations if source.format == "coco" else source.images_dir
    return BadInputError(
        f"no usable defective image in {where} ({result.found} images found, {result.quarantined_images} "
        f"quarantined: {summary}; {result.duplicates} duplicates); every reason is in "
        f"{folder.report}"
    )


def ingest(source: SourceConfig, output: CatalogFolder | str) -> CatalogRecord:
    """Build the catalog in ``output`` (reused as is if it is already complete).

    ``output`` is the folder ``catalog_folder_for`` names under the factory root (its fingerprint is the
    record's); a bare URI (a catalog written anywhere else) names its catalog by its content."""
    folder = output if isinstance(output, CatalogFolder) else CatalogFolder(output, "")
    done = CatalogRecord.read_completed(folder.marker)
    if done:
        return done
    result, categories = collect(source)
    if not any(row["defective"] for row in result.rows):
        _write_quarantine(folder, result, source)
        raise _nothing_usable(result, source, folder)
    table = pa.Table.from_pylist(result.rows, schema=with_metadata(CATALOG_SCHEMA, categories))
    content = fingerprint("catalog", [(r["image_id"], r["split"], r["instances"]) for r in result.rows])
    defective = sum(row["defective"] for row in result.rows)
    record = CatalogRecord(
        uri=folder.uri,
        fingerprint=folder.fingerprint or content,
        content_fingerprint=content,
        found=result.found,
        ingested=len(result.rows),
        quarantined=result.quarantined_images,
        duplicates=result.duplicates,
        defective=defective,
        defect_free=len(result.rows) - defective,
        categories=categories,
        annotations=result.annotation_counts(),
    )
    if record.ingested + record.quarantined + record.duplicates != record.found:
        raise AssertionError(f"ingest counts do not reconcile: {record}")
    counts = record.annotations
    if source.format == "coco" and counts["found"] != sum(v for k, v in counts.items() if k != "found"):
        raise AssertionError(f"annotation counts do not reconcile: {counts}")
    storage.write_bytes_atomic(folder.table, _parquet_bytes(table))
    _write_quarantine(folder, result, source)
    storage.write_json_atomic(folder.marker, record.model_dump(mode="json", exclude={"reused"}))
    return record


# --- what other stages use ---------------------------------------------------------------------


def source_listing(source: SourceConfig) -> dict:
    """What the ingest cache key depends on: the COCO file's hash and every file's name, size and version
    (modification time, or ETag on object stores), so a file rewritten in place is ingested again."""
    if source.format == "coco":
        labelled = (("coco_annotations", source.coco_annotations), ("images_dir", source.images_dir))
    else:
        labelled = (("images_dir", source.images_dir), ("masks_dir", source.masks_dir or ""))
    for label_, uri in (*labelled, ("defect_free_dir", source.defect_free_dir)):
        if not storage.exists(uri):
            raise BadInputError(f"source.{label_} {uri} does not exist")
    listing: dict = {}
    if source.format == "coco":
        listing["coco_sha256"] = storage.sha256_bytes(storage.read_bytes(source.coco_annotations))
    folders = [("images", source.images_dir), ("defect_free", source.defect_free_dir)]
    if source.format == "mask_folder":
        folders.append(("masks", source.masks_dir or ""))
    for label_, uri in folders:
        listing[label_] = [(printable(name), size, version) for name, size, version in storage.folder_listing(uri)]
    return listing


def ingest_fingerprint(source: SourceConfig, factory_root: str) -> str:
    """Cache key of the catalog: the source settings (not how many threads), its files, the root."""
    return fingerprint(
        "ingest",
        INGEST_VERSION,
        source,
        source_listing(source),
        storage.normalise_uri(factory_root),
    )


def catalog_folder_for(config) -> CatalogFolder:
    """The folder of the catalog of ``config.source`` under the factory root, with its fingerprint."""
    return FactoryLayout.of(config.factory_root).catalog(ingest_fingerprint(config.source, config.factory_root))


def catalog_uri_for(config) -> str:
    """Where the catalog of ``config.source`` lives under the factory root."""
    return catalog_folder_for(config).uri
