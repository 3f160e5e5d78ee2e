"""Config keys of the CRM Detectron2 extension (`MODEL.CRM.*`) and of the base models it wraps.

Detectron2 refuses unknown keys when a YAML file is merged, so the keys of a third-party base model
(PanopticFCN, EntitySeg) must be added before the file is read: `get_crm_cfg` reads the file (with its _BASE_
chain) first, applies the config adder of each meta-architecture it names, then merges.

A `_BASE_` may also be "model_zoo:<path>", a config that ships with detectron2 (detectron2.model_zoo), so that
configs/*-CRM.yaml inherit the exact model-zoo settings instead of copies of them.
"""
import importlib
import os

import yaml

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from crm_d2.panoptic.refine import SegmentRefineOptions

__all__ = ["add_crm_config", "add_base_model_configs", "get_crm_cfg", "load_config_dict", "REFINABLE_OUTPUTS",
           "BASE_MODELS"]

REFINABLE_OUTPUTS = ("panoptic_seg", "instances", "sem_seg")

# meta-architecture -> (python package, its config adder, where to get it). Detectron2's own
# meta-architectures (GeneralizedRCNN, PanopticFPN, ...) need nothing and are not listed.
BASE_MODELS = {
    "PanopticFCN": ("panopticfcn", "add_panopticfcn_config",
                    "https://github.com/dvlab-research/PanopticFCN (put the repository root on PYTHONPATH)"),
    "EntityFPN": ("entityseg", "add_entity_config",
                  "https://github.com/dvlab-research/Entity (put its EntitySeg/ folder on PYTHONPATH)"),
}


def add_crm_config(cfg):
    """Add `MODEL.CRM.*` with defaults. CRM is applied after the base model, at the original image size.

    Refinement defaults are the core's (crm_d2.panoptic.refine.SegmentRefineOptions), so the Detectron2 run and
    `crm-d2 panoptic` refine the same way unless told otherwise.
    """
    core = SegmentRefineOptions()
    cfg.MODEL.CRM = CN()
    # False: the model is the base meta-architecture, bit for bit (CRM weights are not even loaded).
    cfg.MODEL.CRM.ENABLED = True
    # CRM checkpoint: a path, the authors' released state_dict, or "demo" (the small model shipped with crm_d2).
    cfg.MODEL.CRM.WEIGHTS = ""
    # The meta-architecture whose outputs are refined; MODEL.META_ARCHITECTURE is "CRMPostRefiner".
    cfg.MODEL.CRM.BASE_META_ARCHITECTURE = "GeneralizedRCNN"
    # Refinement scales of the cascade (fractions of the ROI's full resolution), or ["auto"] (a first stage at
    # about the training resolution, then doubling); [] = the checkpoint's own schedule, as Refiner() and
    # `crm-d2 panoptic` use when given none (the authors' file: the released 0.125, 0.25, 0.5, 1.0).
    cfg.MODEL.CRM.SCALES = []
    # Guided filter of each refined probability with the photo (crm_d2.guided): "RADIUS:PASSES:EPS" or "off";
    # "" = the checkpoint's own, as Refiner() and `crm-d2 panoptic --edge-snap` use when given none.
    cfg.MODEL.CRM.EDGE_SNAP = ""
    # Refine again each segment that the last round still moved (crm_d2.schedule.Rounds): "COUNT:MIN_SHIFT";
    # "" = the checkpoint's own, as Refiner() and `crm-d2 panoptic --rounds` use when given none.
    cfg.MODEL.CRM.ROUNDS = ""
    # GrabCut on the pixels near each refined boundary (crm_d2.grabcut): "BAND:ITERS[:MIN_SHIFT]" (every
    # segment) or "off"; "" = the checkpoint's own (the demo model's: 1 px, gated per segment), as Refiner()
    # and `crm-d2 panoptic --grabcut` use when given none.
    cfg.MODEL.CRM.GRABCUT = ""
    # Context around each segment's box, as a fraction of the box size.
    cfg.MODEL.CRM.ROI_MARGIN = float(core.margin)
    # Long side cap of the encoder input per segment ROI (0 = no cap); decoding stays at full resolution.
    cfg.MODEL.CRM.MAX_SIDE = int(core.max_side or 0)
    # Which base outputs to refine (those the base model does not return are ignored).
    cfg.MODEL.CRM.REFINE = ["panoptic_seg", "instances"]
    # Panoptic segments to refine: "things", "stuff" or "both".
    cfg.MODEL.CRM.TARGETS = core.targets
    # Segments smaller than this many pixels keep their base mask.
    cfg.MODEL.CRM.MIN_AREA = int(core.min_area)
    # Segments per CRM batch (memory: BATCH_SIZE full-size float maps).
    cfg.MODEL.CRM.BATCH_SIZE = int(core.batch_size)
    # bfloat16 autocast for the CRM encoder on CUDA (faster, not bit-exact; ignored on CPU).
    cfg.MODEL.CRM.AMP = False
    # Merge rule of crm_d2.panoptic.merge (see its docstring for the measured alternatives).
    cfg.MODEL.CRM.MERGE = core.merge
    # Refinement may change pixels only this close to a segment's coarse boundary, as a fraction of the image's
    # long side (0 = no limit).
    cfg.MODEL.CRM.BAND = float(core.band or 0.0)
    # Fast mode: refine only a band around each coarse boundary, at the last scale (not bit-exact; docs/benchmark.md).
    cfg.MODEL.CRM.FAST = False
    # A segment or instance that refinement leaves without a pixel keeps its base mask (False) or is dropped.
    cfg.MODEL.CRM.DROP_EMPTY = bool(core.drop_empty)
    # Keep instance masks non-overlapping after refinement (entity outputs, e.g. EntitySeg).
    cfg.MODEL.CRM.NON_OVERLAPPING_INSTANCES = False
    # Write a report to look at per evaluated dataset (crm_d2.report): <dataset output>/report/index.html, the
    # with/without and per-category tables and the 24 segments refinement changed most, as `crm-d2 panoptic
    # --report` writes it. Off by default: it reads every prediction again after the evaluation.
    cfg.MODEL.CRM.REPORT = False
    return cfg


