"""The shipped demo model: it loads by name, says what it is, and sharpens masks of photos it never saw."""
from pathlib import Path

import numpy as np
import pytest

from crm_d2.checkpoint import NAMED_WEIGHTS
from crm_d2.io import read_image, read_mask
from crm_d2.metrics import RefinementMetrics
from crm_d2.model import CRMConfig
from crm_d2.refiner import Refiner
from crm_d2.train.perturb import lowres_protocol

SAMPLE = Path(__file__).resolve().parents[1] / "crm_d2" / "assets" / "sample"

pytestmark = pytest.mark.skipif(not NAMED_WEIGHTS["demo"].exists(), reason="demo model not shipped in this checkout")


def test_demo_model_is_small_and_self_describing():
    assert NAMED_WEIGHTS["demo"].stat().st_size < 8 << 20
    refiner = Refiner("demo", device="cpu")
    cfg = refiner.model.cfg
    assert (cfg.layers, cfg.width) == (CRMConfig.preset("small").layers, CRMConfig.preset("small").width)
    assert cfg.mask_skip
    assert refiner.model.meta["trained_with"] == "crm-d2 train"
    assert refiner.scales == "auto"  # the schedule rule it was validated with, from the file


def test_demo_model_sharpens_photos_it_never_saw(device):
    # The five sample photos are kept out of the demo model's training (configs/training/crm_demo.yaml and
    # crm_small_skip.yaml: exclude). A 16x-coarse person silhouette comes back with a better boundary and overlap,
    # and a 4x one (already good) is nearly kept. Measured, 16x mBA from 69.30: the model alone 73.75, with the
    # linear gates 72.34, with the gates with pairs (shipped) 71.78; 4x 92.19 -> 90.56 for all three. On these
    # five photos the gates cost 16x what they gain on the 84 held-out ones (docs/demo_model.md). The previous
    # shipped model failed the 4x bound (88.31), the two before it failed both (71.27, 80.56; 69.13, 71.62), and
    # so do random weights.
    refiner = Refiner("demo", device=device)  # on CUDA: the checkpoint loads onto the GPU
    for factor, min_gain in ((16, 2.0), (4, -3.0)):
        metrics = RefinementMetrics()
        for image_file in sorted((SAMPLE / "images").glob("*.jpg")):
            image = read_image(image_file)
            gt = np.where(read_mask(SAMPLE / "labels" / f"{image_file.stem}.png") > 0, 255, 0).astype(np.uint8)
            coarse = lowres_protocol(gt, factor)
            metrics.update(refiner.refine(image, coarse, output="binary"), gt, coarse)
        s = metrics.summary()
        assert s["mba"] > s["coarse_mba"] + min_gain, (factor, s)
        if factor == 16:
            assert s["iou"] > s["coarse_iou"], s
