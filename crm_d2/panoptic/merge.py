"""Merge refined per-segment probabilities back into one non-overlapping panoptic id map.

Each segment is refined on its own, so refined masks overlap in some places and leave gaps in others. How those
pixels are settled decides whether refinement can lower PQ for reasons that have nothing to do with mask quality
(a thing swallowed by a confident stuff region, a gap turned into void, a segment dropped by accident). The rule
(measured on generated scenes, numbers in docs/panoptic.md):

1. A segment *claims* a pixel where its refined probability is above `threshold` (0.5). A segment that was not
   refined (filtered by target type or minimum area) claims its original mask with probability 1.
2. Where several segments claim a pixel, the winner follows the rule:
   - "hybrid" (default): things beat stuff, as in the base model's merge (Detectron2 / PanopticFCN paste things
     first and fill stuff into what is left); among things, and among stuff, the higher refined probability wins;
     ties go to the earlier segment (things by descending score, else list order).
   - "paste": the base model's own merge replayed on refined masks: things in score order, each keeps the pixels
     no earlier thing took; stuff after all things, by probability.
   - "prob": the highest refined probability wins, things and stuff alike.
3. A pixel no segment claims keeps its original segment (or stays void where it was void): refinement only moves
   pixels between segments when some refined mask asks for them ("-void" and "-nearest" variants of each rule give
   such pixels to void or to the nearest claimed segment instead; they were measured and are worse).
4. Refinement does not decide which objects exist: a segment left with no pixel (refined to nothing, or all its
   pixels taken by others) gets its original pixels back (`keep_lost`; False removes such segments). `area` (and
   `bbox` if present) are recomputed.
"""
from collections import namedtuple

import cv2
import numpy as np

__all__ = ["SegmentProb", "MERGE_RULES", "DEFAULT_MERGE", "merge_segments", "segment_order", "crop_prob",
           "masks_to_id_map"]

#: Refined probability of one segment: `prob` (float, values in [0, 1]) covers rows y0:y1 and columns x0:x1 of
#: the image; outside the box the probability is 0. Keeps memory at O(box) per segment on large images.
SegmentProb = namedtuple("SegmentProb", ["box", "prob"])

_PRIORITIES = ("hybrid", "paste", "prob")
_UNCLAIMED = ("keep", "void", "nearest")
MERGE_RULES = tuple(p if u == "keep" else f"{p}-{u}" for p in _PRIORITIES for u in _UNCLAIMED)
DEFAULT_MERGE = "hybrid"


def _parse_rule(rule):
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
    priority, _, unclaimed = rule.partition("-")
    return priority, unclaimed or "keep"


def crop_prob(prob, mask=None, eps=1e-3):
    """Full-image probability (HxW) -> SegmentProb cropped to where it is above `eps` (or `mask` is set)."""
    prob = np.asarray(prob)
    support = prob > eps
    if mask is not None:
        support |= np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(support.any(axis=1))
    if not len(rows):
        return SegmentProb((0, 0, 0, 0), np.zeros((0, 0), np.float32))
    cols = np.flatnonzero(support.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return SegmentProb((y0, x0, y1, x1), np.ascontiguousarray(prob[y0:y1, x0:x1], dtype=np.float32))


def segment_order(segments_info):
    """Indices of segments in paste order: things by descending score (list order when any score is missing),
    then stuff in list order. Earlier segments win ties in every rule."""
    things = [i for i, s in enumerate(segments_info) if s["isthing"]]
    stuff = [i for i, s in enumerate(segments_info) if not s["isthing"]]
    if things and all("score" in segments_info[i] for i in things):
        things.sort(key=lambda i: -float(segments_info[i]["score"]))  # stable: equal scores keep list order
    return things + stuff


def _as_segment_prob(p, shape, original, index):
    """Normalise one entry of `probs` (None, HxW array or SegmentProb) to a SegmentProb; `original(index)` gives
    the SegmentProb of the segment's original mask (used when it was not refined)."""
    if p is None:  # not refined: the original mask is a certain claim
        return original(index)
    if isinstance(p, SegmentProb):
        (y0, x0, y1, x1), crop = p
        if not (0 <= y0 <= y1 <= shape[0] and 0 <= x0 <= x1 <= shape[1]) or crop.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"segment #{index}: probability box {p.box} with crop {crop.shape} does not fit an "
                             f"image of {shape[0]}x{shape[1]}")
        return p
    p = np.asarray(p)
    if p.shape != tuple(shape):
        raise ValueError(f"segment #{index}: probability map is {p.shape}, the id map is {tuple(shape)}")
    if p.dtype == bool:
        p = p.astype(np.float32)
    return crop_prob(p)


