import math

import pytest
import torch

from crm_d2.train.losses import CRMLoss, gradient_loss, sobel_magnitude


def row(*values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_sobel_magnitude_by_hand():
    # x = [0, 0, 1] as a 1x3 map. 3x3 average pooling with zero padding (padding counted):
    # pooled = [(0+0)/9, (0+0+1)/9, (0+1)/9] = [0, 1/9, 1/9].
    # Only the middle row of the /4 Sobel-x kernel sees data: gx[j] = (p[j-1] - p[j+1]) / 2 -> [-1/18, -1/18, 1/18];
    # gy = 0 (the rows above and below are padding). Magnitude sqrt(gx^2 + 1e-4).
    mag = sobel_magnitude(row(0, 0, 1))
    expected = math.sqrt(1 / 18**2 + 1e-4)
    assert torch.allclose(mag, torch.full((1, 1, 1, 3), expected), atol=1e-7)
    # A constant-zero map has magnitude sqrt(eps) = 0.01 everywhere.
    assert torch.allclose(sobel_magnitude(torch.zeros(1, 1, 4, 4)), torch.full((1, 1, 4, 4), 0.01))
    # Rotating the input rotates the magnitude (gy is gx's transpose).
    x = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sobel_magnitude(x.transpose(2, 3)), sobel_magnitude(x).transpose(2, 3), atol=1e-6)


def test_gradient_loss_by_hand():
    # |sqrt(1/324 + 1e-4) - sqrt(1e-4)| at each of the 3 pixels.
    expected = math.sqrt(1 / 324 + 1e-4) - 0.01
    assert gradient_loss(row(0, 0, 1), torch.zeros(1, 1, 1, 3)).item() == pytest.approx(expected, abs=1e-7)
    assert gradient_loss(row(0.3, 0.3, 0.9), row(0.3, 0.3, 0.9)).item() == 0.0


def test_crm_loss_by_hand():
    # logits [0, 0, ln 3] -> prob [0.5, 0.5, 0.75]; gt [0, 1, 1].
    logits, gt = row(0.0, 0.0, math.log(3)), row(0.0, 1.0, 1.0)
    total, parts = CRMLoss()(logits, gt)
    bce = (2 * math.log(2) - math.log(0.75)) / 3  # -log(1-0.5), -log(0.5), -log(0.75)
    l1 = (0.5 + 0.5 + 0.25) / 3
    l2 = (0.25 + 0.25 + 0.0625) / 3
    # Gradient term by hand: pooled prob [1/9, 1.75/9, 1.25/9] -> gx [-1.75/18, -0.25/18, 1.75/18];
    # pooled gt [1/9, 2/9, 2/9] -> gx [-2/18, -1/18, 2/18].
    m = lambda g: math.sqrt(g * g + 1e-4)  # noqa: E731
    grad = (2 * abs(m(1.75 / 18) - m(2 / 18)) + abs(m(0.25 / 18) - m(1 / 18))) / 3
    assert parts["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["l1"].item() == pytest.approx(l1, abs=1e-6)
    assert parts["l2"].item() == pytest.approx(l2, abs=1e-6)
    assert parts["grad"].item() == pytest.approx(grad, abs=1e-6)
    assert total.item() == pytest.approx(bce + 0.5 * l1 + 0.5 * l2 + 2.0 * grad, abs=1e-6)
    assert total.item() == pytest.approx(0.904731, abs=1e-5)


def test_bce_uses_binarised_target_and_weights_are_configurable():
    logits = row(0.0, 0.0)
    soft = row(0.4, 0.6)  # BCE sees [0, 1]; L1 sees the soft values
    _, parts = CRMLoss()(logits, soft)
    assert parts["bce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert parts["l1"].item() == pytest.approx(0.1, abs=1e-6)
    only_l2, p = CRMLoss(bce=0, l1=0, l2=1, grad=0)(logits, soft)
    assert only_l2.item() == pytest.approx(p["l2"].item())


def test_loss_gradients_flow_and_shapes_checked():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    gt = torch.zeros(2, 1, 8, 8)
    gt[:, :, 2:6, 2:6] = 1
    total, _ = CRMLoss()(logits, gt)
    total.backward()
    inside = logits.grad[:, :, 3, 3]
    assert (inside < 0).all()  # push logits up where the GT is foreground
    assert (logits.grad[:, :, 0, 0] > 0).all()
    with pytest.raises(ValueError, match="same shape"):
        CRMLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
