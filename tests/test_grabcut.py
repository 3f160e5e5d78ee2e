"""GrabCut finish (crm_d2.grabcut): what it does to a boundary near the photo's edge, what it may not touch, and
how the Refiner, the CLI and the option's forms choose it."""
import warnings

import cv2
import numpy as np
import pytest

from crm_d2.grabcut import (GATE_FEATURES, LOW_GATE_FEATURES, Gate, GrabCut, gate_features, grabcut_mask,
                            grabcut_probs, photo_gradient)
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


def kept_and_moved():
    """The disc photo, two coarse masks 2 px inside the disc, and refined masks: the first where it was, the
    second moved by about a pixel."""
    rgb, _ = disc_photo()
    _, wrong = disc_photo(radius=16)
    coarse = np.stack([wrong, wrong]).astype(np.float32)
    probs = coarse.copy()
    probs[1] = disc_photo(radius=17)[1]
    assert boundary_shift(probs[0], coarse[0]) == 0 and boundary_shift(probs[1], coarse[1]) > 0.5
    return rgb, coarse, probs


@pytest.mark.parametrize("chooser", ["min_shift", "gate"])
def test_min_shift_and_a_gate_finish_only_the_masks_they_choose(chooser, finishes_only_the_chosen_mask):
    rgb, coarse, probs = kept_and_moved()
    # both choose the mask that refinement moved by more than 0.5 px: min_shift by rule, the gate by its logit
    opt = GrabCut(2, min_shift=0.5) if chooser == "min_shift" else GrabCut(2, gate=shift_gate(0.5))
    finishes_only_the_chosen_mask(grabcut_probs, rgb, probs, coarse, opt, GrabCut(2))


def test_grabcut_values_mean_the_same_everywhere():
    assert GrabCut.parse(None) is None and GrabCut.parse("") is None  # nothing said: the checkpoint's own
    assert GrabCut.parse("off") is False and GrabCut.parse(0) is False and GrabCut.parse(False) is False
    assert GrabCut.parse(2) == GrabCut.parse("2") == GrabCut(band=2, iters=1) == GrabCut.parse({"band": 2})
    assert GrabCut.parse("3:2:0.25") == GrabCut(3, 2, 0.25) == GrabCut.parse(str(GrabCut(3, 2, 0.25)))
    assert str(GrabCut(2)) == "2:1"
    for bad in ("x", "2:1:0.1:9", "0", -1, True, 1.5, {"width": 2}, "2:0", "2:1:-1", {"band": 1, "gate": 3},
                {"band": 1, "gate": {"mean": [0.0]}}):
        with pytest.raises(ValueError, match="grabcut"):
            GrabCut.parse(bad)
    # a gate comes only with a checkpoint's dict, and is written as such
    gated = GrabCut.parse({"band": 1, "gate": shift_gate(0.5).__dict__})
    assert gated == GrabCut(1, gate=shift_gate(0.5)) and str(gated) == "1:1 gated"
    assert GrabCut.parse(gated.to_dict()) == gated


def shift_gate(px):
    """A hand-made gate: cut the masks that refinement moved by more than `px` on average (the first feature)."""
    n = len(GATE_FEATURES)
    return Gate(mean=[0.0] * n, scale=[1.0] * n, coef=[1.0] + [0.0] * (n - 1), bias=-float(np.log1p(px)))


