"""GrabCut finish: the pixels near the refined boundary decided again by OpenCV's GrabCut (Rother, Kolmogorov and
Blake, SIGGRAPH 2004), that is colour models of the object and of its surroundings plus a graph cut that prefers
to cut along the photo's edges.

Why: the model places a boundary from stride-2 features and, with its mask skip, stays near a coarse input; a
graph cut over the photo's colours moves a boundary that is a few pixels off onto the object's edge. It also
moves good boundaries where the labels do not follow the photo's colour edges, so on its own it is opt-in
(`--grabcut 2`: held-out 16x masks +2.8 -> +8.9 mBA, good 4x masks -12.9). A checkpoint may carry a `Gate`
fitted for its model (`tools/maintain/calibrate_grabcut.py`) that keeps each mask's cut only where it predicts a gain;
the shipped demo model does, so a gated 1-px cut is its default (docs/demo_model.md, "After the model").
`min_shift` gates it to the masks that refinement moved, as the edge snap's does. For a model with a mask skip,
`low_gain` takes a second look at the masks the gate cuts: such a mask is far off, so the model is run on it again
trusting the coarse mask less (its skip gain times `low_gain`), that output is cut too, and a second gate
(`low_gate`) keeps whichever of the two cuts it predicts is better. The Refiner takes that look in whole-image
mode only: in ROI mode (parts and instances of a scene) the model, trusting the mask less, grows a region into its
neighbours.
"""
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from .inputs import check_option_fields, parse_option
from .metrics import outline
from .schedule import boundary_shift

__all__ = ["GATE_FEATURES", "LOW_GATE_FEATURES", "Gate", "GrabCut", "gate_features", "grabcut_mask", "grabcut_probs",
           "photo_gradient"]

# Pixels around the band whose colours feed the object and background models. Local colours separate an object
# from what touches it better than the whole photo's, and the graph stays small at 4K.
CONTEXT = 16
# The band's box is cut into tiles of this side, each with its own graph: a 6000x4000 object would otherwise need
# one graph of the whole object's box (2.7 GB). Masks of photos up to about 1000 px fit one tile.
TILE = 1024


# What a mask's gate reads (`gate_features`), in this order. Lengths are per pixel of boundary, so a mask's size
# does not count; edge strengths are ratios, so a photo's contrast does not.
GATE_FEATURES = ("shift", "cut_moved", "cut_from_coarse", "unsure", "edge_contrast", "coarse_edge", "cut_edge",
                 "coarse_rough2", "coarse_rough4")
# What the second gate reads: the same numbers for the model's output and for its low-gain output.
LOW_GATE_FEATURES = GATE_FEATURES + tuple(f"low_{name}" for name in GATE_FEATURES)


