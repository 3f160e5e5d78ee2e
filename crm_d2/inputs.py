"""The release's input conventions (reflect padding, resize) and the checks every public entry point applies:
one place that turns what users pass (RGB or BGR arrays, tensors, bool/uint8/float masks) into what the
engine needs, with a one-line error naming the problem otherwise."""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

PAD = 32  # the release reflect-pads image and mask by this many pixels
OUTPUTS = ("prob", "binary", "uint8")


def resize(x, size):
    """The release's resize (bilinear, align_corners); at the same size that is the identity, and no copy is
    made (at 6K each copy of the padded image is 300 MB)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def encoder_input(image, mask):
    """The encoder's input, torch.cat((image, mask), 1), written channels_last at once, as the encoder reads it.
    Concatenated and then converted, it was two fresh maps, the first held through the whole encoder (139 MB
    each at 4K)."""
    c = image.shape[1]
    x = torch.empty((mask.shape[0], c + mask.shape[1], *mask.shape[-2:]), dtype=mask.dtype, device=mask.device,
                    memory_format=torch.channels_last)
    x[:, :c] = image
    x[:, c:] = mask
    return x


def resize_sources(n_out, n_in, device=None):
    """Where `resize` samples an n_in-long axis for each of its n_out outputs, in input pixels (float32; 0 and
    n_in - 1 at the ends, as align_corners puts them)."""
    return torch.arange(n_out, device=device, dtype=torch.float32) * ((n_in - 1) / max(1, n_out - 1))


def _as_numpy(x, what):
    """A numpy view of an array or tensor; None (a failed cv2.imread) is an error that says so."""
    if x is None:
        raise ValueError(f"{what} is None (did cv2.imread fail?)")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_rgb_array(image, bgr=False):
    """Validate an image and return it as contiguous HxWx3 uint8 RGB."""
    image = _as_numpy(image, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        if not np.issubdtype(image.dtype, np.floating) or image.min() < 0 or image.max() > 1:
            raise ValueError(f"image must be uint8 0..255 or float in [0, 1], got {image.dtype} "
                             f"in [{image.min()}, {image.max()}]")
        image = np.round(image * 255).astype(np.uint8)
    if min(image.shape[:2]) <= PAD:
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}: CRM needs at least {PAD + 1} pixels per side "
                         f"(it reflect-pads {PAD} px); upscale small images first")
    if bgr:
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


# A resized or blurred soft mask overshoots [0, 1] by float rounding (cv2.resize gives 1.0000001): clipped, not refused.
FLOAT_MASK_SLACK = 1e-3


def to_mask_array(mask, shape=None):
    """Validate one mask and return it as HxW float32 in [0, 1]."""
    mask = _as_numpy(mask, "mask")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        extra = " (it has channels: pass a single-channel mask, e.g. mask[..., 0])" if mask.ndim == 3 else ""
        raise ValueError(f"mask must be HxW, got shape {mask.shape}{extra}")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {shape[0]}x{shape[1]}: "
                         "they must have the same size")
    if mask.dtype == bool:
        return mask.astype(np.float32)
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / (255.0 if mask.max() > 1 else 1.0)
    if np.issubdtype(mask.dtype, np.integer):
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(f"integer mask values must be 0/1 or 0..255, got [{mask.min()}, {mask.max()}]")
        return mask.astype(np.float32) / (255.0 if mask.max() > 1 else 1.0)
    mask = mask.astype(np.float32)
    if not np.isfinite(mask).all():
        raise ValueError("mask contains NaN or infinite values")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -FLOAT_MASK_SLACK or hi > 1 + FLOAT_MASK_SLACK:
        raise ValueError(f"float mask values must lie in [0, 1], got [{lo:.6g}, {hi:.6g}]")
    return np.clip(mask, 0, 1) if lo < 0 or hi > 1 else mask


def to_mask_stack(masks, shape):
    if isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3 and masks.shape[-1] not in (1, 3):
        masks = list(masks)
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("no masks given")
    return np.ascontiguousarray(np.stack([to_mask_array(m, shape) for m in masks]))


def format_output(probs, output):
    if output == "binary":
        return probs > 0.5
    if output == "uint8":
        return np.floor(probs * 255).astype(np.uint8)
    return probs


def check_option_fields(opt, what, counts=(), non_negative=()):
    """The range checks the option dataclasses share, with the one-line error each names `what` in: fields in
    `counts` are whole numbers >= 1, fields in `non_negative` are >= 0 (NaN is refused)."""
    for name in counts:
        value = getattr(opt, name)
        try:
            whole = int(value) == value
        except (TypeError, ValueError, OverflowError):  # None, text, NaN, infinity
            whole = False
        if not whole or value < 1:
            raise ValueError(f"{what} {name} must be a whole number >= 1, got {value!r}")
    for name in non_negative:
        value = getattr(opt, name)
        try:
            ok = bool(value >= 0)
        except TypeError:  # None, text
            ok = False
        if not ok:
            raise ValueError(f"{what} {name} must be >= 0, got {value!r}")


def option_text(opt):
    """The one written form of a parsed option (edge snap, GrabCut, rounds): "off" or its own A:B:... text, so
    run records and reports compare equal however the option was spelt."""
    return str(opt) if opt else "off"


def parse_option(cls, value, what, form, can_be_off=True):
    """An option dataclass (the edge snap, the GrabCut finish, the rounds) from what the Python API, the CLI and
    the Detectron2 config may say, in one place: None or "" (nothing said: the checkpoint's own) -> None; an int
    (the first field), `form` text ("A:B:..."), a dict or a `cls` -> `cls`; and, for an option that can be
    switched off, False, 0 or "off" -> False."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
        if value == "off" and can_be_off:
            return False
    if isinstance(value, (str, dict)):
        return option_from(cls, value, what, f"'off' or {form}" if can_be_off else form)
    first = dataclasses.fields(cls)[0].name
    if isinstance(value, bool) and can_be_off:
        if value:
            raise ValueError(f"{what} True says no {first}: give {form}")
        return False
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return cls(**{first: int(value)}) if value or not can_be_off else False
    off = "'off', " if can_be_off else ""
    raise ValueError(f"{what} must be a {first}, {off}{form.split(' (')[0]}, a dict or {cls.__name__}(...), "
                     f"got {value!r}")


def option_from(cls, value, what, form):
    """An option dataclass from "A:B:..." text (its fields in order, each converted by its type; trailing ones
    may be left out; fields marked `metadata={"text": False}` have no text form) or from a dict of its fields;
    errors name `what` and the accepted `form`."""
    fields = dataclasses.fields(cls)
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"unknown {what} keys {sorted(unknown)}; use {', '.join(f.name for f in fields)}")
        return cls(**value)
    parts = value.split(":")
    written = [f for f in fields if f.metadata.get("text", True)]  # a field marked text=False has no text form
    try:
        if len(parts) > len(written):
            raise ValueError("too many fields")
        return cls(**{f.name: f.type(x) for f, x in zip(written, parts)})
    except ValueError as e:
        raise ValueError(f"{what} must be {form}, got {value!r}: {e}") from None