def test_gate_features_say_how_far_a_mask_is_and_where_the_photos_edge_is():
    rgb, disc = disc_photo()
    _, small = disc_photo(radius=15)  # 3 px inside the edge
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    cut = grabcut_mask(bgr, small, band=3)
    length = np.count_nonzero(small != cv2.erode(small.astype(np.uint8), None).astype(bool))
    f = dict(zip(GATE_FEATURES, gate_features(rgb, small.astype(np.float32), disc.astype(np.float32), cut)))
    assert f["shift"] == pytest.approx(boundary_shift(small.astype(np.float32), disc.astype(np.float32)))
    assert f["cut_moved"] == pytest.approx(np.count_nonzero(cut != small) / length) and f["cut_moved"] > 1.5
    assert f["cut_from_coarse"] < 0.3 * f["shift"]  # the cut went back to the disc
    assert f["unsure"] == 0  # a binary probability has no unsure band
    # the refined boundary lies inside the disc, on no edge; the coarse one and the cut lie on the photo's edge
    assert f["edge_contrast"] < 0.5 and f["coarse_edge"] > 3 and f["cut_edge"] > 3
    assert f["coarse_rough2"] < 0.5 and f["coarse_rough4"] < 1.0  # a disc is smooth
    # a ragged coarse mask (every other boundary pixel notched) is not
    ragged = disc.copy()
    ragged[(disc != cv2.erode(disc.astype(np.uint8), None).astype(bool)) & (np.indices(disc.shape).sum(0) % 2 == 0)] = 0
    rough = gate_features(rgb, small.astype(np.float32), ragged.astype(np.float32), cut)
    assert rough[GATE_FEATURES.index("coarse_rough2")] > 2 * f["coarse_rough2"]
    # on a crop holding the masks, the same numbers: only the masks' surroundings are read
    where = (slice(4, 60), slice(6, 74))
    np.testing.assert_allclose(gate_features(rgb[where], small[where].astype(np.float32),
                                             disc[where].astype(np.float32), cut[where]),
                               list(f.values()), rtol=1e-5)
    # and the same with the photo's gradient made once for every mask, as grabcut_probs does
    np.testing.assert_array_equal(gate_features(rgb, small.astype(np.float32), disc.astype(np.float32), cut,
                                                photo_gradient(rgb)), list(f.values()))
    assert not gate_features(rgb, np.zeros((64, 80), np.float32), np.zeros((64, 80), np.float32),
                             np.zeros((64, 80), bool)).any()
    # a mask that refinement emptied (the coarse one was not): finite numbers, not NaN, for the gate to read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emptied = gate_features(rgb, np.zeros((64, 80), np.float32), disc.astype(np.float32), np.zeros((64, 80), bool))
    assert np.isfinite(emptied).all() and emptied[GATE_FEATURES.index("edge_contrast")] == 0


def test_gate_fit_learns_a_rule_from_examples_and_weights_count():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(1.0, 1.0, (400, len(GATE_FEATURES))))
    helped = x[:, 1] > 1.2  # only the second feature matters
    gate = Gate.fit(x, helped, l2=1.0)
    fresh = np.abs(rng.normal(1.0, 1.0, (400, len(GATE_FEATURES))))
    assert np.mean((gate.logit(fresh) > 0) == (fresh[:, 1] > 1.2)) > 0.95
    assert np.argmax(np.abs(gate.coef)) == 1
    # a stronger penalty shrinks the coefficients; heavy weights on masks it got wrong move the rule
    assert np.abs(Gate.fit(x, helped, l2=1000.0).coef).max() < np.abs(gate.coef).max()
    wrong = (x[:, 1] > 1.2) & (x[:, 1] < 1.6)
    flipped = np.where(wrong, False, helped)
    plain = Gate.fit(x, flipped, l2=1.0)
    heavy = Gate.fit(x, flipped, np.where(wrong, 20.0, 1.0), l2=1.0)
    probe = np.ones((1, len(GATE_FEATURES)))
    probe[0, 1] = 1.4
    assert heavy.logit(probe)[0] < plain.logit(probe)[0]
    # a gate fit on other features than this version computes is refused, by name
    with pytest.raises(ValueError, match="calibrate it again"):
        Gate(**{**gate.__dict__, "features": ("shift",) + GATE_FEATURES[1:-1] + ("other",)})


