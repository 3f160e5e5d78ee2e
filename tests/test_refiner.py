import cv2
import numpy as np
import pytest
import torch

import crm_d2.fast as crm_fast
from crm_d2.inputs import PAD
from crm_d2.metrics import iou
from crm_d2.model import CRMConfig
from crm_d2.reference import reference_refine
from crm_d2.refiner import Refiner
from crm_d2.schedule import ROI_MIN_STAGE_SIDE, roi_box, stage_scales

# Probabilities of the random tiny model come from logits up to ~20: tolerances on CUDA scale with that.
LOGIT_SCALE = 20


@pytest.fixture
def refiner(tiny_model, device):
    r = Refiner(weights=None, allow_random=True, device=device, config=CRMConfig.preset("tiny"))
    r.model.load_state_dict(tiny_model.state_dict())
    return r


def cpu_twin(refiner):
    """The same refiner (weights, schedule, mode, budget) on the CPU: the path CUDA results are compared with."""
    twin = Refiner(weights=None, allow_random=True, device="cpu", config=refiner.model.cfg, scales=refiner.scales,
                   memory_budget=refiner.memory_budget, max_batch=refiner.max_batch, mode=refiner.mode,
                   fast=refiner.fast)
    twin.model.load_state_dict(refiner.model.state_dict())
    return twin


def test_matches_released_pipeline(refiner, scene, tol):
    img, _, coarse = scene
    soft = coarse.astype(np.float32) * 0.8 + 0.1
    ours = refiner.refine(img, soft)
    ref = reference_refine(refiner.model, img, soft)
    assert ours.dtype == np.float32 and ours.shape == coarse.shape
    assert ours.std() > 0.01  # the comparison means something
    np.testing.assert_allclose(ours, ref, atol=tol(2e-5, LOGIT_SCALE))


def test_small_memory_budget_changes_nothing(refiner, scene, tol):
    img, _, coarse = scene
    a = refiner.refine(img, coarse)
    refiner.memory_budget = 1  # one row per decoding step
    np.testing.assert_allclose(refiner.refine(img, coarse), a, atol=tol(1e-6, LOGIT_SCALE))


def test_cpu_decoder_blocking_and_plain_path_agree(refiner, scene, monkeypatch, tol):
    """On CPU, inference decodes in blocks of query rows through oneDNN (`CRM._ensemble_cpu`): blocks of one row
    with the MLP in several slices, and the plain per-neighbour path, give the same probabilities."""
    import crm_d2.model as crm_model
    from crm_d2.model import CRM

    if refiner.device.type != "cpu":
        pytest.skip("the blocked decoder is the CPU path; other devices decode through _ensemble_plain")
    img, _, coarse = scene
    a = refiner.refine(img, coarse)
    monkeypatch.setattr(crm_model, "CPU_BLOCK_BYTES", 100 * 4 * refiner.model.cfg.hidden)  # 100 MLP rows a call
    b = refiner.refine(img, coarse)
    monkeypatch.setattr(CRM, "_ensemble_cpu", CRM._ensemble_plain)
    c = refiner.refine(img, coarse)
    assert a.std() > 0.01
    np.testing.assert_allclose(b, a, atol=tol(1e-6, LOGIT_SCALE))
    np.testing.assert_allclose(c, a, atol=tol(1e-6, LOGIT_SCALE))


