"""The training speed path: sampled decoding, its loss (equal to the dense loss in expectation), the mask skip,
and several input resolutions, through the real trainer."""
import numpy as np
import pytest
import torch

from crm_d2.model import CRM, CRMConfig, QuerySample
from crm_d2.train.losses import CRMLoss, boundary_band, draw_sample
from crm_d2.train.config import load_config
from crm_d2.train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def skip_model(seed=0):
    torch.manual_seed(seed)
    model = CRM(CRMConfig(layers=(1, 1, 1), width=8, mask_skip=True))
    with torch.no_grad():
        for p in model.imnet.parameters():
            p.mul_(4)  # outputs that vary, so that wrong gathers show
    return model.eval()


def test_decode_points_equals_the_grid_decoder():
    model = skip_model()
    x, prior = torch.randn(2, 4, 40, 56), torch.rand(2, 1, 60, 84) * 2 - 1
    with torch.no_grad():
        dense = model(x, (60, 84), prior=prior)  # queried at 1.5x the input, as a lower stage is
        sample = draw_sample(2, (60, 84), 12, 300, generator=torch.Generator().manual_seed(3))
        patch, points = model(x, (60, 84), prior=prior, sample=sample)
    (y0, y1), (x0, x1) = sample.patch
    assert torch.allclose(patch, dense[:, :, y0:y1, x0:x1], atol=1e-5)
    assert torch.allclose(points, sample.take(dense), atol=1e-5)
    # the skip is really added: without it the logits differ by gain * prior
    with torch.no_grad():
        plain = model.decode_rows(model.project(model.encode(x)), (60, 84), (0, 60))[:, None]
    assert torch.allclose(dense - plain, model.mask_gain * prior, atol=1e-5)


def test_skip_model_needs_its_prior():
    with pytest.raises(ValueError, match="prior"):
        skip_model()(torch.randn(1, 4, 32, 32))


def _every_tile(size, tile):
    H, W = size
    c = 2
    for ty in range(0, H, tile):
        for tx in range(0, W, tile):
            patch = ((max(0, ty - c), min(H, ty + tile + c)), (max(0, tx - c), min(W, tx + tile + c)))
            yield QuerySample(patch, None, None, tile=((ty, ty + tile), (tx, tx + tile)))


def test_sampled_loss_equals_the_dense_loss_in_expectation():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 48, 64) * 3
    gt = (torch.rand(2, 1, 48, 64) > 0.6).float()
    gt[:, :, 10:30, 20:50] = 0.7  # a soft region: L1/L2 see the soft GT, BCE the binarised one
    crit = CRMLoss()
    dense_total, dense = crit(logits, gt)
    # Every pixel once as the points, and the mean over every tile of the partition: exactly the dense terms.
    idx = torch.arange(48 * 64).expand(2, -1)
    rows, cols = idx // 64, idx % 64
    totals, grads = [], []
    for s in _every_tile((48, 64), 16):
        s.rows, s.cols = rows, cols
        (y0, y1), (x0, x1) = s.patch
        total, parts = crit.sampled(logits[:, :, y0:y1, x0:x1], s.take(logits), gt, s)
        totals.append(total)
        grads.append(parts["grad"])
        for k in ("bce", "l1", "l2"):
            assert parts[k] == pytest.approx(float(dense[k]), rel=1e-5)
    assert float(torch.stack(grads).mean()) == pytest.approx(float(dense["grad"]), rel=1e-5)
    assert float(torch.stack(totals).mean()) == pytest.approx(float(dense_total), rel=1e-5)
    # And the random draws the trainer makes average to it too.
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(400):
        s = draw_sample(2, (48, 64), 16, 256, generator=g)
        (y0, y1), (x0, x1) = s.patch
        draws.append(float(crit.sampled(logits[:, :, y0:y1, x0:x1], s.take(logits), gt, s)[0]))
    assert np.mean(draws) == pytest.approx(float(dense_total), rel=0.03)


def test_boundary_band_marks_the_edge_and_the_coarse_errors():
    gt = torch.zeros(1, 1, 20, 20)
    gt[:, :, 5:15, 5:15] = 1
    coarse = gt.clone()
    coarse[:, :, 0, 19] = 1  # a false blob far from the edge
    band = boundary_band(gt, coarse, 1)[0]
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    inside = (ys >= 5) & (ys < 15) & (xs >= 5) & (xs < 15)
    ring = ((ys >= 4) & (ys < 16) & (xs >= 4) & (xs < 16)) & ~((ys >= 6) & (ys < 14) & (xs >= 6) & (xs < 14))
    assert torch.equal(band & ~ring, (ys == 0) & (xs == 19))  # the blob, and nothing else outside the ring
    assert torch.equal(band & ring, ring)
    assert not band[inside & ~ring].any()