def test_a_gate_with_pairs_learns_what_two_numbers_say_together_and_round_trips(tmp_path):
    """A mask far off (large shift) helped by the cut only where its coarse mask is smooth: no linear rule tells
    that apart, the products of two features do; the fitted gate travels with its checkpoint."""
    from crm_d2.checkpoint import load_model, save_checkpoint
    from crm_d2.model import CRM, CRMConfig

    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(1.0, 1.0, (800, len(GATE_FEATURES))))
    helped = (x[:, 0] > 1.0) == (x[:, 7] < 1.0)  # an interaction: shift and coarse roughness together
    linear, pairs = Gate.fit(x, helped, l2=1.0), Gate.fit(x, helped, l2=1.0, pairs=True)
    f = len(GATE_FEATURES)
    assert pairs.pairs and len(pairs.coef) == f + f * (f + 1) // 2 and len(pairs.base_mean) == f
    fresh = np.abs(rng.normal(1.0, 1.0, (800, len(GATE_FEATURES))))
    truth = (fresh[:, 0] > 1.0) == (fresh[:, 7] < 1.0)
    assert np.mean((linear.logit(fresh) > 0) == truth) < 0.7 < 0.85 < np.mean((pairs.logit(fresh) > 0) == truth)
    assert pairs.logit(fresh[0]) == pytest.approx(pairs.logit(fresh[:1])[0])  # one mask or N
    low = Gate.fit(np.concatenate([x, x], 1), helped, names=LOW_GATE_FEATURES, pairs=True)
    opt = GrabCut(1, gate=pairs, low_gain=0.5, low_gate=low)
    assert GrabCut.parse(opt.to_dict()) == opt
    model = CRM(CRMConfig(layers=(1, 1, 1), width=8, mask_skip=True))
    back = load_model(save_checkpoint(tmp_path / "m.pth", model, meta={"grabcut": opt.to_dict()}), "cpu")
    again = GrabCut.parse(back.meta["grabcut"])
    assert np.allclose(again.gate.logit(fresh), pairs.logit(fresh)) and again.low_gate.pairs
    with pytest.raises(ValueError, match="with pairs over 9 features needs 54"):
        Gate(**{**pairs.__dict__, "coef": pairs.coef[:f], "mean": pairs.mean[:f], "scale": pairs.scale[:f]})
    with pytest.raises(ValueError, match="base means"):
        Gate(**{**linear.__dict__, "base_mean": (0.0,) * f, "base_scale": (1.0,) * f})


def test_a_gate_does_not_cut_photos_larger_than_it_was_fitted_on():
    rgb, coarse, probs = kept_and_moved()
    gated = grabcut_probs(rgb, probs.copy(), GrabCut(2, gate=shift_gate(0.5)), coarse=coarse)
    # a photo larger than the gate was fitted on is not cut; in ROI mode the photo's size counts, not the crop's
    for side, expect in ((80, gated), (79, probs)):
        sized = GrabCut(2, gate=Gate(**{**shift_gate(0.5).__dict__, "max_side": side}))
        assert sized.gate.covers(rgb.shape) == (side == 80)
        np.testing.assert_array_equal(grabcut_probs(rgb, probs.copy(), sized, coarse=coarse), expect)
    where = (slice(4, 60), slice(6, 74))
    crops, coarse_crops = probs[:, where[0], where[1]].copy(), coarse[:, where[0], where[1]]
    for side, cut in ((80, True), (79, False)):
        sized = GrabCut(2, gate=Gate(**{**shift_gate(0.5).__dict__, "max_side": side}))
        assert np.array_equal(grabcut_probs(rgb, crops.copy(), sized, where, coarse_crops), crops) != cut


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
    # a model with none in its file (the authors' checkpoint) runs without one
    assert Refiner(None, allow_random=True, config="tiny", device="cpu").grabcut is False


