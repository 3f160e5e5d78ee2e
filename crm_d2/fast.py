"""Fast mode: by default the schedule's last stage alone, re-encoding and re-decoding only a band around the coarse
mask's boundary; with `last_stage_only=False`, every stage, the later ones banded around the previous stage's
boundary.

Mixed into `Refiner` (`FastMode`); it shares the exact engine's padding, encoding and decoding, so that inside
the band it computes what exact mode computes. Its speed and its mBA gap to exact mode: docs/benchmark.md.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu import core_workers, per_core
from .inputs import PAD, encoder_input, resize, resize_sources
from .model import make_coord
from .schedule import stage_scales

BAND_BLOCK = 32  # fast mode decodes the band in strips of this many encoder-grid rows


@dataclass
class FastOptions:
    """Knobs of fast mode. By default only the schedule's last stage runs, and only around the coarse mask's
    boundary: the encoder runs on the tiles that touch a band there, the decoder on the band, and the rest of the
    mask stays as it came in. What each default costs and saves, as measured: docs/options.md, and
    docs/benchmark.md, "Fast mode".

    band: full-resolution pixels on each side of the boundary (and of undecided pixels) that are decoded again;
    unsettled: a probability in (u, 1 - u), in the input mask or a previous stage, counts as undecided;
    tile/halo: the encoder runs on tiles of this many stage pixels that touch the band (neighbours in a row as
    one crop, cut to the band's part of them), with this much context around them;
    band_from: stages at or above this scale are banded; lower ones (a stage capped by `max_side`, or the low
    stages of a full schedule) run densely, as they are cheap;
    coarse_band: a banded stage with no stage before it takes its band around the coarse mask's boundary, this
    fraction of the long side wide on each side (a coarse mask is off by more than a refined stage is);
    last_stage_only: False runs every stage of the schedule, the later ones banded around the previous stage's
    boundary: slower, for masks far off their object;
    next_grid/band_full: with last_stage_only=False, dense stages decode only the points where the next stage
    samples them, and banded stages before the last decode their band at full resolution.
    """

    band: int = 16
    unsettled: float = 0.2
    tile: int = 128
    halo: int = 16
    band_from: float = 0.5
    coarse_band: float = 0.005
    next_grid: bool = True
    band_full: bool = True
    last_stage_only: bool = True

    def __post_init__(self):
        if self.tile % 2 or self.halo % 2 or self.tile <= 0 or self.halo < 0:
            raise ValueError("fast mode tile and halo must be even, tile > 0")


class FastMode:
    """`Refiner`'s fast mode (mode="fast"); uses the exact engine's `_padded_inputs`, `_project*`, `_decode_into`
    and `_logits`."""

    @torch.no_grad()
    def _refine_fast(self, images, masks, scales, max_side=None, min_side=None):
        """Fast mode: by default the last stage alone, with only the tiles that touch a band around the coarse
        mask's boundary encoded and decoded (the rest keeps the coarse mask). With `last_stage_only=False`: low
        scales decode only the points the next scale reads; from `band_from` on, only tiles that touch a band
        around the previous stage's boundary (or the coarse mask's, for a first stage) are encoded and decoded,
        the rest is the previous stage upsampled."""
        opt = self.fast
        im, seg = self._padded_inputs(images, masks)
        B, (Hp, Wp) = len(masks), seg.shape[-2:]
        cell = (2 / Hp, 2 / Wp)
        stages = stage_scales(scales, (Hp, Wp), max_side, self.auto_base, min_side)
        if opt.last_stage_only:
            stages = stages[-1:]
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
            cfg = self.model.cfg
            # the skip's and the pixel head's mask, and the head's image, at the queries
            prior = resize(src, D)[:, 0] if cfg.mask_skip or cfg.pixel_head else None
            image = (im if D == (Hp, Wp) else resize(im, D)) if cfg.pixel_head else None
            t0, extra = self._clock(), {}
            if dense:
                prob = torch.empty(B, *D, device=self.device)
                proj = self._project_batched(im_s, seg_s)
                t1 = self._clock()
                self._decode_into(prob, proj, cell, queries, prior, image)
            else:
                prob, t_enc, extra["tiles"] = self._band_stage(im_s, seg_s, prev, D, cell, band, prior, image)
                t1 = t0 + t_enc
            self._record(s, t0, t1, **extra)
            empty = (seg_s + 1).flatten(1).sum(1) * (Hp * Wp / (E[0] * E[1])) < 2
            prob[empty] = 0
            prev = prob[:, None]
        return prev[:, 0, PAD:-PAD, PAD:-PAD].cpu().numpy()

    def _band_stage(self, im_s, seg_s, prev, D, cell, band_px, prior=None, image=None):
        opt = self.fast
        E = seg_s.shape[-2:]
        prob = resize(prev, D)[:, 0]  # the previous stage, kept outside the band
        if prob.data_ptr() == prev.data_ptr():
            prob = prob.clone()  # written below while prev is still read
        band = band_cells(prev, band_px * prev.shape[-2] / D[0], opt.unsettled)
        # Only steers the loops below: on the host, so that each tile's test does not wait for the GPU.
        band = (F.interpolate(band[None, None].float(), size=E, mode="nearest")[0, 0] > 0).cpu()
        Hf, Wf = (E[0] + 1) // 2, (E[1] + 1) // 2
        qy_all, qx_all = make_coord(D[0], prob.device), make_coord(D[1], prob.device)
        crops = []
        for y0 in range(0, E[0], opt.tile):
            y1 = min(E[0], y0 + opt.tile)
            starts = [x0 for x0 in range(0, E[1], opt.tile) if band[y0:y1, x0 : x0 + opt.tile].any()]
            # Neighbouring band tiles of a row are encoded as one crop: one halo per run, not per tile. The crop
            # is the box of the run's strips (BAND_BLOCK-aligned, so even) plus the halo, not the whole tiles:
            # a boundary that crosses a tile takes a fraction of its rows or columns.
            for run in _runs(starts, opt.tile):
                strips_of_run = [st for x0 in run for st in band_strips(band, y0, y1, x0, min(E[1], x0 + opt.tile))]
                crops.append((len(run), strips_of_run))
        enc_times, strips = [], []

        def refine_crop(crop):
            run_strips = crop[1]
            ya, yb = min(st[0] for st in run_strips), max(st[1] for st in run_strips)
            xa, xb = min(st[2] for st in run_strips), max(st[3] for st in run_strips)
            cy0, cx0 = max(0, ya - opt.halo), max(0, xa - opt.halo)
            cy1, cx1 = min(E[0], yb + opt.halo), min(E[1], xb + opt.halo)
            x = encoder_input(im_s[..., cy0:cy1, cx0:cx1], seg_s[..., cy0:cy1, cx0:cx1])
            started = self._clock()
            proj = self._project(x)
            enc_times.append(self._clock() - started)
            # The query terms of the box's rows and columns once; each strip takes its slices.
            ry0, rx0 = ya * D[0] // E[0], xa * D[1] // E[1]
            rows, cols = self.model.query_terms(proj, qy_all[ry0 : yb * D[0] // E[0]],
                                                qx_all[rx0 : xb * D[1] // E[1]], cell, feat_grid=(Hf, Wf),
                                                offset=(cy0 // 2, cx0 // 2))
            for by0, by1, bx0, bx1 in run_strips:  # strips of different crops do not overlap
                dy0, dy1 = by0 * D[0] // E[0], by1 * D[0] // E[0]
                dx0, dx1 = bx0 * D[1] // E[1], bx1 * D[1] // E[1]
                logits = self._logits(proj, [t[:, dy0 - ry0 : dy1 - ry0] for t in rows],
                                      [t[:, dx0 - rx0 : dx1 - rx0] for t in cols], prior,
                                      (slice(dy0, dy1), slice(dx0, dx1)))
                prob[:, dy0:dy1, dx0:dx1] = torch.sigmoid(logits)
                strips.append((dy0, dy1, dx0, dx1))

        # On the CPU each core takes whole crops, one intra-op thread each (`per_core`): a crop's products are
        # small, and split across the cores they wait for each other (fast mode at 2K: 5-7 % faster,
        # docs/benchmark.md, "Fifth pass").
        workers = 1
        if self.device.type == "cpu":
            workers = max(1, min(core_workers(), len(crops)))
            per_core(refine_crop, crops)
        else:
            for crop in crops:
                refine_crop(crop)
        t_enc, tiles = sum(enc_times) / workers, sum(c[0] for c in crops)  # encoder seconds per core
        if self.model.cfg.pixel_head:
            prob = self._pixel_head_strips(prob, image, prior, strips)
        return prob, t_enc, tiles

    def _pixel_head_strips(self, prob, image, prior, strips):
        """The pixel head on the decoded strips only, each read with the head's halo (the previous stage's
        probabilities, as logits, stand in for undecoded neighbours)."""
        head, h = self.model.pixel_head, self.model.pixel_head.HALO
        H, W = prob.shape[-2:]
        out = prob.clone()
        for y0, y1, x0, x1 in strips:
            a, b, c, d = max(0, y0 - h), min(H, y1 + h), max(0, x0 - h), min(W, x1 + h)
            win = (slice(None), slice(a, b), slice(c, d))
            logits = head.apply_rows(torch.logit(prob[win], eps=1e-6), image[:, :, a:b, c:d], prior[win],
                                     self.memory_budget)
            out[:, y0:y1, x0:x1] = torch.sigmoid(logits[:, y0 - a : y1 - a, x0 - c : x1 - c])
        return out


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


def resize_positions(n_out, n_in, device=None):
    """Where F.interpolate(size=n_out, align_corners=True) samples an n_in axis, as (-1, 1) pixel-centre coords."""
    return -1 + (2 * resize_sources(n_out, n_in, device) + 1) / n_in


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
