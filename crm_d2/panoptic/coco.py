"""COCO panoptic format: PNG id maps (id = R + 256 G + 256^2 B), JSON `segments_info`, categories with `isthing`.

Every panoptic path in crm_d2 (refinement, merging, PQ) goes through these helpers, so that PNG and JSON are
checked against each other in one place and a bad file is reported by name and segment id instead of surfacing
as a wrong number. Writers are atomic and keep PNG and JSON in agreement (segments absent from the PNG are dropped).
"""
import json
from pathlib import Path

import cv2
import numpy as np

from crm_d2.io import imread, write_json, write_png

__all__ = [
    "VOID", "rgb2id", "id2rgb", "read_panoptic_png", "PanopticSet", "load_panoptic", "check_segments", "check_areas",
    "segments_to_masks", "masks_to_ids", "mask_bbox", "write_panoptic_image", "read_panoptic_sidecar",
    "write_panoptic_json",
]

VOID = 0
MAX_ID = 256 ** 3


def rgb2id(color):
    """HxWx3 RGB uint8 -> HxW uint32 segment ids (also accepts one (r, g, b) triple -> int)."""
    color = np.asarray(color)
    if color.ndim == 1:
        r, g, b = (int(c) for c in color[:3])
        return r + 256 * g + 256 * 256 * b
    if color.ndim != 3 or color.shape[2] < 3:
        raise ValueError(f"panoptic PNG must be RGB (HxWx3), got shape {color.shape}")
    c = color[..., :3].astype(np.uint32)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(ids):
    """HxW integer segment ids -> HxWx3 RGB uint8 (also accepts one int -> [r, g, b])."""
    ids = np.asarray(ids)
    if ids.ndim == 0:
        i = int(ids)
        if not 0 <= i < MAX_ID:
            raise ValueError(f"segment id {i} does not fit in an RGB PNG (0..{MAX_ID - 1})")
        return [i % 256, i // 256 % 256, i // 65536]
    if ids.size and (ids.min() < 0 or ids.max() >= MAX_ID):
        raise ValueError(f"segment ids must be in 0..{MAX_ID - 1}, got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path):
    """Read a panoptic PNG as HxW uint32 ids; FileNotFoundError / ValueError name the file."""
    img = imread(path, cv2.IMREAD_UNCHANGED, "panoptic PNG")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"panoptic PNG {path} must be 8-bit RGB, got dtype {img.dtype} shape {img.shape}")
    return rgb2id(img[..., 2::-1])


def check_segments(ids, segments_info, where="", categories=None):
    """Check that a PNG id map and its `segments_info` agree; return {segment id: pixel area} for the PNG.

    Raises ValueError naming `where` (file/image) and the id for: a PNG id missing from the JSON, a JSON id
    missing from the PNG, a duplicate or void (0) JSON id, and (with `categories`) an unknown category id.
    """
    labels, counts = np.unique(ids, return_counts=True)
    return check_areas(dict(zip(labels.tolist(), counts.tolist())), segments_info, where, categories)


def check_areas(areas, segments_info, where="", categories=None):
    """check_segments for an already counted map: `areas` is {id: pixel count} (void may be included)."""
    at = f" in {where}" if where else ""
    areas = {int(i): int(c) for i, c in areas.items() if i != VOID}
    seen = set()
    for seg in segments_info:
        sid = seg.get("id")
        if sid is None or "category_id" not in seg:
            raise ValueError(f"segment{at} lacks 'id' or 'category_id': {seg}")
        if sid == VOID:
            raise ValueError(f"segment id 0 is VOID and cannot be listed in segments_info{at}")
        if sid in seen:
            raise ValueError(f"segment id {sid} listed twice in segments_info{at}")
        seen.add(sid)
        if sid not in areas:
            raise ValueError(f"segment id {sid} is in the JSON but not in the PNG{at}")
        if categories is not None and seg["category_id"] not in categories:
            raise ValueError(f"segment id {sid} has unknown category_id {seg['category_id']}{at}")
    extra = sorted(set(areas) - seen)
    if extra:
        raise ValueError(f"segment id(s) {extra} in the PNG are not in the JSON{at}")
    return areas


class PanopticSet:
    """A COCO panoptic JSON plus its PNG folder: annotations by image_id / file_name, categories by id."""

    def __init__(self, json_path, png_dir):
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"panoptic JSON not found: {self.json_path}")
        if not self.png_dir.is_dir():
            raise FileNotFoundError(f"panoptic PNG folder not found: {self.png_dir}")
        try:
            with open(self.json_path) as f:
                self.data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.json_path} is not valid JSON: {exc}") from None
        if not isinstance(self.data, dict) or "annotations" not in self.data:
            raise ValueError(f"{self.json_path} is not a COCO panoptic file (no 'annotations')")
        self.annotations = {}
        self.by_file = {}
        for ann in self.data["annotations"]:
            missing = [k for k in ("image_id", "file_name", "segments_info") if k not in ann]
            if missing:
                raise ValueError(f"{self.json_path}: annotation {ann.get('image_id', ann.get('file_name'))} "
                                 f"lacks {missing}")
            if ann["image_id"] in self.annotations:
                raise ValueError(f"{self.json_path}: image_id {ann['image_id']} has two annotations")
            self.annotations[ann["image_id"]] = ann
            self.by_file[ann["file_name"]] = ann
        self.categories = {c["id"]: c for c in self.data.get("categories", [])}
        self.images = {im["id"]: im for im in self.data.get("images", [])}

    def __len__(self):
        return len(self.annotations)

    def __iter__(self):
        return iter(self.annotations.values())

    def png_path(self, ann):
        return self.png_dir / ann["file_name"]

    def read_ids(self, ann, check=True):
        """HxW uint32 id map of one annotation, checked against its segments_info unless check=False."""
        ids = read_panoptic_png(self.png_path(ann))
        if check:
            check_segments(ids, ann["segments_info"], where=f"{self.png_path(ann)} (image_id {ann['image_id']})",
                           categories=self.categories or None)
        return ids


