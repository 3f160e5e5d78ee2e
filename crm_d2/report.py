"""The report of a with/without-CRM evaluation: one static page (`DIR/index.html`) to look at what refinement did.

The page holds the with/without table, the per-category table (sortable by any column, a few lines of inline
JavaScript) and a gallery of the segments that refinement changed most, by pixels moved: a crop of the photo
around each with the base, the refined and (where one matches) the ground-truth boundary, and IoU and mBA against
that GT before and after. It opens from the file system: no server, nothing fetched (no CDN, no web fonts).

The gallery keeps only the `GALLERY_SIZE` largest changes while it reads the images (a heap; a crop is made only
for a segment that enters it), so a report of 5,000 images is a page and 24 PNGs. A report folder remembers which
run wrote it (`report.json`): another run's report is refused unless `overwrite`, and a rerun deletes the
pictures of the report it replaces, so that a folder never mixes two reports.
"""
import heapq
import html
import json
import math
import shutil
from pathlib import Path

import numpy as np

from .io import atomic_write, read_image, write_image, write_json
from .metrics import boundary_accuracy, boundary_bands, iou, mba_radii
from .pictures import outlined_crop

__all__ = ["GALLERY_SIZE", "Gallery", "report_source", "segment_entry", "panoptic_gallery", "instances_gallery",
           "check_report_dir", "write_report", "comparison_groups", "pq_comparison", "ap_comparison",
           "panoptic_report", "instances_report"]

GALLERY_SIZE = 24
CROP_SIDE = 256  # px, long side of a gallery picture (four to a row on a laptop screen)
CROP_MARGIN = 0.15  # context around a segment, fraction of its box's long side
COLOURS = {"base": (255, 64, 64), "crm": (40, 200, 255), "gt": (255, 220, 0)}  # RGB, drawn gt, base, crm
LABELS = {"base": "without CRM", "crm": "with CRM", "gt": "ground truth"}
RECORD = "report.json"
GALLERY_DIR = "gallery"


# ----------------------------------------------------------------------------------------- the report folder
def report_source(command, out_dir):
    """What names a run for its report folder (`check_report_dir`): the command and its output folder."""
    return {"command": command, "output": str(Path(out_dir).resolve())}


def check_report_dir(report_dir, source, overwrite=False):
    """Refuse a report folder that holds something else than this run's report, unless `overwrite`.

    `source` names the run (command and output folder): a rerun of the same run replaces its own report, another
    run's report (or a folder of other files) is refused with a one-line error saying what to do."""
    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise ValueError(f"--report {report_dir} is a file, not a folder")
    if overwrite or not report_dir.is_dir() or not any(report_dir.iterdir()):
        return
    record = _read_record(report_dir)
    if record is None:
        raise ValueError(f"--report {report_dir} holds files that are not a crm-d2 report; use an empty or new "
                         f"folder, or pass --overwrite to write the report there anyway")
    if record.get("source") != json.loads(json.dumps(source)):
        raise ValueError(f"--report {report_dir} holds the report of another run ({_describe(record.get('source'))});"
                         f" pass --overwrite to replace it, or use another --report folder")


