"""The pixel head (crm_d2.model.PixelHead): a full-resolution logit correction added to a trained model, the same
in every decoding path, and trained with the rest of the model frozen."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from crm_d2.checkpoint import load_checkpoint, load_state, save_checkpoint
from crm_d2.fast import FastOptions
from crm_d2.model import CRM, CRMConfig
from crm_d2.refiner import Refiner
from crm_d2.train.config import load_config
from crm_d2.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SKIP = CRMConfig(layers=(1, 1, 1), width=8, mask_skip=True)


def with_head(base, channels=4, seed=None):
    """`base` plus a pixel head: fresh (zero last layer) or, with a seed, random all through."""
    model = CRM(replace(base.cfg, pixel_head=channels))
    load_state(model, base.state_dict(), new_parts=("pixel_head",))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.pixel_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def refiner_for(model, **kw):
    r = Refiner(weights=None, allow_random=True, device="cpu", config=model.cfg, **kw)
    r.model.load_state_dict(model.state_dict())
    return r


@pytest.fixture
def skip_model(randomize_model):
    return randomize_model(CRM(SKIP))


def test_a_fresh_head_leaves_the_model_it_is_added_to_unchanged(skip_model, scene):
    img, _, coarse = scene
    headed = with_head(skip_model)
    assert headed.cfg.pixel_head == 4
    for mode in ("exact", "fast"):
        a = refiner_for(skip_model, mode=mode).refine(img, coarse)
        b = refiner_for(headed, mode=mode).refine(img, coarse)
        assert a.std() > 0.01
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_a_trained_head_changes_the_output_and_is_saved_with_the_model(skip_model, scene, tmp_path):
    img, _, coarse = scene
    headed = with_head(skip_model, seed=1)
    before = refiner_for(skip_model).refine(img, coarse)
    after = refiner_for(headed).refine(img, coarse)
    assert np.abs(after - before).max() > 0.05
    save_checkpoint(tmp_path / "h.pth", headed)
    assert load_checkpoint(tmp_path / "h.pth")["config"].pixel_head == 4
    np.testing.assert_allclose(Refiner(tmp_path / "h.pth", device="cpu", scales=(0.5, 1.0)).refine(img, coarse),
                               refiner_for(headed, scales=(0.5, 1.0)).refine(img, coarse), atol=1e-6)


def test_head_in_row_slabs_equals_one_pass(skip_model):
    head = with_head(skip_model, seed=2).pixel_head
    g = torch.Generator().manual_seed(0)
    logits, prior = torch.randn(2, 37, 29, generator=g) * 4, torch.randn(2, 37, 29, generator=g)
    image = torch.randn(1, 3, 37, 29, generator=g)
    with torch.no_grad():
        whole = head(logits[:, None], image.expand(2, -1, -1, -1), prior[:, None])[:, 0]
        for budget in (1, 2 * 29 * 4 * 3 * 4 * 5):  # one row per slab, then five
            np.testing.assert_allclose(head.apply_rows(logits, image, prior, budget), whole, atol=1e-5)


def test_fast_mode_applies_the_head_as_exact_mode_does(skip_model, scene):
    img, _, coarse = scene
    headed = with_head(skip_model, seed=3)
    exact = refiner_for(headed, scales=(1.0,)).refine(img, coarse)
    fast = refiner_for(headed, scales=(1.0,), mode="fast",
                       fast=FastOptions(coarse_band=10.0, tile=64, halo=256))  # the band covers everything
    np.testing.assert_allclose(fast.refine(img, coarse), exact, atol=1e-5)
    # band stages at several scales and dense low stages, through the head, stay close to exact mode
    exact = refiner_for(headed, scales=(0.25, 0.5, 1.0)).refine(img, coarse)
    fast = refiner_for(headed, scales=(0.25, 0.5, 1.0), mode="fast",
                       fast=FastOptions(last_stage_only=False)).refine(img, coarse)
    assert np.mean((fast > 0.5) != (exact > 0.5)) < 0.01


def _head_cfg(tmp_path, start, *overrides):
    return load_config(None, [
        f"model.layers={list(SKIP.layers)}", f"model.width={SKIP.width}", "model.mask_skip=true",
        "model.pixel_head=4", f"model.weights={start}", "model.freeze=[feats, aspp_, imnet, mask_gain]",
        "data.train=[{type: synthetic, count: 6, size: 48, seed: 1}]", "data.val=[]", "data.crop_size=32",
        "data.num_workers=0", "data.perturb={lowres_prob: 0.8}", "solver.batch_size=4", "solver.lr=1e-2",
        "solver.max_iter=30", "solver.steps=[1000]", "checkpoint.period=0", "checkpoint.keep=0", "log.period=1",
        "log.tensorboard=false", f"output_dir={tmp_path}", "device=cpu", *overrides])


def test_head_trains_on_a_frozen_model(skip_model, tmp_path):
    start = save_checkpoint(tmp_path / "start.pth", skip_model)
    trainer = Trainer(_head_cfg(tmp_path / "run", start))
    loader, _ = trainer.train_loader()
    batch = next(iter(loader))
    losses = [float(trainer.step(batch)[0]) for _ in range(30)]
    assert np.mean(losses[-3:]) < 0.9 * losses[0]  # the first step is the frozen model's own loss
    state = trainer.model.state_dict()
    for k, v in skip_model.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(state[k], v), k
    assert state["pixel_head.body.6.weight"].abs().sum() > 0
    assert [p for g in trainer.optimizer.param_groups for p in g["params"]] == \
        list(trainer.model.pixel_head.parameters())


def test_head_config_errors_name_the_problem(skip_model, tmp_path):
    start = save_checkpoint(tmp_path / "start.pth", skip_model)
    with pytest.raises(ValueError, match="unknown parts \\['encoder'\\]"):
        Trainer(_head_cfg(tmp_path / "a", start, "model.freeze=[encoder]"))
    with pytest.raises(ValueError, match="leaves nothing to train"):
        Trainer(_head_cfg(tmp_path / "b", start, "model.freeze=[feats, aspp_, imnet, mask_gain, pixel_head]"))
    with pytest.raises(ValueError, match="holds architecture"):  # a head is the only part that may be added
        Trainer(_head_cfg(tmp_path / "c", start, "model.width=16"))
    trainer = Trainer(_head_cfg(tmp_path / "d", start, "sampling={points: 64, tile: 16}"))
    with pytest.raises(ValueError, match="sampling.points=0"):
        trainer.step(next(iter(trainer.train_loader()[0])))
