"""Mask-refinement metrics exactly as the field reports them (BIG / CascadePSP protocol).

IoU is dataset level (sum of intersections over sum of unions), and mBA is CascadePSP's mean boundary accuracy:
five radii, OpenCV ellipse kernels, a band taken from the GT only, OpenCV's default border (no band along the
frame). Masks are binarised the way the reference scripts read PNGs: value > 128 on 0..255, a float probability
p stored as floor(255 p) first. Getting any of these details wrong moves mBA by points, hence one home for them.
"""
import math

import cv2
import numpy as np

__all__ = ["binarize", "intersection_union", "iou", "mba_radii", "boundary_accuracy", "RefinementMetrics"]

MBA_STEPS = 5


def _as_2d(mask, name):
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim == 3:
        raise ValueError(f"{name} has {mask.shape[2]} channels (shape {mask.shape}); pass a single-channel HxW mask")
    if mask.ndim != 2:
        raise ValueError(f"{name} must be an HxW mask, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"{name} is empty (shape {mask.shape})")
    return mask


def binarize(mask, name="mask"):
    """HxW bool foreground of a mask given as bool, 0..255 integers or a float probability in [0, 1].

    uint8 (and other integer) masks are read as 0..255, so a 0/1 uint8 mask is all background: pass bool for 0/1.
    """
    mask = _as_2d(mask, name)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        if mask.dtype != np.uint8 and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"{name}: integer mask values must be in 0..255, got {mask.min()}..{mask.max()}")
        return mask > 128
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"{name}: float mask must be a probability in [0, 1] "
                             f"(got {np.nanmin(mask)}..{np.nanmax(mask)}, or NaN/inf)")
        return np.floor(mask * 255) > 128
    raise ValueError(f"{name}: unsupported mask dtype {mask.dtype}")


def binarize_gt(gt):
    """The ground truth's foreground, as `binarize`. An integer GT of 0s and 1s would read as all background, which
    no ground truth means (a prediction may: floor(255 p) of a faint mask), so it is refused by name."""
    gt = _as_2d(gt, "ground truth")
    if np.issubdtype(gt.dtype, np.integer) and gt.max() == 1:
        raise ValueError("ground truth holds only 0 and 1: pass it as bool or 0/255 (integer masks are read as 0..255)")
    return binarize(gt, "ground truth")


