"""COCO mask AP with stock pycocotools, including class-agnostic entity AP built from a panoptic GT.

Entity segmentation scores every non-crowd panoptic segment (thing or stuff) as one GT instance of a single
category 'entity' (crowd segments stay as iscrowd=1 regions); the Entity repository needs a patched pycocotools
for this, we only build the GT accordingly and run the stock COCOeval (iouType 'segm'). Numbers are in percent,
-1 ("no GT of that size") becomes NaN, as Detectron2 prints them.
"""
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import PanopticSet, mask_bbox, segments_to_masks

__all__ = ["AP_KEYS", "encode_mask", "encode_results", "entity_gt_from_panoptic", "evaluate_masks",
           "format_ap_table", "rle_bytes"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ENTITY_CATEGORY = {"id": 1, "name": "entity", "supercategory": "entity"}


def encode_mask(mask):
    """HxW bool mask -> COCO RLE dict with a str `counts` (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_bytes(rle):
    """An RLE dict as pycocotools wants it: `counts` as bytes (JSON gives str, as `encode_mask` writes it)."""
    if isinstance(rle.get("counts"), str):
        return dict(rle, counts=rle["counts"].encode("ascii"))
    return rle


def compressed_rle(seg, height, width, where):
    """A result's segmentation (compressed or uncompressed RLE, or polygons) as a JSON-ready compressed RLE."""
    if isinstance(seg, list):
        seg = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        seg = mask_utils.frPyObjects(seg, height, width)  # keeps the RLE's own size, checked below
    if not isinstance(seg, dict) or list(seg.get("size", [])) != [height, width]:
        raise ValueError(f"{where}: segmentation must be an RLE of size [{height}, {width}] "
                         f"(the image), got {seg.get('size') if isinstance(seg, dict) else type(seg).__name__}")
    counts = seg["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_results(image_id, masks, scores, category_ids=1):
    """COCO results entries for one image's NxHxW masks (category_ids: one id for all, or one per mask)."""
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"image_id {image_id}: need NxHxW masks and one score each, "
                         f"got masks {masks.shape} and {len(scores)} scores")
    cats = np.broadcast_to(np.asarray(category_ids), (len(masks),))
    return [{"image_id": image_id, "category_id": int(c), "segmentation": encode_mask(m), "score": float(s)}
            for m, s, c in zip(masks, scores, cats)]


def entity_gt_from_panoptic(panoptic, things_only=False):
    """COCO instances GT dict with one category 'entity' from a PanopticSet (or (json_path, png_dir) pair).

    Every segment becomes one annotation (RLE, area, bbox); crowd segments keep iscrowd=1 so that detections on
    them are ignored, as COCO does. things_only keeps only `isthing` categories (class-agnostic instance AP).
    """
    if not isinstance(panoptic, PanopticSet):
        panoptic = PanopticSet(*panoptic)
    images, anns = [], []
    for ann in panoptic:
        ids = panoptic.read_ids(ann)
        h, w = ids.shape
        info = panoptic.images.get(ann["image_id"], {})
        images.append({"id": ann["image_id"], "width": w, "height": h,
                       "file_name": info.get("file_name", Path(ann["file_name"]).with_suffix(".jpg").name)})
        segs = ann["segments_info"]
        if things_only:
            segs = [s for s in segs if panoptic.categories.get(s["category_id"], {}).get("isthing", 0) == 1]
        for seg, m in zip(segs, segments_to_masks(ids, segs)):
            anns.append({"id": len(anns) + 1, "image_id": ann["image_id"], "category_id": ENTITY_CATEGORY["id"],
                         "segmentation": encode_mask(m), "area": int(m.sum()), "bbox": mask_bbox(m),
                         "iscrowd": int(seg.get("iscrowd", 0))})
    return {"images": images, "annotations": anns, "categories": [dict(ENTITY_CATEGORY)]}


def _load_gt(gt):
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        if not Path(gt).is_file():
            raise FileNotFoundError(f"COCO GT JSON not found: {gt}")
        with open(gt) as f:
            gt = json.load(f)
    if not isinstance(gt, dict) or "annotations" not in gt or "images" not in gt:
        raise ValueError("GT must be a COCO instances dict/JSON with 'images' and 'annotations'")
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_results(coco, results, class_agnostic):
    if not results:
        raise ValueError("empty prediction list: there are no instances to evaluate")
    cats = set(coco.getCatIds())
    for k, r in enumerate(results):
        missing = [key for key in ("image_id", "category_id", "segmentation", "score") if key not in r]
        if missing:
            raise ValueError(f"result {k} (image_id {r.get('image_id')}) lacks {missing}")
        img = coco.imgs.get(r["image_id"])
        if img is None:
            raise ValueError(f"result {k}: image_id {r['image_id']} is not in the ground truth")
        if not class_agnostic and r["category_id"] not in cats:
            raise ValueError(f"result {k} (image_id {r['image_id']}): unknown category_id {r['category_id']}")
        size = list(r["segmentation"].get("size", [])) if isinstance(r["segmentation"], dict) else None
        if size != [img["height"], img["width"]]:
            raise ValueError(f"result {k} (image_id {r['image_id']}): segmentation must be an RLE of size "
                             f"[{img['height']}, {img['width']}], got {size}")


def evaluate_masks(gt, results, class_agnostic=False, max_dets=100, quiet=True, per_category=False):
    """Mask AP of COCO results (RLE segmentations) with stock pycocotools: {'AP', 'AP50', ...} in percent.

    gt: a COCO instances dict, JSON path or COCO object (entity_gt_from_panoptic gives the entity one).
    class_agnostic: all GT and results are scored as one category (entity AP).
    per_category: also return the same evaluation's per-category rows (per size when class-agnostic), as
    (summary, {category id or size: {'AP', 'AP50', 'AP75'}}, {category id: name}): crm_d2.panoptic.per_category.
    """
    coco = _load_gt(gt)
    _check_results(coco, results, class_agnostic)
    results = [dict(r) for r in results]
    for r in results:
        r["segmentation"] = rle_bytes(r["segmentation"])
    if class_agnostic:
        data = dict(coco.dataset, categories=[dict(ENTITY_CATEGORY)],
                    annotations=[dict(a, category_id=1) for a in coco.dataset["annotations"]])
        coco = _load_gt(data)
        for r in results:
            r["category_id"] = 1
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, iouType="segm")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = {k: float(v * 100) if v >= 0 else math.nan for k, v in zip(AP_KEYS, ev.stats[:6])}
    if not per_category:
        return summary
    from .per_category import ap_rows

    names = {cid: cat.get("name") for cid, cat in coco.cats.items()}
    return summary, ap_rows(ev, class_agnostic), names


def format_ap_table(results_by_name):
    """Text table of mask AP, one row per result (e.g. {'base': r0, 'CRM': r1}); with two, a difference row."""
    rows = list(results_by_name.items())
    if not rows:
        raise ValueError("format_ap_table needs at least one result")
    if len(rows) == 2:
        (n0, a), (n1, b) = rows
        rows.append((f"{n1} - {n0}", {k: b[k] - a[k] for k in AP_KEYS}))
    width = max(8, max(len(n) for n, _ in rows))
    lines = [f"{'':{width}s} |" + "".join(f"{k:>7s}" for k in AP_KEYS)]
    lines.append("-" * len(lines[0]))
    for i, (name, r) in enumerate(rows):
        fmt = "{:+7.2f}" if len(results_by_name) == 2 and i == 2 else "{:7.2f}"
        lines.append(f"{name:{width}s} |" + "".join(fmt.format(r[k]) for k in AP_KEYS))
    return "\n".join(lines)
