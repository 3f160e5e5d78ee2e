"""The released training loss: BCE-with-logits + L1 + L2 + Sobel-gradient, weights 1 / 0.5 / 0.5 / 2.

BCE sees the binarised GT (gt > 0.5); L1, L2 and the gradient term see the soft GT, so soft boundaries in the
labels are learnt as soft. Everything is computed in float32 even under AMP.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sobel_magnitude", "gradient_loss", "CRMLoss"]

# Sobel kernels divided by 4 (so a unit step has gradient 1), for conv2d: out = sum(w * x) (cross-correlation).
_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0
_SOBEL_Y = _SOBEL_X.t().contiguous()


def sobel_magnitude(x, eps=1e-4):
    """Sobel gradient magnitude of 3x3-average-pooled maps, per channel: sqrt(gx^2 + gy^2 + eps).

    Pooling and Sobel both zero-pad by 1 (the average counts the padding), so the output has the input's size.
    """
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
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
        total = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k] != 0)
        return total, {k: v.detach() for k, v in terms.items()}
