"""The released training loss: BCE-with-logits + L1 + L2 + Sobel-gradient, weights 1 / 0.5 / 0.5 / 2.

BCE sees the binarised GT (gt > 0.5); L1, L2 and the gradient term see the soft GT, so soft boundaries in the
labels are learnt as soft. Everything is computed in float32 even under AMP.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sobel_magnitude", "gradient_loss", "CRMLoss", "draw_sample", "boundary_band", "GRAD_CONTEXT"]

GRAD_CONTEXT = 2  # pixels of context one Sobel magnitude reads (3x3 average pool, then 3x3 Sobel)

# Sobel kernels divided by 4 (so a unit step has gradient 1), for conv2d: out = sum(w * x) (cross-correlation).
_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0
_SOBEL_Y = _SOBEL_X.t().contiguous()


def sobel_magnitude(x, eps=1e-4, inside=None):
    """Sobel gradient magnitude of 3x3-average-pooled maps, per channel: sqrt(gx^2 + gy^2 + eps).

    Pooling and Sobel both zero-pad by 1 (the average counts the padding), so the output has the input's size.
    inside: for a region cut from a larger map and zero-padded, 1 where the region lies in the map (the
    pooled map is zero outside it, as it is beyond the edge of the whole map).
    """
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
    if inside is not None:
        x = x * inside
    kernels = torch.stack([_SOBEL_X, _SOBEL_Y])[:, None].to(device=x.device, dtype=x.dtype)
    g = F.conv2d(x, kernels, padding=1)
    mag = torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + eps)
    return mag.reshape(b, c, h, w)


def gradient_loss(prob, gt, eps=1e-4):
    """L1 between the Sobel magnitudes of prediction and GT: penalises misplaced or blurred boundaries."""
    return F.l1_loss(sobel_magnitude(prob, eps), sobel_magnitude(gt, eps))


class CRMLoss(nn.Module):
    """Weighted sum of the four released terms. `forward(logits, gt)` -> (total, {name: detached value})."""

    def __init__(self, bce=1.0, l1=0.5, l2=0.5, grad=2.0, eps=1e-4):
        super().__init__()
        self.weights = {"bce": float(bce), "l1": float(l1), "l2": float(l2), "grad": float(grad)}
        self.eps = eps

    def forward(self, logits, gt):
        if logits.shape != gt.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and gt {tuple(gt.shape)} must have the same shape")
        logits = logits.float()
        gt = gt.float()
        prob = torch.sigmoid(logits)
        terms = {
            "bce": F.binary_cross_entropy_with_logits(logits, (gt > 0.5).float()),
            "l1": F.l1_loss(prob, gt),
            "l2": F.mse_loss(prob, gt),
            "grad": gradient_loss(prob, gt, self.eps),
        }
        return self._total(terms)

    def sampled(self, patch_logits, point_logits, gt, sample):
        """The same loss, estimated from a `QuerySample` (see `draw_sample`): its expectation over the draw
        equals `forward` on the whole crop (not for boundary points drawn with reweight=False: an emphasis).
        The pointwise terms average the points (weighted by `sample.weights` when they were not drawn
        uniformly); the gradient term is the exact per-pixel term of one random tile of a partition of the crop, computed with its
        Sobel context (zero outside the crop, as the dense loss pads)."""
        gt = gt.float()
        point_logits = point_logits.float()
        prob_pts = torch.sigmoid(point_logits)
        gt_pts = sample.take(gt)
        w = sample.weights
        mean = torch.mean if w is None else (lambda v: (v * w).mean())
        prob, inside = _with_context(torch.sigmoid(patch_logits.float()), sample)
        gt_ctx, _ = _with_context(sample.crop(gt), sample)
        c = GRAD_CONTEXT
        core = (slice(None), slice(None), slice(c, -c), slice(c, -c))
        terms = {
            "bce": mean(F.binary_cross_entropy_with_logits(point_logits, (gt_pts > 0.5).float(), reduction="none")),
            "l1": mean((prob_pts - gt_pts).abs()),
            "l2": mean((prob_pts - gt_pts) ** 2),
            "grad": F.l1_loss(sobel_magnitude(prob, self.eps, inside)[core],
                              sobel_magnitude(gt_ctx, self.eps, inside)[core]),
        }
        return self._total(terms)

    def _total(self, terms):
        total = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k] != 0)
        return total, {k: v.detach() for k, v in terms.items()}


def _with_context(region, sample):
    """Zero-pad a decoded region to its tile plus GRAD_CONTEXT on every side (where the crop's edge clipped
    it); returns it and the 1 x 1 x h x w map of where it lies inside the crop."""
    c = GRAD_CONTEXT
    (y0, y1), (x0, x1) = sample.patch
    (ty0, ty1), (tx0, tx1) = sample.tile
    pad = (c - (tx0 - x0), c - (x1 - tx1), c - (ty0 - y0), c - (y1 - ty1))
    inside = F.pad(region.new_ones(1, 1, *region.shape[-2:]), pad)
    return F.pad(region, pad), inside


def boundary_band(gt, coarse, radius):
    """B x H x W bool: pixels within `radius` px of the GT's boundary, or where the coarse mask is wrong (both
    binarised at 0.5): where a refiner's errors are."""
    g = (gt > 0.5).float()
    k = 2 * radius + 1
    near_edge = F.max_pool2d(g, k, 1, radius) != -F.max_pool2d(-g, k, 1, radius)
    return (near_edge | ((coarse > 0.5) != (g > 0.5)))[:, 0]