@dataclass(frozen=True)
class Gate:
    """Whether GrabCut will sharpen a mask: a logistic model over `gate_features` (signed log1p, standardised)
    that `tools/maintain/calibrate_grabcut.py` fits on development photos for one model and writes into its checkpoint.

    Why: GrabCut gains where the refined mask is still far off and the object's edge is a colour edge, and loses
    where a good mask follows a label that the photo's edges do not show. No single number tells the two apart
    (docs/experiments.md, "GrabCut finish"); the model's shift, its unsure band, the coarse mask's smoothness and
    where GrabCut's boundary lies on the photo's gradient together do, well enough to apply it by default.

    The features are in pixels, so what they mean depends on the photo's resolution: a photo whose long side is
    over `max_side` (the largest it was fitted on; 0: no limit) keeps the model's output rather than trusting the
    gate there. On 2K photos upscaled from the held-out ones, it would have cut masks that it should not have.

    `pairs`: the gate also reads every product of two standardised features (`base_mean`, `base_scale`), which
    lets one number change what another means (a large shift says "far off" on a smooth coarse mask, not on a
    ragged one); `mean`, `scale` and `coef` are then over those F + F(F+1)/2 inputs. Fitted on development and
    training photos, it beat the linear gate at 4x, 8x and 16x, polygons about even (docs/experiments.md, "Gates
    with pairs")."""

    mean: tuple
    scale: tuple
    coef: tuple
    bias: float
    features: tuple = GATE_FEATURES
    max_side: int = 0
    pairs: bool = False
    base_mean: tuple = ()
    base_scale: tuple = ()

    def __post_init__(self):
        for name in ("mean", "scale", "coef", "features", "base_mean", "base_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.features not in (GATE_FEATURES, LOW_GATE_FEATURES):
            raise ValueError(f"this grabcut gate reads features {list(self.features)}; this version of crm_d2 "
                             f"computes {list(GATE_FEATURES)} (and low_ ones): calibrate it again "
                             f"(tools/maintain/calibrate_grabcut.py)")
        f = len(self.features)
        inputs = f + f * (f + 1) // 2 if self.pairs else f
        if not len(self.mean) == len(self.scale) == len(self.coef) == inputs:
            raise ValueError(f"a grabcut gate {'with pairs ' if self.pairs else ''}over {f} features needs {inputs} "
                             f"means, scales and coefficients, not {len(self.coef)}")
        if len(self.base_mean) != len(self.base_scale) or len(self.base_mean) != (f if self.pairs else 0):
            raise ValueError(f"a grabcut gate {'with' if self.pairs else 'without'} pairs needs "
                             f"{f if self.pairs else 0} base means and scales")

    @staticmethod
    def _standard(x):
        x = np.asarray(x, np.float64)
        return np.sign(x) * np.log1p(np.abs(x))

    @classmethod
    def _with_pairs(cls, z):
        """z and the product of every two of its columns (squares too), signed-log1p'd as the features are: the
        products' tails would otherwise decide the fit."""
        i, j = np.triu_indices(z.shape[-1])
        return cls._standard(np.concatenate([z, z[..., i] * z[..., j]], -1))

    def _inputs(self, features):
        x = self._standard(features)
        if self.pairs:
            x = self._with_pairs((x - np.asarray(self.base_mean)) / np.asarray(self.base_scale))
        return x

    def logit(self, features):
        """The log-odds that GrabCut raises this mask's boundary accuracy; features: `gate_features` (or N x F)."""
        z = (self._inputs(features) - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.bias

    def covers(self, shape):
        """Whether the gate was fitted on photos as large as one of this (H, W, ...) shape."""
        return not self.max_side or max(shape[:2]) <= self.max_side

    @classmethod
    def fit(cls, features, helped, weights=None, l2=1.0, steps=50, max_side=0, names=GATE_FEATURES, pairs=False):
        """The gate from N x F features (`names`) and whether GrabCut helped each mask (weighted, e.g. by how
        much it changed the mask's score): L2-penalised logistic regression (the penalty l2/2 |coef|^2 on the
        standardised inputs, next to none on the bias), by Newton's method."""
        x = cls._standard(features)
        base_mean, base_scale = (x.mean(0), x.std(0) + 1e-9) if pairs else (np.zeros(0), np.zeros(0))
        if pairs:
            x = cls._with_pairs((x - base_mean) / base_scale)
        mean, scale = x.mean(0), x.std(0) + 1e-9
        z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], 1)
        y = np.asarray(helped, np.float64)
        sw = np.ones(len(y)) if weights is None or not np.any(weights) else np.asarray(weights) / np.mean(weights)
        w = np.zeros(z.shape[1])
        penalty = np.full(z.shape[1], float(l2))
        penalty[-1] = 1e-6  # all but none on the bias: finite when every example says the same
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
            grad = z.T @ (sw * (p - y)) + penalty * w
            hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(mean.tolist(), scale.tolist(), w[:-1].tolist(), float(w[-1]), tuple(names), int(max_side),
                   bool(pairs), base_mean.tolist(), base_scale.tolist())


