"""Synthetic scenes with exact ground truth, from 64 px up to 6K, for tests, benchmarks and high-resolution checks.

A scene is a textured background with a few objects whose boundaries are smooth closed curves, some with holes and
thin structures (hair, legs, antennae) that a low-resolution segmenter misses. The coarse mask is what such a
segmenter would produce: the GT seen at `segmenter_side` pixels (long side), binarised there and upsampled back.
Everything is a pure function of the seed.

Speed: textures are composed at 1/4 resolution and upsampled once in uint8; object masks are rasterised at full
resolution with OpenCV (sub-pixel polygon vertices) inside each object's own box, so a 6000x4000 scene takes about
a second on one core (0.3 s at 2K).
"""
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crm_d2.train.perturb import PerturbConfig, lowres_perturb

__all__ = ["Scene", "make_scene", "write_big_folder", "write_pairs_folder"]

_SHIFT = 4  # fixed-point bits for OpenCV's sub-pixel polygon vertices


@dataclass
class Scene:
    image: np.ndarray   # HxWx3 uint8 RGB
    gt: np.ndarray      # HxW uint8 0/255, union of the objects
    coarse: np.ndarray  # HxW uint8 0/255, low-resolution segmenter's view of gt
    labels: np.ndarray  # HxW uint8, 0 = background, k = k-th object (later objects occlude earlier ones)
    seed: int


def _size(size):
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise ValueError(f"synthetic scenes need at least 16x16 pixels, got {h}x{w}")
    return h, w


