"""Per-category numbers with and without CRM (crm_d2.panoptic.per_category) against the definitions they claim:
panopticapi's per_class_results (restated in tests/panoptic_reference.py, and the real package when importable)
and pycocotools' per-category precision, on data made here."""
import importlib.util
import math

import numpy as np
import pytest
from panoptic_reference import reference_per_class
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crm_d2.panoptic.coco import write_panoptic_image, write_panoptic_json
from crm_d2.panoptic.instances_eval import encode_mask, evaluate_masks, rle_bytes
from crm_d2.panoptic.per_category import (biggest_changes, combine, format_changes, panoptic_per_category,
                                          ranking_metric)
from crm_d2.panoptic.pq import pq_compute

H, W = 40, 56
# Category 5 has no name: its rows fall back to the id. 6 appears in no GT and no prediction.
CATEGORIES = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "road", "isthing": 0},
              {"id": 3, "name": "car", "isthing": 1}, {"id": 4, "name": "person", "isthing": 1},
              {"id": 5, "isthing": 1}, {"id": 6, "name": "boat", "isthing": 1}]


def _gt_image(rng):
    """Two stuff halves, a few things (one of them a crowd region), a VOID strip."""
    ids = np.zeros((H, W), np.uint32)
    ids[: H // 2], ids[H // 2:] = 1, 2
    segs = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]
    for k, cat in enumerate(rng.choice([3, 3, 4, 4, 5], size=4), start=3):
        y, x = int(rng.integers(0, H - 10)), int(rng.integers(0, W - 12))
        h, w = int(rng.integers(4, 12)), int(rng.integers(4, 14))
        ids[y:y + h, x:x + w] = k
        segs.append({"id": k, "category_id": int(cat), "iscrowd": int(k == 6)})
    ids[:, :3] = 0
    present = set(np.unique(ids).tolist())
    return ids, [s for s in segs if s["id"] in present]


def _prediction(rng, gt_ids, gt_segs, shift):
    """The GT moved by `shift` px, one thing relabelled, a small spurious segment, a segment mostly on VOID."""
    rolled = np.roll(gt_ids, shift, axis=1).astype(np.uint32)
    ids = np.where(rolled > 0, rolled + 10, 0).astype(np.uint32)
    ids[gt_ids == 0] = np.where(rng.random(int((gt_ids == 0).sum())) < 0.5, 0, 11)  # some VOID guessed as sky
    cats = {s["id"] + 10: s["category_id"] for s in gt_segs}
    cats[11] = 1
    things = [i for i, c in cats.items() if c >= 3]
    if things:
        cats[things[0]] = 4 if cats[things[0]] != 4 else 3
    y, x = int(rng.integers(0, H - 4)), int(rng.integers(4, W - 4))
    ids[y:y + 3, x:x + 3] = 90
    cats[90] = int(rng.choice([3, 4, 5]))
    ids[5:15, 0:3] = 91  # on the VOID strip: ignored, not a false positive
    cats[91] = 5
    present = set(np.unique(ids).tolist())
    return ids, [{"id": i, "category_id": c} for i, c in cats.items() if i in present]


@pytest.fixture(scope="module")
def panoptic_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_cat")
    rng = np.random.default_rng(7)
    anns = {"gt": [], "base": [], "crm": []}
    for k in range(1, 7):
        gt_ids, gt_segs = _gt_image(rng)
        anns["gt"].append(write_panoptic_image(root / "gt", f"{k}.png", k, gt_ids, gt_segs, sidecar=False))
        for side, shift in (("base", 3), ("crm", 1)):
            ids, segs = _prediction(rng, gt_ids, gt_segs, shift)
            anns[side].append(write_panoptic_image(root / side, f"{k}.png", k, ids, segs, sidecar=False))
    images = [{"id": k, "file_name": f"{k}.jpg", "height": H, "width": W} for k in range(1, 7)]
    for side, a in anns.items():
        write_panoptic_json(root / f"{side}.json", a, CATEGORIES, images=images)
    return root


