"""`Refiner`: one class, one obvious call, that turns coarse masks into sharp ones at any resolution.

The default reproduces the authors' released inference exactly (32-px reflect padding, ImageNet
normalisation, scales 1/8..1, soft chaining between scales, every pixel decoded at every scale); the work is
organised so that memory is bounded by a budget, not by the image size (see `_refine_stack`).
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .model import CRM, TRUNK_BYTES_PER_PX_PER_WIDTH, CRMConfig, make_coord, normalize_image

PAD = 32
DEFAULT_SCALES = (0.125, 0.25, 0.5, 1.0)  # the release's schedule (and the authors' checkpoint's)
AUTO_BASE = 512  # "auto" schedule: the first stage's long side, about what a checkpoint was trained on
OUTPUTS = ("prob", "binary", "uint8")
ROI_MIN_STAGE_SIDE = 96  # ROI mode: schedule stages below this input long side (with the padding) are skipped
CPU_CHUNK_QUERIES = 16384  # decoder queries per step on CPU: keeps the 32-d working set in L2
BAND_BLOCK = 32  # fast mode decodes the band in strips of this many encoder-grid rows


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


@dataclass
class FastOptions:
    """Knobs of fast mode: later stages re-decode only a band around the previous stage's boundary.

    band: full-resolution pixels on each side of the previous boundary (and of its unsettled pixels) that are
    decoded again; unsettled: a previous probability in (u, 1 - u) counts as undecided; tile/halo: the encoder
    runs on tiles of this many stage pixels that touch the band (neighbours in a row as one crop), with this
    much context around them;
    band_from: stages at or above this scale use band tiles, lower ones run densely (they are cheap);
    coarse_band: when the first stage is already at or above `band_from` (e.g. the demo model's full-scale-only
    schedule), its band is taken around the coarse mask's boundary, this fraction of the long side wide on each
    side (a coarse mask is off by more than a refined stage is);
    next_grid: dense stages decode at the points where the next stage samples them (what exact mode hands on),
    not at their own resolution; band_full: band stages before the last decode their band at full resolution.
    With the four-scale schedule at 4K they take fast mode's mBA gap to exact mode from 0.77 to 0.30 and 0.20
    (docs/benchmark.md).
    """

    band: int = 16
    unsettled: float = 0.2
    tile: int = 128
    halo: int = 32
    band_from: float = 0.5
    coarse_band: float = 0.005
    next_grid: bool = True
    band_full: bool = True

    def __post_init__(self):
        if self.tile % 2 or self.halo % 2 or self.tile <= 0 or self.halo < 0:
            raise ValueError("fast mode tile and halo must be even, tile > 0")


def auto_scales(long_side, base=AUTO_BASE):
    """The resolution-aware schedule: a first stage at about `base` px on the long side, then doubling up to
    full resolution. 400 px -> (1.0,); 1024 -> (0.5, 1.0); 4K -> (0.125, 0.25, 0.5, 1.0), the released ratios."""
    k = max(0, round(math.log2(long_side / base)))
    return tuple(2.0 ** -i for i in range(k, -1, -1))


def stage_scales(scales, padded_shape, max_side=None, base=AUTO_BASE, min_side=None):
    """Encoder scales for one input: "auto" is resolved on the input's size (`auto_scales`); `max_side` caps
    the encoder's input long side (decoding stays at full resolution, which is what makes the cap cheap);
    consecutive duplicates after capping are run once. `min_side` drops the leading stages whose input long
    side would be below it (the last stage always runs): the released ratios start at 1/8, which for a 100-px
    segment (a 264-px padded ROI) is a 33-px encoder input that costs a full-resolution decode and carries no information."""
    if isinstance(scales, str):
        scales = auto_scales(max(padded_shape), base)
    scales = tuple(scales)
    if min_side:
        scales = tuple(s for s in scales[:-1] if s * max(padded_shape) >= min_side) + scales[-1:]
    if max_side is None:
        return scales
    cap = max_side / max(padded_shape)
    out = []
    for s in scales:
        s = min(s, cap)
        if not out or abs(out[-1] - s) > 1e-9:
            out.append(s)
    return tuple(out)


class Refiner:
    """Refine coarse masks with CRM.

    Args:
        weights: "demo" (the small model shipped with crm_d2), a path to a crm_d2 checkpoint, or the authors'
            released state_dict file. `None` builds a randomly initialised model, only with `allow_random=True`.
        device: "cpu", "cuda", "cuda:1", ... or None for CUDA when available.
        scales: the multi-resolution schedule (fractions of the padded image size), low to high, or "auto"
            (`auto_scales`: first stage at about the training resolution, then doubling; worked out per image or
            ROI); default: the checkpoint's own `meta["scales"]` if it has one, else the released 0.125, 0.25,
            0.5, 1 (the authors' checkpoint carries none, so it runs as released).
        memory_budget: bytes the decoder may use per step (queries are chunked to fit it); the encoder trunk
            runs in row tiles when its activations would exceed four times this.
        max_batch: masks encoded together at once.
        amp: run the encoder in bfloat16 autocast (faster on CUDA, slower on CPUs without bf16 units; not
            bit-exact, its error is measured in docs/benchmark.md).
        mode: "exact" (the released protocol) or "fast" (band-limited later stages, see `FastOptions`).
        fast: FastOptions for mode="fast".
        config: architecture for `weights=None`.
    """

    def __init__(self, weights="demo", device=None, scales=None, memory_budget=512 << 20, max_batch=8,
                 amp=False, allow_random=False, config=None, mode="exact", fast=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
        if weights is None:
            if not allow_random:
                raise ValueError("Refiner needs weights: 'demo', a checkpoint path, or allow_random=True for tests")
            cfg = config if isinstance(config, CRMConfig) else CRMConfig.preset(config or "r50")
            self.model = CRM(cfg).eval().to(self.device)
        else:
            self.model = load_model(weights, self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # A checkpoint may say which schedule it was validated with (the demo model: "auto" from 1024 px).
        meta = getattr(self.model, "meta", {})
        scales = scales or meta.get("scales") or DEFAULT_SCALES
        self.scales = self._check_scales(scales)
        self.auto_base = int(meta.get("auto_base", AUTO_BASE))
        self.memory_budget = int(memory_budget)
        self.max_batch = max(1, int(max_batch))
        self.amp = bool(amp)
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.mode = mode
        self.fast = fast or FastOptions()
        self.profile = None  # set to a list to collect per-stage timings (tools/benchmark.py)

    @staticmethod
    def _check_scales(scales):
        if isinstance(scales, str):
            if scales != "auto":
                raise ValueError(f"scales must be a list of numbers or 'auto', got {scales!r}")
            return scales
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (0 < s <= 4) for s in scales):
            raise ValueError(f"scales must be a non-empty list of numbers in (0, 4], got {scales}")
        return scales

    # ------------------------------------------------------------------------------------------- public API
    def refine(self, image, mask, *, bgr=False, roi=False, margin=0.5, max_side=None, scales=None, output="prob"):
        """Refine one mask of one image.

        image: HxWx3 uint8 **RGB** (pass `bgr=True` for arrays from cv2.imread). mask: HxW bool, uint8 (0/1 or
        0..255) or float in [0, 1]; soft masks are used as they are, as in the release. Returns HxW:
        float32 probability (output="prob"), bool (output="binary", p > 0.5) or uint8 floor(255 p) ("uint8").
        roi=True refines only the mask's box plus `margin` (fraction of the box size) and keeps the coarse mask
        outside it (the paper's CRM*); for a crop smaller than the image, schedule stages whose input would be
        below ROI_MIN_STAGE_SIDE px are skipped (`stage_scales`). max_side caps the encoder's input long side.
        """
        return self.refine_batch(image, [mask], bgr=bgr, roi=roi, margin=margin, max_side=max_side,
                                 scales=scales, output=output)[0]

    def refine_batch(self, image, masks, *, bgr=False, roi=False, margin=0.5, max_side=None, scales=None,
                     output="prob"):
        """Refine several masks of one image (e.g. every segment of a panoptic result): N x H x W out."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        scales = self.scales if scales is None else self._check_scales(scales)
        image = to_rgb_array(image, bgr)
        masks = to_mask_stack(masks, image.shape[:2])
        probs = np.zeros(masks.shape, np.float32)
        img_t = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None]
        if roi:
            groups = {}
            for i, m in enumerate(masks):
                box = roi_box(m, margin)
                if box is None or box.shape == image.shape[:2]:
                    box = RoiBox(0, image.shape[0], 0, image.shape[1])
                groups.setdefault(box.shape, []).append((i, box))
            for shape, items in groups.items():
                # a crop skips stages below a useful size; a whole-image "ROI" is refined as the whole image
                min_side = None if shape == image.shape[:2] else ROI_MIN_STAGE_SIDE
                for start in range(0, len(items), self.max_batch):
                    part = items[start : start + self.max_batch]
                    crops = torch.cat([img_t[..., b.y0 : b.y1, b.x0 : b.x1] for _, b in part])
                    crop_masks = np.stack([masks[i][b.slices] for i, b in part])
                    out = self._run(crops, crop_masks, scales, max_side, min_side)
                    for (i, b), p in zip(part, out):
                        probs[i] = masks[i]
                        probs[i][b.slices] = p
        else:
            for start in range(0, len(masks), self.max_batch):
                probs[start : start + self.max_batch] = self._run(
                    img_t, masks[start : start + self.max_batch], scales, max_side)
        return format_output(probs, output)

    # ------------------------------------------------------------------------------------------- engine
    def _run(self, images, masks, scales, max_side, min_side=None):
        run = self._refine_fast if self.mode == "fast" else self._refine_stack
        return run(images, masks, scales, max_side, min_side)

    @torch.no_grad()
    def _refine_stack(self, images, masks, scales, max_side=None, min_side=None):
        """images: 1 or B x3xHxW uint8 tensor; masks: B x H x W float32 numpy in [0, 1] -> B x H x W probs.

        Per scale: resize once, encode once (the feature map is reused by every query chunk), project the
        features to the MLP width, then decode the full-resolution grid in row chunks sized from the budget.
        """
        B = len(masks)
        im, seg = self._padded_inputs(images, masks)
        Hp, Wp = seg.shape[-2:]
        prob = torch.empty(B, Hp, Wp, device=self.device)
        for s in stage_scales(scales, (Hp, Wp), max_side, self.auto_base, min_side):
            size = (round(Hp * s), round(Wp * s))
            im_s, seg_s = resize(im, size), resize(seg, size)
            t0 = self._clock()
            proj = self._project_batched(im_s, seg_s)
            t1 = self._clock()
            self._decode_into(prob, proj, (2 / Hp, 2 / Wp), prior=seg[:, 0])
            self._record(s, t0, t1)
            empty = (seg + 1).flatten(1).sum(1) < 2  # the release's guard against an (almost) empty input
            prob[empty] = 0
            seg = ((prob - 0.5) * 2)[:, None]
        return prob[:, PAD:-PAD, PAD:-PAD].cpu().numpy()

    def _padded_inputs(self, images, masks):
        """The release's input: ImageNet-normalised image and mask in [-1, 1], both reflect-padded by 32 px."""
        seg = torch.from_numpy(masks).to(self.device)[:, None]
        im = F.pad(normalize_image(images.float() / 255), (PAD,) * 4, mode="reflect")
        return im, F.pad(seg * 2 - 1, (PAD,) * 4, mode="reflect")

    def _clock(self):
        if self.profile is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _record(self, scale, t0, t1, **extra):
        if self.profile is not None:
            t2 = self._clock()
            self.profile.append({"scale": scale, "encoder_s": t1 - t0, "decoder_s": t2 - t1, **extra})

    def _project_batched(self, im_s, seg_s):
        """Encode B masks on one (or B) resized images, in sub-batches whose encoder activations fit the budget
        (at 6K one image's trunk alone takes several GB, so big inputs go one by one, in row tiles)."""
        B, px = seg_s.shape[0], seg_s.shape[-2] * seg_s.shape[-1]
        per_item = px * TRUNK_BYTES_PER_PX_PER_WIDTH * self.model.cfg.width
        step = max(1, min(B, self._trunk_budget // per_item))
        im_s = im_s.expand(B, -1, -1, -1)
        parts = [self._project(torch.cat((im_s[i : i + step], seg_s[i : i + step]), 1)) for i in range(0, B, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _project(self, x):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model.encode_projected(x, self.memory_budget, self._trunk_budget).float().contiguous()

    @property
    def _trunk_budget(self):
        return 4 * self.memory_budget  # the encoder's activations: short-lived, so a larger share than the decoder

    def _decode_into(self, prob, proj, cell, queries=None, prior=None):
        """Decode every pixel of prob's grid (B x H x W), chunk by chunk of rows. prior: the stage's input mask
        in [-1, 1] on the same grid (B x H x W), for models with a mask skip.

        On CPU the chunks are small enough for the working set to stay in cache (the MLP is memory-bound, and
        this is several times faster than big chunks); on GPU they are as large as the memory budget allows.
        """
        B, H, W = prob.shape
        if self.device.type == "cpu":
            rows = max(1, CPU_CHUNK_QUERIES // (B * W))
        else:
            rows = max(1, self.memory_budget // (B * W * (2 * self.model.cfg.hidden + 16) * 4))
        qy, qx = queries or (make_coord(H, prob.device), make_coord(W, prob.device))
        (iy, row_term, ay), cols = self.model.query_terms(proj, qy, qx, cell)
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            chunk = (iy[:, r0:r1], row_term[:, r0:r1], ay[:, r0:r1])
            prob[:, r0:r1] = torch.sigmoid(self._logits(proj, chunk, cols, prior, (slice(r0, r1), slice(None))))

    def _logits(self, proj, rows, cols, prior, where):
        """The decoder's logits, plus the mask skip's term (prior[:, where]) for models that have one."""
        logits = self.model.ensemble(proj, rows, cols)
        if self.model.cfg.mask_skip:
            logits += self.model.mask_logit(prior[(slice(None), *where)])
        return logits

    @torch.no_grad()
    def _refine_fast(self, images, masks, scales, max_side=None, min_side=None):
        """Fast mode: low scales decode only the points the next scale reads; from `band_from` on, only tiles
        that touch a band around the previous stage's boundary (or the coarse mask's, for a first stage) are
        encoded and decoded, the rest is the previous stage upsampled."""
        opt = self.fast
        im, seg = self._padded_inputs(images, masks)
        B, (Hp, Wp) = len(masks), seg.shape[-2:]
        cell = (2 / Hp, 2 / Wp)
        stages = stage_scales(scales, (Hp, Wp), max_side, self.auto_base, min_side)
        prev = None
        for i, s in enumerate(stages):
            E = (round(Hp * s), round(Wp * s))
            dense = s < opt.band_from
            band = opt.band
            if prev is None and not dense:  # no cheap low stage: the coarse mask marks where to look
                prev, band = seg * 0.5 + 0.5, max(opt.band, round(opt.coarse_band * max(Hp, Wp)))
            last = i == len(stages) - 1
            D, queries = (Hp, Wp), None  # the grid this stage decodes: full resolution unless said otherwise
            if not last and dense and opt.next_grid:
                # Exact mode resizes a full-resolution map to the next grid (align_corners): decode the very
                # points it reads, nothing else.
                D = (round(Hp * stages[i + 1]), round(Wp * stages[i + 1]))
                queries = (resize_positions(D[0], Hp, self.device), resize_positions(D[1], Wp, self.device))
            elif not last and (dense or not opt.band_full):
                D = E
            im_s = resize(im, E).expand(B, -1, -1, -1)
            src = seg if prev is None else (prev - 0.5) * 2
            seg_s = resize(src, E)
            prior = resize(src, D)[:, 0] if self.model.cfg.mask_skip else None  # the skip's mask at the queries
            t0, extra = self._clock(), {}
            if dense:
                prob = torch.empty(B, *D, device=self.device)
                proj = self._project_batched(im_s, seg_s)
                t1 = self._clock()
                self._decode_into(prob, proj, cell, queries, prior)
            else:
                prob, t_enc, extra["tiles"] = self._band_stage(im_s, seg_s, prev, D, cell, band, prior)
                t1 = t0 + t_enc
            self._record(s, t0, t1, **extra)
            empty = (seg_s + 1).flatten(1).sum(1) * (Hp * Wp / (E[0] * E[1])) < 2
            prob[empty] = 0
            prev = prob[:, None]
        return prev[:, 0, PAD:-PAD, PAD:-PAD].cpu().numpy()

    def _band_stage(self, im_s, seg_s, prev, D, cell, band_px, prior=None):
        opt = self.fast
        E = seg_s.shape[-2:]
        prob = resize(prev, D)[:, 0]  # the previous stage, kept outside the band
        if prob.data_ptr() == prev.data_ptr():
            prob = prob.clone()  # written below while prev is still read
        band = band_cells(prev, band_px * prev.shape[-2] / D[0], opt.unsettled)
        band = F.interpolate(band[None, None].float(), size=E, mode="nearest")[0, 0] > 0
        Hf, Wf = (E[0] + 1) // 2, (E[1] + 1) // 2
        qy_all, qx_all = make_coord(D[0], prob.device), make_coord(D[1], prob.device)
        t_enc, tiles = 0.0, 0
        for y0 in range(0, E[0], opt.tile):
            y1 = min(E[0], y0 + opt.tile)
            starts = [x0 for x0 in range(0, E[1], opt.tile) if band[y0:y1, x0 : x0 + opt.tile].any()]
            # Neighbouring band tiles of a row are encoded as one crop: one halo per run, not per tile.
            for run in _runs(starts, opt.tile):
                xa, xb = run[0], min(E[1], run[-1] + opt.tile)
                cy0, cx0 = max(0, y0 - opt.halo), max(0, xa - opt.halo)
                cy1, cx1 = min(E[0], y1 + opt.halo), min(E[1], xb + opt.halo)
                x = torch.cat((im_s[..., cy0:cy1, cx0:cx1], seg_s[..., cy0:cy1, cx0:cx1]), 1)
                t = self._clock()
                proj = self._project(x)
                t_enc, tiles = t_enc + self._clock() - t, tiles + len(run)
                # The query terms of the run's rows and columns once; each strip takes its slices.
                ry0, rx0 = y0 * D[0] // E[0], xa * D[1] // E[1]
                rows, cols = self.model.query_terms(proj, qy_all[ry0 : y1 * D[0] // E[0]],
                                                    qx_all[rx0 : xb * D[1] // E[1]], cell, feat_grid=(Hf, Wf),
                                                    offset=(cy0 // 2, cx0 // 2))
                for x0 in run:
                    for by0, by1, bx0, bx1 in band_strips(band, y0, y1, x0, min(E[1], x0 + opt.tile)):
                        dy0, dy1 = by0 * D[0] // E[0], by1 * D[0] // E[0]
                        dx0, dx1 = bx0 * D[1] // E[1], bx1 * D[1] // E[1]
                        logits = self._logits(proj, [t[:, dy0 - ry0 : dy1 - ry0] for t in rows],
                                              [t[:, dx0 - rx0 : dx1 - rx0] for t in cols], prior,
                                              (slice(dy0, dy1), slice(dx0, dx1)))
                        prob[:, dy0:dy1, dx0:dx1] = torch.sigmoid(logits)
        return prob, t_enc, tiles


def band_strips(band, y0, y1, x0, x1):
    """The pieces of the tile band[y0:y1, x0:x1] to decode: strips of BAND_BLOCK rows that the band touches,
    each over the columns between the band's first and last BAND_BLOCK-wide blocks in it (cache-sized pieces,
    little wasted work). Yields (y0, y1, x0, x1) on band's grid."""
    for by0 in range(y0, y1, BAND_BLOCK):
        by1 = min(y1, by0 + BAND_BLOCK)
        idx = torch.nonzero(band[by0:by1, x0:x1].any(0))[:, 0]
        if idx.numel():
            yield (by0, by1, x0 + int(idx[0]) // BAND_BLOCK * BAND_BLOCK,
                   min(x1, x0 + (int(idx[-1]) // BAND_BLOCK + 1) * BAND_BLOCK))


def _runs(starts, step):
    """Split sorted tile starts into runs of neighbours ([0, 256, 768] -> [[0, 256], [768]])."""
    runs = []
    for x in starts:
        if runs and x - runs[-1][-1] == step:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def resize(x, size):
    """The release's resize (bilinear, align_corners); at the same size that is the identity, and no copy is
    made (at 6K each copy of the padded image is 300 MB)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def resize_positions(n_out, n_in, device=None):
    """Where F.interpolate(size=n_out, align_corners=True) samples an n_in axis, as (-1, 1) pixel-centre coords."""
    pos = torch.arange(n_out, device=device, dtype=torch.float32) * ((n_in - 1) / max(1, n_out - 1))
    return -1 + (2 * pos + 1) / n_in


def band_cells(prev, radius, unsettled, cell=8):
    """Where fast mode looks again: cells of `cell` x `cell` px of prev's grid (B x 1 x h x w probabilities)
    within `radius` px of any mask's 0.5 contour or of its unsettled pixels (p in (u, 1 - u)); h/cell x w/cell bool.

    Worked out on the cell grid (one pass over the pixels, then tiny pools) because a pixel-exact dilation
    by a 40-px radius costs more than the decoding it saves; one extra cell keeps the band conservative.
    """
    fg = (prev > 0.5).float()
    hi = F.max_pool2d(fg, cell, cell, ceil_mode=True)
    lo = -F.max_pool2d(-fg, cell, cell, ceil_mode=True)
    open_ = F.max_pool2d(((prev > unsettled) & (prev < 1 - unsettled)).float(), cell, cell, ceil_mode=True)
    r = math.ceil(radius / cell) + 1
    grow = lambda t: F.max_pool2d(t, 2 * r + 1, 1, r)  # noqa: E731
    return ((grow(hi) > -grow(-lo)) | (grow(open_) > 0)).any(0)[0]


# ----------------------------------------------------------------------------------------------- input checks
def to_rgb_array(image, bgr=False):
    """Validate an image and return it as contiguous HxWx3 uint8 RGB."""
    if image is None:
        raise ValueError("image is None (did cv2.imread fail?)")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating) or image.min() < 0 or image.max() > 1:
            raise ValueError(f"image must be uint8 0..255 or float in [0, 1], got {image.dtype} "
                             f"in [{image.min()}, {image.max()}]")
        image = np.round(image * 255).astype(np.uint8)
    if min(image.shape[:2]) <= PAD:
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}: CRM needs at least {PAD + 1} pixels per side "
                         f"(it reflect-pads {PAD} px); upscale small images first")
    if bgr:
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def to_mask_array(mask, shape=None):
    """Validate one mask and return it as HxW float32 in [0, 1]."""
    if mask is None:
        raise ValueError("mask is None (did cv2.imread fail?)")
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        extra = " (it has channels: pass a single-channel mask, e.g. mask[..., 0])" if mask.ndim == 3 else ""
        raise ValueError(f"mask must be HxW, got shape {mask.shape}{extra}")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {shape[0]}x{shape[1]}: "
                         "they must have the same size")
    if mask.dtype == bool:
        return mask.astype(np.float32)
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / (255.0 if mask.max() > 1 else 1.0)
    if np.issubdtype(mask.dtype, np.integer):
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(f"integer mask values must be 0/1 or 0..255, got [{mask.min()}, {mask.max()}]")
        return mask.astype(np.float32) / (255.0 if mask.max() > 1 else 1.0)
    mask = mask.astype(np.float32)
    if not np.isfinite(mask).all():
        raise ValueError("mask contains NaN or infinite values")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"float mask values must lie in [0, 1], got [{mask.min():.4g}, {mask.max():.4g}]")
    return mask


def to_mask_stack(masks, shape):
    if isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3 and masks.shape[-1] not in (1, 3):
        masks = list(masks)
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("no masks given")
    return np.ascontiguousarray(np.stack([to_mask_array(m, shape) for m in masks]))


def format_output(probs, output):
    if output == "binary":
        return probs > 0.5
    if output == "uint8":
        return np.floor(probs * 255).astype(np.uint8)
    return probs
