"""panopticapi's per-class PQ, restated plainly for the tests (panopticapi is not on PyPI, so CI cannot import it).

A straight loop over each image's (GT id, prediction id) pairs, as panopticapi's `pq_compute_single_core` and
`PQStat.pq_average` write it: IoU > 0.5 matches of one category, the union without the prediction's VOID pixels,
crowd GT never matched and never a false negative, an unmatched prediction lying more than half on VOID plus its
category's crowd region not a false positive, GT areas from the JSON. Independent of crm_d2.panoptic.pq on purpose.
"""
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

OFFSET = 256 * 256 * 256
VOID = 0


def _ids(path):
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def reference_per_class(gt_json, gt_dir, pred_json, pred_dir):
    """{category id: {'pq', 'sq', 'rq'}} in percent for every GT category, 0 where it has no TP+FP+FN."""
    gt = json.loads(Path(gt_json).read_text())
    pred = json.loads(Path(pred_json).read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    stat = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for gt_ann in gt["annotations"]:
        pred_ann = preds[gt_ann["image_id"]]
        gt_ids = _ids(Path(gt_dir) / gt_ann["file_name"])
        pred_ids = _ids(Path(pred_dir) / pred_ann["file_name"])
        gt_segms = {s["id"]: dict(s) for s in gt_ann["segments_info"]}
        pred_segms = {s["id"]: dict(s) for s in pred_ann["segments_info"]}
        labels, counts = np.unique(pred_ids, return_counts=True)
        for label, n in zip(labels, counts):
            if label in pred_segms:
                pred_segms[label]["area"] = int(n)
        pairs = {}
        combined = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
        labels, counts = np.unique(combined, return_counts=True)
        for label, n in zip(labels, counts):
            pairs[(int(label // OFFSET), int(label % OFFSET))] = int(n)
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in pairs.items():
            if g not in gt_segms or p not in pred_segms:
                continue
            if gt_segms[g].get("iscrowd", 0) == 1:
                continue
            if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - pairs.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:
                s = stat[gt_segms[g]["category_id"]]
                s["tp"] += 1
                s["iou"] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd = {}
        for g, info in gt_segms.items():
            if info.get("iscrowd", 0) == 1:
                crowd[info["category_id"]] = g
                continue
            if g not in gt_matched:
                stat[info["category_id"]]["fn"] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            inter = pairs.get((VOID, p), 0)
            if info["category_id"] in crowd:
                inter += pairs.get((crowd[info["category_id"]], p), 0)
            if inter / info["area"] > 0.5:
                continue
            stat[info["category_id"]]["fp"] += 1
    out = {}
    for cid in categories:
        s = stat[cid]
        if s["tp"] + s["fp"] + s["fn"] == 0:
            out[cid] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        out[cid] = {"pq": 100 * s["iou"] / denom, "sq": 100 * s["iou"] / s["tp"] if s["tp"] else 0.0,
                    "rq": 100 * s["tp"] / denom}
    return out
