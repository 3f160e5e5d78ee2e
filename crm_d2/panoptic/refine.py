"""Refine every segment of a panoptic or instance output with CRM at the image's full resolution.

Each segment's binary mask is refined in the Refiner's ROI mode (its box plus a context margin, encoder input
capped at `max_side`), batched across the segments of one image; the refined probabilities are kept as crops and
settled into a non-overlapping result by crm_d2.panoptic.merge. Works on any model's output (no detectron2).
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from crm_d2.panoptic.coco import check_segments
from crm_d2.panoptic.merge import DEFAULT_MERGE, MERGE_RULES, crop_prob, masks_to_id_map, merge_segments

__all__ = ["SegmentRefineOptions", "refine_panoptic", "refine_instances", "refine_segment_probs"]

TARGETS = ("things", "stuff", "both")


@dataclass
class SegmentRefineOptions:
    """Which segments to refine and how.

    targets: "things", "stuff" or "both". min_area: segments smaller than this (pixels) keep their mask (CRM has
    too little to work with and PQ of tiny segments is noise). margin: context around each segment's box, as a
    fraction of the box size on each side (Refiner.refine_batch's `margin`). max_side: encoder input long-side
    cap per ROI (None or 0 = no cap). scales: refinement scales or "auto" (None = the refiner's). batch_size: segments
    per refine_batch call (memory: batch_size full-size float maps). merge: rule name from merge.MERGE_RULES.
    threshold: refined probability above which a segment claims a pixel. band: refinement may only change pixels
    within this distance of the segment's coarse boundary, as a fraction of the image's long side (None = no
    limit). CRM fixes boundaries; far from them a binary refiner trained on whole objects tends to grow a part
    (a coat) into its whole object (the person), which costs PQ for reasons that have nothing to do with the
    boundary (measured on the demo sample: docs/panoptic.md). drop_empty: a segment or instance that refinement
    leaves without a pixel is dropped (default False: it keeps its base mask; CRM refines masks, it does not
    decide which objects exist).
    """

    targets: str = "both"
    min_area: int = 64
    margin: float = 0.5
    max_side: Optional[int] = 1024
    scales: Optional[Union[str, Sequence[float]]] = None
    batch_size: int = 8
    merge: str = DEFAULT_MERGE
    threshold: float = 0.5
    band: Optional[float] = 0.02
    drop_empty: bool = False

    def __post_init__(self):
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {self.merge!r}; choose one of {', '.join(MERGE_RULES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")

    def selects(self, isthing):
        return self.targets == "both" or (self.targets == "things") == bool(isthing)


def _check_image(image_rgb, shape, where):
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image{where} must be HxWx3 RGB, got shape {image_rgb.shape}")
    if image_rgb.shape[:2] != tuple(shape):
        raise ValueError(f"image{where} is {image_rgb.shape[1]}x{image_rgb.shape[0]} (WxH) but its masks are "
                         f"{shape[1]}x{shape[0]}")
    return image_rgb


def limit_to_band(prob, mask, band):
    """Keep `prob` within `band` (fraction of the long side) of the coarse mask's boundary, the coarse mask
    elsewhere. Worked out on the mask's box grown by the band only: at 4K a whole-image morphology per segment
    costs more than the segment's refinement."""
    r = max(1, int(round(band * max(mask.shape))))
    m = mask.astype(np.uint8)
    out = m.astype(prob.dtype)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return out
    y0, y1 = max(0, rows[0] - r - 1), min(m.shape[0], rows[-1] + r + 2)
    x0, x1 = max(0, cols[0] - r - 1), min(m.shape[1], cols[-1] + r + 2)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    box = m[y0:y1, x0:x1]
    near = cv2.dilate(box, kernel) != cv2.erode(box, kernel)
    out[y0:y1, x0:x1] = np.where(near, prob[y0:y1, x0:x1], out[y0:y1, x0:x1])
    return out


def refine_segment_probs(refiner, image_rgb, masks, options):
    """Refine boolean HxW masks (a list; None entries are skipped) with ROI-mode refine_batch, in chunks of
    `options.batch_size`. Returns one SegmentProb per mask (None where skipped), cropped so that memory stays at
    the size of the segments, not N full images."""
    todo = [i for i, m in enumerate(masks) if m is not None]
    out = [None] * len(masks)
    kwargs = dict(roi=True, margin=options.margin, max_side=options.max_side, output="prob")
    if options.scales is not None:
        kwargs["scales"] = options.scales if isinstance(options.scales, str) else tuple(options.scales)
    for start in range(0, len(todo), options.batch_size):
        chunk = todo[start:start + options.batch_size]
        batch = np.stack([masks[i] for i in chunk]).astype(np.uint8)
        probs = np.asarray(refiner.refine_batch(image_rgb, batch, **kwargs))
        if probs.shape != batch.shape:
            raise RuntimeError(f"refiner returned {probs.shape} for {batch.shape} masks")
        for i, p in zip(chunk, probs):
            if options.band is not None:
                p = limit_to_band(p, masks[i], options.band)
            out[i] = crop_prob(p, masks[i])
    return out


def refine_panoptic(refiner, image_rgb, pan_seg, segments_info, options=None, categories=None, where=""):
    """Refine each segment of one panoptic prediction and merge the result.

    pan_seg: HxW int ids (0 = void); segments_info: dicts {id, category_id, isthing, [score]} (`isthing` may come
    from `categories`, {category_id: category}). Returns (new_pan_seg, new_segments_info): a non-overlapping map of
    pan_seg's dtype and the segments that still have pixels (new dicts, `area` updated). `where` names the
    image in error messages.
    """
    options = options or SegmentRefineOptions()
    pan_seg = np.asarray(pan_seg)
    at = f" {where}" if where else ""
    if pan_seg.ndim != 2:
        raise ValueError(f"panoptic map{at} must be HxW ids, got shape {pan_seg.shape}")
    image_rgb = _check_image(image_rgb, pan_seg.shape, at)
    areas = check_segments(pan_seg, segments_info, where=where, categories=categories or None)
    segs = []
    for s in segments_info:
        if "isthing" not in s:
            cat = (categories or {}).get(s["category_id"])
            if cat is None or "isthing" not in cat:
                raise ValueError(f"segment id {s['id']}{at} has no 'isthing' and category {s['category_id']} "
                                 f"does not say it")
            s = dict(s, isthing=int(cat["isthing"]))
        segs.append(s)
    masks = [pan_seg == s["id"] if options.selects(s["isthing"]) and areas[s["id"]] >= options.min_area else None
             for s in segs]
    probs = refine_segment_probs(refiner, image_rgb, masks, options)
    return merge_segments(pan_seg, segs, probs, rule=options.merge, threshold=options.threshold,
                          keep_lost=not options.drop_empty)


def refine_instances(refiner, image_rgb, masks, scores, options=None, non_overlapping=False, select=None, where=""):
    """Refine a list of instance (or entity) masks; returns NxHxW bool in input order.

    Masks smaller than `options.min_area`, or False in `select` (N bools, e.g. low scores), are not refined; a mask
    refined to nothing keeps its base mask (with `options.drop_empty` it comes back empty, for the caller to
    drop). Instances may overlap (Mask R-CNN style) and are refined independently; with `non_overlapping`
    (entity outputs) the input must not overlap, and the result is merged like panoptic things (scores order
    ties), so it does not overlap either. `options.targets` does not apply (all are things).
    """
    options = options or SegmentRefineOptions()
    at = f" {where}" if where else ""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"instance masks{at} must be NxHxW, got shape {masks.shape}")
    masks = masks > 0.5 if masks.dtype.kind == "f" else masks.astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} instance masks but {len(scores)} scores{at}")
    if not len(masks):
        return masks.copy()
    image_rgb = _check_image(image_rgb, masks.shape[1:], at)
    id_map = masks_to_id_map(masks, where=f"instance list{at}") if non_overlapping else None
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    select = np.ones(len(masks), bool) if select is None else np.asarray(select, bool).reshape(-1)
    if len(select) != len(masks):
        raise ValueError(f"{len(masks)} instance masks but {len(select)} entries in select{at}")
    todo = [m if a >= max(options.min_area, 1) and sel else None for m, a, sel in zip(masks, areas, select)]
    probs = refine_segment_probs(refiner, image_rgb, todo, options)
    if not non_overlapping:
        out = masks.copy()
        for i, p in enumerate(probs):
            if p is not None:
                (y0, x0, y1, x1), crop = p
                claim = crop > options.threshold
                if claim.any() or options.drop_empty:
                    out[i] = False
                    out[i, y0:y1, x0:x1] = claim
        return out
    segs = [{"id": i + 1, "isthing": 1, "score": float(s)} for i, s in enumerate(scores)]
    merged, _ = merge_segments(id_map, segs, probs, rule=options.merge, threshold=options.threshold,
                               keep_lost=not options.drop_empty)
    return merged[None] == np.arange(1, len(masks) + 1)[:, None, None]
