"""ImageNet initialisation of CRM's encoder, as the release trains it (the weights are the user's file: none can be
downloaded here)."""
import re
from pathlib import Path

import torch

__all__ = ["load_imagenet_encoder"]


def load_imagenet_encoder(model, path):
    """Initialise the encoder from an ImageNet ResNet state_dict (torchvision names), as released: conv1's
    extra mask channel is zero, layer4 and fc are ignored. Returns the number of tensors loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ResNet state_dict")
    state = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in state.items()}
    own = model.feats.state_dict()
    new, loaded = {}, 0
    for k, v in own.items():
        src = state.get(k)
        if src is None:
            continue
        if k == "conv1.weight" and src.shape[1] == 3 and v.shape[1] == 4:
            src = torch.cat([src, torch.zeros_like(src[:, :1])], 1)
        if src.shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(src.shape)}, the encoder needs {tuple(v.shape)} "
                             f"(ImageNet init needs the r50 architecture)")
        new[k] = src.to(v.dtype)
        loaded += 1
    if "conv1.weight" not in new or "layer1.0.conv1.weight" not in new:
        raise ValueError(f"{path}: does not look like a torchvision ResNet state_dict (no conv1/layer1 weights)")
    model.feats.load_state_dict(new, strict=False)
    return loaded
