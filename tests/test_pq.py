"""PQ on hand-made cases whose values are worked out in the comments (panopticapi's rules)."""
import json

import numpy as np
import pytest

import crm_d2.panoptic.pq as pqmod
from crm_d2.io import write_json, write_png
from crm_d2.panoptic.coco import id2rgb
from crm_d2.panoptic.pq import PQStat, format_pq_table, pq_compute, pq_image

PERSON, CAR, SKY = 1, 2, 3
CATEGORIES = [{"id": PERSON, "name": "person", "isthing": 1}, {"id": CAR, "name": "car", "isthing": 1},
              {"id": SKY, "name": "sky", "isthing": 0}]
CATS = {c["id"]: c for c in CATEGORIES}


def seg(sid, cat, crowd=0):
    return {"id": sid, "category_id": cat, "iscrowd": crowd}


def idmap(*regions, shape=(10, 10)):
    """regions: (id, rows slice, cols slice), painted in order on a void map."""
    m = np.zeros(shape, np.uint32)
    for sid, rows, cols in regions:
        m[rows, cols] = sid
    return m


R = slice  # readability: R(0, 5) = rows/cols 0..4


def case_basic():
    # GT: person 1 (rows 0-4, cols 0-4, 25 px), car 2 (rows 0-4, cols 5-9, 25 px), sky 3 (rows 5-9, 50 px)
    gt = idmap((1, R(0, 5), R(0, 5)), (2, R(0, 5), R(5, 10)), (3, R(5, 10), R(0, 10)))
    # pred: person 11 (cols 0-3, 20 px): IoU 20/25 = 0.8 -> TP; col 4 void;
    #       car 12 (rows 0-1, cols 5-9, 10 px): IoU 10/25 = 0.4 -> FP car, GT car FN;
    #       person 13 (rows 2-4, cols 5-9) on the car: wrong class -> FP person; sky 14 exact -> TP, IoU 1.
    pred = idmap((11, R(0, 5), R(0, 4)), (12, R(0, 2), R(5, 10)), (13, R(2, 5), R(5, 10)), (14, R(5, 10), R(0, 10)))
    return (gt, [seg(1, PERSON), seg(2, CAR), seg(3, SKY)],
            pred, [seg(11, PERSON), seg(12, CAR), seg(13, PERSON), seg(14, SKY)])


def test_tp_fp_fn_and_groups():
    stat = PQStat().add_image(*case_basic(), CATS)
    r = stat.average(CATS)
    # person: PQ = 0.8 / (1 + 0.5) = 0.5333, SQ 0.8, RQ 1/1.5; car: 0 (1 FP + 1 FN); sky: 1
    assert r["per_class"][PERSON]["pq"] == pytest.approx(100 * 0.8 / 1.5)
    assert (r["per_class"][PERSON]["tp"], r["per_class"][PERSON]["fp"], r["per_class"][PERSON]["fn"]) == (1, 1, 0)
    assert (r["per_class"][CAR]["tp"], r["per_class"][CAR]["fp"], r["per_class"][CAR]["fn"]) == (0, 1, 1)
    assert r["things"] == pytest.approx({"pq": 100 * (0.8 / 1.5) / 2, "sq": 40.0, "rq": 100 * (1 / 1.5) / 2, "n": 2})
    assert r["stuff"] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 1})
    assert r["all"] == pytest.approx({"pq": 100 * (0.8 / 1.5 + 1) / 3, "sq": 60.0, "rq": 100 * (1 / 1.5 + 1) / 3,
                                      "n": 3})


def test_void_is_left_out_of_the_union():
    # GT: person rows 0-4 cols 0-4 (25 px), rows 0-4 cols 5-9 void, sky rows 5-9.
    gt = idmap((1, R(0, 5), R(0, 5)), (3, R(5, 10), R(0, 10)))
    # pred person covers rows 0-4 entirely (50 px): 25 on the person, 25 on void.
    # IoU = 25 / (50 + 25 - 25 - 25) = 1.0 (a plain IoU would be 0.5, no match).
    pred = idmap((21, R(0, 5), R(0, 10)), (22, R(5, 10), R(0, 10)))
    stats = pq_image(gt, [seg(1, PERSON), seg(3, SKY)], pred, [seg(21, PERSON), seg(22, SKY)], CATS)
    assert stats[PERSON].tolist() == [1.0, 1, 0, 0]
    assert stats[SKY].tolist() == [1.0, 1, 0, 0]


def test_iou_of_exactly_half_does_not_match():
    gt = idmap((1, R(0, 10), R(0, 10)))
    pred = idmap((31, R(0, 5), R(0, 10)))  # 50 of 100 px, rest void: IoU 0.5, not > 0.5
    stats = pq_image(gt, [seg(1, PERSON)], pred, [seg(31, PERSON)], CATS)
    assert stats[PERSON].tolist() == [0.0, 0, 1, 1]