def _pair(pred, gt):
    pred = binarize(pred, "prediction")
    gt = binarize_gt(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth sizes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def intersection_union(pred, gt):
    """(intersection, union) pixel counts of the binarised foregrounds, the terms of dataset-level IoU."""
    pred, gt = _pair(pred, gt)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def iou(pred, gt):
    """IoU of one image as a fraction; NaN when both masks are empty."""
    inter, union = intersection_union(pred, gt)
    return inter / union if union else math.nan


def outline(mask):
    """The pixels of a bool mask that touch its outside (3x3): its boundary, one pixel wide. Refinement's shift is
    normalised by its length (crm_d2.schedule), and the report's pictures draw it."""
    m = mask.astype(np.uint8)
    return m != cv2.erode(m, None)


def mba_radii(h, w):
    """The five CascadePSP radii for an h x w image: 1 + int((max_r - 1) / 5 * i), max_r = (w + h) / 300."""
    max_r = (w + h) / 300
    return [1 + int((max_r - 1) / MBA_STEPS * i) for i in range(MBA_STEPS)]


def boundary_bands(gt, image_size=None):
    """The five GT boundary bands of mBA (bool HxW each), or None when a band is empty (all-0 or all-1 GT).
    Computed once per GT: they are the costly part, and refined and coarse masks share them. `image_size`:
    (h, w) of the photo that `gt` was cut from, whose radii apply (default: gt's own size)."""
    h, w = gt.shape if image_size is None else image_size
    gt_u8 = gt.astype(np.uint8)
    bands = []
    for r in mba_radii(h, w):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        band = (cv2.dilate(gt_u8, kernel) - cv2.erode(gt_u8, kernel)) > 0
        if not band.any():
            return None
        bands.append(band)
    return bands


def _boundary_accuracy(pred, gt, bands=None):
    bands = boundary_bands(gt) if bands is None else bands
    if bands is None:
        return math.nan
    correct = pred == gt
    return sum(np.count_nonzero(correct & b) / np.count_nonzero(b) for b in bands) / MBA_STEPS


def boundary_accuracy(pred, gt, image_size=None, bands=None):
    """CascadePSP's boundary accuracy of one image as a fraction in [0, 1]: the mean over five radii of the share
    of GT-boundary-band pixels where the prediction agrees with the GT. NaN when the band is empty (all-0 or
    all-1 GT), which callers should skip rather than count.

    `image_size`: (h, w) of the photo when pred and gt are a crop of it (the report's gallery scores one segment
    in its crop): the photo's radii then apply, and a crop that holds the GT's whole band (a margin wider than
    the largest radius, or the photo's own edge) gives the number of the whole photo. `bands`: this GT's
    `boundary_bands`, when several predictions are scored against it."""
    pred, gt = _pair(pred, gt)
    return _boundary_accuracy(pred, gt, boundary_bands(gt, image_size) if bands is None else bands)


class RefinementMetrics:
    """Accumulate dataset IoU and mBA of refined (and optionally coarse) masks over a dataset.

    `summary()` reports percentages like the papers (BIG: CRM 94.18 IoU / 76.09 mBA): `iou` = 100 * total
    intersection / total union, `mba` = 100 * mean image boundary accuracy over images with a non-empty band;
    `mba_skipped` counts images whose GT had no boundary. `coarse_*` are None when no coarse mask was given.
    """

    def __init__(self):
        self.n = 0
        self.mba_skipped = 0
        self.skipped_names = []
        self._iu = {"refined": [0, 0], "coarse": [0, 0]}
        self._ba = {"refined": [], "coarse": []}
        self.per_image = []

    def update(self, pred, gt, coarse=None, name=None):
        """Add one image; returns its dict of per-image numbers (fractions; mBA NaN if the band is empty)."""
        gt_b = binarize_gt(gt)
        masks = {}
        for key, mask in (("refined", pred), ("coarse", coarse)):
            if mask is None:
                continue
            m = binarize(mask, "coarse mask" if key == "coarse" else "prediction")
            if m.shape != gt_b.shape:
                raise ValueError(f"{key} mask and ground truth sizes differ: {m.shape} vs {gt_b.shape}"
                                 + (f" ({name})" if name else ""))
            masks[key] = m
        row = {"name": name}
        bands = boundary_bands(gt_b)
        for key, m in masks.items():  # validated first, so a bad image leaves the totals untouched
            inter, union = int(np.count_nonzero(m & gt_b)), int(np.count_nonzero(m | gt_b))
            self._iu[key][0] += inter
            self._iu[key][1] += union
            ba = _boundary_accuracy(m, gt_b, bands) if bands is not None else math.nan
            if not math.isnan(ba):
                self._ba[key].append(ba)
            prefix = "" if key == "refined" else "coarse_"
            row[prefix + "iou"] = inter / union if union else math.nan
            row[prefix + "mba"] = ba
        if math.isnan(row["mba"]):
            self.mba_skipped += 1
            self.skipped_names.append(name)
        self.n += 1
        self.per_image.append(row)
        return row

    def _pct(self, key):
        inter, union = self._iu[key]
        return 100.0 * inter / union if union else math.nan

    def summary(self):
        """{'iou', 'mba', 'coarse_iou', 'coarse_mba', 'n', 'mba_skipped'}; metrics in percent."""
        have_coarse = any(r.get("coarse_iou") is not None for r in self.per_image)
        out = {"iou": self._pct("refined"),
               "mba": 100.0 * float(np.mean(self._ba["refined"])) if self._ba["refined"] else math.nan,
               "coarse_iou": None, "coarse_mba": None, "n": self.n, "mba_skipped": self.mba_skipped}
        if have_coarse:
            out["coarse_iou"] = self._pct("coarse")
            out["coarse_mba"] = 100.0 * float(np.mean(self._ba["coarse"])) if self._ba["coarse"] else math.nan
        return out
