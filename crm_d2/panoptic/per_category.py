"""Per-category numbers with and without CRM, and which categories refinement helped and hurt most.

One home for the D2 evaluators, `crm-d2 panoptic` / `instances` and `crm-d2 demo`: every path turns its base and
refined evaluation into the same `{category name: {"base": {...}, "crm": {...}}}` table (percent, as the summary
tables), which goes under `per_category` in the JSON each path writes, and prints the same top/bottom list.

- Panoptic: PQ, SQ, RQ and TP/FP/FN per category, exactly panopticapi's `per_class_results` (crm_d2.panoptic.pq
  computes them; panopticapi reports 0 for a category with no TP+FP+FN, and so does a side where it is absent
  while the other side has it). `segments` is TP + FP: the predicted segments of that category that PQ counts.
- Instances: mask AP, AP50, AP75 per category from pycocotools' accumulated precision (`precision[:, :, k, 0,
  -1]`, the mean over the entries that are not -1, as COCOeval's summary does it); for class-agnostic entity AP
  one row per object size (small, medium, large) instead: `precision[:, :, 0, a, -1]`.
"""
import math

__all__ = ["SIZE_ROWS", "panoptic_per_category", "panoptic_rows", "ap_rows",
           "combine", "ranking_metric", "biggest_changes", "format_changes"]

SIZE_ROWS = ("small", "medium", "large")  # COCOeval's area ranges 1..3 (0 is "all")
TOP = 10


def _unique_names(named):
    """[(id, name)] -> {id: name}; a name two categories share gets its id appended, so rows never collide."""
    names = [str(name) for _, name in named]
    return {cid: (name if names.count(name) == 1 else f"{name} ({cid})") for (cid, _), name in zip(named, names)}


def panoptic_rows(pq_results):
    """pq_compute's `per_class` as {category id: {pq, sq, rq, tp, fp, fn, segments}} for every GT category that
    PQ saw (TP+FP+FN > 0); pq/sq/rq in percent."""
    rows = {}
    for cid, r in pq_results["per_class"].items():
        rows[cid] = {"pq": r["pq"], "sq": r["sq"], "rq": r["rq"], "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
                     "segments": r["tp"] + r["fp"]}
    return rows


def _mean_valid(values):
    """COCOeval's summary rule: the mean over precision entries that are not -1 (no GT there); NaN if none."""
    valid = values[values > -1]
    return 100.0 * float(valid.mean()) if valid.size else math.nan


def ap_rows(cocoeval, class_agnostic=False):
    """Per-category (or, class-agnostic, per-size) AP/AP50/AP75 in percent of an accumulated COCOeval, keyed by
    category id (or by size name). Thresholds 0.5 and 0.75 are rows 0 and 5 of COCO's iouThrs."""
    precision = cocoeval.eval["precision"]  # [T thresholds, R recalls, K categories, A areas, M max dets]
    thresholds = list(cocoeval.params.iouThrs)
    t50, t75 = thresholds.index(0.5), [round(t, 2) for t in thresholds].index(0.75)

    def numbers(p):  # p: [T, R]
        return {"AP": _mean_valid(p), "AP50": _mean_valid(p[t50]), "AP75": _mean_valid(p[t75])}

    if class_agnostic:
        return {size: numbers(precision[:, :, 0, a, -1]) for a, size in enumerate(SIZE_ROWS, start=1)}
    return {cid: numbers(precision[:, :, k, 0, -1]) for k, cid in enumerate(cocoeval.params.catIds)}


def combine(base_rows, crm_rows, names=None):
    """{category name: {"base": row, "crm": row}} in category id order. A category on one side only gets zeros on
    the other (panopticapi's value for a category it did not see). `names`: {id: name}; ids without a name
    (or without an entry) fall back to the id itself."""
    names = names or {}
    keys = sorted(set(base_rows) | set(crm_rows), key=lambda k: (isinstance(k, str), k))
    if all(isinstance(k, str) for k in keys):  # size rows keep their natural order
        keys = [k for k in SIZE_ROWS if k in keys] + [k for k in keys if k not in SIZE_ROWS]
    labels = _unique_names([(k, names.get(k) or k) for k in keys])
    out = {}
    for k in keys:
        some = base_rows.get(k) or crm_rows.get(k)
        zero = {m: 0 if isinstance(v, int) else 0.0 for m, v in some.items()}
        out[labels[k]] = {"base": base_rows.get(k, zero), "crm": crm_rows.get(k, zero)}
    return out


def panoptic_per_category(base_pq, crm_pq):
    """The per-category table of two pq_compute results (base, refined) on the same GT: what every panoptic
    path (D2 evaluator, `crm-d2 panoptic`, the demo) writes under `per_category`."""
    names = {cid: r.get("name") for res in (base_pq, crm_pq) for cid, r in res["per_class"].items()}
    return combine(panoptic_rows(base_pq), panoptic_rows(crm_pq), names)


def ranking_metric(per_category):
    """The metric the top/bottom lists rank by: PQ for panoptic tables, AP otherwise."""
    for row in per_category.values():
        return "pq" if "pq" in row["base"] else "AP"
    return "pq"


def biggest_changes(per_category, metric=None, n=TOP):
    """(gained, lost): up to n categories whose `metric` rose most and n whose fell most, each as
    (name, base, crm, difference); categories that did not change, or have no number (NaN), are in neither."""
    metric = metric or ranking_metric(per_category)
    diffs = []
    for name, row in per_category.items():
        b, c = row["base"].get(metric), row["crm"].get(metric)
        if b is None or c is None or math.isnan(b) or math.isnan(c) or c == b:
            continue
        diffs.append((name, b, c, c - b))
    gained = sorted((d for d in diffs if d[3] > 0), key=lambda d: -d[3])[:n]
    lost = sorted((d for d in diffs if d[3] < 0), key=lambda d: d[3])[:n]
    return gained, lost


def format_changes(per_category, metric=None, n=TOP):
    """The text printed after the with/without table: the n categories that gained most and the n that lost
    most, by `metric` (PQ or AP by default)."""
    metric = metric or ranking_metric(per_category)
    gained, lost = biggest_changes(per_category, metric, n)
    label = metric.upper() if metric.islower() else metric
    lines = []
    for title, rows in ((f"gained most {label} with CRM", gained), (f"lost most {label} with CRM", lost)):
        lines.append(f"{len(rows)} {'category' if len(rows) == 1 else 'categories'} that {title}:")
        width = max([len(r[0]) for r in rows] + [8])
        for name, b, c, d in rows:
            lines.append(f"  {name:{width}s} {b:6.2f} -> {c:6.2f}  ({d:+.2f})")
        if not rows:
            lines.append("  (none)")
    return "\n".join(lines)