def test_cpu_decoder_shares_chunks_among_cores_with_serial_results(refiner, scene, monkeypatch, tol):
    """With several torch threads the CPU decoder runs its chunks on one worker per core (`per_core`), each
    chunk on one thread, and cuts a small grid into a chunk per core; the probabilities are those of a
    one-thread run (to float rounding: the encoder's products split differently with two threads)."""
    import threading

    from crm_d2.model import CRM

    if refiner.device.type != "cpu":
        pytest.skip("per-core decoding is the CPU path")
    img, _, coarse = scene
    real, threads = CRM._ensemble_cpu, []
    monkeypatch.setattr(CRM, "_ensemble_cpu",
                        lambda *a: threads.append((threading.get_ident(), torch.get_num_threads())) or real(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = refiner.refine(img, coarse)
        assert {t[0] for t in threads} == {threading.get_ident()}
        threads.clear()
        torch.set_num_threads(2)
        shared = refiner.refine(img, coarse)
    finally:
        torch.set_num_threads(before)
    assert len({t[0] for t in threads}) == 2 and {t[1] for t in threads} == {1}
    assert serial.std() > 0.01
    np.testing.assert_allclose(shared, serial, atol=tol(1e-6, LOGIT_SCALE))


def test_batch_equals_single_calls(refiner, scene, tol):
    img, gt, coarse = scene
    masks = [coarse, gt, np.roll(coarse, 7, axis=1)]
    refiner.max_batch = 2
    batch = refiner.refine_batch(img, masks)
    assert batch.shape == (3,) + coarse.shape
    for m, b in zip(masks, batch):
        np.testing.assert_allclose(refiner.refine(img, m), b, atol=tol(1e-5, LOGIT_SCALE))


def test_roi_with_whole_image_margin_equals_full(refiner, scene, tol):
    img, _, coarse = scene
    full = refiner.refine(img, coarse)
    np.testing.assert_allclose(refiner.refine(img, coarse, roi=True, margin=1e6), full, atol=tol(1e-6, LOGIT_SCALE))


def test_roi_keeps_coarse_outside_and_batches(refiner, tol):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)
    a = np.zeros((200, 260), np.float32)
    a[20:50, 30:70] = 1
    b = np.zeros_like(a)
    b[120:170, 150:240] = 0.9
    out = refiner.refine_batch(img, [a, b], roi=True, margin=0.25)
    for m, o in zip((a, b), out):
        box = roi_box(m, 0.25)
        outside = np.ones(m.shape, bool)
        outside[box.slices] = False
        assert outside.any()
        np.testing.assert_array_equal(o[outside], m[outside])
        single = refiner.refine(img, m, roi=True, margin=0.25)
        np.testing.assert_allclose(single, o, atol=tol(1e-5, LOGIT_SCALE))
        # inside: the crop refined as an image of its own, minus the stages too small for it
        crop_scales = stage_scales(refiner.scales, (box.shape[0] + 2 * PAD, box.shape[1] + 2 * PAD),
                                   min_side=ROI_MIN_STAGE_SIDE)
        assert len(crop_scales) < len(refiner.scales)
        alone = refiner.refine(img[box.slices], m[box.slices], scales=crop_scales)
        np.testing.assert_allclose(o[box.slices], alone, atol=tol(1e-5, LOGIT_SCALE))


def test_roi_box_rounding_and_limits():
    m = np.zeros((300, 500), np.float32)
    m[100:110, 200:230] = 1
    box = roi_box(m, margin=0.5, min_margin=16)
    h, w = box.shape
    assert h % 32 == 0 and w % 32 == 0 and h >= 64 and w >= 64
    assert box.y0 <= 100 and box.y1 >= 110 and box.x0 <= 200 and box.x1 >= 230
    assert roi_box(np.zeros((10, 10)), 0.5) is None


def test_stage_scales_cap():
    assert stage_scales((0.125, 0.25, 0.5, 1.0), (4064, 6064), None) == (0.125, 0.25, 0.5, 1.0)
    capped = stage_scales((0.125, 0.25, 0.5, 1.0), (4064, 6064), max_side=1024)
    assert capped == (0.125, 1024 / 6064)


def test_max_side_caps_encoder_input(refiner, scene, monkeypatch):
    img, _, coarse = scene
    sizes = []
    real = refiner.model.encode_projected
    monkeypatch.setattr(refiner.model, "encode_projected", lambda x, *a: sizes.append(x.shape[-2:]) or real(x, *a))
    out = refiner.refine(img, coarse, max_side=100)
    assert out.shape == coarse.shape
    assert max(max(s) for s in sizes) <= 100


def test_output_kinds_and_bgr(refiner, scene):
    img, _, coarse = scene
    p = refiner.refine(img, coarse)
    assert refiner.refine(img, coarse, output="binary").dtype == bool
    np.testing.assert_array_equal(refiner.refine(img, coarse, output="binary"), p > 0.5)
    np.testing.assert_array_equal(refiner.refine(img, coarse, output="uint8"), np.floor(p * 255).astype(np.uint8))
    np.testing.assert_allclose(refiner.refine(img[..., ::-1], coarse, bgr=True), p, atol=1e-6)
    # uint8 0/255, uint8 0/1 and bool masks are the same input
    np.testing.assert_allclose(refiner.refine(img, coarse.astype(np.uint8) * 255), p, atol=1e-6)
    np.testing.assert_allclose(refiner.refine(img, coarse.astype(np.uint8)), p, atol=1e-6)


def test_empty_and_full_masks(refiner, scene):
    img, _, coarse = scene
    empty = refiner.refine(img, np.zeros(img.shape[:2], bool))
    assert empty.max() == 0 and not np.isnan(empty).any()
    assert refiner.refine(img, np.zeros(img.shape[:2], bool), roi=True).max() == 0
    full = refiner.refine(img, np.ones(img.shape[:2], bool))
    assert np.isfinite(full).all() and full.shape == img.shape[:2]
    refiner.profile = []  # an empty mask costs no encoder pass, with or without ROI, alone or beside others
    for roi in (False, True):
        assert not refiner.refine_batch(img, np.zeros((2, *img.shape[:2]), bool), roi=roi).any()
    assert refiner.profile == []
    both = refiner.refine_batch(img, [np.zeros(img.shape[:2], bool), coarse])
    assert len(refiner.profile) == len(refiner.scales) and not both[0].any()
    np.testing.assert_array_equal(both[1], refiner.refine(img, coarse))


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (np.zeros((50, 60, 3), np.uint8), np.zeros((50, 61)), "same size"),
        (np.zeros((50, 60, 3), np.uint8), np.zeros((50, 60, 3)), "channels"),
        (np.zeros((50, 60, 3), np.uint8), np.full((50, 60), 1.5), r"\[0, 1\]"),
        (np.zeros((50, 60, 3), np.uint8), np.full((50, 60), np.nan), "NaN"),
        (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1)), "at least 33 pixels"),
        (np.zeros((50, 60), np.uint8), np.zeros((50, 60)), "HxWx3"),
        (np.full((50, 60, 3), 300.0), np.zeros((50, 60)), "uint8"),
        (np.full((50, 60, 3), np.nan), np.zeros((50, 60)), "NaN"),
    ],
)
def test_bad_input_messages(refiner, image, mask, message):
    with pytest.raises(ValueError, match=message):
        refiner.refine(image, mask)


