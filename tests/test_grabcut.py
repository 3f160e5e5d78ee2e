"""GrabCut finish (crm_d2.grabcut): what it does to a boundary near the photo's edge, what it may not touch, and
how the Refiner, the CLI and the option's forms choose it."""

import cv2
import numpy as np
import pytest

from crm_d2.grabcut import GrabCut, grabcut_mask, grabcut_probs
from crm_d2.metrics import iou
from crm_d2.refiner import Refiner
from crm_d2.schedule import boundary_shift

pytestmark = pytest.mark.usefixtures("one_thread")


def disc_photo(h=64, w=80, centre=(32, 40), radius=18):
    """A light-blue disc on a dark-red ground with mild noise, and its mask."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    rgb = np.where(disc[..., None], np.array([160, 190, 230]), np.array([90, 30, 30]))
    noise = np.random.default_rng(1).integers(-8, 9, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8), disc


def ring(mask, r):
    """Pixels within r px of the mask's boundary (as grabcut_mask's band is drawn)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    m = mask.astype(np.uint8)
    return cv2.dilate(m, k) != cv2.erode(m, k)


@pytest.mark.parametrize("off", [-2, 2])
def test_grabcut_moves_a_boundary_that_is_off_onto_the_photos_edge(off):
    rgb, disc = disc_photo()
    _, wrong = disc_photo(radius=18 + off)  # the disc 2 px too small or too large
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    cut = grabcut_mask(bgr, wrong, band=2)
    assert iou(cut, disc) > 0.99 > iou(wrong, disc) + 0.1
    assert np.count_nonzero(cut != disc) < 0.1 * np.count_nonzero(wrong != disc)
    # outside the band nothing changes side, however the photo looks
    far = ~ring(wrong, 2)
    np.testing.assert_array_equal(cut[far], wrong[far])
    # a band narrower than the error can only go part of the way
    assert np.count_nonzero(grabcut_mask(bgr, wrong, band=1) != disc) > np.count_nonzero(cut != disc)


def test_a_band_longer_than_a_tile_is_finished_tile_by_tile():
    rgb, disc = disc_photo()
    _, wrong = disc_photo(radius=20)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    whole = grabcut_mask(bgr, wrong, band=2)  # one tile holds the whole band
    for tile in (8, 16, 40):  # the band's 46-px box in 36, 9 or 4 tiles, each with its own graph
        tiled = grabcut_mask(bgr, wrong, band=2, tile=tile)
        assert iou(tiled, disc) > 0.99 and iou(tiled, whole) > 0.99
        np.testing.assert_array_equal(tiled[~ring(wrong, 2)], wrong[~ring(wrong, 2)])
    np.testing.assert_array_equal(grabcut_mask(bgr, wrong, band=2, tile=46), whole)


