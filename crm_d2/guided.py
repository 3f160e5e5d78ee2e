"""Edge snap: a colour guided filter (He, Sun and Tang, ECCV 2010) of the refined probability, the photo as guide.

Why: the decoder places a boundary from stride-2 features, a pixel or two off the photo's own edge; a guided
filter of radius 1 pulls a probability step onto the nearest colour edge and leaves it alone where the photo
has none (there it only averages). Measured on held-out photos (docs/experiments.md, "Edge snap"): it adds 1-3
mBA to masks from an 8-16x lower-resolution segmenter and costs good (4x) masks where the labels do not sit
on the colour edge, so it is opt-in; a checkpoint may carry one (`meta["edge_snap"]`), the shipped ones do not.
`min_shift` gates it to the masks that refinement moved (those the model found coarse).

Each window is fitted with the local linear model q = a . I + b (I the RGB in [0, 1]), so a filtered step
follows the photo's edges. Outside the band where the probability varies the output equals the input, so the
work is done on the box around that band only (at 4K most of a mask is constant).
"""
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .inputs import check_option_fields, parse_option
from .schedule import boundary_shift

__all__ = ["EdgeSnap", "guided_filter", "snap_probs"]


@dataclass(frozen=True)
class EdgeSnap:
    """radius: filter window radius in output pixels (1 = 3x3 windows); passes: times the filter is applied
    (each pass reaches `radius` further); eps: regularisation, in units of RGB variance on [0, 1] (larger =
    smoother, fewer pulls towards weak edges); min_shift: snap only masks that refinement moved by at least this
    many pixels on average (pixels that changed side / the coarse mask's boundary length). The snap helps masks
    the model found far off and costs good ones, which the model leaves nearly as they are."""

    radius: int = 1
    passes: int = 1
    eps: float = 0.01
    min_shift: float = 0.0

    def __post_init__(self):
        check_option_fields(self, "edge snap", counts=("radius", "passes"), non_negative=("min_shift",))
        if not self.eps > 0:
            raise ValueError(f"edge snap eps must be > 0, got {self.eps}")

    @classmethod
    def parse(cls, value):
        """None or "" (the checkpoint's own) -> None; False, 0 or "off" -> False; an int radius,
        "RADIUS[:PASSES[:EPS[:MIN_SHIFT]]]", a dict or an EdgeSnap -> EdgeSnap (`inputs.parse_option`)."""
        return parse_option(cls, value, "edge snap", "RADIUS[:PASSES[:EPS[:MIN_SHIFT]]] (e.g. 1:2:0.003:0.3)")

    def __str__(self):
        return f"{self.radius}:{self.passes}:{self.eps:g}" + (f":{self.min_shift:g}" if self.min_shift else "")

    def to_dict(self):
        return asdict(self)


def _box(x, r):
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


class _Guide:
    """Per-window statistics of the guide image (means and inverse covariance), computed once for all the
    passes over a mask."""

    def __init__(self, rgb, r, eps):
        I = rgb.astype(np.float32) * (1 / 255)
        self.I = [np.ascontiguousarray(I[..., c]) for c in range(3)]
        self.mean = [_box(c, r) for c in self.I]
        var = {}
        for i in range(3):
            for j in range(i, 3):
                var[i, j] = _box(self.I[i] * self.I[j], r) - self.mean[i] * self.mean[j]
        a, b, c = var[0, 0] + eps, var[0, 1], var[0, 2]
        d, e, f = var[1, 1] + eps, var[1, 2], var[2, 2] + eps
        # inverse of the symmetric [[a b c] [b d e] [c e f]] by cofactors (one pass, no per-pixel solve)
        A, B, C = d * f - e * e, c * e - b * f, b * e - c * d
        det = a * A + b * B + c * C
        inv_det = 1 / det
        self.inv = {(0, 0): A * inv_det, (0, 1): B * inv_det, (0, 2): C * inv_det,
                    (1, 1): (a * f - c * c) * inv_det, (1, 2): (b * c - a * e) * inv_det,
                    (2, 2): (a * d - b * b) * inv_det}
        self.r = r

    def filter(self, p):
        r, I, mI = self.r, self.I, self.mean
        mp = _box(p, r)
        cov = [_box(I[c] * p, r) - mI[c] * mp for c in range(3)]
        inv = lambda i, j: self.inv[min(i, j), max(i, j)]  # noqa: E731
        a = [sum(inv(i, j) * cov[j] for j in range(3)) for i in range(3)]
        b = mp - sum(a[c] * mI[c] for c in range(3))
        return sum(_box(a[c], r) * I[c] for c in range(3)) + _box(b, r)


def guided_filter(rgb, p, radius=1, eps=0.01):
    """Colour guided filter of one float map `p` (HxW) with the uint8 RGB photo `rgb` (HxWx3) as guide."""
    return _Guide(rgb, int(radius), float(eps)).filter(np.asarray(p, np.float32))


def _active_box(p, halo):
    """Rows/columns around every pixel whose window is not constant, grown by `halo`; None if p is constant."""
    lo, hi = p.min(), p.max()
    if hi - lo < 1e-6:
        return None
    varies = (cv2.dilate(p, None) != cv2.erode(p, None))
    rows, cols = np.flatnonzero(varies.any(1)), np.flatnonzero(varies.any(0))
    h, w = p.shape
    return (slice(max(0, rows[0] - halo), min(h, rows[-1] + 1 + halo)),
            slice(max(0, cols[0] - halo), min(w, cols[-1] + 1 + halo)))


def snap_probs(rgb, probs, snap, where=None, coarse=None):
    """Edge-snap probabilities in place: probs is N x H x W float32 in [0, 1] on the photo `rgb` (H x W x 3
    uint8), or on its crop `where` (a pair of slices). Each mask is filtered on the box where it varies (plus a
    halo of the filter's reach), the result clipped to [0, 1]. `coarse` (N x H x W, the masks refinement started
    from) is needed when `snap.min_shift` is set: masks moved less than that are left as they are."""
    if not snap:
        return probs
    if snap.min_shift and coarse is None:
        raise ValueError("an edge snap with min_shift needs the coarse masks")
    rgb = rgb if where is None else rgb[where]
    halo = 2 * snap.radius * snap.passes + 2
    for k, p in enumerate(probs):
        if snap.min_shift and boundary_shift(p, coarse[k]) < snap.min_shift:
            continue
        box = _active_box(p, halo)
        if box is None:
            continue
        guide = _Guide(rgb[box], snap.radius, snap.eps)
        q = p[box]
        for _ in range(snap.passes):
            q = np.clip(guide.filter(q), 0, 1)
        p[box] = q
    return probs
