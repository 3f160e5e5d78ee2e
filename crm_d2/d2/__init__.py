"""Detectron2 extension of crm_d2: CRM post-refinement of any meta-architecture's outputs, without fine-tuning.

The only part of crm_d2 that imports detectron2. It converts Detectron2 outputs and wires configs, the
META_ARCH_REGISTRY and evaluators; refinement, merging, PQ and AP live in the framework-free core.

    from crm_d2.d2 import get_crm_cfg
    cfg = get_crm_cfg("configs/PanopticFPN-R50-CRM.yaml", ["MODEL.CRM.WEIGHTS", "crm.pth"])
    model = detectron2.modeling.build_model(cfg)   # meta-architecture "CRMPostRefiner"
"""
try:
    import detectron2  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from crm_d2.optional import DETECTRON2_HINT

    raise ImportError(f"crm_d2.d2 needs detectron2: {DETECTRON2_HINT}") from exc

from . import datasets  # noqa: F401  registers coco_2017_val_panoptic_crm, coco_2017_val_entity_crm
from .config import BASE_MODELS, add_base_model_configs, add_crm_config, get_crm_cfg
from .evaluation import (
    CRMComparisonEvaluator,
    CRMInstanceEvaluator,
    CRMPanopticEvaluator,
    build_crm_evaluator,
    build_evaluator,
    format_comparison,
)
from .datasets import register_coco_panoptic_crm, register_entity_crm
from .meta_arch import BASE_OUTPUTS_KEY, CRMPostRefiner, CRMRefinementMixin, return_base_outputs

__all__ = [
    "add_crm_config", "add_base_model_configs", "get_crm_cfg", "BASE_MODELS",
    "CRMPostRefiner", "CRMRefinementMixin", "BASE_OUTPUTS_KEY", "return_base_outputs",
    "CRMPanopticEvaluator", "CRMInstanceEvaluator", "CRMComparisonEvaluator", "build_evaluator",
    "build_crm_evaluator", "format_comparison", "register_coco_panoptic_crm", "register_entity_crm",
]
