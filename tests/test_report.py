"""The report (crm_d2.report): the gallery's choice and crops, the page parsed, the folder rules, and the page in
a real browser when Chromium is installed."""
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from crm_d2.io import write_png
from crm_d2.metrics import boundary_accuracy
from crm_d2.panoptic.coco import PanopticSet, write_panoptic_image, write_panoptic_json
from crm_d2.panoptic.per_category import panoptic_per_category
from crm_d2.panoptic.pq import pq_compute
from crm_d2.report import (CROP_SIDE, Gallery, check_report_dir, panoptic_report, pq_comparison, segment_entry)

H, W = 90, 120
CATEGORIES = [{"id": 1, "name": "wall", "isthing": 0}, {"id": 2, "name": "floor", "isthing": 0},
              {"id": 3, "name": "chair", "isthing": 1}, {"id": 4, "isthing": 1}]  # 4: no name


class PageParser(HTMLParser):
    """Image sources, link targets, script sources and the per-category table's body rows of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.rows = [], [], [], []
        self._in_table = self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "script":
            self.scripts.append(attrs.get("src"))
        if tag == "table" and attrs.get("id") == "per-category":
            self._in_table = True
        if tag == "tbody" and self._in_table:
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.rows.append([])
        if tag == "td" and self._in_body:
            self.rows[-1].append(attrs.get("data-v"))

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = self._in_body = False


def parse_page(path):
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_gallery_keeps_the_largest_changes_and_crops_only_newcomers():
    made = []
    gallery = Gallery(size=3)
    for k, moved in enumerate([5, 0, 9, 1, 7, 2, 9, 8]):
        gallery.offer(moved, lambda k=k: made.append(k) or {"k": k})
    assert [e["k"] for e in gallery.entries()] == [2, 6, 7]  # 9, 9 (first offered first), 8
    assert made == [0, 2, 3, 4, 6, 7]  # 0 px never; 2 px (k=5) was no longer in the top 3
    assert len(Gallery(size=0)) == 0 and not Gallery(size=0).offer(10, lambda: 1)


def _disc(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2


def test_a_segment_across_the_photos_edge_is_cropped_safely_and_scored_as_the_whole_photo():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    gt = _disc(0, 0, 30)  # a quarter disc in the corner: the segment crosses two edges
    base = _disc(4, -3, 31)
    crm = _disc(1, 0, 30)
    entry = segment_entry(image, base, crm, gt, category="chair", where="im1")
    x0, y0, x1, y1 = entry["box"]
    assert (x0, y0) == (0, 0) and x1 <= W and y1 <= H
    assert entry["picture"].dtype == np.uint8 and max(entry["picture"].shape[:2]) == CROP_SIDE
    assert entry["moved"] == np.count_nonzero(base != crm)
    for side, m in (("base", base), ("crm", crm)):
        assert entry[f"iou_{side}"] == pytest.approx(100 * (m & gt).sum() / (m | gt).sum())
        assert entry[f"mba_{side}"] == pytest.approx(100 * boundary_accuracy(m, gt))  # the crop gives the photo's
    assert entry["iou_crm"] > entry["iou_base"]
    # the three boundaries are drawn in their colours; no GT, no GT colour
    from crm_d2.report import COLOURS

    colours = {tuple(c) for c in entry["picture"].reshape(-1, 3).tolist()}
    assert set(COLOURS.values()) <= colours
    bare = segment_entry(np.full((H, W, 3), 128, np.uint8), base, crm, None)
    assert "iou_base" not in bare
    assert COLOURS["gt"] not in {tuple(c) for c in bare["picture"].reshape(-1, 3).tolist()}
    # a segment that touches the far corner too
    far = segment_entry(image, _disc(H, W, 20), _disc(H - 2, W - 2, 20), None)
    assert far["box"][2] == W and far["box"][3] == H


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Photos, a panoptic GT, a coarse prediction and a 'refined' one closer to the GT."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(1)
    anns = {"gt": [], "base": [], "crm": []}
    images = []
    for k in range(1, 4):
        gt = np.ones((H, W), np.uint32)
        gt[H // 2:] = 2
        gt[_disc(30 + 5 * k, 40 + 10 * k, 14)] = 3
        gt[_disc(H - 5, 10, 18)] = 4  # crosses the bottom-left edges
        segs = [{"id": i, "category_id": i, "iscrowd": 0} for i in (1, 2, 3, 4)]
        photo = np.zeros((H, W, 3), np.uint8)
        for v, c in {1: (200, 200, 220), 2: (120, 90, 60), 3: (200, 40, 40), 4: (40, 160, 60)}.items():
            photo[gt == v] = c
        write_png(root / "images" / f"im{k}.png", photo)
        images.append({"id": k, "file_name": f"im{k}.png", "height": H, "width": W})
        anns["gt"].append(write_panoptic_image(root / "gt", f"im{k}.png", k, gt, segs, sidecar=False))
        for side, err in (("base", 6), ("crm", 2)):
            small = cv2.resize(gt.astype(np.float32), (W // err, H // err), interpolation=cv2.INTER_NEAREST)
            ids = cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST).astype(np.uint32)
            ids = np.roll(ids, err // 2, axis=1) + 20  # other segment ids than the GT's
            psegs = [{"id": int(i), "category_id": int(i) - 20} for i in np.unique(ids)]
            anns[side].append(write_panoptic_image(root / side, f"im{k}.png", k, ids, psegs, sidecar=False))
    for side, a in anns.items():
        write_panoptic_json(root / f"{side}.json", a, CATEGORIES, images=images)
    return root


def _write(d, report_dir, source, overwrite=False, size=24):
    gt, base, crm = (PanopticSet(d / f"{s}.json", d / s) for s in ("gt", "base", "crm"))
    b = pq_compute(gt, None, base, None, workers=1)
    c = pq_compute(gt, None, crm, None, workers=1)
    per_category = panoptic_per_category(b, c)
    page = panoptic_report(report_dir, gt, base, crm, lambda image_id, ann: d / "images" / ann["file_name"],
                           pq_comparison(b, c), per_category, source, overwrite, size=size)
    return page, per_category


def test_the_page_references_only_files_it_wrote_and_has_a_row_per_category(dataset, tmp_path):
    page, per_category = _write(dataset, tmp_path / "rep", {"command": "test", "output": "a"})
    assert page == tmp_path / "rep" / "index.html"
    parsed = parse_page(page)
    assert parsed.images and all((page.parent / src).is_file() for src in parsed.images)
    assert all(src.endswith(".png") and "://" not in src for src in parsed.images)
    assert parsed.scripts == [None] and not [h for h in parsed.links if "://" in h]  # inline only, no CDN
    assert "http" not in page.read_text().replace("http-equiv", "")
    assert len(parsed.rows) == len(per_category) == 4
    assert [r[0] for r in parsed.rows] == list(per_category) and "4" in per_category  # no name: its id
    # a row holds without / with / difference of each metric, as numbers the sorter reads
    chair = parsed.rows[list(per_category).index("chair")]
    row = per_category["chair"]
    assert float(chair[1]) == pytest.approx(row["base"]["pq"]) and float(chair[2]) == pytest.approx(row["crm"]["pq"])
    assert float(chair[3]) == pytest.approx(row["crm"]["pq"] - row["base"]["pq"])
    # the gallery: largest change first, every segment scored against its GT (all have one here)
    record = json.loads((page.parent / "report.json").read_text())
    moved = [e["moved"] for e in record["gallery"]]
    assert moved == sorted(moved, reverse=True) and len(moved) == 12  # 3 images x 4 segments changed
    assert all(not math.isnan(e["iou_crm"]) and e["mba_base"] is not None for e in record["gallery"])
    assert sorted(p.name for p in (page.parent / "gallery").iterdir()) == [f"{k:02d}.png" for k in range(1, 13)]


def test_report_folder_rules(dataset, tmp_path):
    d, rep = dataset, tmp_path / "rep"
    mine, other = {"command": "test", "output": "a"}, {"command": "test", "output": "b"}
    _write(d, rep, mine)
    _write(d, rep, mine, size=5)  # the same run again: replaces its own report, old pictures gone
    assert sorted(p.name for p in (rep / "gallery").iterdir()) == [f"{k:02d}.png" for k in range(1, 6)]
    with pytest.raises(ValueError, match="holds the report of another run .*output a.*--overwrite"):
        _write(d, rep, other)
    _write(d, rep, other, overwrite=True, size=2)
    assert len(parse_page(rep / "index.html").images) == 2 and len(list((rep / "gallery").iterdir())) == 2
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds files that are not a crm-d2 report"):
        check_report_dir(stranger, mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_report_dir(tmp_path / "file", mine)
    check_report_dir(tmp_path / "new", mine)  # absent: fine, made when written


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (Debian: apt-get install "
                    "chromium); the page is checked in a real browser only where one is")
def test_the_page_renders_in_headless_chromium(dataset, tmp_path):
    page, _ = _write(dataset, tmp_path / "rep", {"command": "test", "output": "a"})
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1400", page.resolve().as_uri()], check=True, capture_output=True,
                   timeout=120)
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (1400, 1200)
    # not a blank page: text and table lines, and the gallery's photos (colours from the photos) are drawn
    assert (picture < 100).any(axis=2).mean() > 0.002
    chair_red = (picture[..., 2] > 150) & (picture[..., 1] < 80) & (picture[..., 0] < 80)
    assert chair_red.sum() > 100


def test_instances_gallery_scores_each_detection_against_its_best_gt_instance(tmp_path):
    """Each entry is scored against the GT instance of its category that overlaps the base or refined mask most
    (IoU > 0.5); crowd regions and other categories are not candidates, except class-agnostic ones; a detection
    with no such instance has no GT numbers."""
    from pycocotools import mask as mask_utils

    from crm_d2.report import instances_gallery

    H, W = 48, 40
    cv2.imwrite(str(tmp_path / "a.png"), np.full((H, W, 3), 128, np.uint8))

    def box(y0, y1, x0, x1):
        m = np.zeros((H, W), np.uint8)
        m[y0:y1, x0:x1] = 1
        return m

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m))
        return dict(r, counts=r["counts"].decode("ascii"))

    def polygon(y0, y1, x0, x1):  # GT may come as COCO polygons
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    near, far = box(20, 35, 20, 35), box(0, 10, 0, 10)
    gt = {"images": [{"id": 1, "height": H, "width": W, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "other"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle(far)},
              {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle(near)},
              {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": rle(box(21, 35, 20, 35))},
              {"id": 4, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": polygon(40, 48, 30, 40)}]}
    base = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle(box(21, 35, 20, 35))},
            {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": rle(box(40, 48, 30, 40))}]
    refined = [dict(base[0], segmentation=rle(near)), dict(base[1], segmentation=rle(box(41, 48, 30, 40)))]
    path = lambda image_id, im: tmp_path / im["file_name"]  # noqa: E731
    entries = {e["where"] + str(e["area_base"]): e for e in instances_gallery(gt, base, refined, path).entries()}
    first, second = entries["a210"], entries["a80"]
    assert first["iou_base"] == pytest.approx(100 * 14 / 15) and first["iou_crm"] == pytest.approx(100)
    assert "iou_base" not in second  # its only overlap is a GT instance of another category
    agnostic = instances_gallery(gt, base, refined, path, class_agnostic=True).entries()
    second = next(e for e in agnostic if e["area_base"] == 80)
    assert second["iou_base"] > 50  # the polygon instance of category 2, the only one it overlaps