def test_panoptic_per_category_is_panopticapis_per_class(panoptic_files):
    d = panoptic_files
    base = pq_compute(d / "gt.json", d / "gt", d / "base.json", d / "base", workers=1)
    crm = pq_compute(d / "gt.json", d / "gt", d / "crm.json", d / "crm", workers=1)
    table = panoptic_per_category(base, crm)
    names = {c["id"]: c.get("name", str(c["id"])) for c in CATEGORIES}
    seen = set()
    for side in ("base", "crm"):
        ref = reference_per_class(d / "gt.json", d / "gt", d / f"{side}.json", d / side)
        for cid, r in ref.items():
            if names[cid] not in table:  # left out only where panopticapi has nothing to say
                assert r == {"pq": 0.0, "sq": 0.0, "rq": 0.0}, cid
                continue
            seen.add(cid)
            row = table[names[cid]][side]
            for k in ("pq", "sq", "rq"):
                assert row[k] == pytest.approx(r[k], abs=1e-9), (side, cid, k)
            assert row["segments"] == row["tp"] + row["fp"]
    assert seen == {1, 2, 3, 4, 5}  # 5 has no name: its row is "5"; boat (6) appears nowhere
    assert "5" in table and "boat" not in table
    # the things the data was made to exercise did happen: a crowd region, an ignored prediction on VOID,
    # false positives and negatives
    assert any(row["base"]["fp"] for row in table.values()) and any(row["base"]["fn"] for row in table.values())
    assert table["sky"]["base"]["pq"] != table["sky"]["crm"]["pq"]


def test_panoptic_per_category_equals_real_panopticapi(panoptic_files):
    if importlib.util.find_spec("panopticapi") is None:
        pytest.skip("panopticapi is not installed (not on PyPI); the restatement above stands in for it")
    import contextlib
    import io

    from panopticapi.evaluation import pq_compute as panopticapi_pq

    d = panoptic_files
    base = pq_compute(d / "gt.json", d / "gt", d / "base.json", d / "base", workers=1)
    crm = pq_compute(d / "gt.json", d / "gt", d / "crm.json", d / "crm", workers=1)
    table = panoptic_per_category(base, crm)
    names = {c["id"]: c.get("name", str(c["id"])) for c in CATEGORIES}
    for side in ("base", "crm"):
        with contextlib.redirect_stdout(io.StringIO()):
            ref = panopticapi_pq(str(d / "gt.json"), str(d / f"{side}.json"), str(d / "gt"), str(d / side))
        for cid, r in ref["per_class"].items():
            row = table.get(names[cid], {}).get(side, {"pq": 0.0, "sq": 0.0, "rq": 0.0})
            for k in ("pq", "sq", "rq"):
                assert row[k] == pytest.approx(100 * r[k], abs=1e-9), (side, cid, k)


def _square(y, x, side, h=120, w=120):
    m = np.zeros((h, w), bool)
    m[y:y + side, x:x + side] = True
    return m


@pytest.fixture(scope="module")
def instance_data():
    """A COCO GT of three categories (one without a name) in three sizes, and base / refined results."""
    rng = np.random.default_rng(3)
    images, anns, base, crm = [], [], [], []
    for image_id in range(1, 5):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 120, "width": 120})
        for cat, side in ((1, 20), (2, 50), (3, 100), (1, 12)):
            y, x = (int(v) for v in rng.integers(0, 120 - side, 2))
            g = _square(y, x, side)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": encode_mask(g), "area": int(g.sum()), "bbox": [x, y, side, side]})
            for results, err in ((base, 4), (crm, 2)):
                dy, dx = (int(v) for v in rng.integers(-err, err + 1, 2))
                p = _square(max(0, y + dy), max(0, x + dx), side)
                results.append({"image_id": image_id, "category_id": cat, "segmentation": encode_mask(p),
                                "score": float(rng.uniform(0.3, 1))})
        results_fp = _square(0, 0, 10)
        base.append({"image_id": image_id, "category_id": 2, "segmentation": encode_mask(results_fp), "score": 0.95})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}, {"id": 3}]}
    return gt, base, crm


