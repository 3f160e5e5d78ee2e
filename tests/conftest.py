import numpy as np
import pytest
import torch

from crm_d2.model import CRM, CRMConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def randomize_model(model, seed=0, mlp_gain=4.0):
    torch.manual_seed(seed)
    model.load_state_dict(type(model)(model.cfg).state_dict())
    """Random weights whose outputs actually vary (fresh init gives ~0.5 everywhere), for exactness tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for p in model.imnet.parameters():
            p.mul_(mlp_gain)
    return model.eval()


@pytest.fixture
def tiny_model():
    return randomize_model(CRM(CRMConfig.preset("tiny")))


@pytest.fixture
def scene():
    """A small RGB image with a disc, its GT and a blocky coarse mask."""
    rng = np.random.default_rng(0)
    H, W = 90, 120
    yy, xx = np.mgrid[:H, :W]
    gt = ((yy - 45) ** 2 + (xx - 55) ** 2) < 30 ** 2
    img = rng.integers(0, 60, (H, W, 3)).astype(np.uint8)
    img[gt] += np.array([150, 120, 40], np.uint8)
    small = gt[::8, ::8].astype(np.uint8)
    import cv2

    coarse = cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    return img, gt, coarse