def add_base_model_configs(cfg, meta_arch):
    """Apply the config adder of a third-party base model (and import it, which registers its meta-arch).

    Raises ImportError naming the missing package and where to get it.
    """
    if meta_arch not in BASE_MODELS:
        return cfg
    package, adder, source = BASE_MODELS[meta_arch]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        if exc.name == package:
            why = "which is not importable"
        else:  # the package is there but one of its own imports is not
            why = f"whose import failed: {exc}"
        raise ImportError(
            f"base meta-architecture {meta_arch!r} needs the python package {package!r}, {why}; get it from "
            f"{source}"
        ) from exc
    getattr(module, adder)(cfg)
    return cfg


MODEL_ZOO_PREFIX = "model_zoo:"


def load_config_dict(config_file):
    """A YAML config as a dict, its `_BASE_` chain merged in (relative paths, or "model_zoo:<path>")."""
    config_file = os.path.expanduser(str(config_file))
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    with open(config_file) as f:
        data = yaml.safe_load(f) or {}
    base = data.pop("_BASE_", None)
    if not base:
        return data
    if base.startswith(MODEL_ZOO_PREFIX):
        from detectron2 import model_zoo

        try:
            zoo_file = model_zoo.get_config_file(base[len(MODEL_ZOO_PREFIX):])
        except RuntimeError as exc:
            raise FileNotFoundError(f"{config_file}: _BASE_ {base!r} is not in detectron2's model zoo ({exc}); "
                                    "install detectron2 from source so that its configs are included") from exc
        merged = CN.load_yaml_with_base(zoo_file, allow_unsafe=True)
    else:
        base = os.path.expanduser(base)
        merged = load_config_dict(base if os.path.isabs(base) else os.path.join(os.path.dirname(config_file), base))
    _merge_dict(data, merged)
    return merged


def _merge_dict(src, dst):
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_dict(value, dst[key])
        else:
            dst[key] = value


def _meta_archs(data, opts):
    """Meta-architecture names a config dict and opts will set, before they are merged."""
    model = data.get("MODEL") or {}
    names = [model.get("META_ARCHITECTURE"), (model.get("CRM") or {}).get("BASE_META_ARCHITECTURE")]
    opts = list(opts or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key in ("MODEL.META_ARCHITECTURE", "MODEL.CRM.BASE_META_ARCHITECTURE"):
            names.append(value)
    return [n for n in dict.fromkeys(names) if n]


def get_crm_cfg(config_file=None, opts=None):
    """A Detectron2 config with CRM keys, base-model keys and the file and opts merged (not frozen)."""
    cfg = get_cfg()
    add_crm_config(cfg)
    data = load_config_dict(config_file) if config_file else {}
    for name in _meta_archs(data, opts):
        add_base_model_configs(cfg, name)
    if data:
        version = data.get("VERSION", cfg.VERSION)
        if version != cfg.VERSION:
            raise ValueError(f"{config_file}: config VERSION {version} is not detectron2's {cfg.VERSION}")
        cfg.merge_from_other_cfg(CN(data))
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