def merge_segments(pan_seg, segments_info, probs, rule=DEFAULT_MERGE, threshold=0.5, keep_lost=True):
    """Settle refined per-segment probabilities into one id map (see the module docstring for the rule).

    pan_seg: HxW integer id map (0 = void) the probabilities were computed from; segments_info: dicts with at least
    `id` and `isthing` (`score` orders things); probs: one entry per segment, None (not refined), an HxW
    probability or a SegmentProb. Returns (new id map of pan_seg's dtype, kept segments as new dicts with `area`).
    """
    priority, unclaimed = _parse_rule(rule)
    pan_seg = np.asarray(pan_seg)
    if pan_seg.ndim != 2:
        raise ValueError(f"pan_seg must be an HxW id map, got shape {pan_seg.shape}")
    if len(probs) != len(segments_info):
        raise ValueError(f"{len(probs)} probability maps for {len(segments_info)} segments")
    for s in segments_info:
        if "isthing" not in s:
            raise ValueError(f"segment id {s.get('id')} lacks 'isthing' (take it from the category)")
    h, w = pan_seg.shape
    order = segment_order(segments_info)
    rank = np.empty(len(order), np.float64)
    rank[order] = np.arange(len(order))

    seg_ids = np.array([s["id"] for s in segments_info], dtype=np.int64)
    boxes = _boxes(pan_seg, seg_ids) if any(p is None for p in probs) else None

    def original(j):
        y0, x0, y1, x1 = boxes[:, j]
        if y1 < y0:
            return SegmentProb((0, 0, 0, 0), np.zeros((0, 0), np.float32))
        return SegmentProb((y0, x0, y1 + 1, x1 + 1), (pan_seg[y0:y1 + 1, x0:x1 + 1] == seg_ids[j]).astype(np.float32))

    best = np.full((h, w), -1.0, np.float32)  # key of the current winner; -1 = unclaimed
    owner = np.full((h, w), -1, np.int32)  # index into segments_info
    n = max(len(order), 1)
    for i in order:
        seg = segments_info[i]
        (y0, x0, y1, x1), p = _as_segment_prob(probs[i], (h, w), original, i)
        if p.size == 0:
            continue
        p = p.astype(np.float32, copy=False)
        claim = p > threshold
        if priority == "prob":
            key = p
        elif seg["isthing"]:
            # things live in [2, 3]: always above stuff; paste ranks them by order, hybrid by probability
            key = np.full_like(p, 3.0 - rank[i] / n) if priority == "paste" else p + 2.0
        else:
            key = p
        b = best[y0:y1, x0:x1]
        win = claim & (key > b)
        b[win] = key[win]
        owner[y0:y1, x0:x1][win] = i

    free = owner < 0
    if unclaimed != "void" and free.any():
        fill = free & (pan_seg != 0)  # original void stays void
        orig = _index_of(seg_ids, pan_seg[fill])
        fill[fill] = orig >= 0  # ids without a segment (not expected) count as void
        orig = orig[orig >= 0]
        if unclaimed == "nearest" and fill.any() and not free.all():
            # nearest claimed pixel (Voronoi fill): vacated pixels go to the neighbour that now borders them
            _, labels = cv2.distanceTransformWithLabels(free.astype(np.uint8), cv2.DIST_L2, 5,
                                                        labelType=cv2.DIST_LABEL_PIXEL)
            lut = np.full(labels.max() + 1, -1, np.int32)
            lut[labels[~free]] = owner[~free]
            owner[fill] = lut[labels[fill]]
        else:
            owner[fill] = orig

    if keep_lost:
        # Restoring one segment can empty another (its pixels were won over the lost one's): repeat until none is
        # lost. Original masks do not overlap, so every segment ends up with at least its restored pixels.
        present = _index_of(seg_ids, pan_seg[pan_seg != 0])
        had_pixels = np.bincount(present[present >= 0], minlength=len(segments_info)) > 0
        while True:
            lost = (np.bincount(owner[owner >= 0], minlength=len(segments_info)) == 0) & had_pixels
            if not lost.any():
                break
            for j in np.flatnonzero(lost):
                owner[pan_seg == seg_ids[j]] = j
    out = np.zeros((h, w), dtype=pan_seg.dtype)
    claimed = owner >= 0
    out[claimed] = seg_ids[owner[claimed]].astype(pan_seg.dtype)
    areas = np.bincount(owner[claimed], minlength=len(segments_info))
    boxes = _boxes(owner, np.arange(len(segments_info))) if any("bbox" in s for s in segments_info) else None
    kept = []
    for j, s in enumerate(segments_info):
        if areas[j] == 0:
            continue
        s = dict(s, area=int(areas[j]))
        if "bbox" in s:
            y0, x0, y1, x1 = (int(v) for v in boxes[:, j])
            s["bbox"] = [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        kept.append(s)
    return out, kept


def _boxes(label_map, labels):
    """Inclusive boxes (4 x N: y0, x0, y1, x1) of each of `labels` in `label_map`, in one pass (y1 = -1: absent)."""
    n = len(labels)
    box = np.array([np.full(n, label_map.shape[0]), np.full(n, label_map.shape[1]), np.full(n, -1), np.full(n, -1)])
    ys, xs = np.nonzero(label_map != 0) if labels.min(initial=1) > 0 else np.indices(label_map.shape).reshape(2, -1)
    j = _index_of(labels, label_map[ys, xs])
    keep = j >= 0
    ys, xs, j = ys[keep], xs[keep], j[keep]
    np.minimum.at(box[0], j, ys)
    np.minimum.at(box[1], j, xs)
    np.maximum.at(box[2], j, ys)
    np.maximum.at(box[3], j, xs)
    return box


def _index_of(ids, values):
    """Position in `ids` (any order) of each of `values`, -1 where absent."""
    order = np.argsort(ids)
    ids = ids[order]
    if not len(ids):
        return np.full(values.shape, -1, np.int64)
    pos = np.clip(np.searchsorted(ids, values), 0, len(ids) - 1)
    return np.where(ids[pos] == values, order[pos], -1)


def masks_to_id_map(masks, where="instance list"):
    """NxHxW non-overlapping masks -> HxW int32 map of 1-based mask indices (0 = no mask).

    Overlapping masks are an error (entity outputs are non-overlapping); the message names the two masks.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    ids = np.zeros(masks.shape[1:], np.int32)
    for i, m in enumerate(masks):
        clash = m & (ids > 0)
        if clash.any():
            j = int(ids[clash][0]) - 1
            n = int((m & (ids == j + 1)).sum())
            raise ValueError(f"masks #{j} and #{i} of the {where} overlap ({n} pixels); "
                             f"non-overlapping refinement needs non-overlapping input")
        ids[m] = i + 1
    return ids