def _cocoeval(gt, results, class_agnostic=False):
    coco = COCO()
    coco.dataset = gt if not class_agnostic else dict(
        gt, categories=[{"id": 1, "name": "entity"}], annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    coco.createIndex()
    dt = coco.loadRes([dict(r, segmentation=rle_bytes(r["segmentation"]), **({"category_id": 1} if class_agnostic
                                                                          else {})) for r in results])
    ev = COCOeval(coco, dt, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    return ev


def _mean(p):
    p = p[p > -1]
    return 100 * float(p.mean()) if p.size else math.nan


def test_instance_per_category_is_pycocotools_precision(instance_data):
    gt, base, crm = instance_data
    summary, rows, names = evaluate_masks(gt, base, per_category=True)
    assert summary == evaluate_masks(gt, base)  # the summary is unchanged by asking for rows
    ev = _cocoeval(gt, base)
    for k, cid in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        assert rows[cid]["AP"] == pytest.approx(_mean(p), abs=1e-9)
        assert rows[cid]["AP50"] == pytest.approx(_mean(p[0]), abs=1e-9)
        assert rows[cid]["AP75"] == pytest.approx(_mean(p[5]), abs=1e-9)
    assert np.mean([r["AP"] for r in rows.values()]) == pytest.approx(summary["AP"])  # COCO's AP is their mean
    _, crm_rows, _ = evaluate_masks(gt, crm, per_category=True)
    table = combine(rows, crm_rows, names)
    assert list(table) == ["cup", "plate", "3"]  # the nameless category falls back to its id
    assert table["plate"]["base"]["AP"] < table["plate"]["crm"]["AP"]  # the false positive costs base only


def test_entity_per_size_is_pycocotools_precision(instance_data):
    gt, base, crm = instance_data
    summary, rows, _ = evaluate_masks(gt, crm, class_agnostic=True, per_category=True)
    assert list(rows) == ["small", "medium", "large"]
    ev = _cocoeval(gt, crm, class_agnostic=True)
    for a, size in enumerate(("small", "medium", "large"), start=1):
        assert rows[size]["AP"] == pytest.approx(_mean(ev.eval["precision"][:, :, 0, a, -1]), abs=1e-9)
    for size, key in (("small", "APs"), ("medium", "APm"), ("large", "APl")):
        assert rows[size]["AP"] == pytest.approx(summary[key], abs=1e-9)  # COCOeval's own per-size numbers
    table = combine(evaluate_masks(gt, base, class_agnostic=True, per_category=True)[1], rows, {1: "entity"})
    assert list(table) == ["small", "medium", "large"]


def test_combine_fills_a_missing_side_with_zeros_and_keeps_names_apart():
    base = {1: {"pq": 50.0, "tp": 1}, 2: {"pq": 70.0, "tp": 2}}
    crm = {2: {"pq": 75.0, "tp": 2}, 3: {"pq": 10.0, "tp": 1}}
    table = combine(base, crm, {1: "cat", 2: "cat", 3: None})
    assert list(table) == ["cat (1)", "cat (2)", "3"]
    assert table["cat (1)"]["crm"] == {"pq": 0.0, "tp": 0} and table["3"]["base"] == {"pq": 0.0, "tp": 0}


def test_top_and_bottom_ten():
    table = {f"c{k}": {"base": {"pq": 50.0}, "crm": {"pq": 50.0 + k - 12}} for k in range(25)}
    table["flat"] = {"base": {"pq": 40.0}, "crm": {"pq": 40.0}}
    table["nan"] = {"base": {"pq": math.nan}, "crm": {"pq": 3.0}}
    gained, lost = biggest_changes(table)
    assert [g[0] for g in gained] == [f"c{k}" for k in range(24, 14, -1)]
    assert [x[0] for x in lost] == [f"c{k}" for k in range(10)]
    assert ranking_metric(table) == "pq"
    text = format_changes(table)
    assert "10 categories that gained most PQ with CRM:" in text and "c24" in text and "(+12.00)" in text
    assert "10 categories that lost most PQ with CRM:" in text and "(-12.00)" in text
    assert "flat" not in text and "nan" not in text
    one = {"a": {"base": {"AP": 1.0}, "crm": {"AP": 2.0}}}
    assert "1 category that gained most AP" in format_changes(one) and "(none)" in format_changes(one)
