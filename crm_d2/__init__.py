"""crm_d2: the Continuous Refinement Model (CRM; Shen et al., CVPR 2022) as a fast toolkit and a Detectron2 extension.

    from crm_d2 import Refiner
    refiner = Refiner(weights="demo")          # or a checkpoint path, device="cuda"
    prob = refiner.refine(image_rgb, mask)     # HxW float32 in [0, 1]
"""
from .checkpoint import load_model, save_checkpoint
from .model import CRM, CRMConfig
from .fast import FastOptions
from .refiner import Refiner

__version__ = "0.1.0"
# What a user needs: the refiner, fast mode's knobs, and checkpoints. The network (CRM, CRMConfig), the panoptic
# path (crm_d2.panoptic) and the rest stay importable, documented where they live (docs/options.md).
__all__ = ["Refiner", "FastOptions", "load_model", "save_checkpoint"]
