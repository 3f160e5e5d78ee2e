"""The gain head (model.gain_head): the mask skip's gain predicted per query point, grown on a trained mask-skip
model so that it starts from that model's very outputs, and used the same way by training and the refiner."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crm_d2.checkpoint import load_checkpoint, load_model, save_checkpoint
from crm_d2.model import CRM, SOFTPLUS_ONE, CRMConfig, add_gain_head
from crm_d2.refiner import Refiner
from crm_d2.train.losses import draw_sample
from crm_d2.train.trainer import Trainer, load_config

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(layers=(1, 1, 1), width=8, mask_skip=True)


def _model(gain_head, seed=0):
    torch.manual_seed(seed)
    model = CRM(CRMConfig(**SMALL, gain_head=gain_head))
    with torch.no_grad():
        for p in model.imnet.parameters():
            p.mul_(4)  # outputs that vary, so that a wrong gather or a dropped output shows
    return model.eval()


def test_gain_head_scales_the_skip_per_query_in_every_decoder_path():
    model = _model(True)
    x, prior = torch.randn(2, 4, 40, 56), torch.rand(2, 1, 60, 84) * 2 - 1
    with torch.no_grad():
        dense = model(x, (60, 84), prior=prior)
        decoded = model.decode_rows(model.project(model.encode(x)), (60, 84), (0, 60))  # B x H x W x 2
        sample = draw_sample(2, (60, 84), 12, 300, generator=torch.Generator().manual_seed(3))
        patch, points = model(x, (60, 84), prior=prior, sample=sample)
    assert decoded.shape == (2, 60, 84, 2)
    gain = model.mask_gain * F.softplus(decoded[..., 1] + SOFTPLUS_ONE)
    assert float(gain.detach().std()) > 0.1  # really per query
    assert torch.allclose(dense[:, 0], decoded[..., 0] + gain * prior[:, 0], atol=1e-5)
    (y0, y1), (x0, x1) = sample.patch
    assert torch.allclose(patch, dense[:, :, y0:y1, x0:x1], atol=1e-5)
    assert torch.allclose(points, sample.take(dense), atol=1e-5)


def test_gain_head_needs_the_mask_skip():
    with pytest.raises(ValueError, match="needs mask_skip"):
        CRMConfig(layers=(1, 1, 1), width=8, gain_head=True)


def _refine(model, tmp_path, name, mode):
    path = save_checkpoint(tmp_path / f"{name}.pth", model, meta={"scales": [0.5, 1.0]})
    refiner = Refiner(str(path), device="cpu", mode=mode)
    rng = np.random.default_rng(0)
    image = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    mask = np.zeros((90, 120), np.float32)
    mask[20:70, 30:95] = 1
    return refiner.refine(image, mask), mask


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_grown_gain_head_starts_as_its_model_and_the_refiner_uses_it(tmp_path, mode):
    base = _model(False)
    grown = CRM(CRMConfig(**SMALL, gain_head=True)).eval()
    grown.load_state_dict(add_gain_head(base.state_dict(), base.cfg))
    x, prior = torch.randn(1, 4, 32, 48), torch.rand(1, 1, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(grown(x, prior=prior), base(x, prior=prior), atol=1e-5)
    before, mask = _refine(base, tmp_path, "base", mode)
    same, _ = _refine(grown, tmp_path, "grown", mode)
    np.testing.assert_allclose(same, before, atol=1e-5)
    with torch.no_grad():  # the head now says "trust the mask" everywhere: the output moves towards it
        grown.imnet.layers[-1].bias[1] = 3.0
    trusting, _ = _refine(grown, tmp_path, "trusting", mode)
    assert np.abs(trusting - mask).mean() < 0.5 * np.abs(before - mask).mean()
    assert load_model(str(tmp_path / "trusting.pth")).cfg.gain_head  # the architecture travels with the file


def _cfg(tmp_path, weights, *overrides):
    return load_config(None, [
        "model.preset=tiny", "model.mask_skip=true", f"model.weights={weights}",
        "data.train=[{type: synthetic, count: 4, size: 48, seed: 1}]", "data.val=[]",
        "data.crop_size=32", "data.num_workers=0", "sampling={points: 64, tile: 16, boundary: 0.5}",
        "solver.batch_size=2", "solver.max_iter=2", "solver.steps=[]", "checkpoint.period=0",
        "checkpoint.keep=0", "log.period=1", "log.tensorboard=false", f"output_dir={tmp_path}", "device=cpu",
        *overrides])


def test_training_grows_a_gain_head_on_a_mask_skip_checkpoint(tmp_path):
    torch.manual_seed(0)
    start = save_checkpoint(tmp_path / "skip.pth", CRM(CRMConfig.from_dict({"preset": "tiny", "mask_skip": True})))
    trainer = Trainer(_cfg(tmp_path / "run", start, "model.gain_head=true"))
    first = trainer.model.imnet.layers[-1]
    assert first.out_features == 2 and not first.weight[1].any() and not first.bias[1].any()  # starts neutral
    trainer.train()
    done = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert done["config"].gain_head and done["model"]["imnet.layers.8.weight"][1].abs().sum() > 0  # it learns
    # the other way round is a different architecture, and says so
    with pytest.raises(ValueError, match="architecture"):
        Trainer(_cfg(tmp_path / "back", tmp_path / "run" / "model_final.pth"))
    # and a model without a mask skip has no gain to scale: a different architecture too
    plain = save_checkpoint(tmp_path / "plain.pth", CRM(CRMConfig.preset("tiny")))
    with pytest.raises(ValueError, match="architecture"):
        Trainer(_cfg(tmp_path / "c", plain, "model.gain_head=true"))
