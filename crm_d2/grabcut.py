"""GrabCut finish: the pixels near the refined boundary decided again by OpenCV's GrabCut (Rother, Kolmogorov and
Blake, SIGGRAPH 2004), that is colour models of the object and of its surroundings plus a graph cut that prefers
to cut along the photo's edges.

Why: the model places a boundary from stride-2 features and, with its mask skip, stays near a coarse input; a
graph cut over the photo's colours moves a boundary that is a few pixels off onto the object's edge. Measured
on held-out photos (docs/demo_model.md, "GrabCut finish"): with a 2-px band it takes masks from a 16x
lower-resolution segmenter from +2.8 to +8.9 mBA, and it costs good (4x) masks where the labels do not follow
the photo's colour edges, so it is opt-in. A checkpoint may carry one (`meta["grabcut"]`); the shipped ones do
not. `min_shift` gates it to the masks that refinement moved, as the edge snap's does.
"""
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .inputs import parse_option
from .schedule import boundary_shift

__all__ = ["GrabCut", "grabcut_mask", "grabcut_probs"]

# Pixels around the band whose colours feed the object and background models. Local colours separate an object
# from what touches it better than the whole photo's, and the graph stays small at 4K.
CONTEXT = 16
# The band's box is cut into tiles of this side, each with its own graph: a 6000x4000 object would otherwise need
# one graph of the whole object's box (2.7 GB). Masks of photos up to about 1000 px fit one tile.
TILE = 1024


@dataclass(frozen=True)
class GrabCut:
    """band: pixels within this many px of the refined boundary (the 0.5 level) are decided again, the rest keep
    their side; iters: GrabCut iterations (colour models refitted, cut again); min_shift: only masks that
    refinement moved by at least this many px on average (`boundary_shift` from the coarse mask), which the model
    found far off."""

    band: int = 2
    iters: int = 1
    min_shift: float = 0.0

    def __post_init__(self):
        if int(self.band) != self.band or self.band < 1:
            raise ValueError(f"grabcut band must be a whole number >= 1, got {self.band}")
        if int(self.iters) != self.iters or self.iters < 1:
            raise ValueError(f"grabcut iters must be a whole number >= 1, got {self.iters}")
        if not self.min_shift >= 0:
            raise ValueError(f"grabcut min_shift must be >= 0, got {self.min_shift}")

    @classmethod
    def parse(cls, value):
        """None or "" (the checkpoint's own) -> None; False, 0 or "off" -> False; an int band,
        "BAND[:ITERS[:MIN_SHIFT]]", a dict or a GrabCut -> GrabCut (`inputs.parse_option`)."""
        return parse_option(cls, value, "grabcut", "BAND[:ITERS[:MIN_SHIFT]] (e.g. 2 or 2:1:0.25)")

    def __str__(self):
        return f"{self.band}:{self.iters}" + (f":{self.min_shift:g}" if self.min_shift else "")

    def to_dict(self):
        return asdict(self)


def _disk(r):
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def grabcut_mask(bgr, fg, band, iters=1, context=CONTEXT, tile=TILE):
    """The HxW bool mask `fg` with its pixels within `band` px of the boundary decided by GrabCut on the uint8
    BGR photo. The band's box is cut in `tile` x `tile` tiles; each tile that holds part of the band gets its own
    graph and colour models, on the tile grown by `context` px (so memory stays bounded at 6K). A tile whose box
    holds no certain object or no certain background to learn colours from is left as it was."""
    fg = fg.astype(np.uint8)
    inner, outer = cv2.erode(fg, _disk(band)), cv2.dilate(fg, _disk(band))
    unsure = outer != inner
    out = fg.astype(bool)
    rows, cols = np.flatnonzero(unsure.any(1)), np.flatnonzero(unsure.any(0))
    if rows.size == 0:
        return out
    h, w = fg.shape
    for y in range(rows[0], rows[-1] + 1, tile):
        for x in range(cols[0], cols[-1] + 1, tile):
            y1, x1 = min(y + tile, rows[-1] + 1), min(x + tile, cols[-1] + 1)
            if not unsure[y:y1, x:x1].any():
                continue
            by, bx = max(0, y - context), max(0, x - context)
            box = (slice(by, min(h, y1 + context)), slice(bx, min(w, x1 + context)))
            label = np.where(inner[box] > 0, cv2.GC_FGD, cv2.GC_BGD).astype(np.uint8)
            label[unsure[box] & (fg[box] > 0)] = cv2.GC_PR_FGD
            label[unsure[box] & (fg[box] == 0)] = cv2.GC_PR_BGD
            if not (label == cv2.GC_FGD).any() or not (label == cv2.GC_BGD).any():
                continue
            bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
            cv2.setRNGSeed(0)  # GrabCut seeds its colour models by k-means on OpenCV's RNG: same input, same output
            cv2.grabCut(np.ascontiguousarray(bgr[box]), label, None, bgd, fgd, int(iters), cv2.GC_INIT_WITH_MASK)
            cut = (label == cv2.GC_FGD) | (label == cv2.GC_PR_FGD)
            out[y:y1, x:x1] = cut[y - by : y1 - by, x - bx : x1 - bx]
    return out


def grabcut_probs(rgb, probs, opt, where=None, coarse=None):
    """GrabCut-finish probabilities in place: probs is N x H x W float32 in [0, 1] on the photo `rgb` (H x W x 3
    uint8 RGB), or on its crop `where` (a pair of slices). A pixel GrabCut moves to the other side keeps its
    confidence (p becomes 1 - p, at least 0.02 from 0.5), so the binarised output is GrabCut's and a soft output
    stays soft. `coarse`
    (N x H x W, the masks refinement started from) is needed when `opt.min_shift` is set."""
    if not opt:
        return probs
    if opt.min_shift and coarse is None:
        raise ValueError("a grabcut with min_shift needs the coarse masks")
    bgr = np.ascontiguousarray((rgb if where is None else rgb[where])[..., ::-1])
    for k, p in enumerate(probs):
        if opt.min_shift and boundary_shift(p, coarse[k]) < opt.min_shift:
            continue
        fg = p > 0.5
        cut = grabcut_mask(bgr, fg, opt.band, opt.iters)
        moved = cut != fg
        flipped = 1.0 - p[moved]
        p[moved] = np.where(cut[moved], np.maximum(flipped, 0.52), np.minimum(flipped, 0.48))
    return probs
