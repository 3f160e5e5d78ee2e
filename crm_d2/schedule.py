"""Where and at which resolutions a mask is refined: the multi-scale schedule, further rounds for masks that are
still moving, and ROI crops (the paper's CRM*)."""
import math
from dataclasses import dataclass

import numpy as np

from .inputs import check_option_fields, parse_option
from .metrics import outline

DEFAULT_SCALES = (0.125, 0.25, 0.5, 1.0)  # the release's schedule (and the authors' checkpoint's)
AUTO_BASE = 512  # "auto" schedule: the first stage's long side, about what a checkpoint was trained on
ROI_MIN_STAGE_SIDE = 96  # ROI mode: schedule stages below this input long side (with the padding) are skipped


def auto_scales(long_side, base=AUTO_BASE):
    """The resolution-aware schedule: a first stage at about `base` px on the long side, then doubling up to
    full resolution. 400 px -> (1.0,); 1024 -> (0.5, 1.0); 4K -> (0.125, 0.25, 0.5, 1.0), the released ratios."""
    k = max(0, round(math.log2(long_side / base)))
    return tuple(2.0 ** -i for i in range(k, -1, -1))


def stage_scales(scales, padded_shape, max_side=None, base=AUTO_BASE, min_side=None):
    """Encoder scales for one input: "auto" is resolved on the input's size (`auto_scales`); `max_side` caps
    the encoder's input long side (None or 0: no cap; decoding stays at full resolution, which is what makes
    the cap cheap);
    consecutive duplicates after capping are run once. `min_side` drops the leading stages whose input long
    side would be below it (the last stage always runs): the released ratios start at 1/8, which for a 100-px
    segment (a 264-px padded ROI) is a 33-px encoder input that costs a full-resolution decode and carries no information."""
    if isinstance(scales, str):
        scales = auto_scales(max(padded_shape), base)
    scales = tuple(scales)
    if min_side:
        scales = tuple(s for s in scales[:-1] if s * max(padded_shape) >= min_side) + scales[-1:]
    if not max_side:
        return scales
    if max_side < 1:
        raise ValueError(f"max_side must be a number of pixels >= 1 (or 0/None for no cap), got {max_side}")
    cap = max_side / max(padded_shape)
    out = []
    for s in scales:
        s = min(s, cap)
        if not out or abs(out[-1] - s) > 1e-9:
            out.append(s)
    return tuple(out)


def boundary_shift(prob, coarse):
    """How far refinement moved a mask, in pixels on average: pixels on the other side of 0.5 than in the coarse
    mask, over the coarse mask's boundary length."""
    c = coarse > 0.5
    return np.count_nonzero((prob > 0.5) != c) / max(1, np.count_nonzero(outline(c)))


@dataclass(frozen=True)
class Rounds:
    """Refine again what is still moving. Round 1 is the schedule; each further round runs the schedule's last
    stage once more on the masks that the round before moved by at least `min_shift` px on average
    (`boundary_shift`), with that round's probability as the input mask, up to `count` rounds in all.

    Why: a model with a mask skip trusts its input mask; a mask far off (16x coarse, a polygon) is only partly
    corrected in one pass, and its soft output, fed back, lets the decoder finish the job. Good masks are
    barely moved by round 1 and stop there, so they are not drifted by repeated passes (docs/experiments.md,
    "Rounds")."""

    count: int = 1
    min_shift: float = 0.0

    def __post_init__(self):
        check_option_fields(self, "rounds", counts=("count",), non_negative=("min_shift",))

    @classmethod
    def parse(cls, value):
        """What the Python API, the CLI and the Detectron2 config may say, in one place: None or "" (nothing
        said: the checkpoint's own) -> None; an int count, "COUNT[:MIN_SHIFT]", a dict or a Rounds -> Rounds."""
        return parse_option(cls, value, "rounds", "COUNT[:MIN_SHIFT] (e.g. 3:0.3)", can_be_off=False)

    def __str__(self):
        """The one written form (run records, reports): COUNT or COUNT:MIN_SHIFT."""
        return f"{self.count}" + (f":{self.min_shift:g}" if self.min_shift and self.count > 1 else "")

    def to_dict(self):
        return {"count": self.count, "min_shift": self.min_shift}


@dataclass
class RoiBox:
    """A crop (y0, y1, x0, x1) of the image in which one mask is refined."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self):
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self):
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def roi_box(mask, margin=0.5, min_margin=16, quantum=32, min_size=64):
    """Crop for ROI ("CRM*") refinement: the box of the mask's pixels >= 0.5 grown by a context margin.

    `margin` is a fraction of the box's height/width added on each side (at least `min_margin` px); the crop
    size is rounded up to a multiple of `quantum` so that crops of similar segments share a shape and batch
    together. Returns None when no pixel reaches 0.5.
    """
    H, W = mask.shape
    rows = np.flatnonzero((mask >= 0.5).any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((mask >= 0.5).any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    spans = []
    for lo, hi, n in ((y0, y1, H), (x0, x1, W)):
        m = max(min_margin, margin * (hi - lo))
        size = min(n, (hi - lo) + 2 * m)
        size = min(n, max(min_size, int(math.ceil(size / quantum)) * quantum))
        lo = int(round((lo + hi) / 2 - size / 2))
        lo = min(max(lo, 0), n - size)
        spans.append((lo, lo + size))
    (y0, y1), (x0, x1) = spans
    return RoiBox(y0, y1, x0, x1)
