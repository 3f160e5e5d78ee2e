"""The shipped demo model: it loads by name, says what it is, and behaves like a trained refiner."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from crm_d2.checkpoint import NAMED_WEIGHTS
from crm_d2.io import read_image, read_mask
from crm_d2.metrics import iou
from crm_d2.refiner import Refiner

SAMPLE = Path(__file__).resolve().parents[1] / "crm_d2" / "assets" / "sample"

pytestmark = pytest.mark.skipif(not NAMED_WEIGHTS["demo"].exists(), reason="demo model not shipped in this checkout")


def test_demo_model_is_small_and_self_describing():
    assert NAMED_WEIGHTS["demo"].stat().st_size < 8 << 20
    refiner = Refiner("demo", device="cpu")
    assert refiner.model.cfg.width == 32
    assert refiner.model.meta["config"] == "configs/crm_demo.yaml"
    assert refiner.scales == (1.0,)  # the schedule it was validated with, from the file


def test_demo_model_is_trained(device):
    # A trained refiner keeps a decent person mask decent; random weights do not (their output is ~constant).
    refiner = Refiner("demo", device=device)  # on CUDA: the checkpoint loads onto the GPU
    scores = []
    for name in ("ccp_0003", "ccp_0106"):
        image = read_image(SAMPLE / "images" / f"{name}.jpg")
        gt = read_mask(SAMPLE / "labels" / f"{name}.png") > 0
        h, w = gt.shape
        low = cv2.resize(gt.astype(np.float32), (w // 12, h // 12), interpolation=cv2.INTER_AREA)
        coarse = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
        refined = refiner.refine(image, coarse, output="binary")
        scores.append((iou(refined, gt), iou(coarse, gt)))
    assert all(r > 0.9 and abs(r - c) < 0.05 for r, c in scores), scores
