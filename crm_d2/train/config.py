"""Training configs: every key with its default, YAML files with `_base_`, dotted KEY=VALUE overrides.

One home for what a training config may say; a file or an override naming anything else is an error, so typos
fail loudly instead of training the default.
"""
import copy
from pathlib import Path

import yaml

from crm_d2.model import CRMConfig
from crm_d2.train.perturb import PerturbConfig

__all__ = ["DEFAULTS", "load_config", "apply_overrides", "model_config"]

# Every key a config may set; a config file or an override naming anything else is an error (typos fail loudly).
DEFAULTS = {
    "model": {"preset": "r50", "layers": None, "width": None, "hidden": None, "depth": None, "dropout": None,
              "mask_skip": None,  # True: the coarse mask's skip to the output logit (project models)
              "init": None,  # ImageNet ResNet-50 state_dict (torchvision names) for the encoder
              "pixel_head": None,  # channels of the full-resolution head (crm_d2.model.PixelHead; 0 = none)
              # whole-model start: a crm_d2 checkpoint, the released file or "demo" (the shipped model)
              "weights": None,
              # Parts kept as they are (no gradient, BatchNorm and dropout in eval mode): e.g. train a pixel head
              # on a trained model with [feats, aspp_, imnet, mask_gain].
              "freeze": []},
    "data": {
        "train": [],
        "val": [],
        "empty": "keep",  # empty masks: keep (as negatives) or skip
        "crop_size": 224,
        "num_workers": 2,
        "perturb": {},  # crm_d2.train.perturb.PerturbConfig fields
        "val_perturb": None,  # coarse masks for validation pairs without one (default: perturb)
        # The network sees each crop at one of these input scales (drawn uniformly per iteration) and is
        # queried at the crop's full resolution, as a schedule's lower stages are at inference.
        "input_scales": [1.0],
    },
    # Decode only part of each crop: `points` random pixels per sample for the pointwise losses and one
    # `tile` x tile square (with its context) for the gradient loss. 0 = every pixel (the released recipe).
    # Same loss in expectation (crm_d2.train.losses.CRMLoss.sampled), a fraction of the decoder's work.
    # boundary: the share of the points drawn from the band (`band` px around the GT's boundary, plus where the
    # coarse mask is wrong); reweight: importance weights keep the loss unbiased, false keeps the emphasis.
    "sampling": {"points": 0, "tile": 0, "boundary": 0.0, "band": 3, "reweight": True},
    "solver": {
        "batch_size": 12,  # total over all processes
        "lr": 2.25e-4,
        "weight_decay": 1e-4,
        "max_iter": 45000,
        "steps": [22500, 37500],
        "gamma": 0.1,
        "amp": True,  # CUDA only (float16 autocast + GradScaler)
        "sync_bn": False,
        "grad_clip": None,
        "channels_last": False,  # channels_last memory format for the encoder (faster convolutions)
        # Seconds of training for a machine lent for a fixed time: max_iter becomes what fits at the speed of
        # the first iterations (`fit_to_budget`), the steps keep their fractions of it. None: max_iter as given.
        "time_budget_s": None,
    },
    "loss": {"bce": 1.0, "l1": 0.5, "l2": 0.5, "grad": 2.0},
    # Validation reads at most max_items items (evenly spread over the sources), the final one too. scales
    # (a list or "auto") and auto_base are stored in the exported model as its default schedule.
    "val": {"period": 5000, "max_items": None, "scales": [0.125, 0.25, 0.5, 1.0], "auto_base": 512, "seed": 0},
    "checkpoint": {"period": 1000, "keep": 3, "export_half": False},
    "log": {"period": 20, "tensorboard": True},
    "output_dir": "runs/crm",
    "seed": 0,
    "device": None,  # None = cuda when available
    "cpu_threads": None,  # torch threads of the training process on CPU (None = torch's default)
}


def _merge(base, new, where=""):
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in out:
            raise ValueError(f"unknown config key {where}{k!r}; known: {sorted(out)}")
        if isinstance(out[k], dict) and isinstance(v, dict) and k not in ("perturb",):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path, seen=()):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through _base_")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping at the top level")
    base = cfg.pop("_base_", None)
    if base:
        parent = _read_yaml(path.parent / base, seen + (path.resolve(),))
        cfg = _deep_update(parent, cfg)
    return cfg


