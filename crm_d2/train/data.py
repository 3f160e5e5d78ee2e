"""Training and validation data: where image/mask pairs come from, and how a training sample is made.

Sources (one dict per source in the YAML config, joined in order):

* `{type: pairs, root: DIR}`: a flat folder of X.jpg + X.png, or `images/` + `masks/` subfolders
  (other names: `images: NAME, masks: NAME`, e.g. DUTS-TR-Image / DUTS-TR-Mask).
* `{type: fss, root: DIR}`: FSS-1000, one folder per class, each a flat folder of pairs.
* `{type: big, root: DIR}`: BIG-layout triplets NAME_im.jpg / NAME_gt.png / NAME_seg.png (validation; the _seg
  file is the coarse mask).
* `{type: synthetic, count: N, size: S, seed: K}`: scenes from `crm_d2.train.synthetic`, made on the fly.

Every source also takes `holdout_every: K` with `part: train|val`: items are sorted by name and every K-th one
(index % K == holdout_offset, default 0) is the validation part. The split is a pure function of the file names,
so it is written down by the config itself. `exclude: [STEM, ...]` keeps named items out of the training part
(e.g. photos a demo shows, which must be new to the model). `label_offset: [DX, DY]` says that a source's masks lie
DX px right of and DY px below its photos' edges (CCP's: about [0.56, 0.25]; `tools/maintain/label_registration.py` measures
it); its masks are moved back by that when loaded, as soft masks, so that the labels a model learns from sit on
the photo's edges. Why: a horizontal flip turns a constant offset into +-DX of label noise on every boundary.

A training sample is a pure function of its position in the sample stream (`StreamSampler`): the data order,
crops, flips, colour jitter and coarse mask are all drawn from numpy generators seeded by (seed, position). That
is what makes `--resume` bit-identical with any number of workers, without saving worker state.
"""
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from crm_d2.io import IMAGE_EXTS, list_big, read_image, read_mask
from crm_d2.train.perturb import PerturbConfig, perturb_mask
from crm_d2.train.registration import move_mask

logger = logging.getLogger(__name__)

__all__ = [
    "Item",
    "list_pairs",
    "list_fss",
    "build_items",
    "CRMTrainDataset",
    "StreamSampler",
    "load_item",
    "val_samples",
]

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Item:
    """One sample: image/mask/coarse files, or a synthetic scene's size and seed."""

    name: str
    image: Path = None
    mask: Path = None
    coarse: Path = None  # a given coarse mask (BIG's _seg.png); None = synthesised
    synthetic: bool = False
    size: object = None
    seed: int = 0
    label_offset: tuple = (0.0, 0.0)  # where the mask lies relative to the photo, px (x right, y down)


# ----------------------------------------------------------------------------------------------- listing
def _image_files(folder):
    return {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTS and p.is_file()}


def list_pairs(root, images=None, masks=None, prefix=""):
    """Image/mask pairs of a folder: `images/` + `masks/` subfolders when present, else flat X.jpg + X.png.

    In a flat folder the PNG with an image's stem is its mask; pairs without a partner are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    img_dir = root / (images or "images")
    msk_dir = root / (masks or "masks")
    if img_dir.is_dir() and msk_dir.is_dir():
        imgs, msks = _image_files(img_dir), _image_files(msk_dir)
        names = sorted(set(imgs) & set(msks))
    elif images or masks:
        raise FileNotFoundError(f"{root}: subfolders {img_dir.name}/ and {msk_dir.name}/ not found")
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        msks = {p.stem: p for p in files if p.suffix.lower() == ".png"}
        imgs = {p.stem: p for p in files if p.suffix.lower() != ".png"}
        names = sorted(set(imgs) & set(msks))
    return [Item(f"{prefix}{n}", imgs[n], msks[n]) for n in names]


def list_fss(root):
    """FSS-1000: class folders of pairs (1.jpg, 1.png, ...); names are CLASS/STEM."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FSS-1000 folder not found: {root}")
    items = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        items += list_pairs(cls, prefix=f"{cls.name}/")
    return items


def _is_empty(path):
    try:
        return not np.any(read_mask(path) > 127)
    except (ValueError, FileNotFoundError):
        return False  # reported (and skipped) when the sample is loaded