def test_float_rounding_past_0_and_1_is_clipped_not_refused(refiner, scene):
    img, _, coarse = scene
    soft = cv2.GaussianBlur(coarse.astype(np.float32), (5, 5), 0)
    over = soft * (1 + 1e-6) - 1e-7  # what resizing a soft mask gives: 1.000001 and -1e-7
    assert over.max() > 1 and over.min() < 0
    np.testing.assert_array_equal(refiner.refine(img, over), refiner.refine(img, np.clip(over, 0, 1)))
    with pytest.raises(ValueError, match=r"got \[-0.1, 1\]"):  # real values out of range are named exactly
        refiner.refine(img, np.where(coarse, 1.0, -0.1))


def test_bad_arguments(refiner, scene):
    img, _, coarse = scene
    with pytest.raises(ValueError, match="output must be"):
        refiner.refine(img, coarse, output="logits")
    with pytest.raises(ValueError, match="scales"):
        refiner.refine(img, coarse, scales=[])
    with pytest.raises(ValueError, match="scales must be a non-empty"):
        Refiner(weights=None, allow_random=True, config="tiny", scales=[])
    with pytest.raises(ValueError, match="mode must be"):
        Refiner(weights="/nonexistent/crm.pth", mode="quick")  # the argument is checked before any file is read
    with pytest.raises(ValueError, match="max_side must be"):
        refiner.refine(img, coarse, max_side=-8)
    with pytest.raises(ValueError, match="no masks"):
        refiner.refine_batch(img, [])
    with pytest.raises(ValueError, match="needs weights"):
        Refiner(weights=None)
    with pytest.raises(FileNotFoundError):
        Refiner(weights="/nonexistent/crm.pth")


def test_fast_mode_tiles_equal_dense_when_halo_covers_the_image(refiner, scene, tol):
    # With a band covering everything and a halo as big as the image, every tile's encoder sees the whole
    # image, so tiled decoding through feature offsets must equal decoding the whole map at once.
    from crm_d2.fast import FastOptions

    img, _, coarse = scene
    refiner.mode = "fast"
    # every stage runs and decodes its own grid, dense or tiled
    own = dict(next_grid=False, band_full=False, last_stage_only=False)
    refiner.fast = FastOptions(band_from=10.0, **own)  # every stage dense
    dense = refiner.refine(img, coarse)
    refiner.fast = FastOptions(band=10_000, tile=64, halo=256, band_from=0.2, **own)
    tiled = refiner.refine(img, coarse)
    np.testing.assert_allclose(tiled, dense, atol=tol(1e-5, LOGIT_SCALE))