def load_panoptic(json_path, png_dir=None):
    """Open a COCO panoptic set; the PNG folder defaults to the JSON path without '.json' (panopticapi's rule)."""
    if png_dir is None:
        png_dir = str(json_path)[: -len(".json")] if str(json_path).endswith(".json") else json_path
    return PanopticSet(json_path, png_dir)


def mask_bbox(mask):
    """COCO [x, y, w, h] box of a boolean mask ([0, 0, 0, 0] when empty)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if not len(ys):
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def segments_to_masks(ids, segments_info):
    """Id map + segments_info -> NxHxW bool masks in segments_info order (a segment absent from the map is empty)."""
    ids = np.asarray(ids)
    seg_ids = np.array([s["id"] for s in segments_info], dtype=np.int64)
    if not len(seg_ids):
        return np.zeros((0,) + ids.shape, dtype=bool)
    return ids[None] == seg_ids[:, None, None]


def masks_to_ids(masks, segment_ids):
    """NxHxW non-overlapping bool masks + their ids -> HxW uint32 id map (0 = void where no mask claims a pixel).

    Overlap resolution is a merging policy (crm_d2.panoptic.merge), not a format concern: overlaps are an error.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be NxHxW, got shape {masks.shape}")
    if len(segment_ids) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(segment_ids)} segment ids")
    ids = np.zeros(masks.shape[1:], dtype=np.uint32)
    if not len(masks):
        return ids
    count = masks.sum(axis=0, dtype=np.int32)
    if count.max() > 1:
        y, x = np.argwhere(count > 1)[0]
        hit = [int(segment_ids[i]) for i in np.flatnonzero(masks[:, y, x])]
        raise ValueError(f"masks overlap (segments {hit} at pixel y={y}, x={x}); resolve overlaps before encoding")
    for sid, m in zip(segment_ids, masks):
        if not 0 < int(sid) < MAX_ID:
            raise ValueError(f"segment id {sid} must be in 1..{MAX_ID - 1}")
        ids[m] = sid
    return ids


def _sidecar_path(png_path):
    return png_path.with_name(png_path.stem + ".segments.json")


def write_panoptic_image(png_dir, file_name, image_id, ids, segments_info, sidecar=True):
    """Write one image's panoptic PNG (atomically) and return its annotation dict.

    Segments whose id is absent from `ids` (e.g. a mask refined to nothing) are dropped from segments_info;
    `area` and `bbox` are recomputed from the map; a map id with no segment is an error. With `sidecar`, the
    annotation is also written to `<stem>.segments.json` after the PNG, so its presence marks the image as done
    (resume) and `read_panoptic_sidecar` returns it.
    """
    ids = np.asarray(ids)
    png_path = Path(png_dir) / file_name
    labels, counts = np.unique(ids, return_counts=True)
    areas = dict(zip(labels.tolist(), counts.tolist()))
    kept = []
    for seg in segments_info:
        if seg["id"] == VOID:
            raise ValueError(f"segment id 0 is VOID and cannot be listed in segments_info of {png_path}")
        if seg["id"] not in areas:
            continue
        seg = dict(seg, id=int(seg["id"]), category_id=int(seg["category_id"]), area=int(areas[seg["id"]]),
                   bbox=mask_bbox(ids == seg["id"]))
        seg.setdefault("iscrowd", 0)
        kept.append(seg)
    check_areas(areas, kept, where=str(png_path))  # the map was counted above
    write_png(png_path, id2rgb(ids), rgb=True)
    ann = {"image_id": image_id, "file_name": file_name, "segments_info": kept}
    if sidecar:
        write_json(_sidecar_path(png_path), ann)
    return ann


def read_panoptic_sidecar(png_dir, file_name):
    """The annotation written next to a finished PNG by write_panoptic_image, or None if the image is not done."""
    png_path = Path(png_dir) / file_name
    side = _sidecar_path(png_path)
    if not (side.is_file() and png_path.is_file()):
        return None
    with open(side) as f:
        return json.load(f)


def write_panoptic_json(path, annotations, categories, images=None, info=None):
    """Write a full COCO panoptic predictions/GT JSON atomically (categories as a list or {id: category})."""
    if isinstance(categories, dict):
        categories = list(categories.values())
    data = {"annotations": list(annotations), "categories": list(categories)}
    if images is not None:
        data["images"] = list(images.values()) if isinstance(images, dict) else list(images)
    if info is not None:
        data["info"] = info
    write_json(path, data)
    return data
