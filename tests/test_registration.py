"""Label registration: measuring where masks lie against a photo's edges, and moving them back when loaded."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crm_d2.train.data import CRMTrainDataset, build_items, load_item
from crm_d2.train.registration import edge_balance, move_mask, registration

SIZE = (150, 160)


def photo_of(inside):
    """An anti-aliased two-colour photo of the shape `inside(x, y)` (continuous pixel coordinates), 8x8 samples
    per pixel."""
    ss = 8
    yy, xx = np.mgrid[0 : SIZE[0] * ss, 0 : SIZE[1] * ss]
    fg = inside((xx + 0.5) / ss - 0.5, (yy + 0.5) / ss - 0.5)
    photo = np.where(fg[..., None], np.float32([200, 60, 40]), np.float32([30, 90, 160]))
    return cv2.resize(photo, SIZE[::-1], interpolation=cv2.INTER_AREA).astype(np.uint8)


def mask_of(inside):
    yy, xx = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    return np.where(inside(xx, yy), 255, 0).astype(np.uint8)


def disk(cx, cy, r):
    return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 < r**2


def box(x0, y0, x1, y1):
    return lambda x, y: (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


@pytest.mark.parametrize("dx, dy", [(0.0, 0.0), (0.5, 0.25), (-0.4, 0.6), (1.1, -0.8)])
def test_registration_finds_a_labels_offset(dx, dy):
    photo = photo_of(disk(80.3, 71.7, 50))
    r = registration(edge_balance(photo, mask_of(disk(80.3 + dx, 71.7 + dy, 50))))
    assert r.offset == pytest.approx((dx, dy), abs=0.1)
    assert r.growth == pytest.approx((0, 0), abs=0.1)
    assert r.transitions > 300


@pytest.mark.parametrize("grow", [0.5, -0.5])
def test_registration_finds_labels_wider_or_narrower_than_the_object(grow):
    # A binary mask's straight edge lies between pixels: the photo's edges are put where `grow` lands it there.
    photo = photo_of(box(30, 40, 120, 110))
    r = registration(edge_balance(photo, mask_of(box(30 - grow, 40 - grow, 120 + grow, 110 + grow))))
    assert r.growth == pytest.approx((grow, grow), abs=0.1)
    assert r.offset == pytest.approx((0, 0), abs=0.1)
    assert r.begins == pytest.approx((-grow, -grow), abs=0.1) and r.ends == pytest.approx((grow, grow), abs=0.1)


def test_registration_of_a_photo_without_edges_is_nan_and_sizes_must_match():
    flat = np.full(SIZE + (3,), 90, np.uint8)
    r = registration(edge_balance(flat, mask_of(box(30, 40, 120, 110))))
    assert np.isnan(r.offset).all()
    with pytest.raises(ValueError, match="mask is 10x10 but the photo is 160x150"):
        edge_balance(flat, np.zeros((10, 10), np.uint8))


def _pair(folder, stem, photo, mask):
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{stem}.bmp"), photo[..., ::-1])  # lossless, RGB photo written as BGR
    cv2.imwrite(str(folder / f"{stem}.png"), mask)


def test_label_offset_moves_the_masks_onto_the_photo(tmp_path):
    """A source whose masks lie (0.5, 0.25) px off its photos, declared as such, loads with masks that the
    registration finds on the photo's edges; the move is bilinear, so the moved mask is soft."""
    dx, dy = 0.5, 0.25
    photo = photo_of(disk(80.3, 71.7, 50))
    _pair(tmp_path / "src", "a", photo, mask_of(disk(80.3 + dx, 71.7 + dy, 50)))
    plain = build_items([{"type": "pairs", "root": str(tmp_path / "src")}])[0]
    moved = build_items([{"type": "pairs", "root": str(tmp_path / "src"), "label_offset": [dx, dy]}])[0]
    assert moved.label_offset == (dx, dy) and plain.label_offset == (0.0, 0.0)
    _, gt0, _ = load_item(plain)
    image, gt1, _ = load_item(moved)
    assert np.array_equal(image, photo)  # the photo is read as it is
    assert np.array_equal(gt1, move_mask(gt0, -dx, -dy))
    assert ((gt1 > 0) & (gt1 < 255)).any()

    def centre(m):
        w = m.astype(np.float64)
        yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
        return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()

    assert np.subtract(centre(gt1), centre(gt0)) == pytest.approx((-dx, -dy), abs=0.01)
    assert registration(edge_balance(image, gt1)).offset == pytest.approx((0, 0), abs=0.15)

    sample = CRMTrainDataset([moved], crop_size=64, seed=0)[(0, 0)]
    assert sample["gt"].shape == (1, 64, 64) and 0 <= sample["gt"].min() and sample["gt"].max() <= 1


@pytest.mark.parametrize("value, message", [("abc", "must be \\[DX, DY\\]"), ([1], "must be \\[DX, DY\\]"),
                                            ([20, 0], "at most 8 px"), ([float("nan"), 0], "finite")])
def test_label_offset_is_validated(tmp_path, value, message):
    _pair(tmp_path / "src", "a", photo_of(disk(80, 70, 40)), mask_of(disk(80, 70, 40)))
    with pytest.raises(ValueError, match=message):
        build_items([{"type": "pairs", "root": str(tmp_path / "src"), "label_offset": value}])
    with pytest.raises(ValueError, match="not synthetic scenes"):
        build_items([{"type": "synthetic", "count": 2, "label_offset": [0.5, 0]}])


def test_label_registration_tool(tmp_path):
    """tools/maintain/label_registration.py measures each folder; with --config it measures what is left after the
    config's own label_offset."""
    import json

    import yaml

    for k in range(3):
        cx, cy = 70.2 + 5 * k, 75.6 - 3 * k
        _pair(tmp_path / "off", f"{k}", photo_of(disk(cx, cy, 45)), mask_of(disk(cx + 0.5, cy - 0.5, 45)))
    root = Path(__file__).resolve().parents[1]
    tool = [sys.executable, str(root / "tools" / "maintain" / "label_registration.py")]
    proc = subprocess.run(tool + [str(tmp_path / "off"), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "off")]
    assert got["photos"] == 3 and got["offset"] == pytest.approx([0.5, -0.5], abs=0.1)
    assert "| source | photos | offset x y |" in proc.stdout

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [{"type": "pairs", "root": str(tmp_path / "off"),
                                                          "label_offset": [0.5, -0.5]}]}}))
    proc = subprocess.run(tool + ["--config", str(config), "--json", str(tmp_path / "c.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = json.loads((tmp_path / "c.json").read_text())[str(tmp_path / "off")]
    assert left["offset"] == pytest.approx([0, 0], abs=0.15)
    bad = subprocess.run(tool, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "give folders of pairs or --config" in bad.stderr