def test_boundary_points_reweighted_keep_the_dense_loss_and_emphasis_oversamples_the_band():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 32, 48) * 3
    gt = torch.zeros(2, 1, 32, 48)
    gt[:, :, 8:24, 10:30] = 1
    coarse = torch.roll(gt, 3, dims=-1)
    band = boundary_band(gt, coarse, 2)
    crit = CRMLoss(grad=0)  # the pointwise terms: the gradient term's tile is drawn as before
    dense = float(crit(logits, gt)[0])
    g = torch.Generator().manual_seed(0)
    draws, emphasis, in_band = [], [], []
    for _ in range(300):
        s = draw_sample(2, (32, 48), 16, 512, generator=g, band=band, boundary=0.7)
        draws.append(float(crit.sampled(s.crop(logits), s.take(logits), gt, s)[0]))
        in_band.append(float(s.take(band[:, None].float()).mean()))
        e = draw_sample(2, (32, 48), 16, 512, generator=g, band=band, boundary=0.7, reweight=False)
        assert e.weights is None
        emphasis.append(float(crit.sampled(e.crop(logits), e.take(logits), gt, e)[0]))
    assert np.mean(draws) == pytest.approx(dense, rel=0.02)
    share = float(band.float().mean())
    assert np.mean(in_band) == pytest.approx(0.7 + 0.3 * share, abs=0.01)  # the mixture's band mass
    # the emphasis version is another objective (the band's loss counts more): its mean is not the dense one
    band_loss = float(crit(logits[band[:, None]].view(1, 1, 1, -1), gt[band[:, None]].view(1, 1, 1, -1))[0])
    assert abs(np.mean(emphasis) - dense) > 5 * abs(np.mean(draws) - dense)
    assert np.sign(np.mean(emphasis) - dense) == np.sign(band_loss - dense)


def test_draw_sample_checks_the_tile():
    with pytest.raises(ValueError, match="divide"):
        draw_sample(1, (50, 50), 16, 10)


def _cfg(tmp_path, *overrides):
    return load_config(None, [
        "model.preset=tiny", "model.mask_skip=true",
        "data.train=[{type: synthetic, count: 6, size: 48, seed: 1}]", "data.val=[]",
        "data.crop_size=32", "data.num_workers=0", "data.input_scales=[1.0, 0.5, 0.25]",
        "data.perturb={fine_prob: 0.3, lowres_prob: 0.5, blob_prob: 0.5}",
        "sampling={points: 64, tile: 16, boundary: 0.5}", "solver.channels_last=true",
        "solver.batch_size=2", "solver.max_iter=4", "solver.steps=[3]", "checkpoint.period=2", "checkpoint.keep=0",
        "log.period=1", "log.tensorboard=false", f"output_dir={tmp_path}", "device=cpu", *overrides])


def test_sampled_training_runs_learns_the_skip_and_resumes_bit_identically(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a"))
    straight.train()
    first = Trainer(_cfg(tmp_path / "b"))
    first.train(stop_at=2)
    resumed = Trainer(_cfg(tmp_path / "b"), resume=True)
    resumed.train()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "mask_gain" in a and float(a["mask_gain"]) != 3.0  # the skip's gain is trained
    from crm_d2.checkpoint import load_checkpoint

    for name in ("model_final.pth", "model_0000004.pth"):  # exported, and a training checkpoint judged mid-run
        meta = load_checkpoint(tmp_path / "a" / name)["meta"]
        assert meta["scales"] == [0.125, 0.25, 0.5, 1.0] and meta["auto_base"] == 512  # val.scales -> default


def test_sampling_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="together"):
        _cfg(tmp_path, "sampling={points: 64, tile: 0}")
    with pytest.raises(ValueError, match="input_scales"):
        _cfg(tmp_path, "data.input_scales=[2.0]")


def test_train_speed_tool_measures_both_parts(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "c.yaml").write_text(
        "model: {preset: tiny, mask_skip: true}\n"
        "data: {train: [{type: synthetic, count: 4, size: 40, seed: 1}], crop_size: 32, input_scales: [1.0, 0.5]}\n"
        "sampling: {points: 32, tile: 16}\nsolver: {batch_size: 2}\n")
    tool = Path(__file__).resolve().parents[1] / "tools" / "maintain" / "train_speed.py"
    out = subprocess.run([sys.executable, str(tool), "--config", str(tmp_path / "c.yaml"), "--threads", "1",
                          "--steps", "2", "--warmup", "1", "--samples", "4", "--json", "--dense"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["batch"] == 2 and row["crop"] == 32 and row["model_samples_per_s"] > 0 and row["load_samples_per_s"] > 0
