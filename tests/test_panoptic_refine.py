"""Segment refinement (crm_d2.panoptic.refine): selection, batching, ROI options, well-formed merged output."""
import numpy as np
import pytest

from crm_d2.model import CRMConfig
from crm_d2.panoptic.coco import check_segments
from crm_d2.panoptic.refine import SegmentRefineOptions, refine_instances, refine_panoptic
from crm_d2.refiner import Refiner


class StubRefiner:
    """Refiner stand-in with the contracted refine_batch; `fn(masks) -> probs` decides the output."""

    def __init__(self, fn=None):
        self.fn = fn or (lambda masks: masks.astype(np.float32))
        self.calls = []

    def refine_batch(self, image, masks, *, roi=False, margin=0.5, max_side=None, scales=None, output="prob"):
        masks = np.asarray(masks)
        self.calls.append({"n": len(masks), "areas": masks.reshape(len(masks), -1).sum(1).tolist(), "roi": roi,
                           "margin": margin, "max_side": max_side, "scales": scales, "output": output})
        return self.fn(masks)


def panoptic_scene(h=48, w=64):
    """Stuff 7 (top) and 8 (bottom), things 21 and 22, a 6-pixel thing 23, a void patch."""
    rng = np.random.default_rng(0)
    ids = np.zeros((h, w), np.uint32)
    ids[: h // 2] = 7
    ids[h // 2:] = 8
    ids[8:30, 10:30] = 21
    ids[20:40, 36:56] = 22
    ids[2:4, 60:63] = 23
    ids[44:, :6] = 0
    segs = [{"id": 7, "category_id": 1, "isthing": 0}, {"id": 8, "category_id": 2, "isthing": 0},
            {"id": 21, "category_id": 3, "isthing": 1, "score": 0.8},
            {"id": 22, "category_id": 3, "isthing": 1, "score": 0.9},
            {"id": 23, "category_id": 4, "isthing": 1, "score": 0.5}]
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return image, ids, segs


def test_identity_refiner_returns_the_input():
    image, ids, segs = panoptic_scene()
    stub = StubRefiner()
    out, kept = refine_panoptic(stub, image, ids, segs)
    np.testing.assert_array_equal(out, ids)
    assert [s["id"] for s in kept] == [7, 8, 21, 22, 23]


def test_selection_batching_and_options_reach_the_refiner():
    image, ids, segs = panoptic_scene()
    stub = StubRefiner()
    opts = SegmentRefineOptions(targets="things", min_area=10, margin=0.3, max_side=512, batch_size=1,
                                scales=(0.5, 1.0))
    refine_panoptic(stub, image, ids, segs, opts)
    # things only, the 6-pixel thing is below min_area; one segment per call
    assert [c["areas"] for c in stub.calls] == [[int((ids == 21).sum())], [int((ids == 22).sum())]]
    assert all(c["roi"] and c["margin"] == 0.3 and c["max_side"] == 512 and c["scales"] == (0.5, 1.0)
               and c["output"] == "prob" for c in stub.calls)
    stub = StubRefiner()
    refine_panoptic(stub, image, ids, segs, SegmentRefineOptions(targets="stuff", batch_size=8))
    assert len(stub.calls) == 1 and stub.calls[0]["n"] == 2
    assert stub.calls[0]["scales"] is None  # None = the refiner's own scales (not passed)


def test_isthing_from_categories_and_vanishing_segment_kept_or_dropped():
    image, ids, segs = panoptic_scene()
    cats = {1: {"id": 1, "isthing": 0}, 2: {"id": 2, "isthing": 0}, 3: {"id": 3, "isthing": 1},
            4: {"id": 4, "isthing": 1}}
    bare = [{k: v for k, v in s.items() if k != "isthing"} for s in segs]
    area22 = int((ids == 22).sum())

    def drop_22_to_stuff(masks):
        p = masks.astype(np.float32)
        for k, m in enumerate(masks):
            if m.sum() == area22:
                p[k] = 0  # thing 22 refined to nothing
        return p

    stub = StubRefiner(drop_22_to_stuff)
    out, kept = refine_panoptic(stub, image, ids, bare, SegmentRefineOptions(merge="hybrid-nearest", band=None),
                                categories=cats)
    np.testing.assert_array_equal(out == 22, ids == 22)  # no detection is lost to refinement
    assert [s["id"] for s in kept] == [s["id"] for s in segs]
    out, kept = refine_panoptic(stub, image, ids, bare, SegmentRefineOptions(merge="hybrid-nearest", band=None,
                                                                             drop_empty=True), categories=cats)
    assert 22 not in out and 22 not in [s["id"] for s in kept]
    assert check_segments(out, kept) == {s["id"]: s["area"] for s in kept}
    assert set(np.unique(out[20:40, 36:56]).tolist()) <= {7, 8}  # vacated: to the neighbouring stuff


def tiny_refiners(device, randomize_model):
    """A random tiny refiner (varied outputs) on the device under test and the same one on the CPU."""
    from crm_d2.model import CRM

    model = randomize_model(CRM(CRMConfig.preset("tiny")))
    out = []
    for d in (device, "cpu"):
        r = Refiner(weights=None, allow_random=True, device=d, config=CRMConfig.preset("tiny"), scales=(0.5, 1.0))
        r.model.load_state_dict(model.state_dict())
        out.append(r)
    return out


def test_random_tiny_refiner_gives_a_well_formed_result(device, randomize_model):
    refiner, cpu = tiny_refiners(device, randomize_model)
    image, ids, segs = panoptic_scene()
    opts = SegmentRefineOptions(min_area=10, max_side=64)
    out, kept = refine_panoptic(refiner, image, ids, segs, opts)
    # on CUDA: the same segments as the CPU path, pixels agreeing but where two segments tie to float precision
    cpu_out, cpu_kept = refine_panoptic(cpu, image, ids, segs, opts)
    assert [s["id"] for s in kept] == [s["id"] for s in cpu_kept]
    assert (out == cpu_out).mean() >= (1.0 if device == "cpu" else 0.99)
    assert (out != ids).any()  # the refiner did change the map
    assert out.shape == ids.shape and out.dtype == ids.dtype
    present = set(np.unique(out).tolist()) - {0}
    assert present == {s["id"] for s in kept} and present <= {7, 8, 21, 22, 23}
    areas = check_segments(out, kept)
    assert all(areas[s["id"]] == s["area"] for s in kept)
    assert (out[2:4, 60:63] == 23).all() or 23 not in present  # the small thing is never refined
    assert all(set(s) >= {"id", "category_id", "isthing", "area"} for s in kept)


def test_bad_panoptic_input():
    image, ids, segs = panoptic_scene()
    stub = StubRefiner()
    with pytest.raises(ValueError, match=r"image x\.png is 64x40 \(WxH\) but its masks are 64x48"):
        refine_panoptic(stub, image[:40], ids, segs, where="x.png")
    with pytest.raises(ValueError, match=r"segment id\(s\) \[23\] in the PNG are not in the JSON in p\.png"):
        refine_panoptic(stub, image, ids, segs[:4], where="p.png")
    with pytest.raises(ValueError, match="targets must be one of"):
        SegmentRefineOptions(targets="all")
    with pytest.raises(ValueError, match="unknown merge rule"):
        SegmentRefineOptions(merge="nope")
    with pytest.raises(ValueError, match="has no 'isthing'"):
        refine_panoptic(stub, image, ids, [{k: v for k, v in s.items() if k != "isthing"} for s in segs])


def instance_masks(h=48, w=64):
    m = np.zeros((3, h, w), bool)
    m[0, 5:25, 5:25] = True
    m[1, 15:35, 15:40] = True  # overlaps mask 0
    m[2, 40:42, 50:52] = True  # tiny
    return m


def test_instances_overlap_allowed_and_independent():
    image = np.zeros((48, 64, 3), np.uint8)
    masks = instance_masks()

    def grow(ms):
        p = ms.astype(np.float32)
        p[:, :, 1:] = np.maximum(p[:, :, 1:], p[:, :, :-1])  # every mask grows one column to the right
        return p

    stub = StubRefiner(grow)
    out = refine_instances(stub, image, masks, [0.9, 0.8, 0.7], SegmentRefineOptions(min_area=10))
    assert out.shape == masks.shape and out.dtype == bool
    assert out[0, 5:25, 25].all() and out[1, 15:35, 40].all()
    np.testing.assert_array_equal(out[2], masks[2])  # below min_area: untouched
    assert stub.calls[0]["n"] == 2
    out = refine_instances(stub, image, masks, [0.9, 0.8, 0.7], SegmentRefineOptions(min_area=1),
                           select=[True, False, True])
    np.testing.assert_array_equal(out[1], masks[1])


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_an_instance_refined_to_nothing_keeps_its_base_mask(non_overlapping):
    image = np.zeros((48, 64, 3), np.uint8)
    masks = instance_masks()
    masks[1, 5:25, 5:25] = False  # no overlap (entities)

    def empty_second(ms):
        return np.stack([np.zeros_like(m) if (m == masks[1]).all() else m for m in ms]).astype(np.float32)

    opts = dict(min_area=1, band=None)
    out = refine_instances(StubRefiner(empty_second), image, masks, [0.9, 0.8, 0.7], SegmentRefineOptions(**opts),
                           non_overlapping=non_overlapping)
    np.testing.assert_array_equal(out, masks)
    out = refine_instances(StubRefiner(empty_second), image, masks, [0.9, 0.8, 0.7],
                           SegmentRefineOptions(drop_empty=True, **opts), non_overlapping=non_overlapping)
    if non_overlapping:  # merged like panoptic things: pixels nobody claims stay with their mask
        np.testing.assert_array_equal(out, masks)
    else:
        assert not out[1].any()
        np.testing.assert_array_equal(out[[0, 2]], masks[[0, 2]])


def test_entities_non_overlapping():
    image = np.zeros((48, 64, 3), np.uint8)
    masks = instance_masks()
    with pytest.raises(ValueError, match=r"masks #0 and #1 of the instance list img 7 overlap \(100 pixels\)"):
        refine_instances(StubRefiner(), image, masks, [0.9, 0.8, 0.7], non_overlapping=True, where="img 7")
    masks[1, 5:25, 5:25] = False
    stub = StubRefiner(lambda ms: np.clip(ms.astype(np.float32) * 0.9 + 0.3 * (ms.sum(0, keepdims=True) == 0),
                                          0, 1))
    out = refine_instances(stub, image, masks, [0.5, 0.9, 0.7], SegmentRefineOptions(min_area=1, band=None),
                           non_overlapping=True)
    assert out.sum(0).max() <= 1
    np.testing.assert_array_equal(out, masks)
    grown = masks[0].copy()
    grown[5:30, 5:30] = True  # mask 0 grows over free pixels and over part of mask 1

    def grow_first(ms):
        return np.stack([grown if (m == masks[0]).all() else m for m in ms]).astype(np.float32)

    out = refine_instances(StubRefiner(grow_first), image, masks, [0.5, 0.9, 0.7], SegmentRefineOptions(min_area=1, band=None),
                           non_overlapping=True)
    assert out.sum(0).max() <= 1
    assert out[0, 25:30, 5:15].all()  # free pixels go to mask 0
    assert out[1, 25:30, 15:30].all()  # equally sure claims: the higher score (mask 1) keeps its pixels


def test_instances_with_a_real_refiner_on_the_device(device, randomize_model):
    refiner, cpu = tiny_refiners(device, randomize_model)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    masks = instance_masks()
    opts = SegmentRefineOptions(min_area=10)
    for non_overlapping in (False, True):
        if non_overlapping:
            masks[1, 5:25, 5:25] = False
        out = refine_instances(refiner, image, masks, [0.9, 0.8, 0.7], opts, non_overlapping=non_overlapping)
        want = refine_instances(cpu, image, masks, [0.9, 0.8, 0.7], opts, non_overlapping=non_overlapping)
        assert out.shape == masks.shape and out.dtype == bool
        np.testing.assert_array_equal(out[2], masks[2])  # below min_area: untouched
        assert (out == want).mean() >= (1.0 if device == "cpu" else 0.99)
        assert not non_overlapping or out.sum(0).max() <= 1


def test_instances_bad_input():
    image = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="3 instance masks but 2 scores"):
        refine_instances(StubRefiner(), image, instance_masks(), [0.9, 0.8])
    with pytest.raises(ValueError, match="must be NxHxW"):
        refine_instances(StubRefiner(), image, instance_masks()[0], [0.9])
    assert refine_instances(StubRefiner(), image, np.zeros((0, 48, 64), bool), []).shape == (0, 48, 64)


def test_band_limits_changes_to_the_coarse_boundary():
    from crm_d2.panoptic.refine import limit_to_band

    mask = np.zeros((100, 100), bool)
    mask[30:70, 30:70] = True
    prob = np.zeros((100, 100), np.float32)  # a refiner that erases the whole segment
    prob[0:5, 0:5] = 1.0  # and claims a far corner
    out = limit_to_band(prob, mask, band=0.05)  # 5 px
    assert out[50, 50] == 1 and out[2, 2] == 0  # far from the boundary: the coarse mask holds
    assert out[30, 50] == 0 and out[27, 50] == 0 and out[34, 50] == 0  # near it: the refiner decides
    assert out[36, 50] == 1


def test_band_on_the_mask_box_equals_the_whole_image_morphology():
    import cv2

    from crm_d2.panoptic.refine import limit_to_band

    rng = np.random.default_rng(0)
    for k in range(6):
        mask = np.zeros((120, 160), np.uint8)
        cx, cy = rng.integers(0, 160), rng.integers(0, 120)  # some touch the image border
        cv2.ellipse(mask, (int(cx), int(cy)), (int(rng.integers(5, 50)), int(rng.integers(5, 40))), 0, 0, 360, 1, -1)
        prob = rng.random(mask.shape).astype(np.float32)
        r = round(0.04 * 160)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        near = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
        np.testing.assert_array_equal(limit_to_band(prob, mask.astype(bool), 0.04),
                                      np.where(near, prob, mask.astype(np.float32)))
    empty = np.zeros((20, 30), bool)
    assert not limit_to_band(np.ones((20, 30), np.float32), empty, 0.1).any()