def draw_sample(batch, size, tile, points, generator=None, device=None, band=None, boundary=0.0, reweight=True):
    """Which pixels of a size=(H, W) crop a training step decodes: one tile of the crop's partition into
    tile x tile squares (uniformly chosen; decoded with GRAD_CONTEXT px around it) and `points` random pixels
    per sample (with replacement).

    The points are uniform, or with `band` (B x H x W bool, see `boundary_band`) and boundary = s > 0, drawn
    from the mixture (1 - s) uniform + s uniform-over-the-band: more of them where the errors are. reweight=True
    attaches importance weights (uniform density / mixture density), so the loss stays the dense loss in
    expectation with less variance at the boundary; False keeps the emphasis (PointRend's choice).
    Returns a crm_d2.model.QuerySample."""
    from crm_d2.model import QuerySample

    H, W = size
    if H % tile or W % tile:
        raise ValueError(f"sampling.tile {tile} must divide the crop size {H}x{W}")
    k = torch.randint(0, (H // tile) * (W // tile), (1,), generator=generator).item()
    ty0, tx0 = (k // (W // tile)) * tile, (k % (W // tile)) * tile
    c = GRAD_CONTEXT
    patch = ((max(0, ty0 - c), min(H, ty0 + tile + c)), (max(0, tx0 - c), min(W, tx0 + tile + c)))
    weights = None
    if band is None or boundary <= 0:
        idx = torch.randint(0, H * W, (batch, points), generator=generator).to(device)
    else:
        # on the band's device (the GPU in training); a CPU generator (tests) draws on the CPU
        band = band.reshape(batch, H * W).float()
        band = band.cpu() if generator is not None else band
        area = band.sum(1, keepdim=True)
        # Samples whose band is empty fall back to uniform.
        density = torch.where(area > 0, (1 - boundary) / (H * W) + boundary * band / area.clamp(min=1),
                              torch.full_like(band, 1.0 / (H * W)))
        idx = torch.multinomial(density, points, replacement=True, generator=generator)
        if reweight:
            weights = (1.0 / (H * W) / torch.gather(density, 1, idx)).to(device)
        idx = idx.to(device)
    return QuerySample(patch, idx // W, idx % W, tile=((ty0, ty0 + tile), (tx0, tx0 + tile)), weights=weights)
