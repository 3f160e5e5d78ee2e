"""Panoptic quality (PQ/SQ/RQ) with exactly the rules of panopticapi's `pq_compute` (panopticapi is not on PyPI).

Rules: a GT and a predicted segment of the same category match when IoU > 0.5, where the union leaves out the
prediction's pixels on VOID (id 0); crowd GT segments never match; an unmatched prediction is not a false positive
when more than half of it lies on VOID plus the crowd region of its category (panopticapi uses the last crowd
segment of that category in `segments_info`); GT areas come from the JSON `area` field as in panopticapi (the PNG
count when absent), prediction areas from the PNG. PQ = sum IoU / (TP + FP/2 + FN/2) per category, then averaged
over the GT categories with any TP+FP+FN, for all / things / stuff. Each image is one vectorised `np.unique` over
(gt id, pred id) pairs; large sets run on a process pool.

Bad input (a prediction for an image not in the GT, a GT image with no prediction, unknown category ids, PNG and
JSON ids that disagree, PNG sizes that differ) raises a ValueError naming the file and id with `strict=True`
(the default); with `strict=False` the image is left out and listed in `results["skipped"]` with the reason.
"""
import multiprocessing
import os
from collections import defaultdict

import numpy as np

from .coco import VOID, PanopticSet, check_areas, read_panoptic_png

__all__ = ["PQStat", "pq_image", "pq_compute", "format_pq_table"]

OFFSET = 256 ** 3
MIN_IMAGES_FOR_POOL = 64  # below this a process pool costs more than it saves


class PQStat:
    """Per-category IoU sum, TP, FP, FN, added up over images; `average()` gives PQ/SQ/RQ in percent."""

    def __init__(self):
        self.per_cat = defaultdict(lambda: np.zeros(4))  # iou, tp, fp, fn

    def __iadd__(self, other):
        items = other.per_cat.items() if isinstance(other, PQStat) else other.items()
        for cat, v in items:
            self.per_cat[cat] += v
        return self

    def add_image(self, gt_ids, gt_segments, pred_ids, pred_segments, categories=None, where=""):
        self += pq_image(gt_ids, gt_segments, pred_ids, pred_segments, categories, where)
        return self

    def average(self, categories):
        """{'all', 'things', 'stuff', 'per_class'}: PQ/SQ/RQ in percent averaged over categories present.

        `categories` is {id: {'isthing': 0/1, 'name': ...}} (the GT's). A group with no category present gives
        0.0 with n = 0 (panopticapi would divide by zero).
        """
        raw = {}
        for cat, info in categories.items():
            iou, tp, fp, fn = self.per_cat[cat] if cat in self.per_cat else (0.0, 0, 0, 0)
            if tp + fp + fn == 0:
                continue
            denom = tp + 0.5 * fp + 0.5 * fn
            raw[cat] = (iou / denom, iou / tp if tp else 0.0, tp / denom, int(info.get("isthing", 0) == 1))
        out = {}
        for group, want in (("all", None), ("things", 1), ("stuff", 0)):
            rows = [r for r in raw.values() if want is None or r[3] == want]
            n = len(rows)
            out[group] = {k: 100 * float(sum(r[i] for r in rows)) / n if n else 0.0
                          for i, k in enumerate(("pq", "sq", "rq"))}
            out[group]["n"] = n
        per_class = {}
        for cat, (pq, sq, rq, isthing) in raw.items():
            _, tp, fp, fn = self.per_cat[cat]
            per_class[cat] = {"pq": 100 * float(pq), "sq": 100 * float(sq), "rq": 100 * float(rq),
                              "tp": int(tp), "fp": int(fp), "fn": int(fn), "isthing": isthing,
                              "name": categories[cat].get("name", str(cat))}
        out["per_class"] = per_class
        return out


def _segment_arrays(segments):
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    cats = np.array([int(s["category_id"]) for s in segments], dtype=np.int64)
    return ids, cats


def _sum_by(keys, counts):
    """{key: total count} of the (gt, pred) pair counts grouped by one side."""
    uniq, inv = np.unique(keys, return_inverse=True)
    return dict(zip(uniq.tolist(), np.bincount(inv, weights=counts).astype(np.int64).tolist()))


def _index(sorted_ids, order, values):
    """Position in segments_info of each id in `values` (all known to be present)."""
    return order[np.searchsorted(sorted_ids, values)]


