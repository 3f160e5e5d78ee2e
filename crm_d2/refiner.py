"""`Refiner`: one class, one obvious call, that turns coarse masks into sharp ones at any resolution.

The default reproduces the authors' released inference exactly (32-px reflect padding, ImageNet
normalisation, scales 1/8..1, soft chaining between scales, every pixel decoded at every scale); the work is
organised so that memory is bounded by a budget, not by the image size (see `_refine_stack`).
"""
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .cpu import per_core, warm_malloc_thresholds
from .fast import FastMode, FastOptions
from .grabcut import GrabCut, grabcut_probs
from .guided import EdgeSnap, snap_probs
from .inputs import OUTPUTS, PAD, encoder_input, format_output, resize, to_mask_stack, to_rgb_array
from .model import CRM, TRUNK_BYTES_PER_PX_PER_WIDTH, CRMConfig, make_coord, normalize_image_
from .schedule import (AUTO_BASE, DEFAULT_SCALES, ROI_MIN_STAGE_SIDE, RoiBox, Rounds, boundary_shift, roi_box,
                       stage_scales)

__all__ = ["Refiner", "FastOptions", "EdgeSnap", "GrabCut", "Rounds"]

CPU_CHUNK_QUERIES = 65536  # decoder queries per task on CPU (`per_core`; each works through its chunk in blocks)