def test_fast_mode_keeps_settled_pixels_from_the_previous_stage(refiner, scene):
    from crm_d2.fast import FastOptions

    img, _, coarse = scene
    refiner.mode = "fast"
    refiner.fast = FastOptions(band=2, unsettled=0.0, tile=32, halo=16, last_stage_only=False)
    refiner.profile = []
    out = refiner.refine(img, coarse)
    assert out.shape == coarse.shape and np.isfinite(out).all()
    assert [round(p["scale"], 3) for p in refiner.profile] == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="even"):
        FastOptions(tile=33)


def test_fast_mode_low_stages_decode_what_the_next_stage_reads(refiner, scene):
    from crm_d2.fast import FastOptions

    img, _, coarse = scene
    exact = refiner.refine(img, coarse)
    refiner.mode = "fast"
    gaps = {}
    for next_grid in (False, True):
        refiner.fast = FastOptions(band_from=10.0, next_grid=next_grid, last_stage_only=False)  # all dense
        gaps[next_grid] = np.abs(refiner.refine(img, coarse) - exact).mean()
    # decoding the next stage's sample points stays much closer to exact mode than decoding each stage's own
    # grid and resizing it (what remains: the decoder at a point vs the bilinear blend of its two neighbours)
    assert gaps[True] < 0.2 * gaps[False] and gaps[False] > 1e-4


def test_resize_positions_are_where_interpolate_samples():
    import torch
    import torch.nn.functional as F

    from crm_d2.model import make_coord
    from crm_d2.fast import resize_positions

    n_in, n_out = 37, 10
    ramp = make_coord(n_in)  # a linear ramp of pixel-centre coordinates: bilinear sampling returns positions
    sampled = F.interpolate(ramp.view(1, 1, -1), size=n_out, mode="linear", align_corners=True).view(-1)
    assert torch.allclose(resize_positions(n_out, n_in), sampled, atol=1e-6)


def test_encoder_input_is_the_concatenation_already_in_the_encoders_layout(refiner, scene, monkeypatch):
    """Image and mask are written into one channels_last map, which the encoder then takes without a copy (at 4K
    the concatenation and its converted copy were two 139 MB maps, a 4K exact refine 4-5 % slower for them); exact
    and fast mode both hand the encoder such a map."""
    from crm_d2.inputs import encoder_input

    image = torch.randn(2, 3, 9, 7).expand(2, -1, -1, -1)
    mask = torch.rand(2, 1, 9, 7)
    x = encoder_input(image[:, :, 1:8], mask[:, :, 1:8])  # crops, as fast mode passes them
    assert torch.equal(x, torch.cat((image[:, :, 1:8], mask[:, :, 1:8]), 1))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.contiguous(memory_format=torch.channels_last).data_ptr() == x.data_ptr()

    layouts, encode = [], refiner.model.encode_projected
    monkeypatch.setattr(refiner.model, "encode_projected",
                        lambda x, *a, **k: layouts.append(x.is_contiguous(memory_format=torch.channels_last))
                        or encode(x, *a, **k))
    img, _, coarse = scene
    for mode in ("exact", "fast"):
        refiner.mode = mode
        refiner.refine(img, coarse)
    assert len(layouts) > 2 and all(layouts)


def test_padded_inputs_are_the_release_formula_to_the_bit_and_leave_the_callers_masks_alone(refiner):
    """The image is padded while still uint8 and the mask before it is scaled, then both are scaled in place: the
    release's normalise-then-pad, bit for bit and in the same layout, with one fresh map each instead of five and
    three. The masks come from the caller (a numpy view): nothing may be written into them."""
    import torch.nn.functional as F

    from crm_d2.model import normalize_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    masks = rng.random((2, 70, 90), dtype=np.float32)
    kept = masks.copy()
    img_t = torch.from_numpy(image).to(refiner.device).permute(2, 0, 1)[None]  # as refine_batch makes it
    im, seg = refiner._padded_inputs(img_t, masks)

    pad = (PAD,) * 4
    want_im = F.pad(normalize_image(img_t.float() / 255), pad, mode="reflect")
    want_seg = F.pad(torch.from_numpy(masks).to(refiner.device)[:, None] * 2 - 1, pad, mode="reflect")
    assert torch.equal(im, want_im) and torch.equal(seg, want_seg)
    assert im.stride() == want_im.stride() and seg.stride() == want_seg.stride()
    assert np.array_equal(masks, kept)