def _read_record(report_dir):
    try:
        with open(Path(report_dir) / RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(source):
    if isinstance(source, dict):
        return ", ".join(f"{k} {v}" for k, v in source.items())
    return str(source)


def _clear_previous(report_dir):
    """Delete what the report this one replaces wrote (its listed pictures, page and record), nothing else."""
    record = _read_record(report_dir) or {}
    for name in record.get("files", []):
        path = Path(report_dir) / name
        if path.is_file() and path.resolve().parent.is_relative_to(Path(report_dir).resolve()):
            path.unlink()
    gallery = Path(report_dir) / GALLERY_DIR
    if gallery.is_dir() and not any(gallery.iterdir()):
        shutil.rmtree(gallery)


# ----------------------------------------------------------------------------------------- the gallery
class Gallery:
    """The `size` segments that refinement changed most, by pixels moved, kept while the images are read.

    `offer(moved, make)` calls `make()` (which crops and scores the segment) only when `moved` would enter the
    current top `size`, so that a large set costs a crop per newcomer, not per segment."""

    def __init__(self, size=GALLERY_SIZE):
        if size < 0:
            raise ValueError(f"gallery size must be 0 or more, got {size}")
        self.size = int(size)
        self._heap = []  # (moved, order, entry): the smallest change on top, the first offered kept on ties
        self._order = 0

    def would_take(self, moved):
        return moved > 0 and self.size > 0 and (len(self._heap) < self.size or moved > self._heap[0][0])

    def offer(self, moved, make):
        if not self.would_take(moved):
            return False
        self._order -= 1
        item = (int(moved), self._order, make())
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        else:
            heapq.heapreplace(self._heap, item)
        return True

    def entries(self):
        """The kept segments, largest change first."""
        return [e for _, _, e in sorted(self._heap, key=lambda t: (-t[0], -t[1]))]

    def __len__(self):
        return len(self._heap)


def _box(masks, shape):
    """(x0, y0, x1, y1) around every mask, widened by CROP_MARGIN of its long side and by more than the largest
    mBA radius (so that the crop holds the GT's whole band), clipped to the photo."""
    h, w = shape
    rows = np.zeros(h, bool)
    cols = np.zeros(w, bool)
    for m in masks:
        rows |= m.any(axis=1)
        cols |= m.any(axis=0)
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    if not len(ys):
        raise ValueError("a gallery segment with no pixel on either side")
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    pad = max(int(math.ceil(CROP_MARGIN * max(y1 - y0, x1 - x0))), max(mba_radii(h, w)) + 2, 8)
    return max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)


def _pct(x):
    return None if x is None or math.isnan(x) else 100.0 * float(x)


def segment_entry(image, base, crm, gt=None, category="", where=""):
    """One gallery entry: the outlined crop (RGB array) and the numbers of one segment.

    base / crm / gt: HxW bool masks of the photo (gt None when no GT segment matches). IoU and mBA against the GT
    are computed in the crop with the photo's mBA radii (crm_d2.metrics), which gives the whole photo's numbers.
    """
    image_size = base.shape
    masks = [m for m in (base, crm, gt) if m is not None]
    x0, y0, x1, y1 = _box(masks, image_size)
    cut = {k: (m[y0:y1, x0:x1] if m is not None else None) for k, m in (("base", base), ("crm", crm), ("gt", gt))}
    entry = {"category": str(category), "where": str(where), "moved": int(np.count_nonzero(base != crm)),
             "area_base": int(base.sum()), "area_crm": int(crm.sum()), "box": [int(x0), int(y0), int(x1), int(y1)]}
    if gt is not None:
        g = cut["gt"]
        bands = boundary_bands(g, image_size)  # the costly part of mBA: once for both sides
        for side in ("base", "crm"):
            m = cut[side]
            entry[f"iou_{side}"] = _pct(iou(m, g))  # None where both are empty
            entry[f"mba_{side}"] = _pct(boundary_accuracy(m, g, bands=bands))
    outlines = [(cut[k], COLOURS[k]) for k in ("gt", "base", "crm") if cut[k] is not None]
    entry["picture"] = outlined_crop(image[y0:y1, x0:x1], (0, 0, x1 - x0, y1 - y0), outlines, CROP_SIDE)
    return entry


class _Photo:
    """A photo read on first use only (most images give no gallery entry once the gallery is full)."""

    def __init__(self, path):
        self.path, self._image = path, None

    def __call__(self):
        if self._image is None:
            self._image = read_image(self.path)
        return self._image


