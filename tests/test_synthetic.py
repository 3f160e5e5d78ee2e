import cv2
import numpy as np
import pytest

from crm_d2.io import list_big, read_image, read_mask
from crm_d2.train.perturb import mask_iou
from crm_d2.train.synthetic import make_scene, write_big_folder, write_pairs_folder


def test_deterministic_from_seed():
    a, b, c = make_scene((96, 128), 5), make_scene((96, 128), 5), make_scene((96, 128), 6)
    for key in ("image", "gt", "coarse", "labels"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [64, (90, 150), (1600, 2048)])
def test_shapes_and_types(size):
    s = make_scene(size, 1)
    h, w = (size, size) if isinstance(size, int) else size
    assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
    assert s.gt.shape == s.coarse.shape == s.labels.shape == (h, w)
    assert set(np.unique(s.gt)) <= {0, 255} and set(np.unique(s.coarse)) <= {0, 255}
    assert np.array_equal(s.gt > 0, s.labels > 0)
    assert 0.005 < (s.gt > 0).mean() < 0.9
    # The coarse mask is a low-resolution view of the GT: close, never exact.
    assert 0.6 < mask_iou(s.coarse, s.gt) < 1.0


def test_objects_are_visible_in_the_image():
    s = make_scene(256, 3, objects=1)
    fg, bg = s.image[s.gt > 0].astype(float), s.image[s.gt == 0].astype(float)
    assert np.linalg.norm(fg.mean(0) - bg.mean(0)) > 30


def _holes(gt):
    _, hier = cv2.findContours(gt, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return 0 if hier is None else int((hier[0][:, 3] >= 0).sum())


def _thin_pixels(mask):
    opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((7, 7), np.uint8))
    return int(np.count_nonzero((mask > 0) & (opened == 0)))


def test_holes_and_thin_structures_can_be_switched():
    with_holes = [_holes(make_scene(512, s, objects=1, thin=False).gt) for s in range(6)]
    no_holes = [_holes(make_scene(512, s, objects=1, holes=False, thin=False).gt) for s in range(6)]
    assert max(with_holes) >= 1 and max(no_holes) == 0
    thin = [make_scene(512, s, objects=1, holes=False, segmenter_side=128) for s in range(6)]
    plain = [make_scene(512, s, objects=1, holes=False, thin=False) for s in range(6)]
    assert max(_thin_pixels(t.gt) for t in thin) > 200
    assert max(_thin_pixels(p.gt) for p in plain) < 100
    # Same seed, same body: the strands are exactly what thin=True adds; a 128 px segmenter misses most of them.
    for t, p in zip(thin, plain):
        assert not np.any((p.gt > 0) & (t.gt == 0))
    strands = [(t.gt > 0) & (p.gt == 0) for t, p in zip(thin, plain)]
    covered = sum(int(np.count_nonzero(t.coarse[m] > 0)) for t, m in zip(thin, strands))
    assert covered < 0.5 * sum(int(m.sum()) for m in strands)


def test_bad_size():
    with pytest.raises(ValueError, match="at least 16"):
        make_scene((8, 100), 0)


def test_write_big_folder_is_listable_and_resumes(tmp_path):
    names = write_big_folder(tmp_path, 2, size=(80, 100), seed=3)
    items = list_big(tmp_path)
    assert [it["name"] for it in items] == names
    gt = read_mask(items[0]["gt"])
    assert np.array_equal(gt, make_scene((80, 100), 3).gt)
    assert read_image(items[0]["image"]).shape == (80, 100, 3)
    stamp = items[0]["seg"].stat().st_mtime_ns
    write_big_folder(tmp_path, 3, size=(80, 100), seed=3)
    assert items[0]["seg"].stat().st_mtime_ns == stamp  # done items are kept
    assert len(list_big(tmp_path)) == 3
    pairs = write_pairs_folder(tmp_path / "pairs", 2, size=64)
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == sorted(
        [f"{n}.jpg" for n in pairs] + [f"{n}.png" for n in pairs])
