"""One loader for CRM weights: the authors' released state_dict and crm_d2's own self-describing files.

Project format: a dict {"format": "crm_d2", "version": 1, "config": CRMConfig dict, "model": state_dict,
"meta": {...}} plus optional training state (optimizer, scheduler, iteration, rng). Everything is read with
`torch.load(weights_only=True)`: a checkpoint is data, never code.
"""
import hashlib
import re
from pathlib import Path

import torch

from .io import atomic_write
from .model import CRM, CRMConfig

FORMAT = "crm_d2"
VERSION = 1
ASSETS = Path(__file__).resolve().parent / "assets"
NAMED_WEIGHTS = {"demo": ASSETS / "crm_demo.pth"}
_IGNORED = re.compile(r"^feats\.layer4\.")  # computed by the release, never used


def resolve_weights(weights):
    """Map a built-in name ("demo") to its file; pass paths through."""
    if isinstance(weights, str) and weights in NAMED_WEIGHTS:
        path = NAMED_WEIGHTS[weights]
        if not path.exists():
            raise FileNotFoundError(
                f"the built-in {weights!r} model is not in this install ({path}); train one with "
                "`crm-d2 train --config configs/training/crm_demo.yaml` or pass --weights PATH"
            )
        return path
    return Path(weights)


def weights_fingerprint(weights):
    """The first 16 hex digits of the weights file's SHA-256 (None if there is no such file): what a run records,
    since a name ("demo") or a path may hold other weights tomorrow."""
    try:
        path = resolve_weights(weights)
    except FileNotFoundError:  # a built-in model missing from the install: the refiner reports it
        return None
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_checkpoint(path, model, cfg=None, meta=None, half=False, **extra):
    """Atomically write a project-format checkpoint; `half` stores float tensors as fp16 (for shipping)."""
    model = getattr(model, "module", model)
    cfg = cfg or model.cfg
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": state, "meta": dict(meta or {})}
    obj.update(extra)
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


def _read(path):
    path = Path(path)
    if not path.is_file():
        hint = ""
        if len(path.parts) == 1 and not path.suffix:  # a bare name such as "model_45705", read as a built-in
            hint = (f" ({', '.join(map(repr, NAMED_WEIGHTS))} is the only built-in name; other weights are files "
                    "passed by path, e.g. the authors' model_45705: README, 'Which weights', says where it is published)")
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt, truncated or unsafe files
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch weights file, truncated, or it contains objects "
            f"other than tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def infer_config(state):
    """Architecture of a bare state_dict, read from its key layout and shapes (released files carry no config)."""
    try:
        width = state["feats.conv1.weight"].shape[0]
        layers = []
        for k in (1, 2, 3):
            blocks = {int(m.group(1)) for key in state if (m := re.match(rf"feats\.layer{k}\.(\d+)\.conv1\.weight$", key))}
            layers.append(len(blocks))
        linears = sorted(int(m.group(1)) for key in state if (m := re.match(r"imnet\.layers\.(\d+)\.weight$", key)))
        hidden = state["imnet.layers.0.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a CRM state_dict: key {exc} is missing") from None
    return CRMConfig(layers=tuple(layers), width=width, hidden=hidden, depth=len(linears) - 1)


def load_checkpoint(path):
    """Read and validate a checkpoint; returns the project-format dict (released files are converted)."""
    obj = _read(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict or a crm_d2 checkpoint, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        if "model" not in obj or "config" not in obj:
            raise ValueError(f"{path}: crm_d2 checkpoint without 'model' or 'config'")
        if int(obj.get("version", VERSION)) > VERSION:
            raise ValueError(f"{path}: crm_d2 checkpoint format version {obj['version']}, newer than this crm_d2 "
                             f"reads ({VERSION}): upgrade crm_d2")
        obj["config"] = CRMConfig.from_dict(obj["config"])
        return obj
    if "format" in obj:
        raise ValueError(f"{path}: unknown checkpoint format {obj['format']!r}")
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: neither a crm_d2 checkpoint nor a raw state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not _IGNORED.match(k)}
    return {"format": "released", "version": 0, "config": infer_config(state), "model": state,
            "meta": {"source": "released state_dict", "file": str(path)}}


def load_state(model, state, source="checkpoint", new_parts=()):
    """load_state_dict with errors that name the offending keys and shapes. new_parts: top-level modules the
    model adds to the state's architecture (e.g. a pixel head on a trained model), left as initialised."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and k.split(".")[0] not in new_parts]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{source} does not match the CRM architecture {model.cfg.to_dict()}: " + "; ".join(parts))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source} is a checkpoint of a different architecture: shape mismatch in "
                         + "; ".join(bad[:6]))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def load_model(weights, device="cpu", cfg=None):
    """Build a CRM from weights ("demo", a released state_dict or a crm_d2 checkpoint) in eval mode."""
    path = resolve_weights(weights)
    ckpt = load_checkpoint(path)
    if cfg is not None and cfg != ckpt["config"]:
        raise ValueError(f"{path} holds architecture {ckpt['config'].to_dict()}, not the requested {cfg.to_dict()}")
    model = CRM(ckpt["config"])
    load_state(model, ckpt["model"], source=str(path))
    model.meta = ckpt.get("meta", {})
    return model.to(device).eval()