def _pairs_by_overlap(a_ids, b_ids, a_segments, b_segments):
    """{a segment id: (b segment id or None, intersection)}: each a segment's b segment of the same category with
    the largest overlap (refinement keeps a segment's category, not necessarily its id)."""
    from .panoptic.pq import OFFSET

    pairs, counts = np.unique(a_ids.astype(np.uint64) * OFFSET + b_ids.astype(np.uint64), return_counts=True)
    b_cat = {int(s["id"]): int(s["category_id"]) for s in b_segments}
    best = {}
    for pair, n in zip(pairs.tolist(), counts.tolist()):
        a, b = divmod(pair, OFFSET)
        best.setdefault(a, []).append((b, n))
    out = {}
    for s in a_segments:
        cands = [(n, b) for b, n in best.get(int(s["id"]), []) if b_cat.get(b) == int(s["category_id"])]
        n, b = max(cands) if cands else (0, None)
        out[int(s["id"])] = (b, n)
    return out


def _matching_gt(gt_ids, gt_segments, masks, category_id):
    """The GT mask (non-crowd, of category_id) with the largest IoU > 0.5 against any of `masks`, as panoptic
    matching counts a match; None when there is none."""
    touched = np.unique(gt_ids[np.logical_or.reduce(masks)])
    best, best_iou = None, 0.5
    for s in gt_segments:
        if s["id"] not in touched or s.get("iscrowd", 0) == 1:
            continue
        if int(s["category_id"]) != int(category_id):
            continue
        g = gt_ids == s["id"]
        iou = max(np.count_nonzero(m & g) / np.count_nonzero(m | g) for m in masks)
        if iou > best_iou:
            best, best_iou = g, iou
    return best


def panoptic_gallery(gt, base, refined, image_path, size=GALLERY_SIZE):
    """Gallery of a panoptic evaluation: gt, base and refined are crm_d2.panoptic.coco.PanopticSet objects;
    image_path(image_id, annotation) gives the photo's path. Segments pair up with the refined segment of the same
    category that overlaps them most."""
    gallery = Gallery(size)
    names = {cid: c.get("name") or str(cid) for cid, c in {**base.categories, **gt.categories}.items()}
    for image_id, r_ann in refined.annotations.items():
        b_ann, g_ann = base.annotations.get(image_id), gt.annotations.get(image_id)
        if b_ann is None:
            continue
        b_ids, r_ids = base.read_ids(b_ann, check=False), refined.read_ids(r_ann, check=False)
        b_area = dict(zip(*(a.tolist() for a in np.unique(b_ids, return_counts=True))))
        r_area = dict(zip(*(a.tolist() for a in np.unique(r_ids, return_counts=True))))
        photo = _Photo(image_path(image_id, b_ann))
        gt_ids = None
        partners = _pairs_by_overlap(b_ids, r_ids, b_ann["segments_info"], r_ann["segments_info"])
        for seg in b_ann["segments_info"]:
            sid = int(seg["id"])
            rid, inter = partners[sid]
            moved = int(b_area.get(sid, 0)) + int(r_area.get(rid, 0) if rid is not None else 0) - 2 * inter
            if not gallery.would_take(moved):
                continue
            if g_ann is not None and gt_ids is None:
                gt_ids = gt.read_ids(g_ann, check=False)

            def make(seg=seg, rid=rid):
                b = b_ids == seg["id"]
                r = r_ids == rid if rid is not None else np.zeros_like(b)
                g = None if gt_ids is None else _matching_gt(gt_ids, g_ann["segments_info"], [b, r],
                                                              seg["category_id"])
                where = Path(b_ann["file_name"]).stem
                return segment_entry(photo(), b, r, g, names.get(int(seg["category_id"]), seg["category_id"]), where)

            gallery.offer(moved, make)
    return gallery


