"""Edge snap (crm_d2.guided): the guided filter's arithmetic, what it does to a boundary, and how the Refiner and
the CLI choose it."""

import cv2
import numpy as np
import pytest
import torch

from crm_d2.checkpoint import save_checkpoint
from crm_d2.cli import main
from crm_d2.guided import EdgeSnap, guided_filter, snap_probs
from crm_d2.model import CRM, CRMConfig
from crm_d2.refiner import Refiner
from crm_d2.schedule import boundary_shift

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_guided_filter(rgb, p, r, eps):
    """He et al.'s algorithm written out window by window: a ridge fit q = a . I + b per window (borders
    mirrored as cv2.BORDER_REFLECT does), then each pixel averages the fits of the windows that cover it."""
    I = rgb.astype(np.float64) / 255
    h, w = p.shape
    Ip = np.pad(I, ((r, r), (r, r), (0, 0)), mode="symmetric")
    pp = np.pad(p.astype(np.float64), r, mode="symmetric")
    a, b = np.zeros((h, w, 3)), np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            X = Ip[y:y + 2 * r + 1, x:x + 2 * r + 1].reshape(-1, 3)
            t = pp[y:y + 2 * r + 1, x:x + 2 * r + 1].ravel()
            mx, mt = X.mean(0), t.mean()
            cov = (X - mx).T @ (X - mx) / len(t)
            a[y, x] = np.linalg.solve(cov + eps * np.eye(3), (X - mx).T @ (t - mt) / len(t))
            b[y, x] = mt - a[y, x] @ mx
    ap = np.pad(a, ((r, r), (r, r), (0, 0)), mode="symmetric")
    bp = np.pad(b, r, mode="symmetric")
    q = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            q[y, x] = ap[y:y + 2 * r + 1, x:x + 2 * r + 1].reshape(-1, 3).mean(0) @ I[y, x] \
                + bp[y:y + 2 * r + 1, x:x + 2 * r + 1].mean()
    return q


@pytest.mark.parametrize("r,eps", [(1, 0.01), (2, 0.001)])
def test_guided_filter_is_the_windowed_ridge_fit(r, eps):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
    p = rng.random((9, 11)).astype(np.float32)
    np.testing.assert_allclose(guided_filter(rgb, p, r, eps), naive_guided_filter(rgb, p, r, eps), atol=2e-4)


