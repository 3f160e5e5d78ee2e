"""Where a dataset's masks lie relative to its photos' edges, to a tenth of a pixel.

Why: mBA at 300-900 px scores a band of one to three pixels, so a label that sits half a pixel off the photo's
edges decides much of it. CCP's masks lie about 0.56 px right of and 0.25 px below its photos' edges; PASCAL-S's
(several annotators' masks averaged) lie inside their objects' right and bottom edges (docs/experiments.md,
"Label registration"). A training source can be told its offset (`label_offset`, `crm_d2.train.data`).

How: along x (and y), at every pair of neighbouring pixels where the mask changes, compare the photo's colour
step one pixel before and one pixel after the pair. They are equal when the photo's edge lies where the mask's
does. The photo is moved by sub-pixel amounts (bicubic) until they are; the move that balances them is where the
label lies, measured separately for edges where the object begins (left, top) and where it ends (right, bottom).
It is meant for registration errors under about a pixel: further off, the step at the mask's own transition is
flat photo on both sides and the balance says nothing.
"""
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["EdgeBalance", "Registration", "edge_balance", "move_mask", "move_photo", "registration"]

SHIFTS = np.round(np.arange(-1.5, 1.51, 0.25), 2)  # photo moves tried, px; the zero is interpolated between them
MARGIN = 3  # transitions this close to the border are skipped (the moved photo is reflected there)


@dataclass
class EdgeBalance:
    """Sums over a set of photos of the colour steps before / at / after the mask's transitions, per photo move
    (rows: SHIFTS), per axis (x, y) and side (begins, ends): arrays of shape (len(SHIFTS), 2, 2, 3)."""

    steps: np.ndarray
    count: np.ndarray  # (2, 2) transitions per axis and side

    def __add__(self, other):
        return EdgeBalance(self.steps + other.steps, self.count + other.count)


@dataclass(frozen=True)
class Registration:
    """Where the labels lie relative to the photo's edges, px (x right, y down): `offset` is their mean position
    (what `label_offset` corrects), `growth` how much wider each side is (negative: the labels are narrower
    than the objects). `begins` / `ends`: the two sides' own offsets, per axis."""

    offset: tuple
    growth: tuple
    begins: tuple
    ends: tuple
    transitions: int


def edge_balance(image, mask, shifts=SHIFTS):
    """EdgeBalance of one RGB (or grey) photo and its mask (binarised at half its range)."""
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    fg = np.asarray(mask) > (127 if np.asarray(mask).dtype == np.uint8 else 0.5)
    if fg.shape != img.shape[:2]:
        raise ValueError(f"mask is {fg.shape[1]}x{fg.shape[0]} but the photo is {img.shape[1]}x{img.shape[0]}")
    steps = np.zeros((len(shifts), 2, 2, 3))
    count = np.zeros((2, 2), np.int64)
    for axis in (0, 1):  # 0: x, 1: y
        g = fg if axis == 0 else fg.T
        change = g[:, 1:].astype(np.int8) - g[:, :-1].astype(np.int8)  # pair (c, c + 1) along the axis
        where = []
        for side, sign in ((0, 1), (1, -1)):  # 0: the object begins, 1: it ends
            r, c = np.nonzero(change == sign)
            keep = (c >= MARGIN) & (c < g.shape[1] - 1 - MARGIN)
            where.append((r[keep], c[keep]))
            count[axis, side] = keep.sum()
        if not count[axis].any():
            continue
        for i, s in enumerate(shifts):
            moved = move_photo(img, s, 0) if axis == 0 else move_photo(img, 0, s)
            if axis == 1:
                moved = moved.transpose(1, 0, 2)
            step = np.abs(np.diff(moved, axis=1)).sum(-1)  # step[:, c] = |I[c + 1] - I[c]|
            for side, (r, c) in enumerate(where):
                steps[i, axis, side] = [step[r, c + k].sum() for k in (-1, 0, 1)]
    return EdgeBalance(steps, count)


def _balance_point(steps, shifts):
    """The photo move at which the steps after and before the transitions are equal (linear between moves)."""
    tilt = (steps[:, 2] - steps[:, 0]) / np.maximum(steps[:, 1], 1e-9)  # rises with the move
    for i in range(len(shifts) - 1):
        a, b = tilt[i], tilt[i + 1]
        if a <= 0 <= b and b > a:
            return float(shifts[i] + (shifts[i + 1] - shifts[i]) * (-a) / (b - a))
    return float("nan")  # no edges in the photos, or the labels too far off (module doc)


def registration(balance, shifts=SHIFTS):
    """The Registration that an EdgeBalance (summed over a source's photos) implies."""
    side = [[_balance_point(balance.steps[:, axis, s], shifts) for s in (0, 1)] for axis in (0, 1)]
    return Registration(
        offset=tuple((b + e) / 2 for b, e in side),
        growth=tuple((e - b) / 2 for b, e in side),
        begins=tuple(b for b, _ in side),
        ends=tuple(e for _, e in side),
        transitions=int(balance.count.sum()),
    )


def _move(array, dx, dy, interpolation, border):
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    out = cv2.warpAffine(array, m, (array.shape[1], array.shape[0]), flags=interpolation, borderMode=border)
    return out.reshape(array.shape)


def move_mask(mask, dx, dy):
    """The mask moved by (dx, dy) px (x right, y down), bilinearly: a sub-pixel move gives a soft boundary."""
    return _move(mask, dx, dy, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE)


def move_photo(image, dx, dy):
    """The photo moved by (dx, dy) px, bicubically (how `edge_balance` moves it too)."""
    return _move(image, dx, dy, cv2.INTER_CUBIC, cv2.BORDER_REFLECT)
