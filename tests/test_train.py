import argparse
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crm_d2.checkpoint import load_checkpoint, load_model
from crm_d2.io import read_image, read_mask
from crm_d2.model import CRM, CRMConfig
from crm_d2.train.data import CRMTrainDataset, StreamSampler, build_items, list_fss, list_pairs
from crm_d2.train.synthetic import make_scene, write_big_folder, write_pairs_folder
from crm_d2.train.config import load_config
from crm_d2.train.trainer import Trainer, load_imagenet_encoder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def deterministic(device):
    """On CUDA: deterministic kernels wherever PyTorch has them (cuDNN, cuBLAS, scatter/index ops). Yields the
    warnings of ops that have none: where that list is not empty, two runs may differ in the last bits."""
    if device == "cpu":
        yield []
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def tiny_cfg(tmp_path, *overrides, device="cpu"):
    base = [
        "model.preset=tiny",
        "data.train=[{type: synthetic, count: 6, size: 48, seed: 1}]",
        "data.val=[]",
        "data.crop_size=32",
        "data.num_workers=0",
        "data.perturb={lowres_prob: 0.5}",
        "solver.batch_size=2",
        "solver.max_iter=4",
        "solver.steps=[3]",
        "checkpoint.period=2",
        "checkpoint.keep=0",
        "log.period=1",
        "log.tensorboard=false",
        f"output_dir={tmp_path}",
        f"device={device}",
    ]
    return load_config(None, base + list(overrides))