def edge_photo(h=40, w=48, edge=24):
    """A photo whose left part is dark red and right part light blue, plus mild noise."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :edge] = (90, 30, 30)
    rgb[:, edge:] = (160, 190, 230)
    noise = np.random.default_rng(1).integers(-6, 7, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)


def test_snap_pulls_a_boundary_onto_the_photos_edge_and_leaves_flat_areas():
    rgb, snap = edge_photo(), EdgeSnap(radius=1, passes=2, eps=0.003)
    for start in (23, 25):  # the mask's boundary 1 px left or right of the photo's edge at x = 24
        prob = np.zeros((1, 40, 48), np.float32)
        prob[0, :, start:] = 1
        snapped = snap_probs(rgb, prob.copy(), snap)
        cols = np.flatnonzero((snapped[0] > 0.5).all(0))
        assert cols[0] == 24 and cols[-1] == 47, start  # the foreground now starts at the edge
        assert not (snapped[0, :, :24] > 0.5).any()
        assert snapped.min() >= 0 and snapped.max() <= 1
        # where the mask is constant over the filter's reach, nothing changes
        np.testing.assert_array_equal(snapped[0, :, :19], 0)
        np.testing.assert_array_equal(snapped[0, :, 30:], 1)
        # without a photo edge nearby, a step stays where it was
        kept = snap_probs(np.full_like(rgb, 128), prob.copy(), snap)
        assert np.flatnonzero((kept[0] > 0.5).all(0))[0] == start


def test_snap_on_the_active_box_equals_the_whole_image_and_roi_crops():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (50, 60, 3)).astype(np.uint8)
    prob = np.zeros((2, 50, 60), np.float32)
    prob[0, 10:30, 15:35] = rng.random((20, 20))
    prob[1, 40:, :] = 1  # touches the border
    snap = EdgeSnap(radius=1, passes=2, eps=0.01)
    full = prob.copy()
    for p in full:
        for _ in range(snap.passes):
            p[:] = np.clip(guided_filter(rgb, p, snap.radius, snap.eps), 0, 1)
    np.testing.assert_allclose(snap_probs(rgb, prob.copy(), snap), full, atol=1e-5)
    # on a crop of the photo (ROI mode), the crop of the photo is the guide
    where = (slice(5, 45), slice(10, 50))
    crop = prob[:, where[0], where[1]].copy()
    expect = crop.copy()
    for p in expect:
        for _ in range(snap.passes):
            p[:] = np.clip(guided_filter(rgb[where], p, snap.radius, snap.eps), 0, 1)
    np.testing.assert_allclose(snap_probs(rgb, crop, snap, where), expect, atol=1e-5)
    # "off" and constant maps are returned as they are
    assert snap_probs(rgb, prob, False) is prob
    zeros = np.zeros((1, 50, 60), np.float32)
    np.testing.assert_array_equal(snap_probs(rgb, zeros, snap), 0)


def test_min_shift_snaps_only_masks_that_refinement_moved(finishes_only_the_chosen_mask):
    rgb = edge_photo()
    coarse = np.zeros((2, 40, 48), np.float32)
    coarse[:, 5:35, 25:] = 1  # boundary 1 px right of the photo's edge at x = 24
    probs = coarse.copy()
    probs[1, 5:35, 24:] = 1  # the second mask was moved by refinement: 30 pixels over a ~90 px boundary
    assert boundary_shift(probs[0], coarse[0]) == 0
    assert boundary_shift(probs[1], coarse[1]) == pytest.approx(30 / np.count_nonzero(
        coarse[1] != cv2.erode(coarse[1], None)))
    finishes_only_the_chosen_mask(snap_probs, rgb, probs, coarse, EdgeSnap(1, 2, 0.003, min_shift=0.2),
                                  EdgeSnap(1, 2, 0.003))


def test_edge_snap_values_mean_the_same_everywhere():
    assert EdgeSnap.parse(None) is None and EdgeSnap.parse("") is None  # nothing said: the checkpoint's own
    assert EdgeSnap.parse("off") is False and EdgeSnap.parse(0) is False and EdgeSnap.parse(False) is False
    assert EdgeSnap.parse("1:2:0.003") == EdgeSnap(1, 2, 0.003) == EdgeSnap.parse({"radius": 1, "passes": 2,
                                                                                  "eps": 0.003})
    assert EdgeSnap.parse(2) == EdgeSnap.parse("2") == EdgeSnap(radius=2)
    assert EdgeSnap.parse(str(EdgeSnap(3, 1, 0.02))) == EdgeSnap(3, 1, 0.02)
    assert EdgeSnap.parse("1:2:0.003:0.3") == EdgeSnap(1, 2, 0.003, 0.3) == EdgeSnap.parse(str(EdgeSnap(1, 2, 0.003,
                                                                                                      0.3)))
    for bad in ("x", "1:2:3:4:5", "0", -1, True, 1.5, {"size": 1}, "1:0", "1:1:0.01:-1"):
        with pytest.raises(ValueError, match="edge snap"):
            EdgeSnap.parse(bad)


@pytest.fixture
def snap_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = CRMConfig.preset("tiny")
    model = CRM(cfg).eval()
    path = tmp_path / "snap.pth"
    save_checkpoint(path, model, cfg, meta={"scales": [1.0], "edge_snap": {"radius": 1, "passes": 2, "eps": 0.003}})
    return path


def test_refiner_takes_the_checkpoints_snap_unless_told_otherwise(snap_checkpoint, scene, roi_keeps_coarse_outside):
    img, gt, coarse = scene
    own = Refiner(str(snap_checkpoint), device="cpu")
    assert own.edge_snap == EdgeSnap(1, 2, 0.003)
    off = Refiner(str(snap_checkpoint), device="cpu", edge_snap="off")
    assert off.edge_snap is False
    assert Refiner(str(snap_checkpoint), device="cpu", edge_snap="2:1:0.01").edge_snap == EdgeSnap(2, 1, 0.01)
    raw = off.refine(img, coarse)
    expect = snap_probs(img, raw[None].copy(), own.edge_snap)[0]
    np.testing.assert_allclose(own.refine(img, coarse), expect, atol=1e-5)
    assert not np.allclose(raw, expect)  # the snap did something on this scene
    # a gate the refinement's shift does not reach leaves the output as it was; one it reaches snaps it
    shift = boundary_shift(raw, coarse.astype(np.float32))
    for min_shift, want in ((shift * 2 + 1, raw), (shift / 2, expect)):
        gated = Refiner(str(snap_checkpoint), device="cpu", edge_snap=EdgeSnap(1, 2, 0.003, min_shift))
        np.testing.assert_allclose(gated.refine(img, coarse), want, atol=1e-5)
        np.testing.assert_allclose(gated.refine(img, coarse, roi=True, margin=0.1),
                                   (own if min_shift < shift else off).refine(img, coarse, roi=True, margin=0.1),
                                   atol=1e-5)
    # ROI mode snaps inside the box and keeps the coarse mask outside it
    roi_keeps_coarse_outside(own.refine(img, coarse, roi=True, margin=0.1), coarse, 0.1,
                             off.refine(img, coarse, roi=True, margin=0.1))
    # a model with no snap in its file (the authors' checkpoint) runs without one
    assert Refiner(None, allow_random=True, config="tiny", device="cpu").edge_snap is False


def test_cli_edge_snap_is_an_output_setting(tmp_path, snap_checkpoint, check_output_setting):
    d, _, _ = check_output_setting(snap_checkpoint, "--edge-snap", "edge_snap", "off", "1:x",
                                   "RADIUS[:PASSES[:EPS[:MIN_SHIFT]]]", "1:1", "1:1:0.01")
    single = tmp_path / "one.png"
    assert main(["refine", "--weights", str(snap_checkpoint), "--device", "cpu", str(d / "a_im.jpg"),
                 str(d / "a_seg.png"), "-o", str(single), "--edge-snap", "off"]) == 0
    refiner = Refiner(str(snap_checkpoint), device="cpu", edge_snap="off")
    from crm_d2.io import read_image, read_mask

    expect = refiner.refine(read_image(d / "a_im.jpg"), read_mask(d / "a_seg.png"), output="uint8")
    np.testing.assert_array_equal(cv2.imread(str(single), cv2.IMREAD_UNCHANGED), expect)