def instances_gallery(gt, base_results, crm_results, image_path, size=GALLERY_SIZE, class_agnostic=False):
    """Gallery of an instance / entity evaluation. gt: COCO instances dict; *_results: COCO results (RLE) lists;
    image_path(image_id, image dict) gives the photo's path. A refined result pairs with the base result of the
    same image, category and score (refinement changes only the mask; a dropped one pairs with none)."""
    from pycocotools import mask as mask_utils

    from .panoptic.instances_eval import compressed_rle, rle_bytes

    gallery = Gallery(size)
    images = {im["id"]: im for im in gt["images"]}
    names = {c["id"]: c.get("name") or str(c["id"]) for c in gt.get("categories", [])}
    gt_by_image = {}
    for a in gt["annotations"]:
        gt_by_image.setdefault(a["image_id"], []).append(a)
    refined_by_key = {}
    for r in crm_results:
        refined_by_key.setdefault((r["image_id"], r["category_id"], float(r["score"])), []).append(r)

    def encode(seg, im):
        return rle_bytes(compressed_rle(seg, im["height"], im["width"], f"image {im['id']}"))

    def decode(seg, im):
        return mask_utils.decode(encode(seg, im)).astype(bool)

    gt_rles = {}  # id(annotation) -> its RLE: each GT instance is encoded once, however many entries rank it

    def gt_rle(a, im):
        if id(a) not in gt_rles:
            gt_rles[id(a)] = encode(a["segmentation"], im)
        return gt_rles[id(a)]

    photo, photo_id = None, None  # the current image's photo only: a gallery entry is made when it is offered
    for res in base_results:
        im = images.get(res["image_id"])
        if im is None:
            continue
        queue = refined_by_key.get((res["image_id"], res["category_id"], float(res["score"])))
        ref = queue.pop(0) if queue else None
        b_rle, r_rle = rle_bytes(res["segmentation"]), rle_bytes(ref["segmentation"]) if ref else None
        b_area = int(mask_utils.area(b_rle))
        r_area = int(mask_utils.area(r_rle)) if r_rle else 0
        inter = int(mask_utils.area(mask_utils.merge([b_rle, r_rle], intersect=True))) if r_rle else 0
        moved = b_area + r_area - 2 * inter
        if not gallery.would_take(moved):
            continue
        if photo_id != res["image_id"]:
            photo, photo_id = _Photo(image_path(res["image_id"], im)), res["image_id"]

        def make(res=res, ref=ref, im=im, photo=photo, masks=[b_rle] + ([r_rle] if r_rle else [])):
            b = decode(res["segmentation"], im)
            r = decode(ref["segmentation"], im) if ref else np.zeros_like(b)
            # The GT instance matching either mask best, at IoU > 0.5 as COCO's AP50: ranked on the RLEs, and
            # only that one decoded (an image can hold hundreds of instances).
            g = None
            candidates = [a for a in gt_by_image.get(res["image_id"], []) if not a.get("iscrowd", 0)
                          and (class_agnostic or a["category_id"] == res["category_id"])]
            if candidates:
                rles = [gt_rle(a, im) for a in candidates]
                ious = np.asarray(mask_utils.iou(rles, masks, [0] * len(masks))).reshape(len(rles), -1).max(1)
                if ious.max() > 0.5:
                    g = mask_utils.decode(rles[int(ious.argmax())]).astype(bool)
            category = "entity" if class_agnostic else names.get(res["category_id"], res["category_id"])
            return segment_entry(photo(), b, r, g, category, Path(im.get("file_name", str(res["image_id"]))).stem)

        gallery.offer(moved, make)
    return gallery


# ----------------------------------------------------------------------------------------- the page
def comparison_groups(base, crm, groups=None, metrics=None):
    """[(row label, base value, crm value)] for the with/without table from two {group: {metric: value}} dicts
    (D2's results, or the CLI's tables in that shape)."""
    rows = []
    for group in groups or list(dict.fromkeys(list(base) + list(crm))):
        b, c = base.get(group, {}), crm.get(group, {})
        for metric in metrics or list(dict.fromkeys(list(b) + list(c))):
            vb, vc = b.get(metric), c.get(metric)
            if isinstance(vb, (int, float)) or isinstance(vc, (int, float)):
                rows.append((f"{group} {metric}", vb, vc))
    return rows


