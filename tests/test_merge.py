"""Merging refined per-segment probabilities into one id map: the rules of crm_d2.panoptic.merge on hand-made maps."""
import numpy as np
import pytest

from crm_d2.panoptic.coco import check_segments
from crm_d2.panoptic.merge import (DEFAULT_MERGE, MERGE_RULES, SegmentProb, crop_prob, masks_to_id_map,
                                   merge_segments, segment_order)


def scene():
    """10x12 map: stuff 1 (left half) and 2 (right half), thing 3 (score .9) and thing 4 (score .6), void strip."""
    ids = np.zeros((10, 12), np.uint32)
    ids[:, :6] = 1
    ids[:, 6:] = 2
    ids[2:6, 2:6] = 3
    ids[5:9, 6:10] = 4
    ids[:, 11] = 0  # void column
    segs = [{"id": 1, "category_id": 10, "isthing": 0}, {"id": 2, "category_id": 11, "isthing": 0},
            {"id": 3, "category_id": 1, "isthing": 1, "score": 0.9},
            {"id": 4, "category_id": 2, "isthing": 1, "score": 0.6}]
    return ids, segs


def coarse_probs(ids, segs):
    return [(ids == s["id"]).astype(np.float32) for s in segs]


@pytest.mark.parametrize("rule", MERGE_RULES)
def test_identity_refinement_changes_nothing(rule):
    ids, segs = scene()
    out, kept = merge_segments(ids, segs, coarse_probs(ids, segs), rule=rule)
    assert out.dtype == ids.dtype
    np.testing.assert_array_equal(out, ids)
    assert [s["id"] for s in kept] == [1, 2, 3, 4]
    assert [s["area"] for s in kept] == [int((ids == i).sum()) for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("rule", MERGE_RULES)
def test_unrefined_segments_keep_their_pixels(rule):
    ids, segs = scene()
    out, kept = merge_segments(ids, segs, [None] * 4, rule=rule)
    np.testing.assert_array_equal(out, ids)


def test_things_beat_stuff_in_hybrid_and_paste_but_not_in_prob():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[2][2:5, 6] = 0.6  # thing 3 grows one column into stuff 2, which is sure of it (1.0)
    for rule in ("hybrid", "paste"):
        out, _ = merge_segments(ids, segs, probs, rule=rule)
        assert (out[2:5, 6] == 3).all(), rule
    out, _ = merge_segments(ids, segs, probs, rule="prob")
    assert (out[2:5, 6] == 2).all()


def test_between_things_hybrid_follows_probability_and_paste_follows_score():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[3][5, 6:10] = 0.7  # thing 4 weakly claims row 5 of itself
    probs[2][5, 6:10] = 0.6  # thing 3 (higher score) claims it less strongly
    out, _ = merge_segments(ids, segs, probs, rule="hybrid")
    assert (out[5, 6:10] == 4).all()
    out, _ = merge_segments(ids, segs, probs, rule="paste")
    assert (out[5, 6:10] == 3).all()


def test_ties_go_to_the_higher_score_then_list_order():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[2][8, 6:10] = 1.0  # thing 3 claims row 8 of thing 4 just as surely
    out, _ = merge_segments(ids, segs, probs, rule="hybrid")
    assert (out[8, 6:10] == 3).all()
    assert segment_order(segs) == [2, 3, 0, 1]
    no_scores = [{k: v for k, v in s.items() if k != "score"} for s in segs]
    assert segment_order(list(reversed(no_scores))) == [0, 1, 2, 3]


def test_unclaimed_pixels_keep_original_or_void_or_nearest():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[2][2:6, 4:6] = 0.3  # thing 3 lets go of its two right columns; nobody else claims them
    out, kept = merge_segments(ids, segs, probs, rule="hybrid")
    assert (out[2:6, 4:6] == 3).all()
    out, _ = merge_segments(ids, segs, probs, rule="hybrid-void")
    assert (out[2:6, 4:6] == 0).all()
    out, _ = merge_segments(ids, segs, probs, rule="hybrid-nearest")
    assert (out[3:5, 5] == 2).all()  # next to stuff 2, which now borders them
    assert (out[3:5, 4] == 3).all()  # next to what is left of thing 3


@pytest.mark.parametrize("rule", MERGE_RULES)
def test_void_stays_void_unless_a_segment_claims_it(rule):
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    out, _ = merge_segments(ids, segs, probs, rule=rule)
    assert (out[:, 11] == 0).all()
    probs[1][:3, 11] = 0.8  # stuff 2 grows into the void column
    out, _ = merge_segments(ids, segs, probs, rule=rule)
    assert (out[:3, 11] == 2).all() and (out[3:, 11] == 0).all()


@pytest.mark.parametrize("rule", ["hybrid", "paste", "prob"])
def test_a_lost_segment_gets_its_pixels_back_unless_told_to_drop_it(rule):
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[3][:] = 0.0  # thing 4 refined to nothing
    probs[1][5:9, 6:10] = 0.9  # and stuff 2 claims its pixels
    out, kept = merge_segments(ids, segs, probs, rule=rule)
    np.testing.assert_array_equal(out, ids)  # refinement does not decide which objects exist
    assert [s["id"] for s in kept] == [1, 2, 3, 4]
    # a thing that another thing swallows whole comes back too
    probs = coarse_probs(ids, segs)
    probs[2][2:9, 2:10] = 1.0
    probs[3][:] = 0.4
    out, kept = merge_segments(ids, segs, probs, rule=rule)
    assert (out == 4).sum() == (ids == 4).sum() and [s["id"] for s in kept] == [1, 2, 3, 4]
    assert check_segments(out, kept) == {s["id"]: s["area"] for s in kept}
    # drop_empty's behaviour: removed, and PNG and JSON agree
    probs = coarse_probs(ids, segs)
    probs[3][:] = 0.0
    probs[1][5:9, 6:10] = 0.9
    out, kept = merge_segments(ids, segs, probs, rule=rule, keep_lost=False)
    assert 4 not in out and [s["id"] for s in kept] == [1, 2, 3]
    areas = check_segments(out, kept)
    assert all(areas[s["id"]] == s["area"] for s in kept)


def test_vanished_segment_without_claimant_keeps_pixels_by_default():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    probs[3][:] = 0.0
    out, kept = merge_segments(ids, segs, probs)  # nobody wants the pixels: they stay with thing 4
    assert DEFAULT_MERGE == "hybrid"
    np.testing.assert_array_equal(out, ids)
    out, kept = merge_segments(ids, segs, probs, rule="hybrid-void", keep_lost=False)
    assert 4 not in out and [s["id"] for s in kept] == [1, 2, 3]
    out, kept = merge_segments(ids, segs, probs, rule="hybrid-void")  # kept: void only takes what is unclaimed
    np.testing.assert_array_equal(out, ids)


def test_perfect_refinement_recovers_ground_truth():
    """A refiner that returns the true masks must give the true map back: merging adds no error of its own."""
    ids, segs = scene()
    gt = ids.copy()
    gt[2:7, 1:7] = 3  # the true thing 3 is larger
    gt[6:9, 7:12] = 4  # and thing 4 is elsewhere, partly over the void column
    coarse = ids
    probs = [(gt == s["id"]).astype(np.float32) for s in segs]
    for rule in ("hybrid", "paste", "prob"):
        out, kept = merge_segments(coarse, segs, probs, rule=rule)
        np.testing.assert_array_equal(out, gt)


def test_crop_and_full_probabilities_agree():
    rng = np.random.default_rng(0)
    ids, segs = scene()
    full = [np.clip(p + rng.normal(0, 0.3, p.shape), 0, 1).astype(np.float32) * (p > 0)
            for p in coarse_probs(ids, segs)]
    crops = [crop_prob(p) for p in full]
    assert all(isinstance(c, SegmentProb) for c in crops)
    a, ka = merge_segments(ids, segs, full)
    b, kb = merge_segments(ids, segs, crops)
    np.testing.assert_array_equal(a, b)
    assert ka == kb
    empty = crop_prob(np.zeros((4, 4)))
    assert empty.prob.size == 0


def test_bbox_is_updated_when_present():
    ids, segs = scene()
    segs = [dict(s, bbox=[0, 0, 1, 1]) for s in segs]
    probs = coarse_probs(ids, segs)
    probs[2][2:6, 2] = 0.0
    probs[0][2:6, 2] = 1.0
    _, kept = merge_segments(ids, segs, probs)
    assert kept[2]["bbox"] == [3, 2, 3, 4]


def test_bad_input():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    with pytest.raises(ValueError, match="unknown merge rule 'best'"):
        merge_segments(ids, segs, probs, rule="best")
    with pytest.raises(ValueError, match="3 probability maps for 4 segments"):
        merge_segments(ids, segs, probs[:3])
    with pytest.raises(ValueError, match=r"segment #1: probability map is \(5, 5\)"):
        merge_segments(ids, segs, [probs[0], np.zeros((5, 5)), probs[2], probs[3]])
    with pytest.raises(ValueError, match="segment id 3 lacks 'isthing'"):
        merge_segments(ids, [segs[0], segs[1], {"id": 3}, segs[3]], probs)
    with pytest.raises(ValueError, match="does not fit"):
        merge_segments(ids, segs, [SegmentProb((0, 0, 20, 20), np.zeros((20, 20)))] + probs[1:])


def test_masks_to_id_map():
    m = np.zeros((3, 5, 5), bool)
    m[0, :2] = True
    m[1, 3:] = True
    np.testing.assert_array_equal(masks_to_id_map(m)[:, 0], [1, 1, 0, 2, 2])
    m[2, 1:4] = True
    with pytest.raises(ValueError, match=r"masks #0 and #2 of the entity list overlap \(5 pixels\)"):
        masks_to_id_map(m, where="entity list")


def test_restoring_a_lost_segment_never_loses_another():
    ids, segs = scene()
    probs = coarse_probs(ids, segs)
    # thing 4 moves onto thing 3's place and loses its own pixels to stuff 2; thing 3 gets nothing
    probs[2][:] = 0.0
    probs[3][:] = 0.0
    probs[3][2:6, 2:6] = 0.95
    probs[1][5:9, 6:10] = 0.9
    out, kept = merge_segments(ids, segs, probs)
    assert [s["id"] for s in kept] == [1, 2, 3, 4]  # restoring 3 empties 4, which is restored in turn
    np.testing.assert_array_equal(out == 4, ids == 4)
    assert check_segments(out, kept) == {s["id"]: s["area"] for s in kept}
