"""The resolution-aware schedule ("auto"), the mask skip at inference, and the held-out evaluation command."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crm_d2.checkpoint import save_checkpoint
from crm_d2.model import CRM, CRMConfig
from crm_d2.refiner import Refiner
from crm_d2.schedule import DEFAULT_SCALES, ROI_MIN_STAGE_SIDE, auto_scales, stage_scales
from crm_d2.train.perturb import PerturbConfig, blob_perturb, lowres_protocol, mask_iou, perturb_mask

ROOT = Path(__file__).resolve().parents[1]
MAINTAIN = ROOT / "tools" / "maintain"  # the scripts that keep the shipped model


def test_auto_schedule_starts_near_the_training_resolution_and_doubles():
    assert auto_scales(464) == (1.0,)  # a 400-px photo: one full-resolution stage
    assert auto_scales(1088) == (0.5, 1.0)
    assert auto_scales(2112) == (0.25, 0.5, 1.0)
    assert auto_scales(3904) == DEFAULT_SCALES  # 4K: the released ratios
    assert auto_scales(1088, base=256) == (0.25, 0.5, 1.0)
    assert stage_scales("auto", (1000, 2112), None) == (0.25, 0.5, 1.0)
    assert stage_scales("auto", (1000, 2112), max_side=528) == (0.25,)  # capped like any schedule
    assert stage_scales((0.5, 1.0), (400, 400), max_side=0) == (0.5, 1.0)  # 0, as the CLI's and D2's: no cap
    with pytest.raises(ValueError, match="max_side must be"):
        stage_scales((0.5, 1.0), (400, 400), max_side=-1)


def test_stages_below_a_useful_size_are_skipped_in_roi_mode():
    assert stage_scales(DEFAULT_SCALES, (264, 200), min_side=96) == (0.5, 1.0)  # 33 and 66 px: skipped
    assert stage_scales(DEFAULT_SCALES, (4064, 6064), min_side=96) == DEFAULT_SCALES
    assert stage_scales(DEFAULT_SCALES, (64, 64), min_side=96) == (1.0,)  # the last stage always runs
    # through refine_batch: a small segment's ROI runs fewer stages than the whole image does
    refiner = Refiner(None, device="cpu", allow_random=True, config=CRMConfig(layers=(1, 1, 1), width=8),
                      scales=DEFAULT_SCALES)
    image = np.full((400, 600, 3), 90, np.uint8)
    mask = np.zeros((400, 600), np.uint8)
    mask[180:230, 280:330] = 1  # a 50-px segment: ROI about 128 px, padded 192
    refiner.profile = []
    refiner.refine_batch(image, [mask], roi=True)
    roi_stages = [p["scale"] for p in refiner.profile]
    refiner.profile = []
    refiner.refine_batch(image, [mask])
    assert [p["scale"] for p in refiner.profile] == list(DEFAULT_SCALES)  # whole image: the released schedule
    assert roi_stages == [s for s in DEFAULT_SCALES if s * 192 >= ROI_MIN_STAGE_SIDE] == [0.5, 1.0]


def _skip_checkpoint(tmp_path, meta):
    torch.manual_seed(0)
    model = CRM(CRMConfig(layers=(1, 1, 1), width=8, mask_skip=True))
    with torch.no_grad():  # the decoder says 0 everywhere: the output is the skip alone
        model.imnet.layers[-1].weight.zero_()
        model.imnet.layers[-1].bias.zero_()
        model.mask_gain.fill_(2.5)
    return save_checkpoint(tmp_path / "skip.pth", model, meta=meta)


def test_checkpoint_carries_its_schedule_rule(tmp_path):
    path = _skip_checkpoint(tmp_path, {"scales": "auto", "auto_base": 128})
    refiner = Refiner(str(path), device="cpu")
    assert refiner.scales == "auto" and refiner.auto_base == 128
    refiner.profile = []
    image = np.zeros((200, 150, 3), np.uint8)
    refiner.refine(image, np.ones((200, 150), np.float32) * 0.7)
    assert [p["scale"] for p in refiner.profile] == [0.5, 1.0]  # 264 px padded, base 128: 0.5 then 1.0
    assert Refiner(str(path), device="cpu", scales=[1.0]).scales == (1.0,)  # an explicit schedule wins
    released = {f"module.{k}": v for k, v in CRM(CRMConfig(layers=(1, 1, 1), width=8)).state_dict().items()}
    torch.save(released, tmp_path / "model_45705")
    assert Refiner(str(tmp_path / "model_45705"), device="cpu").scales == DEFAULT_SCALES  # the authors' file
    with pytest.raises(ValueError, match="auto"):
        Refiner(str(path), device="cpu", scales="fast")


@pytest.mark.parametrize("mode, every_stage", [("exact", True), ("fast", True), ("fast", False)],
                         ids=["exact", "fast", "fast, last stage only"])
def test_mask_skip_passes_the_mask_through_every_stage(tmp_path, mode, every_stage):
    from crm_d2.fast import FastOptions

    path = _skip_checkpoint(tmp_path, {"scales": [0.5, 1.0]})
    refiner = Refiner(str(path), device="cpu", mode=mode, fast=FastOptions(last_stage_only=not every_stage))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 128, 3)).astype(np.uint8)
    mask = np.zeros((96, 128), np.float32)
    mask[20:70, 30:100] = 1
    prob = refiner.refine(image, mask)
    # two stages (fast mode's default: the last one only), each p = sigmoid(2.5 * (2 m - 1)) of the previous one,
    # at the same pixels
    expect = mask
    for _ in range(2 if every_stage else 1):
        expect = 1 / (1 + np.exp(-2.5 * (2 * expect - 1)))
    assert np.abs(prob - expect).max() < 2e-3  # the half-scale stage's own grid blurs the mask a little
    assert np.abs(prob[40:50, 50:80] - expect[40:50, 50:80]).max() < 1e-5


def test_lowres_protocol_and_new_perturbations():
    gt = np.zeros((128, 160), np.uint8)
    gt[30:100, 40:130] = 255
    gt[60:64, 10:150] = 255  # a thin bar that a 16x segmenter loses
    c4, c16 = lowres_protocol(gt, 4), lowres_protocol(gt, 16)
    assert set(np.unique(c16)) <= {0, 255} and np.array_equal(c4, lowres_protocol(gt, 4))  # fixed, binary
    assert mask_iou(c4, gt) > mask_iou(c16, gt) > 0.8
    rng = np.random.default_rng
    fine = [perturb_mask(gt, rng(i), PerturbConfig(fine_prob=1.0)) for i in range(10)]
    ious = [mask_iou(f > 127, gt) for f in fine]  # nearly perfect (a blur may thin the 4-px bar): to be kept
    assert min(ious) > 0.9 and np.mean(ious) > 0.95
    blobs = [blob_perturb(gt, rng(i)) for i in range(10)]
    assert all(not np.array_equal(b, gt) for b in blobs) and all(set(np.unique(b)) <= {0, 255} for b in blobs)
    with pytest.raises(ValueError, match="fine_prob"):
        PerturbConfig.from_dict({"fine_prob": 2})


def test_heldout_eval_command(tmp_path):
    from crm_d2.train.synthetic import write_pairs_folder

    for src in ("ecssd", "pascal-s"):
        write_pairs_folder(tmp_path / "data" / src, 12, size=(72, 96), seed=len(src))
    model = CRM(CRMConfig(layers=(1, 1, 1), width=8, mask_skip=True))
    weights = save_checkpoint(tmp_path / "m.pth", model, meta={"scales": "auto"})
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "heldout_eval.py"), "--weights", str(weights),
                          "--data", str(tmp_path / "data"), "--every", "1", "--recipes", "8x", "polygon",
                          "--json", str(tmp_path / "r.json"), "--write-big", str(tmp_path / "big"),
                          "--threads", "1", "--pictures", str(tmp_path / "pics"), "--picture-names", "ecssd/syn0000",
                          "--label-offset", "pascal-s=0.5,-0.25"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 8x | all | 4 |" in out.stdout  # every 10th of 12 pairs in each of two sources: 2 + 2
    assert "pascal-s photos moved by 0.5,-0.25 px" in out.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["photos"] == 4 and set(res["results"]) == {"8x", "polygon"}
    assert res["label_offsets"] == {"pascal-s": [0.5, -0.25]}
    assert set(res["results"]["8x"]) == {"all", "ecssd", "pascal-s"}
    assert len(list((tmp_path / "big" / "8x").glob("*_seg.png"))) == 4  # a BIG folder for crm-d2 refine/eval
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["ecssd_syn0000_8x.png",
                                                                      "ecssd_syn0000_polygon.png"]


def test_heldout_eval_moves_a_sources_photos_onto_its_labels(tmp_path, monkeypatch):
    """--label-offset SOURCE=DX,DY: that source's photos are moved by (DX, DY) before refining (the analysis of a
    registration error); the others and every ground truth are read as they are."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from heldout_eval import heldout_items, label_offset_argument, load_photos

    from crm_d2.train.registration import move_photo
    from crm_d2.train.synthetic import write_pairs_folder

    for src in ("ecssd", "ccp"):
        write_pairs_folder(tmp_path / src, 10, size=(40, 56), seed=len(src))
    items = heldout_items(tmp_path, every=1)
    plain = list(load_photos(items))
    moved = list(load_photos(items, label_offsets={"ccp": (0.5, 0.25)}))
    assert [p[0] for p in plain] == ["ecssd/syn0000", "ccp/syn0000"]
    assert np.array_equal(moved[1][1], move_photo(plain[1][1], 0.5, 0.25))
    assert not np.array_equal(moved[1][1], plain[1][1])
    assert np.array_equal(moved[0][1], plain[0][1])
    assert all(np.array_equal(a, b) for (_, _, ga), (_, _, gb) in zip(plain, moved) for a, b in zip(ga, gb))
    assert label_offset_argument("ccp=0.56,0.25") == ("ccp", (0.56, 0.25))
    for bad in ("ccp=0.5", "coco=0.5,0.5", "ccp"):
        with pytest.raises(argparse.ArgumentTypeError):
            label_offset_argument(bad)