@dataclass(frozen=True)
class GrabCut:
    """band: pixels within this many px of the refined boundary (the 0.5 level) are decided again, the rest keep
    their side; iters: GrabCut iterations (colour models refitted, cut again); min_shift: only masks that
    refinement moved by at least this many px on average (`boundary_shift` from the coarse mask), which the model
    found far off; gate: a `Gate` (or its dict) that keeps each mask's cut only where it predicts a gain, as a
    checkpoint's `meta["grabcut"]` carries it (the text form has none: a cut asked for by hand is not gated);
    low_gain, low_gate: for the masks the gate cuts, the model is run again with its mask skip's gain times
    low_gain (0: not), that output is cut as well, and `low_gate` (reading LOW_GATE_FEATURES) keeps its cut
    instead where it predicts a gain (needs a gate, and a Refiner to run the model again)."""

    band: int = 2
    iters: int = 1
    min_shift: float = 0.0
    gate: Gate = field(default=None, metadata={"text": False})
    low_gain: float = field(default=0.0, metadata={"text": False})
    low_gate: Gate = field(default=None, metadata={"text": False})

    def __post_init__(self):
        for name in ("gate", "low_gate"):
            value = getattr(self, name)
            if isinstance(value, dict):
                try:
                    object.__setattr__(self, name, value := Gate(**value))
                except TypeError as e:  # a key it does not have, or one missing
                    raise ValueError(f"grabcut {name}: {e}") from None
            if value is not None and not isinstance(value, Gate):
                raise ValueError(f"grabcut {name} must be a Gate or its dict, got {type(value).__name__}")
        check_option_fields(self, "grabcut", counts=("band", "iters"), non_negative=("min_shift", "low_gain"))
        if self.low_gain and not (self.gate and self.low_gate and self.low_gate.features == LOW_GATE_FEATURES):
            raise ValueError("grabcut low_gain needs a gate and a low_gate that reads LOW_GATE_FEATURES")

    @classmethod
    def parse(cls, value):
        """None or "" (the checkpoint's own) -> None; False, 0 or "off" -> False; an int band,
        "BAND[:ITERS[:MIN_SHIFT]]", a dict or a GrabCut -> GrabCut (`inputs.parse_option`)."""
        return parse_option(cls, value, "grabcut", "BAND[:ITERS[:MIN_SHIFT]] (e.g. 2 or 2:1:0.25)")

    def __str__(self):
        return (f"{self.band}:{self.iters}" + (f":{self.min_shift:g}" if self.min_shift else "")
                + (" gated" if self.gate else "") + (f", low gain x{self.low_gain:g}" if self.low_gain else ""))

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


