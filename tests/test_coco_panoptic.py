import json

import cv2
import numpy as np
import pytest

from crm_d2.io import write_json, write_png
from crm_d2.panoptic.coco import (PanopticSet, check_segments, id2rgb, load_panoptic, mask_bbox, masks_to_ids,
                                  read_panoptic_png, read_panoptic_sidecar, rgb2id, segments_to_masks,
                                  write_panoptic_image, write_panoptic_json)

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "sky", "isthing": 0}]


def test_rgb_id_conversion():
    assert rgb2id([1, 2, 3]) == 1 + 2 * 256 + 3 * 65536
    assert id2rgb(197121) == [1, 2, 3]
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 197121, 256 ** 3 - 1]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 2].tolist() == [1, 2, 3]
    assert (rgb2id(rgb) == ids).all()
    with pytest.raises(ValueError, match="does not fit"):
        id2rgb(256 ** 3)


def test_png_stores_rgb_in_file_order(tmp_path):
    ids = np.array([[197121, 0]], np.uint32)
    write_png(tmp_path / "a.png", id2rgb(ids))
    # the file holds R=1, G=2, B=3 (cv2 reads BGR)
    assert cv2.imread(str(tmp_path / "a.png"))[0, 0].tolist() == [3, 2, 1]
    assert (read_panoptic_png(tmp_path / "a.png") == ids).all()
    cv2.imwrite(str(tmp_path / "grey.png"), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="grey.png must be 8-bit RGB"):
        read_panoptic_png(tmp_path / "grey.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_panoptic_png(tmp_path / "missing.png")


def test_check_segments_messages():
    ids = np.array([[0, 5], [7, 7]])
    assert check_segments(ids, [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 3}]) == {5: 1, 7: 2}
    with pytest.raises(ValueError, match=r"segment id\(s\) \[7\] in the PNG are not in the JSON in x.png"):
        check_segments(ids, [{"id": 5, "category_id": 1}], where="x.png")
    with pytest.raises(ValueError, match="segment id 9 is in the JSON but not in the PNG"):
        check_segments(ids, [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 1}, {"id": 9, "category_id": 1}])
    with pytest.raises(ValueError, match="segment id 5 listed twice"):
        check_segments(ids, [{"id": 5, "category_id": 1}, {"id": 5, "category_id": 1}])
    with pytest.raises(ValueError, match="unknown category_id 2"):
        check_segments(ids, [{"id": 5, "category_id": 2}, {"id": 7, "category_id": 1}], categories={1: {}, 3: {}})


def test_masks_round_trip_and_overlap_error():
    ids = np.zeros((4, 5), np.uint32)
    ids[:2, :3] = 10
    ids[2:, 1:] = 20
    segs = [{"id": 20, "category_id": 3}, {"id": 10, "category_id": 1}, {"id": 30, "category_id": 1}]
    masks = segments_to_masks(ids, segs)
    assert masks.shape == (3, 4, 5) and masks[0].sum() == 8 and masks[1].sum() == 6 and masks[2].sum() == 0
    assert (masks_to_ids(masks, [20, 10, 30]) == ids).all()
    assert mask_bbox(masks[0]) == [1, 2, 4, 2] and mask_bbox(masks[2]) == [0, 0, 0, 0]
    masks[1, 2, 2] = True
    with pytest.raises(ValueError, match=r"masks overlap \(segments \[20, 10\] at pixel y=2, x=2\)"):
        masks_to_ids(masks, [20, 10, 30])


def test_write_image_drops_empty_segments_and_resumes(tmp_path):
    ids = np.zeros((6, 8), np.uint32)
    ids[1:3, 2:6] = 70000
    ids[4:, :] = 5
    segs = [{"id": 70000, "category_id": 1}, {"id": 5, "category_id": 3}, {"id": 9, "category_id": 1}]
    assert read_panoptic_sidecar(tmp_path / "out", "img.png") is None
    ann = write_panoptic_image(tmp_path / "out", "img.png", 42, ids, segs)
    assert [s["id"] for s in ann["segments_info"]] == [70000, 5]  # 9 refined to nothing: dropped
    assert ann["segments_info"][0]["area"] == 8 and ann["segments_info"][0]["bbox"] == [2, 1, 4, 2]
    assert ann["segments_info"][1]["bbox"] == mask_bbox(ids == 5) == [0, 4, 8, 2]
    assert ann["segments_info"][1]["iscrowd"] == 0
    assert read_panoptic_sidecar(tmp_path / "out", "img.png") == ann
    assert (read_panoptic_png(tmp_path / "out" / "img.png") == ids).all()
    with pytest.raises(ValueError, match=r"\[5\] in the PNG are not in the JSON in .*bad.png"):
        write_panoptic_image(tmp_path / "out", "bad.png", 1, ids, segs[:1])
    assert not (tmp_path / "out" / "bad.png").exists()

    write_panoptic_json(tmp_path / "out.json", [ann], {c["id"]: c for c in CATEGORIES})
    ps = load_panoptic(tmp_path / "out.json")  # folder defaults to the JSON path without .json
    assert len(ps) == 1 and ps.annotations[42]["file_name"] == "img.png" and ps.by_file["img.png"]["image_id"] == 42
    assert ps.categories[3]["isthing"] == 0
    assert (ps.read_ids(ps.annotations[42]) == ids).all()


def test_panoptic_set_errors(tmp_path):
    (tmp_path / "pngs").mkdir()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PanopticSet(tmp_path / "nope.json", tmp_path / "pngs")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        PanopticSet(tmp_path / "bad.json", tmp_path / "pngs")
    write_json(tmp_path / "x.json", {"annotations": [{"image_id": 1, "file_name": "1.png"}]})
    with pytest.raises(ValueError, match=r"annotation 1 lacks \['segments_info'\]"):
        PanopticSet(tmp_path / "x.json", tmp_path / "pngs")
    ann = {"image_id": 1, "file_name": "1.png", "segments_info": [{"id": 3, "category_id": 1}]}
    write_json(tmp_path / "y.json", {"annotations": [ann], "categories": CATEGORIES})
    write_png(tmp_path / "pngs" / "1.png", id2rgb(np.full((2, 2), 4)))
    ps = PanopticSet(tmp_path / "y.json", tmp_path / "pngs")
    with pytest.raises(ValueError, match=r"segment id 3 is in the JSON but not in the PNG in .*1.png \(image_id 1\)"):
        ps.read_ids(ann)
    assert json.loads((tmp_path / "y.json").read_text())["annotations"][0] == ann
