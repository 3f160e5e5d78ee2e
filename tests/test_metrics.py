import math

import numpy as np
import pytest

from crm_d2.metrics import RefinementMetrics, binarize, boundary_accuracy, intersection_union, iou, mba_radii


def square(h=20, w=20, y0=5, y1=15, x0=5, x1=15):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def test_radii_follow_cascadepsp():
    # BIG size 2048x1600: max_r = 3648/300 = 12.16; 1 + int(11.16/5 * i) = 1, 3, 5, 7, 9
    assert mba_radii(1600, 2048) == [1, 3, 5, 7, 9]
    # small images: (max_r - 1) < 0, int() truncates towards zero -> all radius 1
    assert mba_radii(20, 20) == [1] * 5
    # 400x500: max_r = 3 -> 1 + int(0.4 i) = 1, 1, 1, 2, 2
    assert mba_radii(400, 500) == [1, 1, 1, 2, 2]


def test_band_of_a_square_counted_by_hand():
    gt = square()  # 10x10 square in a 20x20 image; radius 1 -> 3x3 cross kernel
    # dilation: 12x12 minus 4 corners = 140 px, erosion: 8x8 = 64 px -> band 76 px
    # (40 outside the square, 36 inside it).
    assert boundary_accuracy(gt, gt) == 1.0
    assert boundary_accuracy(np.zeros_like(gt), gt) == pytest.approx(40 / 76)
    assert boundary_accuracy(np.full_like(gt, 255), gt) == pytest.approx(36 / 76)
    # one extra column on the right: 10 wrong band pixels
    assert boundary_accuracy(square(x1=16), gt) == pytest.approx(66 / 76)


def test_no_band_along_the_image_frame():
    # GT = left half of a 10x10 image. OpenCV's default border ignores outside pixels, so the band is only
    # columns 4 and 5 (20 px); zero padding would add the frame and change the answer.
    gt = np.zeros((10, 10), np.uint8)
    gt[:, :5] = 255
    assert boundary_accuracy(np.zeros_like(gt), gt) == pytest.approx(10 / 20)


def test_mean_over_five_radii():
    # 400x500 (radii 1, 1, 1, 2, 2); vertical GT edge, prediction one column too wide. For radius r the band is
    # 2r full-height columns with 1 wrong column: (3 * (1 - 1/2) + 2 * (1 - 1/4)) / 5 = 0.6
    gt = np.zeros((400, 500), np.uint8)
    gt[:, :250] = 255
    pred = np.zeros_like(gt)
    pred[:, :251] = 255
    assert boundary_accuracy(pred, gt) == pytest.approx(0.6)


def test_empty_band_is_nan():
    assert math.isnan(boundary_accuracy(square(), np.zeros((20, 20), np.uint8)))
    assert math.isnan(boundary_accuracy(square(), np.full((20, 20), 255, np.uint8)))


def test_binarization_rules():
    assert binarize(np.array([[128, 129]], np.uint8)).tolist() == [[False, True]]
    # float p stored as floor(255 p): 0.5 -> 127, 129/255 -> 129, 0.506 -> 129
    assert binarize(np.array([[0.5, 129 / 255, 0.506]])).tolist() == [[False, True, True]]
    assert binarize(np.array([[True, False]])).tolist() == [[True, False]]
    assert binarize(np.zeros((3, 3, 1), np.uint8)).shape == (3, 3)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="sizes differ"):
        boundary_accuracy(square(), square(h=21))
    with pytest.raises(ValueError, match="3 channels"):
        boundary_accuracy(np.zeros((20, 20, 3), np.uint8), square())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        boundary_accuracy(np.full((20, 20), 1.5), square())
    with pytest.raises(ValueError, match="0..255"):
        iou(np.full((20, 20), 300, np.int32), square())
    zero_one = square() // 255  # a 0/1 ground truth is refused, where the pipeline would score it as empty
    with pytest.raises(ValueError, match="ground truth holds only 0 and 1"):
        iou(square(), zero_one)
    with pytest.raises(ValueError, match="ground truth holds only 0 and 1"):
        RefinementMetrics().update(square(), zero_one)
    assert iou(zero_one, square()) == 0  # a prediction stored as floor(255 p) may be that faint


def test_iou_helpers():
    assert intersection_union(square(x1=10), square()) == (50, 100)
    assert iou(square(x1=10), square()) == 0.5
    assert math.isnan(iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)))


def test_accumulator_is_dataset_level():
    m = RefinementMetrics()
    gt_a = square()
    m.update(gt_a, gt_a, coarse=np.zeros_like(gt_a), name="a")   # I=100, U=100, BA=1
    gt_b = square(y0=5, y1=7)                                      # 2x10 bar
    # bar band: dilation 4x12 minus corners = 44 px, erosion empty -> 20 GT + 24 background px
    m.update(np.zeros_like(gt_b), gt_b, coarse=gt_b, name="b")    # I=0, U=20, BA=24/44
    row = m.update(np.zeros((20, 20), bool), np.zeros((20, 20), bool), coarse=np.zeros((20, 20), bool), name="c")
    assert math.isnan(row["mba"])                                  # no GT boundary: skipped for mBA only
    s = m.summary()
    assert s["n"] == 3 and s["mba_skipped"] == 1 and m.skipped_names == ["c"]
    assert s["iou"] == pytest.approx(100 * 100 / 120)             # not the mean of per-image IoUs (50)
    assert s["mba"] == pytest.approx(100 * (1 + 24 / 44) / 2)
    assert s["coarse_iou"] == pytest.approx(100 * 20 / 120)
    assert s["coarse_mba"] == pytest.approx(100 * (40 / 76 + 1) / 2)
    assert set(s) >= {"iou", "mba", "coarse_iou", "coarse_mba", "n"}


def test_accumulator_without_coarse_and_size_errors():
    m = RefinementMetrics()
    m.update(square(), square())
    s = m.summary()
    assert s["coarse_iou"] is None and s["coarse_mba"] is None and s["iou"] == 100.0
    with pytest.raises(ValueError, match="coarse mask and ground truth sizes differ"):
        m.update(square(), square(), coarse=square(w=30))
    assert m.summary() == s  # a rejected image leaves the totals untouched