def test_tight_memory_budget_tiles_the_trunk_and_changes_nothing(refiner, scene, monkeypatch, tol):
    img, _, coarse = scene
    a = refiner.refine(img, coarse)
    calls = []
    trunk = refiner.model._branches
    monkeypatch.setattr(refiner.model, "_branches",
                        lambda x, *a, **k: calls.append(x.shape[-2]) or trunk(x, *a, **k))
    refiner.memory_budget = 40_000  # a trunk budget of ~0.16 MB: the full-scale pass needs row tiles
    np.testing.assert_allclose(refiner.refine(img, coarse), a, atol=tol(1e-5, LOGIT_SCALE))
    assert len(calls) > len(refiner.scales) and min(calls) < img.shape[0]


def test_band_cells_marks_the_contour_and_unsettled_pixels():
    import torch

    from crm_d2.fast import band_cells

    prev = torch.zeros(1, 1, 64, 128)
    prev[..., :, :40] = 1  # a vertical contour between x=39 and x=40
    prev[..., 50:, 120:] = 0.5  # an undecided patch in the far corner
    band = band_cells(prev, radius=8, unsettled=0.2, cell=8)
    assert band.shape == (8, 16) and band.dtype == torch.bool
    cols = band[:4].any(0).nonzero()[:, 0].tolist()
    assert 4 in cols and 5 in cols  # the cells on both sides of the contour
    assert min(cols) >= 1 and max(cols) <= 8  # radius 8 px = 1 cell, plus one for safety, not more
    assert band[7, 15] and band[5, 13] and not band[0, 12]


def test_fast_mode_runs_only_the_last_stage_by_default(refiner, scene, tol):
    """Fast mode's default skips the stages before the last: with the released four scales it must run the
    full-scale stage alone, banded around the coarse mask, and give what that one-stage schedule gives."""
    from crm_d2.fast import FastOptions

    img, _, coarse = scene
    refiner.mode = "fast"
    refiner.profile = []
    out = refiner.refine(img, coarse)
    assert [p["scale"] for p in refiner.profile if "scale" in p] == [1.0]
    refiner.scales = (1.0,)
    np.testing.assert_allclose(out, refiner.refine(img, coarse), atol=tol(1e-6, LOGIT_SCALE))
    refiner.scales, refiner.fast, refiner.profile = (0.25, 0.5, 1.0), FastOptions(last_stage_only=False), []
    refiner.refine(img, coarse)
    assert [p["scale"] for p in refiner.profile if "scale" in p] == [0.25, 0.5, 1.0]


def test_fast_mode_with_one_scale_refines_a_band_around_the_coarse_mask(refiner, scene, tol):
    from crm_d2.fast import FastOptions

    img, _, coarse = scene
    refiner.scales = (1.0,)
    exact = refiner.refine(img, coarse)
    refiner.mode = "fast"
    refiner.fast = FastOptions(coarse_band=10.0, tile=64, halo=256)  # band and context cover everything
    np.testing.assert_allclose(refiner.refine(img, coarse), exact, atol=tol(1e-5, LOGIT_SCALE))
    # a bigger scene, so that some tiles lie far from the coarse boundary
    import cv2

    yy, xx = np.mgrid[:240, :320]
    disc = ((yy - 120) ** 2 + (xx - 160) ** 2) < 50**2
    img = np.random.default_rng(1).integers(0, 255, (240, 320, 3)).astype(np.uint8)
    refiner.fast = FastOptions(band=4, coarse_band=0.0, tile=32, halo=16)
    out = refiner.refine(img, disc)
    # far from the coarse boundary the coarse mask is kept as it is, near it the model decides
    dist = cv2.distanceTransform((~disc).astype(np.uint8), cv2.DIST_L2, 3) + cv2.distanceTransform(
        disc.astype(np.uint8), cv2.DIST_L2, 3)
    far = dist > 90  # band (3 cells) plus a whole 32-px tile
    assert far.sum() > 10_000 and np.array_equal(out[far], disc[far].astype(np.float32))
    assert np.abs(out - disc)[dist < 3].max() > 0.05