def _deep_update(base, new):
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def apply_overrides(cfg, overrides):
    """Apply KEY=VALUE strings (dotted keys, list indices allowed: data.train.0.root=...); values are YAML."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node, parts = cfg, key.strip().split(".")
        for i, part in enumerate(parts):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"override {key}: {part!r} is not an index of a {len(node)}-element list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"override {key}: {'.'.join(parts[:i]) or key} is not a mapping")
            if i == len(parts) - 1:
                node[part] = value  # unknown keys are rejected by the validation that follows
            else:
                if isinstance(node, dict) and part not in node:
                    raise ValueError(f"override {key}: unknown key {part!r}; known: {sorted(node)}")
                node = node[part]
    return cfg


def load_config(path=None, overrides=()):
    """DEFAULTS <- YAML file (with optional `_base_: other.yaml`) <- overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    base_dir = None
    if path is not None:
        cfg = _merge(cfg, _read_yaml(path))
        base_dir = str(Path(path).resolve().parent)
    cfg = apply_overrides(cfg, overrides)
    cfg = _merge(DEFAULTS, cfg)  # re-validate keys after overrides
    cfg["_base_dir"] = base_dir
    s = cfg["solver"]
    # PyYAML reads "1e-3" (no dot) as a string: numbers are coerced here rather than failing deep in torch.
    try:
        for k in ("lr", "weight_decay", "gamma"):
            s[k] = float(s[k])
        for k in ("max_iter", "batch_size"):
            s[k] = int(s[k])
        s["steps"] = [int(v) for v in s["steps"]]
        cfg["data"]["input_scales"] = [float(v) for v in cfg["data"]["input_scales"]]
        samp = cfg["sampling"]
        samp.update(points=int(samp["points"] or 0), tile=int(samp["tile"] or 0), band=int(samp["band"]),
                    boundary=float(samp["boundary"] or 0), reweight=bool(samp["reweight"]))
        cfg["loss"] = {k: float(v) for k, v in cfg["loss"].items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: a solver/loss value is not a number ({exc})") from None
    if int(s["max_iter"]) < 1 or int(s["batch_size"]) < 1:
        raise ValueError("solver.max_iter and solver.batch_size must be positive")
    if not cfg["data"]["input_scales"] or not all(0 < v <= 1 for v in cfg["data"]["input_scales"]):
        raise ValueError(f"data.input_scales must be a non-empty list in (0, 1], got {cfg['data']['input_scales']}")
    if (cfg["sampling"]["points"] > 0) != (cfg["sampling"]["tile"] > 0):
        raise ValueError("sampling.points and sampling.tile go together (both 0 = decode every pixel)")
    if not 0 <= cfg["sampling"]["boundary"] < 1 or cfg["sampling"]["band"] < 0:
        raise ValueError(f"sampling.boundary must be in [0, 1) and sampling.band >= 0, got {cfg['sampling']}")
    if not isinstance(cfg["model"]["freeze"], list):
        raise ValueError(f"model.freeze must be a list of module names, got {cfg['model']['freeze']!r}")
    if s["time_budget_s"] is not None:
        try:
            s["time_budget_s"] = float(s["time_budget_s"])
        except (TypeError, ValueError):
            raise ValueError(f"solver.time_budget_s must be a number of seconds, got {s['time_budget_s']!r}") from None
        if s["time_budget_s"] <= 0:
            raise ValueError(f"solver.time_budget_s must be positive, got {s['time_budget_s']}")
    if list(s["steps"]) != sorted(s["steps"]):
        raise ValueError(f"solver.steps must be increasing, got {s['steps']}")
    PerturbConfig.from_dict(cfg["data"]["perturb"])  # fail early on bad perturbation options
    return cfg


def model_config(cfg):
    m = dict(cfg["model"])
    m.pop("init", None)
    m.pop("weights", None)
    m.pop("freeze", None)
    return CRMConfig.from_dict({k: v for k, v in m.items() if v is not None})