def build_items(specs, part="train", base_dir=None, empty="keep"):
    """Join the sources described by `specs` (list of dicts, see module doc) into one list of Items.

    part: "train" or "val", selects the side of each source's `holdout_every` split (sources without one are
    used whole). empty: "keep" (empty masks stay, as negatives) or "skip". Relative roots are taken from the
    current directory, else from `base_dir` (the config file's folder).
    """
    if empty not in ("keep", "skip"):
        raise ValueError(f"empty must be 'keep' or 'skip', got {empty!r}")
    items = []
    for i, spec in enumerate(specs or []):
        spec = dict(spec)
        kind = spec.pop("type", "pairs")
        root = spec.pop("root", None)
        if root is not None:
            root = Path(os.path.expanduser(str(root)))
            if not root.is_absolute() and not root.exists() and base_dir is not None:
                if (Path(base_dir) / root).exists():
                    root = Path(base_dir) / root
        exclude = {str(n) for n in spec.pop("exclude", None) or ()}
        label_offset = _label_offset(spec.pop("label_offset", None), i)
        every = int(spec.pop("holdout_every", 0) or 0)
        offset = int(spec.pop("holdout_offset", 0))
        if every and not 0 <= offset < every:
            raise ValueError(f"data source {i}: holdout_offset must lie in [0, holdout_every) = [0, {every}), "
                             f"got {offset} (the validation part would be empty)")
        if kind == "pairs":
            src = list_pairs(root, spec.pop("images", None), spec.pop("masks", None),
                             prefix=spec.pop("prefix", f"{root.name}/"))
        elif kind == "fss":
            src = list_fss(root)
        elif kind == "big":
            src = [Item(t["name"], t["image"], t["gt"], t["seg"]) for t in list_big(root)]
            missing = [it.name for it in src if it.mask is None]
            if missing:
                raise FileNotFoundError(f"{root}: BIG triplets without NAME_gt.png: {', '.join(missing[:5])}")
        elif kind == "synthetic":
            count, size, seed = int(spec.pop("count", 32)), spec.pop("size", 128), int(spec.pop("seed", 0))
            size = tuple(size) if isinstance(size, (list, tuple)) else int(size)
            src = [Item(f"synthetic/{seed + k}", synthetic=True, size=size, seed=seed + k) for k in range(count)]
        else:
            raise ValueError(f"data source {i}: unknown type {kind!r} (pairs, fss, big, synthetic)")
        if spec:
            raise ValueError(f"data source {i} ({kind}): unknown keys {sorted(spec)}")
        if not src:
            raise FileNotFoundError(f"data source {i} ({kind} at {root}) has no image/mask pairs")
        if every > 0:
            src = sorted(src, key=lambda it: it.name)
            src = [it for k, it in enumerate(src) if (k % every == offset) == (part == "val")]
        if label_offset != (0.0, 0.0):
            if kind == "synthetic":
                raise ValueError(f"data source {i}: label_offset is for photos with labels, not synthetic scenes")
            src = [dataclasses.replace(it, label_offset=label_offset) for it in src]
        if exclude and part == "train":
            src = [it for it in src if it.name.rsplit("/", 1)[-1] not in exclude]
        if empty == "skip":
            kept = [it for it in src if it.synthetic or not _is_empty(it.mask)]
            if len(kept) != len(src):
                logger.info("%s: skipped %d empty masks", root, len(src) - len(kept))
            src = kept
        items += src
    return items


def _label_offset(value, i):
    if value is None:
        return (0.0, 0.0)
    try:
        dx, dy = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"data source {i}: label_offset must be [DX, DY] in pixels, got {value!r}") from None
    if not (math.isfinite(dx) and math.isfinite(dy)) or max(abs(dx), abs(dy)) > 8:
        raise ValueError(f"data source {i}: label_offset {value!r} must be finite and at most 8 px (a registration "
                         "error, not a misplaced mask)")
    return (dx, dy)


# ----------------------------------------------------------------------------------------------- loading
def load_item(item):
    """(image HxWx3 uint8 RGB, gt HxW uint8, coarse HxW uint8 or None) of an Item; ValueError if unreadable."""
    if item.synthetic:
        from crm_d2.train.synthetic import make_scene

        s = make_scene(item.size, item.seed)
        return s.image, s.gt, s.coarse
    image = read_image(item.image)
    gt = read_mask(item.mask)
    if gt.shape != image.shape[:2]:
        raise ValueError(f"{item.name}: mask {item.mask} is {gt.shape[1]}x{gt.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]}")
    if item.label_offset != (0.0, 0.0):
        gt = move_mask(gt, -item.label_offset[0], -item.label_offset[1])
    coarse = None
    if item.coarse is not None:
        coarse = read_mask(item.coarse)
        if coarse.shape != gt.shape:
            raise ValueError(f"{item.name}: coarse mask {item.coarse} does not match the image size")
    return image, gt, coarse


def val_samples(items, perturb=None, seed=0):
    """Yield (name, image, gt, coarse) for validation; pairs without a coarse mask get a fixed synthetic one
    (seeded by the item's index, so every validation run sees the same coarse masks). Unreadable items are
    reported and skipped."""
    perturb = perturb or PerturbConfig()
    for k, item in enumerate(items):
        try:
            image, gt, coarse = load_item(item)
        except (ValueError, FileNotFoundError) as exc:
            logger.warning("skipping validation item %s: %s", item.name, exc)
            continue
        if coarse is None:
            coarse = perturb_mask(gt, np.random.default_rng([int(seed), k, 0x7A1]), perturb)
        yield item.name, image, gt, coarse