def test_calibrate_skip_picks_the_gain_on_photos_heldout_eval_does_not_judge(tmp_path, monkeypatch):
    from crm_d2.train.synthetic import write_pairs_folder

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from heldout_eval import dev_items, heldout_items

    write_pairs_folder(tmp_path / "data" / "ecssd", 40, size=(64, 80), seed=3)
    judged = {it.image for it in heldout_items(tmp_path / "data", every=3)}
    dev = dev_items(tmp_path / "data", every=1)
    assert len(dev) == 2 and not judged & {it.image for it in dev}  # held-out items 1 and 2 (0 and 3 are judged)
    write_pairs_folder(tmp_path / "data" / "pascal-s", 20, size=(64, 80), seed=4)  # two more development photos
    extra = [it for it in dev_items(tmp_path / "data", every=1) if "pascal-s" in it.name]
    assert len(extra) == 2
    cv2.imwrite(str(extra[0].mask), np.zeros((64, 80), np.uint8))  # one of them empty: skipped, not a crash
    # the skip-only model returns its coarse mask (gain 2.5); x0 would trust it not at all (p = 0.5 everywhere)
    weights = _skip_checkpoint(tmp_path, {"scales": "auto"})
    out = subprocess.run([sys.executable, str(MAINTAIN / "calibrate_skip.py"), "--weights", str(weights),
                          "--output", str(tmp_path / "cal.pth"), "--data", str(tmp_path / "data"), "--every", "1",
                          "--multipliers", "0", "1", "--rounds", "1", "2", "--recipes", "8x", "--threads", "1",
                          "--json", str(tmp_path / "cal.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "cal.json").read_text())
    assert [(row["multiplier"], row["rounds"]["count"]) for row in res["table"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert res["best"]["multiplier"] == 1.0 and res["best"]["rounds"]["count"] == 1  # the first of equals
    for row in res["table"]:  # x1 gives back the coarse mask in every round; x0 gives p = 0.5 in every round
        assert (row["mean_mba_gain"] == pytest.approx(0.0, abs=1e-9)) == (row["multiplier"] == 1.0), row
    cal = Refiner(str(tmp_path / "cal.pth"), device="cpu")
    assert float(cal.model.mask_gain) == pytest.approx(2.5)
    assert cal.model.meta["mask_gain_calibration"]["multiplier"] == 1.0 and cal.scales == "auto"
    assert "rounds" not in cal.model.meta and str(cal.rounds) == "1"  # one round needs no entry


def test_calibrate_grabcut_fits_a_gate_on_the_development_photos_and_writes_it_into_the_model(tmp_path, monkeypatch):
    from crm_d2.grabcut import LOW_GATE_FEATURES, GrabCut
    from crm_d2.train.synthetic import write_pairs_folder

    write_pairs_folder(tmp_path / "data" / "ecssd", 70, size=(64, 80), seed=3)
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from heldout_eval import dev_items

    empty = dev_items(tmp_path / "data", every=1)[-1].mask  # a development photo with nothing in its mask is skipped
    cv2.imwrite(str(empty), np.zeros((64, 80), np.uint8))
    weights = _skip_checkpoint(tmp_path, {"scales": "auto"})  # gives back its coarse mask
    out = subprocess.run([sys.executable, str(MAINTAIN / "calibrate_grabcut.py"), "--weights", str(weights),
                          "--output", str(tmp_path / "gated.pth"), "--data", str(tmp_path / "data"), "--every", "1",
                          "--band", "2", "--recipes", "8x", "16x", "--threads", "1", "--train-every", "0",
                          "--json", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "g.json").read_text())
    assert len(res["rows"]) == 3 * 2  # held-out items 1, 2, 4 (0, 3, 6 are judged; 5 is empty), two recipes
    never, always = res["folds"]["never"], res["folds"]["always"]
    for recipe in ("8x", "16x"):  # the model gives back the coarse mask; the cut changes it
        assert never[recipe]["mba"] == pytest.approx(0.0, abs=1e-9) and never[recipe]["cut"] == 0
        assert always[recipe]["cut"] == 1 and always[recipe]["mba"] != pytest.approx(0.0, abs=1e-6)
        rows = [r for r in res["rows"] if r["recipe"] == recipe]
        assert always[recipe]["mba"] == pytest.approx(100 * np.mean([r["cut"][2] - r["coarse"][2] for r in rows]))
    gated = Refiner(str(tmp_path / "gated.pth"), device="cpu")
    assert isinstance(gated.grabcut, GrabCut) and gated.grabcut.band == 2 and gated.grabcut.gate is not None
    assert gated.grabcut.gate.max_side == 80  # the largest photo it was fitted on
    assert gated.grabcut.gate.pairs and gated.grabcut.low_gate.pairs  # the default gate reads pairs of features
    assert gated.model.meta["grabcut_calibration"]["dev_photos"] == 4 and gated.scales == "auto"
    # the second look (a model with a mask skip): every mask refined again at half the gain and cut, and a second
    # gate fitted; this model gives back its coarse mask at any gain, so that cut is the first one's
    assert gated.grabcut.low_gain == 0.5 and gated.grabcut.low_gate.features == LOW_GATE_FEATURES
    assert "gated + low gain (folds)" in res["folds"]
    assert all(r["low"] == r["cut"] and len(r["low_features"]) == len(LOW_GATE_FEATURES) for r in res["rows"])
    out = subprocess.run([sys.executable, str(MAINTAIN / "calibrate_grabcut.py"), "--weights", str(weights),
                          "--output", str(tmp_path / "first_only.pth"), "--data", str(tmp_path / "data"),
                          "--band", "2", "--recipes", "8x", "--threads", "1", "--low-gain", "0", "--gate", "linear"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first_only = Refiner(str(tmp_path / "first_only.pth"), device="cpu").grabcut
    assert first_only.gate is not None and first_only.low_gain == 0 and first_only.low_gate is None
    assert not first_only.gate.pairs and len(first_only.gate.coef) == len(first_only.gate.features)


def test_calibrate_grabcut_adds_training_photos_in_worker_processes_and_resumes_from_its_cache(tmp_path, monkeypatch):
    """--train-every N adds every N-th training photo to what the gates are fitted on, never to the folds' table;
    --workers measures photos in processes; --cache keeps each photo's rows, resumes, and refuses other settings."""
    from crm_d2.train.synthetic import write_pairs_folder

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from heldout_eval import dev_items, training_items

    write_pairs_folder(tmp_path / "data" / "ecssd", 40, size=(64, 80), seed=5)
    assert len(dev_items(tmp_path / "data", every=1)) == 2 and len(training_items(tmp_path / "data")) == 36
    weights = _skip_checkpoint(tmp_path, {"scales": "auto"})

    def calibrate(name, *extra):
        out = subprocess.run([sys.executable, str(MAINTAIN / "calibrate_grabcut.py"), "--weights", str(weights),
                              "--output", str(tmp_path / f"{name}.pth"), "--data", str(tmp_path / "data"),
                              "--band", "2", "--recipes", "8x", "--threads", "1",
                              "--json", str(tmp_path / f"{name}.json"), *extra],
                             capture_output=True, text=True, timeout=300)
        return out, (json.loads((tmp_path / f"{name}.json").read_text()) if out.returncode == 0 else None)

    cache = tmp_path / "cache"
    out, res = calibrate("a", "--train-every", "12", "--workers", "2", "--cache", str(cache))
    assert out.returncode == 0, out.stderr
    assert "2 development and 3 training photos" in out.stderr
    splits = [r["split"] for r in res["rows"]]
    assert splits == ["dev"] * 2 + ["train"] * 3
    dev = [r for r in res["rows"] if r["split"] == "dev"]  # the folds' table reads the development photos only
    always = 100 * np.mean([r["cut"][2] - r["coarse"][2] for r in dev])
    assert res["folds"]["always"]["8x"]["mba"] == pytest.approx(always)
    assert len(list(cache.glob("*_syn*.json"))) == 5
    written = Refiner(str(tmp_path / "a.pth"), device="cpu")
    cal = written.model.meta["grabcut_calibration"]
    assert cal["dev_photos"] == 2 and cal["train_photos"] == 3
    monkeypatch.syspath_prepend(str(MAINTAIN))
    from calibrate_grabcut import _as_arrays, fit_gates  # the written gates are fitted on all rows, training too

    rows = [_as_arrays(r) for r in res["rows"]]
    for fitted_on, same in ((rows, True), ([r for r in rows if r["split"] == "dev"], False)):
        gate, _ = fit_gates(fitted_on, 10.0, 80, pairs=True)
        assert np.allclose(gate.coef, written.grabcut.gate.coef) == same

    one, plain = calibrate("b", "--train-every", "12")  # one process, no cache: the same rows
    assert one.returncode == 0, one.stderr
    for a, b in zip(res["rows"], plain["rows"]):
        assert a["photo"] == b["photo"] and a["cut"] == b["cut"]
        assert np.allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)

    next(cache.glob("train_*.json")).unlink()  # a run killed before its last photo: the rest is read back
    out, again = calibrate("c", "--train-every", "12", "--cache", str(cache))
    assert out.returncode == 0, out.stderr
    assert " 4/5 " in out.stderr  # the progress starts at the four photos already measured
    assert [r["cut"] for r in again["rows"]] == [r["cut"] for r in res["rows"]]
    assert len(list(cache.glob("*_syn*.json"))) == 5

    out, _ = calibrate("d", "--train-every", "12", "--cache", str(cache), "--band", "1")  # other settings
    assert out.returncode != 0 and "other settings" in out.stderr and "band" in out.stderr
    out, _ = calibrate("e", "--train-every", "6", "--cache", str(cache))  # other photos, other polygon seeds
    assert out.returncode != 0 and "other settings" in out.stderr and "train_every" in out.stderr


def test_training_items_leave_out_the_photos_the_demo_shows(tmp_path, monkeypatch):
    """The training configs exclude the demo's five CCP photos; so do the gates' training photos, after thinning
    (the same other photos are taken). The shipped model's recipe and the demo name the same photos."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from heldout_eval import demo_photos, heldout_split, training_items

    from crm_d2.train.synthetic import write_pairs_folder

    shown = demo_photos()
    assert shown == {"ccp/0003", "ccp/0106", "ccp/0166", "ccp/0310", "ccp/0430"}
    from crm_d2.train.config import load_config

    recipe = load_config(ROOT / "configs" / "training" / "crm_small_skip.yaml")  # the shipped model's
    left_out = {f"{Path(spec['root']).name}/{stem}" for spec in recipe["data"]["train"]
                for stem in spec.get("exclude", ())}
    assert left_out == shown
    write_pairs_folder(tmp_path / "ccp", 30, size=(32, 40))
    for i, f in enumerate(sorted((tmp_path / "ccp").glob("syn*.jpg"))):  # CCP-like names 0425-0454
        f.rename(f.with_name(f"{i + 425:04d}.jpg"))
        f.with_suffix(".png").rename(f.with_name(f"{i + 425:04d}.png"))
    every = heldout_split(tmp_path, "train")[::2]
    assert "ccp/0430" in {it.name for it in every}
    assert [it.name for it in training_items(tmp_path, 2)] == [it.name for it in every if it.name != "ccp/0430"]