def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive():
    gt = idmap((3, R(5, 10), R(0, 10)))  # rows 0-4 void
    # car 41 (rows 0-5): 50 of its 60 px on void -> ignored; sky 42 (rows 6-9): IoU 40/50 = 0.8 -> TP
    pred = idmap((41, R(0, 6), R(0, 10)), (42, R(6, 10), R(0, 10)))
    stat = PQStat().add_image(gt, [seg(3, SKY)], pred, [seg(41, CAR), seg(42, SKY)], CATS)
    r = stat.average(CATS)
    assert CAR not in r["per_class"]  # no TP/FP/FN: not averaged
    assert r["all"] == pytest.approx({"pq": 80.0, "sq": 80.0, "rq": 100.0, "n": 1})
    assert r["things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def test_crowd_regions():
    # GT: a person crowd over rows 0-4 (never matched, never FN) and sky rows 5-9.
    gt = idmap((1, R(0, 5), R(0, 10)), (3, R(5, 10), R(0, 10)))
    gt_segs = [seg(1, PERSON, crowd=1), seg(3, SKY)]
    # person 51 inside the crowd (30 px, all on the same-category crowd) -> ignored;
    # car 52 inside the person crowd -> the crowd is not its category -> FP car; sky 53 -> TP.
    pred = idmap((51, R(0, 5), R(0, 6)), (52, R(0, 5), R(6, 10)), (53, R(5, 10), R(0, 10)))
    stats = pq_image(gt, gt_segs, pred, [seg(51, PERSON), seg(52, CAR), seg(53, SKY)], CATS)
    assert PERSON not in stats
    assert stats[CAR].tolist() == [0.0, 0, 1, 0]
    r = PQStat().__iadd__(stats).average(CATS)
    assert r["all"]["pq"] == pytest.approx(50.0) and r["all"]["n"] == 2


def test_crowd_is_not_matched_even_when_it_overlaps_exactly():
    gt = idmap((1, R(0, 10), R(0, 10)))
    pred = idmap((61, R(0, 10), R(0, 10)))
    stats = pq_image(gt, [seg(1, PERSON, crowd=1)], pred, [seg(61, PERSON)], CATS)
    assert stats == {}


def test_duplicate_predictions():
    # one GT person (whole image); two person predictions: rows 0-5 (IoU 0.6 -> TP), rows 6-9 (0.4 -> FP)
    gt = idmap((1, R(0, 10), R(0, 10)))
    pred = idmap((71, R(0, 6), R(0, 10)), (72, R(6, 10), R(0, 10)))
    r = PQStat().add_image(gt, [seg(1, PERSON)], pred, [seg(71, PERSON), seg(72, PERSON)], CATS).average(CATS)
    # PQ = 0.6 / (1 + 0.5) = 0.4, SQ = 0.6, RQ = 2/3
    assert r["per_class"][PERSON] == pytest.approx({"pq": 40.0, "sq": 60.0, "rq": 200 / 3, "tp": 1, "fp": 1,
                                                    "fn": 0, "isthing": 1, "name": "person"})


def test_gt_area_comes_from_the_json_like_panopticapi():
    gt = idmap((1, R(0, 10), R(0, 10)))
    pred = idmap((81, R(0, 10), R(0, 10)))
    stats = pq_image(gt, [dict(seg(1, PERSON), area=125)], pred, [seg(81, PERSON)], CATS)
    assert stats[PERSON][0] == pytest.approx(100 / 125)


# ---- files, bad input, pool, CLI -------------------------------------------------------------------------------

def write_set(root, images, categories=CATEGORIES):
    """images: list of (image_id, file_name, id map, segments_info); writes root/x.json + root/x/*.png."""
    anns = []
    for image_id, name, ids, segs in images:
        write_png(root.parent / root.name / name, id2rgb(ids))
        anns.append({"image_id": image_id, "file_name": name, "segments_info": segs})
    write_json(str(root) + ".json", {"annotations": anns, "categories": categories})
    return str(root) + ".json", str(root)


def basic_files(tmp_path, n=2):
    gt_ids, gt_segs, pred_ids, pred_segs = case_basic()
    gt = write_set(tmp_path / "gt", [(i, f"{i}.png", gt_ids, gt_segs) for i in range(n)])
    pred = write_set(tmp_path / "pred", [(i, f"{i}.png", pred_ids, pred_segs) for i in range(n)])
    return gt, pred


def test_pq_compute_on_files(tmp_path):
    (gj, gd), (pj, pd) = basic_files(tmp_path)
    r = pq_compute(gj, gd, pj, pd)
    # two copies of the basic image: per-class ratios, hence PQ, are unchanged
    assert r["all"]["pq"] == pytest.approx(100 * (0.8 / 1.5 + 1) / 3)
    assert r["per_class"][PERSON]["tp"] == 2 and r["n_images"] == 2 and r["skipped"] == []


def test_process_pool_gives_the_same_numbers(tmp_path, monkeypatch):
    (gj, gd), (pj, pd) = basic_files(tmp_path, n=4)
    serial = pq_compute(gj, gd, pj, pd, workers=1)
    monkeypatch.setattr(pqmod, "MIN_IMAGES_FOR_POOL", 0)
    pooled = pq_compute(gj, gd, pj, pd, workers=2)
    assert pooled == serial


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    write_json(path, data)


@pytest.mark.parametrize("edit, message, evaluated", [
    (lambda d: d["annotations"][0]["segments_info"].pop(),
     r"segment id\(s\) \[14\] in the PNG are not in the JSON in prediction .*pred/0.png \(image_id 0\)", 1),
    (lambda d: d["annotations"][0]["segments_info"].append(seg(99, SKY)), "segment id 99 is in the JSON but not in", 1),
    (lambda d: d["annotations"][0]["segments_info"][0].update(category_id=42), "unknown category_id 42", 1),
    (lambda d: d["annotations"].append({"image_id": 7, "file_name": "7.png", "segments_info": []}),
     "7.png has image_id 7, which is not in the ground truth", 2),
    (lambda d: d["annotations"].pop(), r"no prediction for image_id 1 \(1.png\)", 1),
])
def test_bad_predictions_name_file_and_id(tmp_path, edit, message, evaluated):
    (gj, gd), (pj, pd) = basic_files(tmp_path)
    _edit_json(pj, edit)
    with pytest.raises(ValueError, match=message):
        pq_compute(gj, gd, pj, pd)
    # not strict: the bad image is left out and reported
    r = pq_compute(gj, gd, pj, pd, strict=False)
    assert len(r["skipped"]) == 1 and r["skipped"][0]["reason"]
    assert r["n_images"] == evaluated
    assert r["all"]["pq"] == pytest.approx(100 * (0.8 / 1.5 + 1) / 3)


def test_size_mismatch_and_missing_png(tmp_path):
    (gj, gd), (pj, pd) = basic_files(tmp_path)
    write_png(tmp_path / "pred" / "0.png", id2rgb(np.pad(case_basic()[2], ((0, 2), (0, 0)))))
    with pytest.raises(ValueError, match=r"pred/0.png is 10x12 but ground truth .*gt/0.png is 10x10"):
        pq_compute(gj, gd, pj, pd)
    (tmp_path / "pred" / "1.png").unlink()
    r = pq_compute(gj, gd, pj, pd, strict=False)
    assert r["n_images"] == 0 and len(r["skipped"]) == 2
    assert "not found" in r["skipped"][1]["reason"]


def test_format_pq_table():
    base = {g: {"pq": 41.0, "sq": 80.0, "rq": 50.0, "n": 3} for g in ("all", "things", "stuff")}
    crm = {g: {"pq": 41.8, "sq": 80.5, "rq": 50.0, "n": 3} for g in ("all", "things", "stuff")}
    table = format_pq_table({"base": base, "CRM": crm})
    lines = table.splitlines()
    assert "CRM - base" in lines[0]
    assert [ln.split()[0] for ln in lines[3:]] == ["All", "Things", "Stuff"]
    assert "+0.80" in lines[3] and "41.80" in lines[3]


def _run_cli(argv, capsys):
    from crm_d2.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_pq_json(tmp_path, capsys):
    (gj, gd), (pj, pd) = basic_files(tmp_path)
    rc, out, _ = _run_cli(["pq", "--gt-json", gj, "--gt-dir", gd, "--pred-json", pj, "--pred-dir", pd, "--json"],
                          capsys)
    assert rc == 0
    data = json.loads(out)
    assert set(data) == {"all", "things", "stuff"}
    assert set(data["all"]) == {"pq", "sq", "rq", "n"}
    assert data["stuff"] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 1}
    assert data["all"]["pq"] == pytest.approx(100 * (0.8 / 1.5 + 1) / 3)


def test_cli_pq_table_and_errors(tmp_path, capsys):
    (gj, gd), (pj, pd) = basic_files(tmp_path)
    rc, out, _ = _run_cli(["pq", "--gt-json", gj, "--gt-dir", gd, "--pred-json", pj, "--pred-dir", pd], capsys)
    assert rc == 0 and "Things" in out and "2 images evaluated" in out
    _edit_json(pj, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=42))
    rc, _, err = _run_cli(["pq", "--gt-json", gj, "--gt-dir", gd, "--pred-json", pj, "--pred-dir", pd], capsys)
    assert rc == 1 and "unknown category_id 42" in err and "1.png" in err
    rc, out, err = _run_cli(["pq", "--gt-json", gj, "--gt-dir", gd, "--pred-json", pj, "--pred-dir", pd, "--json",
                             "--skip-bad"], capsys)
    assert rc == 0 and "skipped image_id 1" in err and json.loads(out)["all"]["n"] == 3