def test_a_checkpoints_gate_decides_per_mask_and_a_band_given_by_hand_is_not_gated(demo_checkpoint, scene):
    img, gt, coarse = scene
    gated = GrabCut(2, gate=shift_gate(0.0))
    path = demo_checkpoint({"scales": [1.0], "grabcut": gated.to_dict()})
    own = Refiner(str(path), device="cpu")
    assert own.grabcut == gated
    assert Refiner(str(path), device="cpu", grabcut=2).grabcut == GrabCut(2)  # by hand: every mask
    raw = Refiner(str(path), device="cpu", grabcut="off").refine(img, coarse)
    c = (coarse > 127).astype(np.float32)[None]
    finished = own.refine(img, coarse)
    np.testing.assert_array_equal(finished, grabcut_probs(img, raw[None].copy(), gated, coarse=c)[0])
    assert not np.array_equal(finished, raw)  # this gate let the cut through
    never = Refiner(str(demo_checkpoint({"scales": [1.0], "grabcut": GrabCut(2, gate=shift_gate(1e9)).to_dict()},
                                        "never.pth")), device="cpu")
    np.testing.assert_array_equal(never.refine(img, coarse), raw)


def test_cli_grabcut_is_an_output_setting(grabcut_checkpoint, check_output_setting):
    _, out, finished = check_output_setting(grabcut_checkpoint, "--grabcut", "grabcut", "off", "2:x",
                                            "BAND[:ITERS[:MIN_SHIFT]]", "2", "2:1")
    assert not np.array_equal(cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED), finished)


def constant_gate(logit, features=LOW_GATE_FEATURES):
    """A hand-made gate that always says `logit`."""
    n = len(features)
    return Gate(mean=[0.0] * n, scale=[1.0] * n, coef=[0.0] * n, bias=float(logit), features=features)


def test_a_second_look_refines_the_cut_masks_again_and_its_gate_picks_the_better_cut():
    rgb, coarse, probs = kept_and_moved()
    truth = np.where(disc_photo()[1], 0.9, 0.1).astype(np.float32)  # soft, unlike the first look's output
    calls = []

    def rerun(indices, factor):  # the model run again with a lower gain: here it finds the disc itself
        calls.append((list(indices), factor))
        return np.stack([truth] * len(indices))

    first = GrabCut(2, gate=shift_gate(0.5))
    plain = grabcut_probs(rgb, probs.copy(), first, coarse=coarse)
    take = GrabCut(2, gate=shift_gate(0.5), low_gain=0.5, low_gate=constant_gate(5.0))
    out = grabcut_probs(rgb, probs.copy(), take, coarse=coarse, rerun=rerun)
    assert calls == [([1], 0.5)]  # only the mask the first gate cuts is looked at again, at the option's gain
    np.testing.assert_array_equal(out[0], probs[0])
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    np.testing.assert_array_equal(out[1] > 0.5, grabcut_mask(bgr, truth > 0.5, 2))  # the low-gain output's cut
    assert not np.array_equal(out[1], plain[1])
    # its gate saying no, or no way to run the model again, leaves the first look's result
    keep = GrabCut(2, gate=shift_gate(0.5), low_gain=0.5, low_gate=constant_gate(-5.0))
    np.testing.assert_array_equal(grabcut_probs(rgb, probs.copy(), keep, coarse=coarse, rerun=rerun), plain)
    np.testing.assert_array_equal(grabcut_probs(rgb, probs.copy(), take, coarse=coarse), plain)
    # the second gate reads both looks' numbers: the first's and the low-gain output's
    seen = []

    class Spy(Gate):
        def logit(self, features):
            seen.append(np.asarray(features))
            return 1.0

    spy = Spy(**constant_gate(0.0).__dict__)
    grabcut_probs(rgb, probs.copy(), GrabCut(2, gate=shift_gate(0.5), low_gain=0.5, low_gate=spy), coarse=coarse,
                  rerun=rerun)
    low_cut = grabcut_mask(bgr, truth > 0.5, 2)
    first_cut = grabcut_mask(bgr, probs[1] > 0.5, 2)
    np.testing.assert_allclose(seen[0], np.concatenate([gate_features(rgb, probs[1], coarse[1], first_cut),
                                                        gate_features(rgb, truth, coarse[1], low_cut)]))