def pq_image(gt_ids, gt_segments, pred_ids, pred_segments, categories=None, where=""):
    """PQ statistics of one image: {category_id: array([iou_sum, tp, fp, fn])}.

    gt_ids / pred_ids are HxW integer id maps, *_segments their `segments_info` lists (GT ones need `iscrowd`,
    default 0). Both are checked (ids agree with the map, known categories when `categories` is given).
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    at = f" in {where}" if where else ""
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"prediction size {pred_ids.shape} differs from ground truth size {gt_ids.shape}{at}")
    for name, m in (("ground truth", gt_ids), ("prediction", pred_ids)):
        if m.size and (m.min() < 0 or m.max() >= OFFSET):
            raise ValueError(f"{name} ids must be in 0..{OFFSET - 1}{at}, got {m.min()}..{m.max()}")
    # Confusion between GT and predicted segments: one np.unique over combined ids gives every area too.
    pairs, inter = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    g_id = (pairs // OFFSET).astype(np.int64)
    p_id = (pairs % OFFSET).astype(np.int64)
    inter = inter.astype(np.int64)
    gt_png_area = check_areas(_sum_by(g_id, inter), gt_segments, f"ground truth{at}", categories)
    pred_area_map = check_areas(_sum_by(p_id, inter), pred_segments, f"prediction{at}", categories)

    g_seg, g_cat = _segment_arrays(gt_segments)
    p_seg, p_cat = _segment_arrays(pred_segments)
    g_area = np.array([s.get("area", gt_png_area[int(s["id"])]) for s in gt_segments], dtype=np.int64)
    g_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt_segments], dtype=bool)
    p_area = np.array([pred_area_map[int(i)] for i in p_seg], dtype=np.int64)
    g_order, p_order = np.argsort(g_seg), np.argsort(p_seg)
    g_sorted, p_sorted = g_seg[g_order], p_seg[p_order]

    on_pred = p_id != VOID
    on_gt = g_id != VOID
    void_overlap = np.zeros(len(p_seg), dtype=np.int64)
    sel = on_pred & ~on_gt
    void_overlap[_index(p_sorted, p_order, p_id[sel])] = inter[sel]

    both = on_pred & on_gt
    gi = _index(g_sorted, g_order, g_id[both])
    pi = _index(p_sorted, p_order, p_id[both])
    inter_b = inter[both]

    # Matches: same category, non-crowd GT, IoU > 0.5 (unique by construction, as in panopticapi).
    cand = (g_cat[gi] == p_cat[pi]) & ~g_crowd[gi]
    gi_c, pi_c, in_c = gi[cand], pi[cand], inter_b[cand]
    union = p_area[pi_c] + g_area[gi_c] - in_c - void_overlap[pi_c]
    iou = in_c / union
    hit = iou > 0.5
    gt_matched = np.zeros(len(g_seg), dtype=bool)
    pred_matched = np.zeros(len(p_seg), dtype=bool)
    gt_matched[gi_c[hit]] = True
    pred_matched[pi_c[hit]] = True

    # Unmatched predictions on VOID + their category's crowd region (last crowd segment of it) are ignored.
    crowd_of_cat = {int(g_cat[k]): k for k in np.flatnonzero(g_crowd)}
    ignored_overlap = void_overlap.copy()
    if crowd_of_cat:
        crowd_seg = np.array([crowd_of_cat.get(int(c), -1) for c in p_cat[pi]], dtype=np.int64)
        on_crowd = crowd_seg == gi
        np.add.at(ignored_overlap, pi[on_crowd], inter_b[on_crowd])
    fp = ~pred_matched & ~(ignored_overlap / np.maximum(p_area, 1) > 0.5)
    fn = ~gt_matched & ~g_crowd

    stats = defaultdict(lambda: np.zeros(4))
    for cat, v in zip(g_cat[gi_c[hit]], iou[hit]):
        s = stats[int(cat)]
        s[0] += v
        s[1] += 1
    for cat in p_cat[fp]:
        stats[int(cat)][2] += 1
    for cat in g_cat[fn]:
        stats[int(cat)][3] += 1
    return dict(stats)


def _evaluate_one(task):
    """Worker: read one GT/prediction PNG pair; returns (stats, None) or (None, skip record) when not strict."""
    gt_ann, pred_ann, gt_path, pred_path, categories, strict = task
    where = f"{pred_path} (image_id {gt_ann['image_id']})"
    try:
        gt = read_panoptic_png(gt_path)
        pred = read_panoptic_png(pred_path)
        if gt.shape != pred.shape:
            raise ValueError(f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but ground truth "
                             f"{gt_path} is {gt.shape[1]}x{gt.shape[0]} (image_id {gt_ann['image_id']})")
        return pq_image(gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], categories, where), None
    except (ValueError, FileNotFoundError) as exc:
        if strict:
            raise
        return None, {"image_id": gt_ann["image_id"], "file_name": pred_ann["file_name"], "reason": str(exc)}


def _as_set(obj, png_dir, what):
    if isinstance(obj, PanopticSet):
        return obj
    if png_dir is None:
        raise ValueError(f"{what}: a PNG folder is needed with a JSON path")
    return PanopticSet(obj, png_dir)


def pq_compute(gt_json, gt_dir, pred_json, pred_dir, *, workers=None, strict=True, progress=False):
    """PQ of a COCO panoptic prediction against its GT, as panopticapi's pq_compute computes it.

    gt_json / pred_json: paths (with their PNG folders) or PanopticSet objects (then the dirs may be None).
    Predictions are matched to GT by image_id. workers: process count (default min(cpu, 8); small sets run
    in-process). Returns {'all', 'things', 'stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {cat: {...}},
    'n_images': evaluated images, 'skipped': [{'image_id', 'file_name', 'reason'}]}, pq/sq/rq in percent.
    """
    gt = _as_set(gt_json, gt_dir, "ground truth")
    pred = _as_set(pred_json, pred_dir, "prediction")
    categories = gt.categories
    if not categories:
        raise ValueError(f"{gt.json_path} has no 'categories'; PQ needs them (with 'isthing')")
    skipped = []

    def bad(image_id, file_name, reason):
        if strict:
            raise ValueError(reason)
        skipped.append({"image_id": image_id, "file_name": file_name, "reason": reason})

    for image_id, ann in pred.annotations.items():
        if image_id not in gt.annotations:
            bad(image_id, ann["file_name"],
                f"{pred.json_path}: prediction {ann['file_name']} has image_id {image_id}, which is not in "
                f"the ground truth {gt.json_path}")
    tasks = []
    for image_id, gt_ann in gt.annotations.items():
        pred_ann = pred.annotations.get(image_id)
        if pred_ann is None:
            bad(image_id, gt_ann["file_name"],
                f"{pred.json_path}: no prediction for image_id {image_id} ({gt_ann['file_name']})")
            continue
        tasks.append((gt_ann, pred_ann, str(gt.png_path(gt_ann)), str(pred.png_path(pred_ann)), categories, strict))

    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, int(workers))
    stat = PQStat()
    n_images = 0
    for stats, skip in _map(_evaluate_one, tasks, workers, progress):
        if skip is not None:
            skipped.append(skip)
            continue
        stat += stats
        n_images += 1
    results = stat.average(categories)
    results["n_images"] = n_images
    results["skipped"] = skipped
    return results


def _map(fn, tasks, workers, progress):
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="PQ", unit="img")
    try:
        if workers <= 1 or len(tasks) < MIN_IMAGES_FOR_POOL:
            for t in tasks:
                yield fn(t)
                bar and bar.update()
            return
        # The platform's default start method, as panopticapi under Detectron2 uses it: workers only run numpy
        # and PNG decoding, and fork keeps scripts without a `__main__` guard working.
        ctx = multiprocessing.get_context()
        chunk = max(1, min(32, len(tasks) // (workers * 4)))
        with ctx.Pool(workers) as pool:
            for out in pool.imap(fn, tasks, chunksize=chunk):
                yield out
                bar and bar.update()
    finally:
        if bar is not None:
            bar.close()


def format_pq_table(results_by_name):
    """Text table of PQ/SQ/RQ for All/Things/Stuff, one column group per result (e.g. {'base': r0, 'CRM': r1});
    with exactly two results a third group gives their difference (second minus first)."""
    groups = list(results_by_name.items())
    if not groups:
        raise ValueError("format_pq_table needs at least one result")
    if len(groups) == 2:
        (n0, a), (n1, b) = groups
        groups.append((f"{n1} - {n0}", {g: {k: b[g][k] - a[g][k] for k in ("pq", "sq", "rq")}
                                        for g in ("all", "things", "stuff")}))
    diff_col = len(groups) == 3 and len(results_by_name) == 2
    lines = [f"{'':8s}" + "".join(f" | {name:^20s}" for name, _ in groups) + " |    N",
             f"{'':8s}" + " | {:>6s} {:>6s} {:>6s}".format("PQ", "SQ", "RQ") * len(groups) + " |"]
    lines.append("-" * len(lines[0]))
    for label, key in (("All", "all"), ("Things", "things"), ("Stuff", "stuff")):
        row = f"{label:8s}"
        for i, (_, r) in enumerate(groups):
            fmt = "{:+6.2f}" if diff_col and i == 2 else "{:6.2f}"
            row += " | " + " ".join(fmt.format(r[key][k]) for k in ("pq", "sq", "rq"))
        lines.append(row + f" | {groups[0][1][key]['n']:4d}")
    return "\n".join(lines)