# ----------------------------------------------------------------------------------------------- augmentation
def random_crop(image, gt, size, rng):
    """A size x size crop at native resolution; smaller images are zero-padded at a random offset."""
    h, w = gt.shape
    ch, cw = (size, size) if isinstance(size, int) else size
    ph, pw = max(ch, h), max(cw, w)
    if (ph, pw) != (h, w):
        oy, ox = rng.integers(0, ph - h + 1), rng.integers(0, pw - w + 1)
        img_p = np.zeros((ph, pw, 3), image.dtype)
        gt_p = np.zeros((ph, pw), gt.dtype)
        img_p[oy:oy + h, ox:ox + w] = image
        gt_p[oy:oy + h, ox:ox + w] = gt
        image, gt = img_p, gt_p
    y = rng.integers(0, ph - ch + 1)
    x = rng.integers(0, pw - cw + 1)
    return image[y:y + ch, x:x + cw], gt[y:y + ch, x:x + cw]


def color_jitter(image, rng, brightness=0.2, contrast=0.05, saturation=0.05, grayscale_p=0.1):
    """ColorJitter(brightness, contrast, saturation) in random order, then RandomGrayscale(p), on float [0, 1]."""
    img = image.astype(np.float32) * (1.0 / 255.0)
    ops = rng.permutation(3)
    factors = 1.0 + (rng.random(3) * 2.0 - 1.0) * np.array([brightness, contrast, saturation])
    for op in ops:
        f = float(factors[op])
        if op == 0:
            img = img * f
        elif op == 1:
            mean = float((img @ _GRAY).mean())
            img = (img - mean) * f + mean
        else:
            gray = (img @ _GRAY)[..., None]
            img = (img - gray) * f + gray
        np.clip(img, 0.0, 1.0, out=img)
    if rng.random() < grayscale_p:
        img = np.repeat((img @ _GRAY)[..., None], 3, axis=2)
    return img


class CRMTrainDataset(Dataset):
    """Training samples: crop, flip, colour jitter (image only), coarse mask synthesised from the GT crop.

    `dataset[(index, position)]` -> dict(image 3xSxS float [0,1], gt 1xSxS soft float, coarse 1xSxS float,
    index). Items that fail to load are reported once by name and replaced by the next loadable item.
    """

    def __init__(self, items, crop_size=224, perturb=None, seed=0, augment=True):
        if not items:
            raise ValueError("no training items: check the data sources in the config")
        self.items = list(items)
        self.crop_size = crop_size
        self.perturb = perturb or PerturbConfig()
        self.seed = int(seed)
        self.augment = augment
        self._bad = set()

    def __len__(self):
        return len(self.items)

    def _load(self, index):
        for k in range(len(self.items)):
            item = self.items[(index + k) % len(self.items)]
            if item.name in self._bad:
                continue
            try:
                image, gt, _ = load_item(item)
                return image, gt
            except (ValueError, FileNotFoundError) as exc:
                self._bad.add(item.name)
                logger.warning("skipping training item %s: %s", item.name, exc)
        raise ValueError("none of the training items could be read")

    def __getitem__(self, key):
        index, position = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng([self.seed, int(position)])
        image, gt = self._load(int(index))
        image, gt = random_crop(image, gt, self.crop_size, rng)
        if self.augment:
            if rng.random() < 0.5:
                image, gt = image[:, ::-1], gt[:, ::-1]
            img = color_jitter(image, rng)
        else:
            img = image.astype(np.float32) * (1.0 / 255.0)
        gt = np.ascontiguousarray(gt)
        coarse = perturb_mask(gt, rng, self.perturb)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "gt": torch.from_numpy(gt.astype(np.float32) * (1.0 / 255.0))[None],
            "coarse": torch.from_numpy(coarse.astype(np.float32) * (1.0 / 255.0))[None],
            "index": int(index),
        }


class StreamSampler(Sampler):
    """An endless, resumable stream of (item index, position) keys.

    Position p of the global stream (all ranks together) maps to epoch p // n and to the (p % n)-th entry of
    that epoch's permutation, drawn from (seed, epoch). Iteration i of the run consumes positions
    [i * B * world, (i + 1) * B * world), rank r the slice [r * B, (r + 1) * B) of it. Starting at
    `start_iter` therefore reproduces exactly what an uninterrupted run would have loaded.
    """

    def __init__(self, num_items, batch_size, seed=0, rank=0, world_size=1, start_iter=0):
        self.n = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iter = int(start_iter)
        self._perm = (None, None)

    def index(self, position):
        epoch = position // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 0x5A]).permutation(self.n))
        return int(self._perm[1][position % self.n])

    def __iter__(self):
        it = self.start_iter
        per_iter = self.batch_size * self.world_size
        while True:
            base = it * per_iter + self.rank * self.batch_size
            for j in range(self.batch_size):
                yield self.index(base + j), base + j
            it += 1

    def __len__(self):  # endless; DataLoader only needs this for len(loader), which the trainer never asks
        return 2**62