def test_a_second_look_is_written_with_the_checkpoint_and_checked():
    low = GrabCut(1, gate=shift_gate(0.5), low_gain=0.5, low_gate=constant_gate(1.0))
    assert GrabCut.parse(low.to_dict()) == low and str(low) == "1:1 gated, low gain x0.5"
    assert GrabCut.parse(GrabCut(1, gate=shift_gate(0.5)).to_dict()).low_gain == 0  # older files: no second look
    for bad in ({"low_gain": 0.5},  # no second gate
                {"low_gain": 0.5, "low_gate": shift_gate(0.5).__dict__},  # a first-look gate
                {"low_gain": -1, "low_gate": constant_gate(1.0).__dict__}):
        with pytest.raises(ValueError, match="grabcut"):
            GrabCut.parse({"band": 1, "gate": shift_gate(0.5).__dict__, **bad})
    with pytest.raises(ValueError, match="low_gain"):
        GrabCut(1, low_gain=0.5, low_gate=constant_gate(1.0))  # without a first gate
    fitted = Gate.fit(np.random.default_rng(0).normal(size=(40, len(LOW_GATE_FEATURES))), np.arange(40) % 2,
                      names=LOW_GATE_FEATURES)
    assert fitted.features == LOW_GATE_FEATURES and len(fitted.coef) == len(LOW_GATE_FEATURES)


def test_mask_gain_times_scales_the_skip_within_its_block_only():
    from crm_d2.checkpoint import load_model
    from crm_d2.model import CRM, CRMConfig

    model = load_model("demo", "cpu")
    gain = model.mask_gain.item()
    with model.mask_gain_times(0.5):
        assert model.mask_gain.item() == pytest.approx(gain / 2)
    assert model.mask_gain.item() == gain
    with pytest.raises(RuntimeError), model.mask_gain_times(0.25):
        raise RuntimeError("a failure inside")
    assert model.mask_gain.item() == gain  # restored however the block ends
    with pytest.raises(ValueError, match="mask skip"), CRM(CRMConfig.preset("tiny")).mask_gain_times(0.5):
        pass


def test_refiner_takes_a_second_look_with_the_model_trusting_the_mask_less(demo_checkpoint, scene,
                                                                            roi_keeps_coarse_outside):
    img, gt, coarse = scene
    c = (coarse > 127).astype(np.float32)[None]
    opt = GrabCut(2, gate=shift_gate(0.0), low_gain=0.5, low_gate=constant_gate(5.0))
    path = demo_checkpoint({"scales": [1.0], "grabcut": opt.to_dict()})
    own = Refiner(str(path), device="cpu")
    off = Refiner(str(path), device="cpu", grabcut="off")
    raw = off.refine(img, coarse)
    with off.model.mask_gain_times(0.5):
        low = off.refine(img, coarse)
    assert not np.array_equal(low, raw)  # trusting the coarse mask less changes the output on this scene
    expect = grabcut_probs(img, raw[None].copy(), opt, coarse=c, rerun=lambda idx, f: low[None])[0]
    np.testing.assert_array_equal(own.refine(img, coarse), expect)
    first_only = grabcut_probs(img, raw[None].copy(), GrabCut(2, gate=shift_gate(0.0)), coarse=c)[0]
    assert not np.array_equal(expect, first_only)
    # ROI mode (parts and instances of a scene) takes the first look only, and keeps the coarse mask outside it
    no_second = Refiner(str(path), device="cpu", grabcut=GrabCut(2, gate=shift_gate(0.0)))
    roi = own.refine(img, coarse, roi=True, margin=0.1)
    np.testing.assert_array_equal(roi, no_second.refine(img, coarse, roi=True, margin=0.1))
    roi_keeps_coarse_outside(roi, coarse, 0.1, off.refine(img, coarse, roi=True, margin=0.1))
    assert own.model.mask_gain.item() == off.model.mask_gain.item()
    with pytest.raises(ValueError, match="no mask skip"):
        Refiner(None, allow_random=True, config="tiny", device="cpu", grabcut=opt)