def test_fast_mode_encodes_the_bands_part_of_a_tile_not_the_whole_tile(refiner):
    """A straight boundary across a row of tiles: the encoder's crops take the band's rows (two 32-row strips)
    plus the halo, not the tiles' 128 rows; the band is decoded and the rest keeps the coarse mask."""
    from crm_d2.fast import FastOptions

    mask = np.zeros((256, 320), bool)
    mask[:128] = True  # padded by 32: the boundary is at grid row 160, inside the tile row 128..256
    img = np.random.default_rng(2).integers(0, 255, (256, 320, 3)).astype(np.uint8)
    refiner.scales, refiner.mode = (1.0,), "fast"
    refiner.fast = FastOptions(band=4, coarse_band=0.0, tile=128, halo=16)
    crops, project = [], refiner._project
    refiner._project = lambda x: crops.append(tuple(x.shape[-2:])) or project(x)
    out = refiner.refine(img, mask)
    assert crops and all(h <= 2 * 32 + 2 * 16 < 128 + 2 * 16 for h, _ in crops), crops
    assert sum(w for _, w in crops) >= 320  # every column of the boundary is encoded
    assert np.abs(out - mask)[120:136].max() > 0.05
    keep = np.r_[0:90, 165:256]  # the grid rows outside the two strips (96..160 in the image)
    assert np.array_equal(out[keep], mask[keep].astype(np.float32))


def test_fast_mode_crops_on_one_worker_per_core_equal_the_serial_crops(refiner, scene, monkeypatch):
    """On the CPU fast mode's crops run one per core (`per_core`), all writing into one probability map: the
    result must equal the crops run in turn on one thread (each strip written once, by its own crop)."""
    if refiner.device.type != "cpu":
        pytest.skip("the crops' workers are the CPU's")
    img, gt, coarse = scene
    masks = [coarse, np.roll(gt, 5, axis=0)]
    refiner.mode = "fast"
    before, crops = torch.get_num_threads(), []
    real = crm_fast.per_core
    monkeypatch.setattr(crm_fast, "per_core", lambda fn, items: crops.append(len(items)) or real(fn, items))
    try:
        torch.set_num_threads(2)
        two = refiner.refine_batch(img, masks)
        torch.set_num_threads(1)
        one = refiner.refine_batch(img, masks)
    finally:
        torch.set_num_threads(before)
    assert crops and crops[0] > 1  # there were several crops to share
    np.testing.assert_allclose(two, one, atol=1e-5)
    assert np.abs(two - np.stack(masks).astype(np.float32)).max() > 0.05  # the band was refined


def test_amp_encoder_is_close_to_fp32(refiner, scene):
    img, _, coarse = scene
    fp32 = cpu_twin(refiner).refine(img, coarse)  # the CPU's fp32 result
    refiner.amp = True  # bfloat16 autocast encoder on the device under test
    bf16 = refiner.refine(img, coarse)
    diff = np.abs(bf16 - fp32)
    assert bf16.dtype == np.float32 and 0 < diff.max() < 0.1 and diff.mean() < 0.01


@pytest.mark.parametrize("case", ["exact", "roi", "fast", "tf32"])
def test_device_agrees_with_cpu(refiner, scene, case, set_torch_flag):
    """The device under test against the CPU path on the same weights and inputs (on CPU: the CPU path against
    itself, bit for bit). Exact mode and ROI to float tolerance; fast mode to float tolerance except where a band
    cell sits on a threshold; TF32 convolutions (PyTorch's CUDA default, off in the CUDA test run) to the bf16
    tolerance of `test_amp_encoder_is_close_to_fp32`. docs/benchmark.md ("GPU") lists these tolerances."""
    img, gt, coarse = scene
    masks = [coarse, np.roll(gt, 5, axis=0)]
    kwargs = dict(roi=True, margin=0.25) if case == "roi" else {}
    refiner.mode = "fast" if case == "fast" else "exact"
    cpu = cpu_twin(refiner)
    if case == "tf32":
        set_torch_flag(torch.backends.cudnn, "allow_tf32", True)
        set_torch_flag(torch.backends.cuda.matmul, "allow_tf32", True)
    got = refiner.refine_batch(img, masks, **kwargs)
    want = cpu.refine_batch(img, masks, **kwargs)
    diff = np.abs(got - want)
    print(f"{case} on {refiner.device}: max |device - cpu| {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"pixels over 1e-3: {(diff > 1e-3).mean():.3%}")
    assert got.shape == want.shape == (2,) + coarse.shape and want.std() > 0.01
    if refiner.device.type == "cpu":
        np.testing.assert_array_equal(got, want)
    elif case in ("exact", "roi"):
        assert diff.max() < 1e-4
    elif case == "fast":
        assert (diff > 1e-3).mean() < 0.01 and all(iou(g > 0.5, w > 0.5) > 0.99 for g, w in zip(got, want))
    else:
        assert diff.max() < 0.1 and diff.mean() < 0.01