def test_grabcut_gives_the_same_output_whatever_ran_before():
    # GrabCut seeds its colour models by k-means on OpenCV's global RNG; on a textured photo that changes the cut
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
    _, disc = disc_photo()
    rgb[disc] = (rgb[disc] * 0.6 + 80).astype(np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    first = grabcut_mask(bgr, disc, band=2)
    for seed in (1, 8, 15):
        cv2.setRNGSeed(seed)
        np.testing.assert_array_equal(grabcut_mask(bgr, disc, band=2), first)


def test_grabcut_probs_flips_sides_keeping_confidence_and_works_on_crops():
    rgb, disc = disc_photo()
    _, wrong = disc_photo(radius=16)
    prob = np.where(wrong, 0.9, 0.2).astype(np.float32)
    prob[ring(wrong, 1)] = 0.6  # unsure at the boundary
    out = grabcut_probs(rgb, prob[None].copy(), GrabCut(band=2))[0]
    cut = grabcut_mask(np.ascontiguousarray(rgb[..., ::-1]), prob > 0.5, band=2)
    np.testing.assert_array_equal(out > 0.5, cut)  # binarised, it is GrabCut's mask
    moved = cut != (prob > 0.5)
    assert moved.any()
    np.testing.assert_array_equal(out[~moved], prob[~moved])  # the rest is untouched
    np.testing.assert_allclose(out[moved], np.where(cut[moved], np.maximum(1 - prob[moved], 0.52),
                                                    np.minimum(1 - prob[moved], 0.48)))
    # on a crop of the photo (ROI mode) the crop of the photo is what GrabCut sees
    where = (slice(4, 60), slice(6, 74))
    crop = prob[where][None].copy()
    expect = grabcut_probs(np.ascontiguousarray(rgb[where]), crop.copy(), GrabCut(band=2))
    np.testing.assert_array_equal(grabcut_probs(rgb, crop, GrabCut(band=2), where), expect)
    # "off", an empty and a full mask are returned as they are
    stack = prob[None].copy()
    assert grabcut_probs(rgb, stack, False) is stack
    np.testing.assert_array_equal(stack[0], prob)
    for const in (0.0, 1.0):
        flat = np.full((1, 64, 80), const, np.float32)
        np.testing.assert_array_equal(grabcut_probs(rgb, flat.copy(), GrabCut(2)), flat)


def test_min_shift_finishes_only_masks_that_refinement_moved():
    rgb, disc = disc_photo()
    _, wrong = disc_photo(radius=16)
    coarse = np.stack([wrong, wrong]).astype(np.float32)
    probs = coarse.copy()
    _, moved_once = disc_photo(radius=17)
    probs[1] = moved_once  # refinement moved the second mask by about a pixel, the first not at all
    assert boundary_shift(probs[0], coarse[0]) == 0 and boundary_shift(probs[1], coarse[1]) > 0.5
    gated = grabcut_probs(rgb, probs.copy(), GrabCut(2, min_shift=0.5), coarse=coarse)
    ungated = grabcut_probs(rgb, probs.copy(), GrabCut(2))
    np.testing.assert_array_equal(gated[0], probs[0])  # kept
    np.testing.assert_array_equal(gated[1], ungated[1])  # finished as without the gate
    assert not np.array_equal(ungated[0], probs[0])  # and the gate is what kept the first one
    with pytest.raises(ValueError, match="coarse"):
        grabcut_probs(rgb, probs.copy(), GrabCut(2, min_shift=0.5))


def test_grabcut_values_mean_the_same_everywhere():
    assert GrabCut.parse(None) is None and GrabCut.parse("") is None  # nothing said: the checkpoint's own
    assert GrabCut.parse("off") is False and GrabCut.parse(0) is False and GrabCut.parse(False) is False
    assert GrabCut.parse(2) == GrabCut.parse("2") == GrabCut(band=2, iters=1) == GrabCut.parse({"band": 2})
    assert GrabCut.parse("3:2:0.25") == GrabCut(3, 2, 0.25) == GrabCut.parse(str(GrabCut(3, 2, 0.25)))
    assert str(GrabCut(2)) == "2:1"
    for bad in ("x", "2:1:0.1:9", "0", -1, True, 1.5, {"width": 2}, "2:0", "2:1:-1"):
        with pytest.raises(ValueError, match="grabcut"):
            GrabCut.parse(bad)


@pytest.fixture
def grabcut_checkpoint(demo_checkpoint):
    return demo_checkpoint({"scales": [1.0], "grabcut": {"band": 2, "iters": 1}})


def test_refiner_takes_the_checkpoints_grabcut_unless_told_otherwise(grabcut_checkpoint, scene, roi_keeps_coarse_outside):
    img, gt, coarse = scene
    own = Refiner(str(grabcut_checkpoint), device="cpu")
    assert own.grabcut == GrabCut(2)
    off = Refiner(str(grabcut_checkpoint), device="cpu", grabcut="off")
    assert off.grabcut is False
    assert Refiner(str(grabcut_checkpoint), device="cpu", grabcut="3:2").grabcut == GrabCut(3, 2)
    raw = off.refine(img, coarse)
    expect = grabcut_probs(img, raw[None].copy(), own.grabcut)[0]
    np.testing.assert_array_equal(own.refine(img, coarse), expect)
    assert not np.array_equal(raw, expect)  # it did something on this scene
    # after the edge snap, when both are set
    both = Refiner(str(grabcut_checkpoint), device="cpu", edge_snap="1:1:0.01")
    snapped = Refiner(str(grabcut_checkpoint), device="cpu", edge_snap="1:1:0.01", grabcut="off").refine(img, coarse)
    np.testing.assert_array_equal(both.refine(img, coarse), grabcut_probs(img, snapped[None].copy(), GrabCut(2))[0])
    # ROI mode finishes inside the box and keeps the coarse mask outside it
    roi_keeps_coarse_outside(own.refine(img, coarse, roi=True, margin=0.1), coarse, 0.1,
                             off.refine(img, coarse, roi=True, margin=0.1))
    # a model with none in its file (the demo model, the authors' checkpoint) runs without one
    assert Refiner(None, allow_random=True, config="tiny", device="cpu").grabcut is False


def test_cli_grabcut_is_an_output_setting(grabcut_checkpoint, check_output_setting):
    _, out, finished = check_output_setting(grabcut_checkpoint, "--grabcut", "grabcut", "off", "2:x",
                                            "BAND[:ITERS[:MIN_SHIFT]]", "2", "2:1")
    assert not np.array_equal(cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED), finished)
