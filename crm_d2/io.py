"""Image/mask reading and crash-safe writing shared by every command.

Images are returned as RGB uint8 everywhere in crm_d2: OpenCV's BGR stops at this module.
"""
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def imread(path, flags, what="image"):
    """cv2.imread that says which file is missing or undecodable instead of returning None."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    img = cv2.imread(path, flags)
    if img is None:
        raise ValueError(f"cannot decode {what} {path} (corrupt or unsupported format)")
    return img


def read_image(path):
    """Read a colour image as HxWx3 uint8 RGB; raise ValueError naming the file if it cannot be decoded."""
    return cv2.cvtColor(imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_mask(path, colour="grey"):
    """Read a single-channel mask as HxW uint8. A grey mask stored as RGB is taken as it is; a cut-out whose
    colour channels hold one value carries its mask in alpha; a colour file is converted to grey
    (colour="grey"), or refused (colour="refuse": a mask handed to refine, which must not guess, as the Refiner
    API refuses an HxWx3 mask). 16-bit files keep their 0/1 or 0/255 values; 0..65535 ones are scaled down."""
    m = imread(path, cv2.IMREAD_UNCHANGED, "mask")
    if m.ndim == 3 and m.shape[2] == 4 and (m[..., :3] == m.flat[0]).all() and (m[..., 3] != m[0, 0, 3]).any():
        m = m[..., 3]  # a cut-out: one colour, the mask in alpha (an opaque one-colour file stays its colour)
    if m.ndim == 3:
        rgb = m[..., :3]
        if colour == "refuse" and not (rgb == rgb[..., :1]).all():
            raise ValueError(f"mask {path} is a colour image (its channels differ): pass a single-channel mask "
                             "(grey PNG, 0/255 or 0..255)")
        m = cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY)
    if m.dtype == np.uint16:
        m = (m >> 8 if m.max() > 255 else m).astype(np.uint8)
    return m


def atomic_write(path, write_fn, suffix=""):
    """Write through a temporary file in the same folder and rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_png(path, array, rgb=True):
    """Atomically write a uint8 mask (HxW) or RGB picture (HxWx3) as PNG."""
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and rgb:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)

    def write(tmp):
        if not cv2.imwrite(tmp, array):
            raise ValueError(f"could not encode PNG for {path}")

    atomic_write(path, write, ".png")


MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless: a mask's edges survive the file


def check_mask_path(path):
    """Refuse a mask file name whose format would change the mask (JPEG, WebP) or that names no format."""
    suffix = Path(path).suffix.lower()
    if suffix in MASK_EXTS:
        return
    if suffix in (".jpg", ".jpeg", ".webp", ".jp2"):
        raise ValueError(f"{path}: {suffix[1:].upper()} is lossy and would blur the mask's edges; masks are written "
                         f"as {', '.join(e[1:].upper() for e in MASK_EXTS)}: use {Path(path).with_suffix('.png')}")
    raise ValueError(f"{path}: a mask file name must end in {', '.join(MASK_EXTS)}")


def write_mask(path, array):
    """Atomically write a uint8 HxW mask in the (lossless) format its extension names."""
    check_mask_path(path)
    array = np.ascontiguousarray(array)

    def write(tmp):
        if not cv2.imwrite(tmp, array):
            raise ValueError(f"could not encode mask {path}")

    atomic_write(path, write, Path(path).suffix)


def write_image(path, array_rgb):
    """Atomically write an RGB picture; the format follows the file extension."""
    suffix = Path(path).suffix or ".png"
    bgr = cv2.cvtColor(np.ascontiguousarray(array_rgb), cv2.COLOR_RGB2BGR)

    def write(tmp):
        if not cv2.imwrite(tmp, bgr):
            raise ValueError(f"could not encode image for {path}")

    atomic_write(path, write, suffix)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)

    atomic_write(path, write, ".json")


def list_big(folder, skipped=None):
    """Names of BIG-layout triplets (NAME_im.jpg, NAME_seg.png, NAME_gt.png) in a folder.

    Returns a sorted list of dicts with keys name, image, seg, gt (gt may be None when absent). Images without a
    NAME_seg.png cannot be refined or evaluated and are left out; pass a list as `skipped` to be told which
    (file name, reason), so that they are not left out without a word.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BIG folder not found: {folder}")
    items = []
    for seg in sorted(folder.glob("*_seg.png")):
        name = seg.name[: -len("_seg.png")]
        image = None
        for ext in (".jpg", ".jpeg", ".png"):
            cand = folder / f"{name}_im{ext}"
            if cand.exists():
                image = cand
                break
        if image is None:
            raise FileNotFoundError(f"{seg.name} has no image {name}_im.jpg in {folder}")
        gt = folder / f"{name}_gt.png"
        items.append({"name": name, "image": image, "seg": seg, "gt": gt if gt.exists() else None})
    if skipped is not None:
        names = {it["name"] for it in items}
        for image in sorted(p for ext in (".jpg", ".jpeg", ".png") for p in folder.glob(f"*_im{ext}")):
            name = image.name[: image.name.rindex("_im")]
            if name not in names:
                skipped.append((image.name, f"no coarse mask {name}_seg.png"))
    if not items:
        raise FileNotFoundError(f"no BIG-layout triplets (NAME_im.jpg, NAME_seg.png) in {folder}")
    return items