def photo_gradient(rgb):
    """The H x W gradient magnitude of an RGB uint8 photo in CIELAB (Sobel): what the gate calls an edge."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).astype(np.float32)
    return np.sqrt(sum(cv2.Sobel(lab[..., i], cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(lab[..., i], cv2.CV_32F, 0, 1) ** 2
                       for i in range(3)))


def gate_features(rgb, prob, coarse, cut, gradient=None):
    """What a `Gate` reads for one mask (GATE_FEATURES, in order), on the H x W x 3 uint8 RGB photo or the crop
    that the masks cover: prob, the refined probability; coarse, the mask refinement started from (> 0.5 is in);
    cut, GrabCut's bool mask. How far the model and the cut moved the mask and how unsure the model is (per pixel
    of boundary); how the photo's gradient (CIELAB, Sobel) on the refined boundary compares with the band around
    it and with the gradient on the coarse and the cut boundaries; how much the coarse mask changes when blurred
    (2 and 4 px), which is little for a mask from a low-resolution segmenter. `gradient`: `photo_gradient(rgb)`,
    when the caller has it (one per photo rather than one per mask); otherwise it is made on the masks' box,
    which gives the same numbers."""
    fg, was = prob > 0.5, coarse > 0.5
    ys, xs = np.nonzero(fg | was | cut)
    if ys.size == 0:
        return np.zeros(len(GATE_FEATURES))
    margin = 16  # past the band (5 px), the Sobel window and the blurs' reach that matters
    box = (slice(max(0, ys.min() - margin), ys.max() + margin + 1),
           slice(max(0, xs.min() - margin), xs.max() + margin + 1))
    fg, was, cut, prob = fg[box], was[box], cut[box], prob[box]
    grad = photo_gradient(rgb[box]) if gradient is None else gradient[box]
    on_fg, on_was, on_cut = outline(fg), outline(was), outline(cut)
    length, was_length = max(1, np.count_nonzero(on_fg)), max(1, np.count_nonzero(on_was))

    def edge(pixels):
        return float(grad[pixels].mean()) if pixels.any() else 0.0

    u = fg.astype(np.uint8)
    band = (cv2.dilate(u, None, iterations=5) > 0) & ~(cv2.erode(u, None, iterations=5) > 0)
    strength = edge(on_fg)

    def rough(sigma):
        return np.count_nonzero(was != (cv2.GaussianBlur(was.astype(np.float32), (0, 0), sigma) > 0.5)) / was_length

    return np.array([
        np.count_nonzero(fg != was) / was_length,  # shift: as `boundary_shift`
        np.count_nonzero(cut != fg) / length,
        np.count_nonzero(cut != was) / was_length,
        np.count_nonzero((prob > 0.3) & (prob < 0.7)) / length,
        strength / (edge(band) + 1e-6),  # a refined mask with no pixel has no band: 0, not NaN
        edge(on_was) / (strength + 1e-6),
        edge(on_cut) / (strength + 1e-6),
        rough(2),
        rough(4),
    ])


def grabcut_probs(rgb, probs, opt, where=None, coarse=None, rerun=None):
    """GrabCut-finish probabilities in place: probs is N x H x W float32 in [0, 1] on the photo `rgb` (H x W x 3
    uint8 RGB), or on its crop `where` (a pair of slices). A pixel GrabCut moves to the other side keeps its
    confidence (p becomes 1 - p, at least 0.02 from 0.5), so the binarised output is GrabCut's and a soft output
    stays soft. `coarse` (N x H x W, the masks refinement started from) is needed when `opt.min_shift` or
    `opt.gate` is set; a mask whose gate says no, and every mask of a photo larger than the gate covers, keeps
    the model's output. `rerun(indices, factor)`: the model's probabilities for those masks with its skip gain
    times factor, for `opt.low_gain` (without it, or without a low gain, only the first look is taken)."""
    if not opt:
        return probs
    if (opt.min_shift or opt.gate) and coarse is None:
        raise ValueError("a grabcut with min_shift or a gate needs the coarse masks")
    if opt.gate and not opt.gate.covers(rgb.shape):
        return probs
    rgb = rgb if where is None else rgb[where]
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    second_look = bool(opt.low_gain) and rerun is not None
    # one per photo, not per mask (nor per look)
    gradient = photo_gradient(rgb) if opt.gate and (len(probs) > 1 or second_look) else None
    cuts, looks = {}, {}  # the masks that wait for a second look (photos the gate covers: up to ~1000 px)
    for k, p in enumerate(probs):
        if opt.min_shift and boundary_shift(p, coarse[k]) < opt.min_shift:
            continue
        cut = grabcut_mask(bgr, p > 0.5, opt.band, opt.iters)
        if opt.gate:
            looks[k] = gate_features(rgb, p, coarse[k], cut, gradient)
            if opt.gate.logit(looks[k]) <= 0:
                continue
        if second_look:
            cuts[k] = cut
        else:
            _take_cut(p, cut)
    if cuts:
        chosen = sorted(cuts)
        for k, low in zip(chosen, rerun(chosen, opt.low_gain)):
            low = np.asarray(low, np.float32)
            cut = grabcut_mask(bgr, low > 0.5, opt.band, opt.iters)
            if opt.low_gate.logit(np.concatenate([looks[k], gate_features(rgb, low, coarse[k], cut, gradient)])) > 0:
                probs[k], cuts[k] = low, cut
            _take_cut(probs[k], cuts[k])
    return probs


def _take_cut(p, cut):
    """p (H x W, in place) takes the cut's sides, keeping its confidence."""
    moved = cut != (p > 0.5)
    flipped = 1.0 - p[moved]
    p[moved] = np.where(cut[moved], np.maximum(flipped, 0.52), np.minimum(flipped, 0.48))