# ----------------------------------------------------------------------------------------------- config
def test_config_file_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {preset: tiny}\nsolver: {max_iter: 50, steps: [10, 20]}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver: {lr: 0.001}\n"
                                         "data: {train: [{type: synthetic, count: 2}]}\n")
    cfg = load_config(tmp_path / "child.yaml", ["solver.max_iter=7", "data.train.0.count=3", "seed=5"])
    assert cfg["model"]["preset"] == "tiny" and cfg["solver"]["lr"] == 0.001
    assert cfg["solver"]["max_iter"] == 7 and cfg["solver"]["steps"] == [10, 20]
    assert cfg["data"]["train"][0]["count"] == 3 and cfg["seed"] == 5
    assert cfg["solver"]["weight_decay"] == 1e-4  # default recipe
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(tmp_path / "child.yaml", ["solver.lrr=1"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["nope.x=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["solver.lr"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "training"
    paper = load_config(root / "crm_r50_paper.yaml")
    assert paper["solver"]["batch_size"] == 12 and paper["solver"]["max_iter"] == 45000
    assert paper["solver"]["steps"] == [22500, 37500] and paper["data"]["crop_size"] == 224
    assert paper["solver"]["lr"] == 2.25e-4 and paper["solver"]["weight_decay"] == 1e-4
    for name in ("crm_tiny_cpu.yaml", "crm_demo.yaml"):
        cfg = load_config(root / name)
        assert cfg["model"]["preset"] == "tiny"
        tr = {(s["root"], s.get("holdout_every")) for s in cfg["data"]["train"]}
        assert tr == {(s["root"], s.get("holdout_every")) for s in cfg["data"]["val"]}
    # The GPU recipes train on exactly the demo model's training split (the held-out photos judge them all).
    demo = load_config(root / "crm_demo.yaml")
    for name in ("crm_r50_skip.yaml", "crm_small_skip.yaml"):
        cfg = load_config(root / name)
        assert cfg["data"]["train"] == demo["data"]["train"] and cfg["model"]["mask_skip"]
        assert cfg["data"]["val"] == [] and cfg["solver"]["amp"] and cfg["checkpoint"]["export_half"]
    head = load_config(root / "experiments" / "crm_small_head.yaml")  # the head trains on the same split, on the shipped model
    assert head["data"]["train"] == demo["data"]["train"] and head["model"]["weights"] == "demo"
    assert head["model"]["pixel_head"] and "feats" in head["model"]["freeze"] and head["sampling"]["points"] == 0
    # The registered recipe: the same split, only CCP's masks moved (the held-out photos stay held out).
    reg, small = load_config(root / "crm_small_reg.yaml"), load_config(root / "crm_small_skip.yaml")
    plain = [{k: v for k, v in s.items() if k != "label_offset"} for s in reg["data"]["train"]]
    assert plain == demo["data"]["train"]
    assert [s.get("label_offset") for s in reg["data"]["train"]] == [None, None, [0.56, 0.25]]
    assert {k: v for k, v in reg.items() if k not in ("data", "output_dir")} == \
        {k: v for k, v in small.items() if k not in ("data", "output_dir")}
    for path in root.glob("**/crm_*.yaml"):
        load_config(path)


# ----------------------------------------------------------------------------------------------- data
def _pair(folder, name, size=(40, 50), empty=False, ext=".jpg"):
    s = make_scene(size, abs(hash(name)) % 1000)
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{name}{ext}"), s.image[..., ::-1])
    cv2.imwrite(str(folder / f"{name}.png"), np.zeros_like(s.gt) if empty else s.gt)


def test_sources_splits_and_empty_masks(tmp_path):
    for i in range(5):
        _pair(tmp_path / "flat", f"a{i}", empty=(i == 2))
    (tmp_path / "flat" / "notes.txt").write_text("ignored")
    (tmp_path / "sub" / "images").mkdir(parents=True)
    (tmp_path / "sub" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "images" / "b0.jpg"), np.zeros((40, 50, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "sub" / "masks" / "b0.png"), np.zeros((40, 50), np.uint8) + 255)
    for cls in ("cat", "dog"):
        for i in (1, 2):
            _pair(tmp_path / "fss" / cls, str(i))
    write_big_folder(tmp_path / "big", 2, size=(48, 64))

    assert [it.name for it in list_pairs(tmp_path / "flat")] == [f"a{i}" for i in range(5)]
    assert [it.image.name for it in list_pairs(tmp_path / "sub")] == ["b0.jpg"]
    assert [it.name for it in list_fss(tmp_path / "fss")] == ["cat/1", "cat/2", "dog/1", "dog/2"]

    specs = [{"type": "pairs", "root": str(tmp_path / "flat"), "holdout_every": 2},
             {"type": "pairs", "root": "sub"}, {"type": "fss", "root": str(tmp_path / "fss")},
             {"type": "big", "root": str(tmp_path / "big")}, {"type": "synthetic", "count": 2}]
    train = build_items(specs, "train", base_dir=tmp_path)
    val = build_items(specs, "val", base_dir=tmp_path)
    flat_train = [it.name for it in train if it.name.startswith("flat/")]
    flat_val = [it.name for it in val if it.name.startswith("flat/")]
    assert flat_train == ["flat/a1", "flat/a3"] and flat_val == ["flat/a0", "flat/a2", "flat/a4"]
    assert len(train) == 2 + 1 + 4 + 2 + 2
    assert sum(it.coarse is not None for it in train) == 2  # BIG's _seg.png
    skipped = build_items(specs, "val", base_dir=tmp_path, empty="skip")
    assert "flat/a2" not in [it.name for it in skipped] and len(skipped) == len(val) - 1
    with pytest.raises(ValueError, match="unknown type"):
        build_items([{"type": "coco", "root": str(tmp_path)}])
    with pytest.raises(ValueError, match="unknown keys"):
        build_items([{"type": "synthetic", "cuont": 3}])
    with pytest.raises(ValueError, match="holdout_offset must lie in"):
        build_items([{"type": "synthetic", "count": 4, "holdout_every": 2, "holdout_offset": 2}], "val")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_items([{"type": "pairs", "root": str(tmp_path / "nowhere")}])


def test_undecodable_image_is_reported_and_skipped(tmp_path, caplog):
    _pair(tmp_path, "good")
    _pair(tmp_path, "bad")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    items = list_pairs(tmp_path)
    ds = CRMTrainDataset(items, crop_size=32, seed=0)
    bad = [it.name for it in items].index("bad")
    with caplog.at_level(logging.WARNING):
        sample = ds[(bad, 0)]
    assert "bad" in caplog.text and "bad.jpg" in caplog.text
    assert sample["image"].shape == (3, 32, 32)
    assert "bad" in ds._bad


def test_samples_are_a_function_of_position(tmp_path):
    write_pairs_folder(tmp_path, 3, size=(40, 60))
    ds = CRMTrainDataset(list_pairs(tmp_path), crop_size=64, seed=3)
    a, b, c = ds[(1, 10)], ds[(1, 10)], ds[(1, 11)]
    for k in ("image", "gt", "coarse"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], c["image"]) or not torch.equal(a["coarse"], c["coarse"])
    assert a["image"].shape == (3, 64, 64) and a["gt"].shape == a["coarse"].shape == (1, 64, 64)
    assert 0 <= a["image"].min() and a["image"].max() <= 1
    # Images smaller than the crop are zero-padded: the 40x60 picture fills 2400 of the 4096 pixels.
    assert (a["image"].abs().sum(0) > 0).sum() <= 40 * 60


def test_stream_sampler_resumes_and_splits_ranks():
    full = StreamSampler(7, batch_size=3, seed=1)
    it = iter(full)
    stream = [next(it) for _ in range(3 * 6)]
    assert sorted(i for i, _ in stream[:7]) == list(range(7))  # each epoch is a permutation
    later = iter(StreamSampler(7, batch_size=3, seed=1, start_iter=4))
    assert [next(later) for _ in range(6)] == stream[12:18]
    r0 = iter(StreamSampler(7, batch_size=2, seed=1, rank=0, world_size=2))
    r1 = iter(StreamSampler(7, batch_size=2, seed=1, rank=1, world_size=2))
    positions = [next(r0)[1] for _ in range(4)] + [next(r1)[1] for _ in range(4)]
    assert sorted(positions) == list(range(8))


# ----------------------------------------------------------------------------------------------- training
def test_training_steps_reduce_the_loss(tmp_path, device):
    cfg = tiny_cfg(tmp_path, "solver.lr=1e-3", "solver.steps=[1000]", "data.crop_size=48", "solver.batch_size=4",
                   device=device)
    trainer = Trainer(cfg)  # on CUDA with the default solver.amp (float16 autocast + GradScaler)
    loader, _ = trainer.train_loader()
    batch = next(iter(loader))
    losses = [float(trainer.step(batch)[0]) for _ in range(20)]
    assert trainer.iteration == 20
    assert np.mean(losses[-3:]) < 0.85 * losses[0]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kill_and_resume_is_bit_identical(tmp_path, device, deterministic):
    straight = Trainer(tiny_cfg(tmp_path / "a", device=device))
    straight.train()
    # Killed right after the checkpoint of iteration 2 ...
    first = Trainer(tiny_cfg(tmp_path / "b", device=device))
    first.train(stop_at=2)
    assert first.iteration == 2 and (tmp_path / "b" / "model_0000002.pth").exists()
    del first
    # ... and continued by a fresh process state.
    torch.manual_seed(1234)
    np.random.seed(99)
    # (with a worker process this time: samples depend on their stream position only, not on who loads them)
    resumed = Trainer(tiny_cfg(tmp_path / "b", "data.num_workers=1", device=device), resume=True)
    assert resumed.iteration == 2
    resumed.train()

    # Bit-identical wherever the kernels are deterministic (always on CPU). On CUDA an op without a deterministic
    # implementation (the `deterministic` fixture lists them) can change the last bits of a run: then the two runs
    # must agree to float tolerance (the most Adam can move a weight in 4 steps is about 4 x lr).
    nondeterministic = sorted({str(w.message).split("\n")[0] for w in deterministic
                               if "deterministic" in str(w.message)})
    if nondeterministic:
        print("ops without a deterministic implementation:", *nondeterministic, sep="\n  ")

    def same(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y) or bool(nondeterministic and torch.allclose(x, y, rtol=1e-3, atol=1e-3))
        return x == y or bool(nondeterministic and x == pytest.approx(y, rel=1e-3, abs=1e-3))

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(same(a[k], b[k]) for k in a)
    oa, ob = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(same(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr() == [2.25e-5]
    rows_a, rows_b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    timing = ("time_per_iter", "data_time")
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys() and all(same(ra[k], rb[k]) for k in ra if k not in timing)
    assert [r["iter"] for r in rows_b] == [1, 2, 3, 4]
    ck = load_checkpoint(tmp_path / "b" / "model_0000004.pth")
    assert ck["iteration"] == 4 and set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    # The exported weights load for inference.
    model = load_model(tmp_path / "b" / "model_final.pth")
    assert isinstance(model, CRM) and not model.training


def test_resume_without_checkpoint_starts_fresh_and_refuses_other_architecture(tmp_path, device):
    t = Trainer(tiny_cfg(tmp_path, device=device), resume=True)
    assert t.iteration == 0
    t.train(stop_at=2)
    with pytest.raises(ValueError, match="architecture"):
        Trainer(tiny_cfg(tmp_path, "model.width=16", device=device), resume=True)
    # Fine-tuning start: whole-model weights from a checkpoint, fresh optimizer and iteration count.
    ft = Trainer(tiny_cfg(tmp_path / "ft", f"model.weights={tmp_path / 'model_0000002.pth'}", device=device))
    assert ft.iteration == 0
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in ft.model.state_dict().items())


def test_validation_reports_iou_and_mba(tmp_path, device):
    write_big_folder(tmp_path / "big", 2, size=(72, 96), seed=4)
    cfg = tiny_cfg(tmp_path / "run", f"data.val=[{{type: big, root: {tmp_path / 'big'}}}]", "solver.max_iter=2",
                   "val.period=0", device=device)
    trainer = Trainer(cfg)
    summary = trainer.train()
    assert summary["n"] == 2
    assert 0 <= summary["iou"] <= 100 and 0 <= summary["mba"] <= 100
    assert summary["coarse_iou"] > 50  # synthetic coarse masks are close to the GT
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["val/n"] == 2 and rows[-1]["val/full"] is True


def test_final_validation_keeps_to_max_items(tmp_path):
    """val.max_items caps every validation, the one at max_iter too (it used to read the whole set)."""
    write_big_folder(tmp_path / "big", 4, size=(48, 64), seed=5)
    cfg = tiny_cfg(tmp_path / "run", f"data.val=[{{type: big, root: {tmp_path / 'big'}}}]", "solver.max_iter=2",
                   "val.period=0", "val.max_items=2")
    summary = Trainer(cfg, device="cpu").train()
    assert summary["n"] == 2
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["val/n"] == 2 and rows[-1]["val/full"] is True


def test_imagenet_init_zeroes_the_mask_channel(tmp_path):
    donor = CRM(CRMConfig.preset("tiny")).feats.state_dict()
    state = {k: v.clone() for k, v in donor.items()}
    state["conv1.weight"] = state["conv1.weight"][:, :3].clone()
    state["fc.weight"] = torch.zeros(10, 4)  # classifier and layer4 are ignored
    state["layer4.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "resnet.pth")
    model = CRM(CRMConfig.preset("tiny"))
    n = load_imagenet_encoder(model, tmp_path / "resnet.pth")
    assert n == len(donor)
    assert torch.equal(model.feats.conv1.weight[:, :3], state["conv1.weight"])
    assert model.feats.conv1.weight[:, 3].abs().sum() == 0
    assert torch.equal(model.feats.layer3[0].conv2.weight, donor["layer3.0.conv2.weight"])
    torch.save({"x.weight": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="ResNet"):
        load_imagenet_encoder(CRM(CRMConfig.preset("tiny")), tmp_path / "junk.pth")


def test_command_line_entry(tmp_path, device):
    from crm_d2.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\ndata: {train: [{type: synthetic, count: 2, size: 40}], crop_size: 32, "
                   "num_workers: 0}\nsolver: {batch_size: 1, max_iter: 2, steps: [1]}\nlog: {tensorboard: false}\n"
                   "checkpoint: {period: 1}\n")
    args = parser.parse_args(["--config", str(cfg), "--output", str(tmp_path / "out"), "--device", device,
                              "solver.max_iter=1"])
    assert command.run(args) == 0
    assert (tmp_path / "out" / "model_0000001.pth").exists() and (tmp_path / "out" / "model_final.pth").exists()
    args = parser.parse_args(["--config", str(cfg), "--output", str(tmp_path / "out"), "--device", device,
                              "--resume"])
    assert command.run(args) == 0
    assert (tmp_path / "out" / "model_0000002.pth").exists()

    # tools/train_crm.py, the Detectron2-style spelling: --config-file, --num-gpus, and options after the overrides
    spec = importlib.util.spec_from_file_location("train_crm", Path(__file__).parents[1] / "tools" / "train_crm.py")
    train_crm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_crm)
    assert train_crm.main(["--config-file", str(cfg), "--num-gpus", "1", "--output", str(tmp_path / "d2"),
                           "--device", device, "solver.max_iter=3", "solver.steps=[2]", "--resume"]) == 0
    assert (tmp_path / "d2" / "model_0000003.pth").exists()


# ----------------------------------------------------------------------------------------------- time budget
def test_a_fresh_run_replaces_the_checkpoints_of_the_one_before(tmp_path, device):
    Trainer(tiny_cfg(tmp_path, device=device)).train()  # iterations 2 and 4, and model_final.pth
    assert (tmp_path / "model_0000004.pth").exists() and (tmp_path / "model_final.pth").exists()
    (tmp_path / "model_mine.pth").write_bytes(b"a user's own file")
    again = Trainer(tiny_cfg(tmp_path, "solver.lr=1e-4", device=device))  # other settings, no --resume
    again.train(stop_at=2)
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000002.pth", "model_mine.pth"]
    resumed = Trainer(tiny_cfg(tmp_path, "solver.lr=1e-4", device=device), resume=True)
    assert resumed.iteration == 2  # this run's checkpoint, not the old run's iteration 4


def test_fit_to_budget_keeps_the_steps_fractions():
    from crm_d2.train.trainer import fit_to_budget

    assert fit_to_budget(30, 10.0, 97.0, 45000, [22500, 37500]) == (1000, [500, 833])
    # budget spent in the probe: one more iteration, and the decay is taken there rather than never
    assert fit_to_budget(30, 10.0, -5.0, 100, [50]) == (31, [31])


def test_time_budget_fits_max_iter_and_resume_keeps_it(tmp_path, monkeypatch):
    import crm_d2.train.trainer as trainer_mod

    # A fake clock that advances 1 s per training step: the probe measures 1 iteration/s whatever the machine,
    # so 80 s of budget, 30 of them spent by the warm-up and the probe, fit 80 iterations.
    now = [0.0]
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: now[0])
    step = Trainer.step

    def timed_step(self, batch):
        now[0] += 1.0
        return step(self, batch)

    monkeypatch.setattr(Trainer, "step", timed_step)
    cfg = tiny_cfg(tmp_path, "solver.max_iter=100", "solver.steps=[50, 75]", "solver.time_budget_s=80",
                   "checkpoint.period=1000")
    t = Trainer(cfg)
    t.train()
    fitted = t.max_iter
    assert fitted == 80 and t.iteration == 80 and (tmp_path / "model_final.pth").exists()
    assert sorted(t.scheduler.milestones) == [40, 60]
    assert t.scheduler.get_last_lr() == [pytest.approx(2.25e-6)]  # both steps taken
    written = load_config(tmp_path / "config.yaml")["solver"]
    assert (written["max_iter"], written["steps"], written["time_budget_s"]) == (fitted, sorted(t.scheduler.milestones), None)
    # The final checkpoint holds the fitted length: resuming with the same (budgeted) config does not train on.
    ck = load_checkpoint(tmp_path / f"model_{fitted:07d}.pth")
    assert ck["train_config"]["solver"]["max_iter"] == fitted
    again = Trainer(tiny_cfg(tmp_path, "solver.max_iter=100", "solver.steps=[50, 75]", "solver.time_budget_s=80"),
                    resume=True)
    assert again.iteration == again.max_iter == fitted
    assert again.train() is None and again.iteration == fitted
    # killed after its last checkpoint, before the export: the resumed run writes model_final.pth and trains no more
    (tmp_path / "model_final.pth").unlink()
    assert again.train() is None and again.iteration == fitted and (tmp_path / "model_final.pth").exists()
    # a budget spent before the probe ends still takes both learning-rate steps
    short = Trainer(tiny_cfg(tmp_path / "short", "solver.max_iter=100", "solver.steps=[50, 75]",
                             "solver.time_budget_s=40", "checkpoint.period=1000"))
    short.train()
    assert short.iteration == 40 and short.scheduler.get_last_lr() == [pytest.approx(2.25e-6)]


def test_time_budget_is_validated(tmp_path):
    with pytest.raises(ValueError, match="time_budget_s"):
        tiny_cfg(tmp_path, "solver.time_budget_s=-1")
    with pytest.raises(ValueError, match="time_budget_s"):
        tiny_cfg(tmp_path, "solver.time_budget_s=soon")


def test_pack_data_carries_the_training_split_only(tmp_path):
    """tools/maintain/pack_data.py: the training part of each source (held-out and excluded items stay behind), images
    re-encoded, masks kept exactly, and a data.train list that finds them again."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    src = tmp_path / "photos"
    for i in range(20):
        _pair(src, f"{i:04d}", size=(48, 64))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [{"type": "pairs", "root": str(src), "holdout_every": 10,
                                                          "exclude": ["0005"], "label_offset": [0.5, -0.25]}]}}))
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "packed"
    proc = subprocess.run([sys.executable, str(root / "tools" / "maintain" / "pack_data.py"), "--config", str(config),
                           "--out", str(out), "--format", "webp", "--quality", "90"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    specs = yaml.safe_load((out / "sources.yaml").read_text())
    packed = build_items(specs, "train")
    want = build_items(load_config(config)["data"]["train"], "train")
    assert [it.name.split("/")[-1] for it in packed] == [it.name.split("/")[-1] for it in want]
    assert len(packed) == 17  # 20, less 0000 and 0010 (held out) and 0005 (excluded)
    assert specs[0]["label_offset"] == [0.5, -0.25] and packed[0].label_offset == (0.5, -0.25)
    for a, b in zip(packed, want):
        assert a.image.suffix == ".webp"
        assert np.array_equal(read_mask(a.mask), np.where(read_mask(b.mask) > 127, 255, 0))
        assert np.abs(read_image(a.image).astype(int) - read_image(b.image).astype(int)).mean() < 8