class Refiner(FastMode):
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
        mode: "exact" (the released protocol) or "fast" (the schedule's last stage only, re-encoded and re-decoded
            only in a band around the coarse mask's boundary; see `FastOptions`).
        fast: FastOptions for mode="fast".
        config: architecture for `weights=None`.
        edge_snap: a guided filter of the refined probability with the photo as guide (`crm_d2.guided`): an
            int radius, "RADIUS:PASSES:EPS[:MIN_SHIFT]", an EdgeSnap, or "off"/False; default: the checkpoint's own
            `meta["edge_snap"]`, else off (the demo model and the authors' checkpoint carry none). It helps
            coarse masks (8-16x) and costs good ones (docs/experiments.md, "Edge snap").
        rounds: refine again, from its own probability, each mask that the last round still moved by at least
            MIN_SHIFT px on average, up to COUNT rounds (`crm_d2.schedule.Rounds`): an int COUNT, "COUNT:MIN_SHIFT",
            or a Rounds; default: the checkpoint's own `meta["rounds"]`, else 1 (one pass of the schedule).
        grabcut: the pixels within BAND px of the refined boundary decided again by OpenCV's GrabCut with the
            photo (`crm_d2.grabcut`), after the edge snap: an int BAND, "BAND[:ITERS[:MIN_SHIFT]]", a GrabCut, or
            "off"/False; default: the checkpoint's own `meta["grabcut"]`, else off. The demo model's own is a
            1-px band kept per mask only where its gate predicts a gain, and for those masks, in whole-image
            mode (not ROI), a second look: the model run again trusting the coarse mask less, cut too, and the
            better cut kept (docs/demo_model.md, "After the model"). A band given here cuts every mask, which
            helps masks from a 16x lower-resolution segmenter and costs good ones (docs/experiments.md,
            "GrabCut finish").
    """

    def __init__(self, weights="demo", device=None, scales=None, memory_budget=512 << 20, max_batch=8,
                 amp=False, allow_random=False, config=None, mode="exact", fast=None, edge_snap=None,
                 rounds=None, grabcut=None):
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
        if self.device.type == "cpu":
            warm_malloc_thresholds()  # the encoder's slabs and the decoder's blocks are reused, not faulted in again
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
        scales = (meta.get("scales") or DEFAULT_SCALES) if scales is None else scales
        self.scales = self._check_scales(scales)
        self.auto_base = int(meta.get("auto_base", AUTO_BASE))
        snap = EdgeSnap.parse(edge_snap)
        self.edge_snap = (EdgeSnap.parse(meta.get("edge_snap")) or False) if snap is None else snap
        rounds = Rounds.parse(rounds)
        self.rounds = (Rounds.parse(meta.get("rounds")) or Rounds()) if rounds is None else rounds
        cut = GrabCut.parse(grabcut)
        self.grabcut = (GrabCut.parse(meta.get("grabcut")) or False) if cut is None else cut
        if self.grabcut and self.grabcut.low_gain and not self.model.cfg.mask_skip:
            raise ValueError("grabcut low_gain scales the mask skip's gain, and this model has no mask skip")
        self.memory_budget = int(memory_budget)
        self.max_batch = max(1, int(max_batch))
        self.amp = bool(amp)
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
        # an empty mask refines to zeros (the release's guard) at every stage: it is not run
        live = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
        if roi:
            groups = {}
            for i in live:
                box = roi_box(masks[i], margin)
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
                    out = self._run_rounds(crops, crop_masks, scales, max_side, min_side)
                    # no second look at the GrabCut gate's masks here: in a crop of a scene the model, trusting the
                    # mask less, grows a part or an instance into its neighbours (docs/demo_model.md)
                    for (i, b), p, coarse in zip(part, out, crop_masks):
                        probs[i] = masks[i]
                        probs[i][b.slices] = self._finish(image, p[None], coarse[None], b.slices)[0]
        else:
            for start in range(0, len(live), self.max_batch):
                part = live[start : start + self.max_batch]
                chunk = masks[part]
                again = self._rerun(img_t, chunk, scales, max_side)
                probs[part] = self._finish(image, self._run_rounds(img_t, chunk, scales, max_side), chunk, None, again)
        return format_output(probs, output)

    def _finish(self, image, probs, coarse, where=None, rerun=None):
        """The photo-guided steps after the model: the edge snap, then the GrabCut finish (each when set).
        rerun: `_rerun`'s function, for the GrabCut gate's second look at the masks it cuts (its output is
        snapped as the first run's was)."""
        if self.edge_snap and rerun is not None:
            rerun = partial(self._snapped, image, rerun, coarse, where)
        steps = ((self.edge_snap, snap_probs, {}, "edge_snap_s"),
                 (self.grabcut, grabcut_probs, {"rerun": rerun}, "grabcut_s"))
        for opt, run, extra, key in steps:
            if opt:
                t0 = time.perf_counter()
                probs = run(image, probs, opt, where, coarse, **extra)
                if self.profile is not None:
                    self.profile.append({key: time.perf_counter() - t0})
        return probs

    def _snapped(self, image, rerun, coarse, where, indices, factor):
        return snap_probs(image, rerun(indices, factor), self.edge_snap, where, coarse[list(indices)])

    def _rerun(self, images, masks, scales, max_side, min_side=None):  # whole-image mode
        """(indices, factor) -> those masks refined again with the model's mask skip gain times factor."""

        def run(indices, factor):
            indices = list(indices)
            crops = images if images.shape[0] == 1 else images[torch.as_tensor(indices, device=images.device)]
            with self.model.mask_gain_times(factor):
                return self._run_rounds(crops, masks[indices], scales, max_side, min_side)

        return run

    # ------------------------------------------------------------------------------------------- engine
    def _run_rounds(self, images, masks, scales, max_side, min_side=None):
        """The schedule, then `self.rounds`: the schedule's last stage again, from the last round's probability,
        for the masks that round moved by at least rounds.min_shift px (the others have settled)."""
        probs = self._run(images, masks, scales, max_side, min_side)
        last_stage = (1.0,) if isinstance(scales, str) else tuple(scales)[-1:]
        active, before = np.arange(len(masks)), masks
        for _ in range(self.rounds.count - 1):
            moving = [j for j, k in enumerate(active) if boundary_shift(probs[k], before[j]) >= self.rounds.min_shift]
            if not moving:
                break
            active = active[moving]
            before = probs[active]  # a copy: the input of this round, and what its shift is measured from
            crops = images if images.shape[0] == 1 else images[torch.as_tensor(active, device=images.device)]
            probs[active] = self._run(crops, before, last_stage, max_side, min_side)
        return probs

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
        inner = (slice(None), slice(PAD, Hp - PAD), slice(PAD, Wp - PAD))
        stages = stage_scales(scales, (Hp, Wp), max_side, self.auto_base, min_side)
        for k, s in enumerate(stages):
            size = (round(Hp * s), round(Wp * s))
            im_s, seg_s = resize(im, size), resize(seg, size)
            t0 = self._clock()
            proj = self._project_batched(im_s, seg_s)
            t1 = self._clock()
            if k == len(stages) - 1 and not self.model.cfg.pixel_head:
                # The padding is cut off after the last stage: decode the image's own pixels only (earlier stages
                # decode it all, as the next stage reads it). A pixel head reads the neighbours it would lose.
                queries = make_coord(Hp, self.device)[inner[1]], make_coord(Wp, self.device)[inner[2]]
                self._decode_into(prob[inner], proj, (2 / Hp, 2 / Wp), queries, prior=seg[:, 0][inner])
            else:
                self._decode_into(prob, proj, (2 / Hp, 2 / Wp), prior=seg[:, 0], image=im)
            self._record(s, t0, t1)
            empty = (seg + 1).flatten(1).sum(1) < 2  # the release's guard against an (almost) empty input
            prob[empty] = 0
            seg = ((prob - 0.5) * 2)[:, None]
        return prob[inner].cpu().numpy()

    def _padded_inputs(self, images, masks):
        """The release's input: ImageNet-normalised image and mask in [-1, 1], both reflect-padded by 32 px.

        Padded first (the image while it is still uint8), then scaled in place: padding only copies values, so the
        result is the same bits as scaling first. Scaling first made five fresh full-resolution maps of the image
        and three of the mask; this makes one of each, and takes 15 ms instead of 85 ms at 2K (fast mode's whole
        refine is 1.2-1.5 s there; docs/benchmark.md, "Eighth pass")."""
        pad = (PAD,) * 4
        # F.pad copies, so the in-place scaling never writes into the caller's masks (a numpy view) or image
        seg = F.pad(torch.from_numpy(masks).to(self.device)[:, None], pad, mode="reflect")
        im = F.pad(images, pad, mode="reflect").float().div_(255)
        return normalize_image_(im), seg.mul_(2).sub_(1)

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
        parts = [self._project(encoder_input(im_s[i : i + step], seg_s[i : i + step])) for i in range(0, B, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _project(self, x):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model.encode_projected(x, self.memory_budget, self._trunk_budget).float().contiguous()

    @property
    def _trunk_budget(self):
        return 4 * self.memory_budget  # the encoder's activations: short-lived, so a larger share than the decoder

    def _decode_into(self, prob, proj, cell, queries=None, prior=None, image=None):
        """Decode every pixel of prob's grid (B x H x W), chunk by chunk of rows. prior: the stage's input mask
        in [-1, 1] on the same grid (B x H x W), for models with a mask skip or a pixel head; image: the
        normalised image on that grid (1 or B x 3 x H x W), for a pixel head.

        On CPU the chunks are shared among the cores, one chunk per core at a time (`per_core`), and each is
        decoded in blocks whose activations stay in that core's cache (`CRM._ensemble_cpu`); on GPU chunks are as
        large as the memory budget allows.
        """
        B, H, W = prob.shape
        cpu = self.device.type == "cpu"
        if cpu:  # chunks of at most CPU_CHUNK_QUERIES, and at least one per core where there are the rows
            rows = max(1, min(CPU_CHUNK_QUERIES // (B * W), -(-H // torch.get_num_threads())))
        else:
            rows = max(1, self.memory_budget // (B * W * (2 * self.model.cfg.hidden + 16) * 4))
        qy, qx = queries or (make_coord(H, prob.device), make_coord(W, prob.device))
        (iy, row_term, ay), cols = self.model.query_terms(proj, qy, qx, cell)
        head = self.model.cfg.pixel_head

        def decode(r0):
            r1 = min(H, r0 + rows)
            chunk = (iy[:, r0:r1], row_term[:, r0:r1], ay[:, r0:r1])
            logits = self._logits(proj, chunk, cols, prior, (slice(r0, r1), slice(None)))
            prob[:, r0:r1] = logits if head else torch.sigmoid(logits)

        starts = range(0, H, rows)
        if cpu:
            per_core(decode, starts)
        else:
            for r0 in starts:
                decode(r0)
        if head:  # the head reads a neighbourhood of decoded logits: it runs once the whole grid is decoded
            prob[:] = torch.sigmoid(self.model.pixel_head.apply_rows(prob, image, prior, self.memory_budget))

    def _logits(self, proj, rows, cols, prior, where):
        """The decoder's logits, plus the mask skip's term (prior[:, where]) for models that have one."""
        logits = self.model.ensemble(proj, rows, cols)
        if self.model.cfg.mask_skip:
            logits += self.model.mask_logit(prior[(slice(None), *where)])
        return logits
