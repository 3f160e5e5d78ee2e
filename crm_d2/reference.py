"""A literal re-statement of the authors' released inference, kept for verification and benchmarks.

It decodes the way the release does (per-query grid_sample of the 256-d features and of the cell centres,
a 262-d MLP input per neighbour, every full-resolution pixel at every scale) and can also run the unused
layer4, so that `tools/benchmark.py` can time the released cost and the tests can check that the fast
engine in `crm_d2.refiner` gives the same probabilities. Nothing user-facing calls it.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from .model import Bottleneck, make_coord, normalize_input

RELEASED_CHUNK = 802816


def make_coord_grid(shape, device=None):
    """(H*W) x 2 pixel-centre coordinates in (y, x) order, as LIIF's make_coord(flatten=True)."""
    ys, xs = make_coord(shape[0], device), make_coord(shape[1], device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(-1, 2)


def query_logits(model, feat, coord, cell):
    """Released decoding of query coordinates (B x Q x 2) against a feature map (B x C x h x w)."""
    B = feat.shape[0]
    hf, wf = feat.shape[-2:]
    feat_coord = make_coord_grid((hf, wf), feat.device).view(hf, wf, 2).permute(2, 0, 1)
    feat_coord = feat_coord.unsqueeze(0).expand(B, 2, hf, wf)
    preds, areas = [], []
    for vy in (-1, 1):
        for vx in (-1, 1):
            c = coord.clone()
            c[:, :, 0] += vy * (1 / hf) + 1e-6
            c[:, :, 1] += vx * (1 / wf) + 1e-6
            c.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = c.flip(-1).unsqueeze(1)
            q_feat = F.grid_sample(feat, grid, mode="nearest", align_corners=False)[:, :, 0].permute(0, 2, 1)
            q_coord = F.grid_sample(feat_coord, grid, mode="nearest", align_corners=False)[:, :, 0].permute(0, 2, 1)
            rel = coord - q_coord
            rel[:, :, 0] *= hf
            rel[:, :, 1] *= wf
            rel_cell = cell.clone()
            rel_cell[:, :, 0] *= hf
            rel_cell[:, :, 1] *= wf
            inp = torch.cat([q_feat, rel, coord, rel_cell], -1)
            preds.append(model.imnet(inp))
            areas.append(torch.abs(rel[:, :, 0] * rel[:, :, 1]) + 1e-9)
    total = torch.stack(areas).sum(0)
    areas = [areas[3], areas[2], areas[1], areas[0]]
    out = 0
    for p, a in zip(preds, areas):
        out = out + p * (a / total).unsqueeze(-1)
    return out[..., 0]


def make_layer4(model):
    """The layer4 that the release computes and discards (random weights: only its cost matters here)."""
    w = model.cfg.width
    inplanes = 16 * w
    down = torch.nn.Sequential(torch.nn.Conv2d(inplanes, 32 * w, 1, bias=False), torch.nn.BatchNorm2d(32 * w))
    blocks = [Bottleneck(inplanes, 8 * w, 1, 1, down)] + [Bottleneck(32 * w, 8 * w, 1, 4) for _ in range(2)]
    return torch.nn.Sequential(*blocks).eval()


@torch.no_grad()
def reference_refine(model, image, mask, scales=(0.125, 0.25, 0.5, 1.0), chunk=RELEASED_CHUNK, layer4=None,
                     timings=None):
    """Released pipeline on one RGB uint8 image and one mask in [0, 1]; returns the HxW float32 probability."""
    device = next(model.parameters()).device
    img = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255
    seg = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).to(device)[None, None]
    x = normalize_input(img, seg)
    x = F.pad(x, (32, 32, 32, 32), mode="reflect")
    im, seg = x[:, :3], x[:, 3:]
    Hp, Wp = seg.shape[-2:]
    coord = make_coord_grid((Hp, Wp), device)[None]
    cell = torch.empty_like(coord)
    cell[..., 0], cell[..., 1] = 2 / Hp, 2 / Wp
    for s in scales:
        size = (round(Hp * s), round(Wp * s))
        t0 = time.perf_counter()
        im_ = F.interpolate(im, size=size, mode="bilinear", align_corners=True)
        seg_ = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        x1, x2, x3 = model.feats(torch.cat((im_, seg_), 1))
        if layer4 is not None:
            layer4(x3)
        feat = model.aspp_(x1, x2, x3)
        t1 = time.perf_counter()
        out = torch.cat([torch.sigmoid(query_logits(model, feat, coord[:, i : i + chunk], cell[:, i : i + chunk]))
                         for i in range(0, Hp * Wp, chunk)], 1).view(1, 1, Hp, Wp)
        if (seg + 1).sum() < 2:
            out.zero_()
        seg = (out - 0.5) * 2
        if timings is not None:
            timings.append({"scale": s, "encoder_s": t1 - t0, "decoder_s": time.perf_counter() - t1})
    return out[0, 0, 32:-32, 32:-32].cpu().numpy()