def _texture(h, w, rng, base):
    """Colour field around `base` (RGB): smooth shading + blotches + optional stripes + fine grain. uint8 HxWx3."""
    lh, lw = max(2, (h + 3) // 4), max(2, (w + 3) // 4)
    coarse = rng.random((rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.float32)
    field = cv2.resize(coarse, (lw, lh), interpolation=cv2.INTER_CUBIC) * 70.0 - 35.0
    # Blotches of about 1/100 of the short side at any resolution: blurred noise on a small grid, upsampled.
    bh, bw = max(2, min(lh, 100 * lh // max(1, min(lh, lw)))), max(2, min(lw, 100 * lw // max(1, min(lh, lw))))
    blotch = cv2.GaussianBlur(rng.random((bh, bw, 3), dtype=np.float32), (0, 0), 1.0)
    field += (cv2.resize(blotch, (lw, lh), interpolation=cv2.INTER_LINEAR) - 0.5) * rng.uniform(60, 200)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30)
        stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))
        field += stripes[..., None] * rng.uniform(8, 30)
    small = np.clip(field + np.asarray(base, np.float32), 0, 255).astype(np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # Fine grain at full resolution from a small patch wrapped around: cheap at 6K, and no colour is ever flat.
    ph, pw = min(h, 97), min(w, 101)
    patch = rng.integers(0, 17, size=(ph, pw, 3), dtype=np.uint8)
    strip = np.ascontiguousarray(np.tile(patch, (1, -(-w // pw), 1))[:, :w])
    for y in range(0, h, ph):  # row blocks of a C-contiguous image are contiguous: added in place
        n = min(ph, h - y)
        cv2.add(img[y:y + n], strip[:n], dst=img[y:y + n])
    cv2.subtract(img, (8, 8, 8, 0), dst=img)
    return img


def _blob(cx, cy, radius, rng, n_pts, roughness=0.25):
    """Closed smooth curve r(t) = R (1 + sum_k a_k cos(k t + p_k)) as float (N, 2) x/y points."""
    t = np.linspace(0, 2 * np.pi, n_pts, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, 13):
        r += rng.uniform(0, roughness) / (k - 1) ** 1.3 * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = radius * np.maximum(r, 0.3)
    ax = rng.uniform(0.6, 1.0)  # elongation
    rot = rng.uniform(0, np.pi)
    x, y = r * np.cos(t) * ax, r * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _strand(start, direction, length, rng, n_pts=64):
    """A curved thin structure (quadratic Bezier) leaving `start` along `direction`."""
    d = direction / (np.linalg.norm(direction) + 1e-9)
    n = np.array([-d[1], d[0]])
    end = start + d * length + n * rng.uniform(-0.5, 0.5) * length
    ctrl = start + d * length * 0.5 + n * rng.uniform(-0.6, 0.6) * length
    t = np.linspace(0, 1, n_pts)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t ** 2 * end


def _fixed(pts, ox, oy):
    return np.round((pts - [ox, oy]) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _object(h, w, rng, holes, thin):
    """Rasterise one object: returns (mask ROI uint8 0/255, x0, y0)."""
    side = min(h, w)
    radius = rng.uniform(0.1, 0.28) * side
    cx = rng.uniform(0.2, 0.8) * w
    cy = rng.uniform(0.2, 0.8) * h
    n_pts = int(np.clip(2 * np.pi * radius / 2, 64, 4096))
    outline = _blob(cx, cy, radius, rng, n_pts)
    hole_polys, strands = [], []
    if holes and rng.random() < 0.6:
        for _ in range(rng.integers(1, 3)):
            hx = cx + rng.uniform(-0.3, 0.3) * radius
            hy = cy + rng.uniform(-0.3, 0.3) * radius
            hole_polys.append(_blob(hx, hy, rng.uniform(0.08, 0.25) * radius, rng, max(32, n_pts // 4), 0.15))
    if thin and rng.random() < 0.7:
        width = max(1, int(round(rng.uniform(0.0015, 0.005) * side)))
        for _ in range(rng.integers(1, 5)):
            i = rng.integers(len(outline))
            start = outline[i]
            strands.append((_strand(start, start - [cx, cy], rng.uniform(0.3, 0.9) * radius, rng), width))
    allpts = np.concatenate([outline] + [s for s, _ in strands], 0)
    pad = 2 + max([wd for _, wd in strands], default=0)
    x0 = int(np.clip(np.floor(allpts[:, 0].min()) - pad, 0, w - 1))
    y0 = int(np.clip(np.floor(allpts[:, 1].min()) - pad, 0, h - 1))
    x1 = int(np.clip(np.ceil(allpts[:, 0].max()) + pad + 1, x0 + 1, w))
    y1 = int(np.clip(np.ceil(allpts[:, 1].max()) + pad + 1, y0 + 1, h))
    roi = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(roi, [_fixed(outline, x0, y0)], 255, lineType=cv2.LINE_8, shift=_SHIFT)
    for hp in hole_polys:
        cv2.fillPoly(roi, [_fixed(hp, x0, y0)], 0, lineType=cv2.LINE_8, shift=_SHIFT)
    for pts, width in strands:
        cv2.polylines(roi, [_fixed(pts, x0, y0)], False, 255, thickness=width, lineType=cv2.LINE_8, shift=_SHIFT)
    return roi, x0, y0


def make_scene(size=512, seed=0, *, objects=None, holes=True, thin=True, segmenter_side=None):
    """A deterministic synthetic scene.

    size: int or (H, W); objects: count (default 1-3 from the seed); segmenter_side: long side in pixels at which
    the coarse mask is made (default from the seed, 96-320 px, a typical low-resolution segmenter's grid, and at
    most a quarter of the scene's long side).
    """
    h, w = _size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5C3E]))
    bg_color = rng.uniform(40, 215, 3)
    image = _texture(h, w, rng, bg_color)
    labels = np.zeros((h, w), np.uint8)
    n_obj = int(objects) if objects is not None else int(rng.integers(1, 4))
    for k in range(1, n_obj + 1):
        roi, x0, y0 = _object(h, w, rng, holes, thin)
        rh, rw = roi.shape
        # Object colour differs from the background by a clear but varying margin.
        color = np.clip(bg_color + rng.choice([-1, 1], 3) * rng.uniform(40, 110, 3), 0, 255)
        tex = _texture(rh, rw, rng, color)
        sel = roi > 0
        np.copyto(image[y0:y0 + rh, x0:x0 + rw], tex, where=sel[..., None])
        labels[y0:y0 + rh, x0:x0 + rw][sel] = k
        # Soft image edges (optics), hard GT.
        image[y0:y0 + rh, x0:x0 + rw] = cv2.GaussianBlur(image[y0:y0 + rh, x0:x0 + rw], (3, 3), 0.7)
    gt = cv2.threshold(labels, 0, 255, cv2.THRESH_BINARY)[1]
    coarse = _segmenter_view(gt, rng, segmenter_side)
    return Scene(image=image, gt=gt, coarse=coarse, labels=labels, seed=int(seed))


def _segmenter_view(gt, rng, segmenter_side=None):
    """The coarse mask of a low-resolution segmenter whose grid has `segmenter_side` px on its long side."""
    h, w = gt.shape
    if segmenter_side is None:
        # Never finer than 1/4 of the scene, so that small test scenes still get a visibly coarse mask.
        segmenter_side = min(int(rng.integers(96, 321)), max(h, w) / 4.0)
    factor = max(1.0, max(h, w) / float(segmenter_side))
    # Receptive-field blur of 0.5-1.5 cells, less on the tiny grids of small test scenes.
    blur = min(1.0, segmenter_side / 96.0)
    cfg = PerturbConfig(lowres_threshold=(0.4, 0.6), lowres_blur_prob=1.0, lowres_blur_sigma=(0.5 * blur, 1.5 * blur),
                        lowres_soft_prob=0.0)
    return lowres_perturb(gt, rng, cfg, factor=factor)


def upscale_photo(image, mask, size, seed=0, segmenter_side=None):
    """A high-resolution test scene from a real photo and its mask (there is no real 4K data here).

    The photo is scaled (bicubic) to cover `size` and centre-cropped; the mask is scaled as a soft map and
    thresholded at 0.5, so its boundary stays smooth rather than staircased; the coarse mask is the same
    low-resolution segmenter's view as in `make_scene`. Figures from these say "upscaled photos".
    """
    H, W = _size(size)
    h, w = mask.shape
    k = max(H / h, W / w)
    sh, sw = max(H, round(h * k)), max(W, round(w * k))
    y0, x0 = (sh - H) // 2, (sw - W) // 2
    img = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_CUBIC)[y0 : y0 + H, x0 : x0 + W]
    soft = cv2.resize(mask.astype(np.float32) / max(1, mask.max()), (sw, sh), interpolation=cv2.INTER_LINEAR)
    gt = np.where(soft[y0 : y0 + H, x0 : x0 + W] >= 0.5, 255, 0).astype(np.uint8)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E07]))
    coarse = _segmenter_view(gt, rng, segmenter_side)
    return Scene(image=np.ascontiguousarray(img), gt=gt, coarse=coarse, labels=(gt > 0).astype(np.uint8),
                 seed=int(seed))


def write_big_folder(folder, count, size=512, seed=0, **kwargs):
    """Write `count` scenes as BIG-layout triplets NAME_im.jpg / NAME_gt.png / NAME_seg.png; returns the names.

    Existing complete triplets are kept (rerunning resumes).
    """
    from crm_d2.io import write_image, write_png

    folder = Path(folder)
    names = []
    for i in range(count):
        name = f"syn{i:04d}"
        names.append(name)
        files = [folder / f"{name}_im.jpg", folder / f"{name}_gt.png", folder / f"{name}_seg.png"]
        if all(f.exists() for f in files):
            continue
        s = make_scene(size, seed + i, **kwargs)
        write_image(files[0], s.image)
        write_png(files[1], s.gt)
        write_png(files[2], s.coarse)
    return names


def write_pairs_folder(folder, count, size=128, seed=0, **kwargs):
    """Write `count` scenes as flat training pairs NAME.jpg + NAME.png (image, GT); returns the names."""
    from crm_d2.io import write_image, write_png

    folder = Path(folder)
    names = []
    for i in range(count):
        name = f"syn{i:04d}"
        names.append(name)
        s = make_scene(size, seed + i, **kwargs)
        write_image(folder / f"{name}.jpg", s.image)
        write_png(folder / f"{name}.png", s.gt)
    return names
