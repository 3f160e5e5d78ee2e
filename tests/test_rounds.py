"""Rounds (crm_d2.schedule.Rounds): refining again the masks that are still moving, and how the Refiner, the CLI
and a checkpoint choose it."""
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from crm_d2.refiner import Refiner
from crm_d2.schedule import Rounds, boundary_shift, roi_box

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rounds_values_mean_the_same_everywhere():
    assert Rounds.parse(None) is None and Rounds.parse("") is None  # nothing said: the checkpoint's own
    assert Rounds.parse(1) == Rounds.parse("1") == Rounds() == Rounds(1, 0.0)
    assert Rounds.parse("3:0.3") == Rounds(3, 0.3) == Rounds.parse({"count": 3, "min_shift": 0.3})
    assert Rounds.parse(str(Rounds(3, 0.3))) == Rounds(3, 0.3) and str(Rounds(3, 0.3)) == "3:0.3"
    assert str(Rounds(2)) == "2" and str(Rounds(1, 0.3)) == "1"  # one round has no gate to write
    assert Rounds.parse(Rounds(2).to_dict()) == Rounds(2)
    for bad in ("x", "0", "3:0.3:1", "2:-1", 0, True, 1.5, {"rounds": 2}, "1.5", {"count": 2, "min_shift": math.nan},
                {"count": math.nan}, {"count": None}, {"count": math.inf}, {"count": 2, "min_shift": None}):
        with pytest.raises(ValueError, match="rounds"):
            Rounds.parse(bad)


@pytest.fixture
def model_path(demo_checkpoint):
    return demo_checkpoint({"scales": [0.5, 1.0], "rounds": {"count": 3, "min_shift": 0}})


@pytest.fixture
def by_hand(model_path, scene, device):
    """Rounds done by hand with a one-round refiner (p[k]: after k rounds, p[0] the masks), each the schedule's
    last stage run on the last output.
    The masks are the scene's disc and a square elsewhere, which round 1 moves by different amounts."""
    img, gt, coarse = scene
    square = np.zeros(coarse.shape, bool)
    square[10:40, 70:110] = True
    masks = np.stack([coarse, square]).astype(np.float32)
    one = Refiner(str(model_path), device=device, rounds=1)
    p = [masks]
    for _ in range(3):
        p.append(one.refine_batch(img, p[-1], scales=None if len(p) == 1 else [1.0]))

    def refine(**options):  # the same masks through Refiner's own rounds
        return Refiner(str(model_path), device=device, **options).refine_batch(img, masks)

    # the same computation run twice: float rounding on CPU; TF32 and kernel choice on CUDA
    tol = 1e-5 if device == "cpu" else 1e-3
    return SimpleNamespace(img=img, masks=masks, p=p, refine=refine, tol=tol)


def test_each_round_refines_the_last_rounds_output_at_the_last_stage(by_hand, model_path, device):
    h = by_hand
    _, p1, p2, p3 = h.p
    assert np.abs(p2 - p1).max() > 0.05 and np.abs(p3 - p2).max() > 0.01  # every round does something here
    np.testing.assert_allclose(h.refine(rounds=2), p2, atol=h.tol)
    np.testing.assert_allclose(h.refine(), p3, atol=h.tol)  # the checkpoint's own: 3 rounds
    # fast mode runs the same rounds (its own engine for each)
    fast1 = Refiner(str(model_path), device=device, rounds=1, mode="fast")
    want = fast1.refine_batch(h.img, fast1.refine_batch(h.img, h.masks), scales=[1.0])
    np.testing.assert_allclose(h.refine(rounds=2, mode="fast"), want, atol=h.tol)


def test_min_shift_stops_each_mask_once_it_has_settled(by_hand):
    h = by_hand
    masks, p1, p2, p3 = h.p
    shifts = [boundary_shift(p, m) for p, m in zip(p1, masks)]
    assert abs(shifts[0] - shifts[1]) > 0.05, shifts
    moved = int(np.argmax(shifts))
    gated = h.refine(rounds=Rounds(2, float(np.mean(shifts))))
    np.testing.assert_allclose(gated[moved], p2[moved], atol=h.tol)  # still moving: refined again
    np.testing.assert_allclose(gated[1 - moved], p1[1 - moved], atol=h.tol)  # settled: round 1 kept
    # a gate no mask reaches is one round; round 3 is measured from round 2, not from the coarse mask
    np.testing.assert_allclose(h.refine(rounds=Rounds(3, 1e9)), p1, atol=h.tol)
    second = [boundary_shift(b, a) for a, b in zip(p1, p2)]
    gate3 = min(shifts) / 2
    assert min(second) < gate3  # some mask settles in round 2 that is still far from its coarse mask
    want = np.stack([p3[k] if second[k] >= gate3 else p2[k] for k in range(2)])
    np.testing.assert_allclose(h.refine(rounds=Rounds(3, gate3)), want, atol=h.tol)


def test_roi_rounds_stay_in_the_crop(model_path, scene, device):
    img, gt, coarse = scene
    m = coarse.astype(np.float32)
    once = Refiner(str(model_path), device=device, rounds=1).refine(img, m, roi=True, margin=0.1)
    twice = Refiner(str(model_path), device=device, rounds=2).refine(img, m, roi=True, margin=0.1)
    box = roi_box(m, 0.1)
    outside = np.ones(m.shape, bool)
    outside[box.slices] = False
    assert outside.any()
    np.testing.assert_array_equal(twice[outside], m[outside])
    assert np.abs(twice - once).max() > 0.05


def test_refiner_takes_the_checkpoints_rounds_unless_told_otherwise(model_path):
    assert Refiner(str(model_path), device="cpu").rounds == Rounds(3, 0.0)
    assert Refiner(str(model_path), device="cpu", rounds="2:0.5").rounds == Rounds(2, 0.5)
    assert Refiner(str(model_path), device="cpu", rounds=1).rounds == Rounds(1)
    # a file that says none (the authors' checkpoint) runs its schedule once
    assert Refiner(None, allow_random=True, config="tiny", device="cpu").rounds == Rounds(1)


def test_cli_rounds_is_an_output_setting(model_path, check_output_setting):
    _, out, one_round = check_output_setting(model_path, "--rounds", "rounds", "1", "2:x", "COUNT[:MIN_SHIFT]",
                                             "3:0", "3")
    assert not np.array_equal(cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED), one_round)
