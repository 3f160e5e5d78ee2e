import math

import numpy as np
import pytest

from crm_d2.io import write_json, write_png
from crm_d2.panoptic.coco import PanopticSet, id2rgb
from crm_d2.panoptic.instances_eval import (encode_results, entity_gt_from_panoptic, evaluate_masks,
                                            format_ap_table)

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "sky", "isthing": 0}]


@pytest.fixture
def panoptic(tmp_path):
    """Image 1: two persons (100 px each) over sky (200 px). Image 2: a person crowd over sky."""
    a = np.zeros((20, 20), np.uint32)
    a[:10, :10], a[:10, 10:], a[10:] = 1, 2, 3
    b = np.zeros((20, 20), np.uint32)
    b[:10], b[10:] = 4, 5
    anns = [{"image_id": 1, "file_name": "1.png", "segments_info": [
                {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
                {"id": 3, "category_id": 3, "iscrowd": 0}]},
            {"image_id": 2, "file_name": "2.png", "segments_info": [
                {"id": 4, "category_id": 1, "iscrowd": 1}, {"id": 5, "category_id": 3, "iscrowd": 0}]}]
    write_png(tmp_path / "gt" / "1.png", id2rgb(a))
    write_png(tmp_path / "gt" / "2.png", id2rgb(b))
    write_json(tmp_path / "gt.json", {"annotations": anns, "categories": CATEGORIES})
    return PanopticSet(tmp_path / "gt.json", tmp_path / "gt"), a, b


def test_entity_gt(panoptic):
    ps, a, b = panoptic
    gt = entity_gt_from_panoptic(ps)
    assert gt["categories"] == [{"id": 1, "name": "entity", "supercategory": "entity"}]
    assert [(x["image_id"], x["area"], x["iscrowd"], x["category_id"]) for x in gt["annotations"]] == [
        (1, 100, 0, 1), (1, 100, 0, 1), (1, 200, 0, 1), (2, 200, 1, 1), (2, 200, 0, 1)]
    assert gt["images"][0]["height"] == 20 and gt["annotations"][1]["bbox"] == [10, 0, 10, 10]
    things = entity_gt_from_panoptic(ps, things_only=True)
    assert [x["area"] for x in things["annotations"]] == [100, 100, 200]


def test_perfect_entities_and_crowd_is_ignored(panoptic):
    ps, a, b = panoptic
    gt = entity_gt_from_panoptic(ps)
    res = encode_results(1, [a == 1, a == 2, a == 3], [0.9, 0.8, 0.7])
    res += encode_results(2, [b == 5], [0.9])
    r = evaluate_masks(gt, res)
    assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0)
    assert r["APs"] == pytest.approx(100.0) and math.isnan(r["APm"]) and math.isnan(r["APl"])  # all < 32^2 px
    # a confident detection on the crowd region is ignored, not a false positive
    r = evaluate_masks(gt, res + encode_results(2, [b == 4], [0.99]))
    assert r["AP"] == pytest.approx(100.0)
    # ... while the same mask on image 1 (no crowd there) costs precision
    r = evaluate_masks(gt, res + encode_results(1, [np.ones((20, 20), bool)], [0.99]))
    assert r["AP"] < 100.0


def test_recall_one_third(panoptic):
    ps, a, _ = panoptic
    gt = entity_gt_from_panoptic(ps)
    gt = dict(gt, images=gt["images"][:1], annotations=[x for x in gt["annotations"] if x["image_id"] == 1])
    # one of three entities found with precision 1: the 101-point precision is 1 for recall 0.00..0.33 -> 34/101
    r = evaluate_masks(gt, encode_results(1, [a == 1], [0.9]))
    assert r["AP"] == pytest.approx(100 * 34 / 101)


def test_class_aware_versus_agnostic(panoptic, tmp_path):
    ps, a, b = panoptic
    gt = entity_gt_from_panoptic(ps)
    gt["categories"].append({"id": 2, "name": "other"})
    gt["annotations"][2]["category_id"] = 2  # the sky of image 1 is of another class
    write_json(tmp_path / "inst.json", gt)
    res = encode_results(1, [a == 1, a == 2, a == 3], [0.9, 0.8, 0.7], category_ids=[1, 1, 1])
    res += encode_results(2, [b == 5], [0.9])
    aware = evaluate_masks(str(tmp_path / "inst.json"), res)
    # class 1: its 3 non-crowd GT are all found before its one FP (the sky, score 0.7, ranked last) -> AP 100;
    # class 2: its only GT was predicted as class 1 -> AP 0. Mean over classes: 50.
    assert aware["AP"] == pytest.approx(50.0)
    assert evaluate_masks(gt, res, class_agnostic=True)["AP"] == pytest.approx(100.0)


def test_bad_results(panoptic):
    ps, a, _ = panoptic
    gt = entity_gt_from_panoptic(ps)
    with pytest.raises(ValueError, match="empty prediction list"):
        evaluate_masks(gt, [])
    with pytest.raises(ValueError, match="image_id 9 is not in the ground truth"):
        evaluate_masks(gt, encode_results(9, [a == 1], [0.5]))
    with pytest.raises(ValueError, match=r"unknown category_id 7"):
        evaluate_masks(gt, encode_results(1, [a == 1], [0.5], category_ids=7))
    assert evaluate_masks(gt, encode_results(1, [a == 1], [0.5], category_ids=7), class_agnostic=True)["AP"] > 0
    with pytest.raises(ValueError, match=r"image_id 1\): segmentation must be an RLE of size \[20, 20\], got \[5, 5\]"):
        evaluate_masks(gt, encode_results(1, [np.ones((5, 5), bool)], [0.5]))
    with pytest.raises(ValueError, match="2 scores"):
        encode_results(1, [a == 1], [0.5, 0.2])


def test_format_ap_table():
    base = dict(AP=38.1, AP50=60.0, AP75=40.0, APs=20.0, APm=40.0, APl=float("nan"))
    crm = dict(base, AP=38.9)
    lines = format_ap_table({"base": base, "CRM": crm}).splitlines()
    assert lines[0].split() == ["|", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[2].split()[:2] == ["base", "|"] and "38.90" in lines[3] and "+0.80" in lines[4]