def _num(v, signed=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "", "-"
    if isinstance(v, int):
        return str(v), (f"{v:+d}" if signed else str(v))
    return repr(float(v)), (f"{v:+.2f}" if signed else f"{v:.2f}")


def _cell(v, signed=False, cls=""):
    key, text = _num(v, signed)
    if signed and text not in ("-",) and v:
        cls = (cls + " " + ("up" if v > 0 else "down")).strip()
    return f'<td class="n {cls}" data-v="{key}">{text}</td>'


def _comparison_html(rows):
    out = ['<table class="cmp"><thead><tr><th>metric</th><th>without CRM</th><th>with CRM</th>'
           '<th>difference</th></tr></thead><tbody>']
    for label, b, c in rows:
        d = c - b if isinstance(b, (int, float)) and isinstance(c, (int, float)) else None
        out.append(f"<tr><td>{html.escape(label)}</td>{_cell(b)}{_cell(c)}{_cell(d, True)}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _per_category_html(per_category):
    if not per_category:
        return "<p>No per-category numbers.</p>"
    metrics = [m for m in next(iter(per_category.values()))["base"] if m not in ("tp", "fp", "fn")]
    head = ['<th data-type="text">category</th>']
    for m in metrics:
        label = html.escape(m.upper() if m.islower() and m != "segments" else m)
        head += [f"<th>{label}<br>without</th>", f"<th>{label}<br>with</th>", f"<th>{label}<br>&Delta;</th>"]
    out = ['<table class="sortable" id="per-category"><thead><tr>' + "".join(head) + "</tr></thead><tbody>"]
    for name, row in per_category.items():
        cells = [f'<td data-v="{html.escape(str(name))}">{html.escape(str(name))}</td>']
        for m in metrics:
            b, c = row["base"].get(m), row["crm"].get(m)
            d = c - b if b is not None and c is not None else None
            cells += [_cell(b), _cell(c), _cell(d, True)]
        out.append('<tr class="category">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _fmt_pair(entry, key):
    b, c = entry.get(f"{key}_base"), entry.get(f"{key}_crm")
    if b is None and c is None:
        return None
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return f"{f(b)} &rarr; {f(c)}"


def _gallery_html(entries, files):
    if not entries:
        return "<p>Refinement changed no segment.</p>"
    out = ['<div class="gallery">']
    for k, (e, name) in enumerate(zip(entries, files), start=1):
        lines = [f"<b>#{k} {html.escape(e['category'])}</b> &middot; {html.escape(e['where'])}",
                 f"{e['moved']:,} px moved &middot; area {e['area_base']:,} &rarr; {e['area_crm']:,} px"]
        iou, mba = _fmt_pair(e, "iou"), _fmt_pair(e, "mba")
        lines.append(f"vs GT: IoU {iou} &middot; mBA {mba}" if iou else "no matching GT segment")
        out.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(e["category"])}" loading="lazy">'
                   f'<figcaption>{"<br>".join(lines)}</figcaption></figure>')
    out.append("</div>")
    return "\n".join(out)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#0a7a2a}.down{color:#b00020}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e0e8f8}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
.gallery{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;width:262px;font-size:.8em}figure img{border:1px solid #999;display:block;max-width:260px}
.key span{display:inline-block;width:14px;height:4px;margin:0 4px 3px 12px;vertical-align:middle}
.note{color:#555;font-size:.9em}
"""

SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var desc = !th.classList.contains("desc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(desc ? "desc" : "asc");
      var text = th.dataset.type === "text", body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (text) { return desc ? y.localeCompare(x) : x.localeCompare(y); }
        x = x === "" ? -Infinity : parseFloat(x); y = y === "" ? -Infinity : parseFloat(y);
        return desc ? y - x : x - y;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def write_report(report_dir, title, comparison, per_category, gallery, source, overwrite=False, notes=()):
    """Write DIR/index.html, DIR/gallery/NN.png and DIR/report.json; returns the page's path.

    comparison: [(label, base, crm)] rows (comparison_groups); per_category: crm_d2.panoptic.per_category.combine's
    table; gallery: a Gallery; source: what names this run (see check_report_dir); notes: lines shown under the
    title (what was evaluated)."""
    report_dir = Path(report_dir)
    check_report_dir(report_dir, source, overwrite)
    report_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(report_dir)
    entries = gallery.entries()
    files = [f"{GALLERY_DIR}/{k:02d}.png" for k in range(1, len(entries) + 1)]
    for entry, name in zip(entries, files):
        write_image(report_dir / name, entry["picture"])
    key = "".join(f'<span style="background:rgb{COLOURS[k]}"></span>{LABELS[k]}' for k in ("base", "crm", "gt"))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{"".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)}
<h2>With and without CRM</h2>
{_comparison_html(comparison)}
<h2>Per category</h2>
<p class="note">Click a column to sort by it. Numbers in percent; &Delta; = with CRM &minus; without.</p>
{_per_category_html(per_category)}
<h2>The {len(entries)} segments refinement changed most</h2>
<p class="note key">By pixels moved. Boundaries:{key}. IoU and mBA against the matching ground-truth segment,
without &rarr; with CRM.</p>
{_gallery_html(entries, files)}
<script>{SCRIPT}</script>
</body></html>
"""
    atomic_write(report_dir / "index.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), ".html")
    gallery_rows = [{k: v for k, v in e.items() if k != "picture"} | {"file": f} for e, f in zip(entries, files)]
    write_json(report_dir / RECORD, {"source": source, "files": files + ["index.html"], "gallery": gallery_rows})
    return report_dir / "index.html"


# ----------------------------------------------------------------------------------------- the two kinds of run
def pq_comparison(base, crm):
    """With/without rows of two pq_compute results: PQ, SQ, RQ of All, Things, Stuff."""
    shape = lambda r: {g.capitalize(): {k.upper(): r[g][k] for k in ("pq", "sq", "rq")}  # noqa: E731
                       for g in ("all", "things", "stuff")}
    return comparison_groups(shape(base), shape(crm))


def ap_comparison(base, crm, kind="mask AP"):
    """With/without rows of two evaluate_masks summaries."""
    return comparison_groups({kind: base}, {kind: crm})


def panoptic_report(report_dir, gt, base, refined, image_path, comparison, per_category, source, overwrite=False,
                    title="CRM panoptic refinement", size=GALLERY_SIZE):
    """The report of a panoptic run from its files (PanopticSets of GT, base and refined predictions): the CLI,
    the demo and the D2 evaluator all write it through here."""
    gallery = panoptic_gallery(gt, base, refined, image_path, size)
    notes = [f"{len(refined.annotations)} images; predictions {base.json_path} refined into {refined.json_path}"]
    return write_report(report_dir, title, comparison, per_category, gallery, source, overwrite, notes)


def instances_report(report_dir, gt, base_results, crm_results, image_path, comparison, per_category, source,
                     overwrite=False, class_agnostic=False, title="CRM instance refinement", size=GALLERY_SIZE):
    """The report of an instance / entity run (COCO GT dict and results lists), for the CLI and the D2 path."""
    gallery = instances_gallery(gt, base_results, crm_results, image_path, size, class_agnostic)
    kind = "entity (class-agnostic) mask AP, per object size" if class_agnostic else "mask AP per category"
    notes = [f"{len(gt['images'])} images, {len(base_results)} base results; {kind}"]
    return write_report(report_dir, title, comparison, per_category, gallery, source, overwrite, notes)
