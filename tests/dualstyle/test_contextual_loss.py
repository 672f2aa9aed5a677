"""training.dualstyle.losses: the contextual loss (Mechrez et al., 2018) against a float64 per-sample loop
written from the paper's equations, its gradients, and the feature-matching loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.dualstyle import contextual_loss, feature_matching_loss


def _cx_loop(x: np.ndarray, y: np.ndarray, h: float, eps: float = 1e-5) -> float:
    """Per sample n, per x position i and y position j, in plain Python floats."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    ys = y.reshape(n, c, -1)
    mu = ys.transpose(1, 0, 2).reshape(c, -1).mean(axis=1)  # channel mean of y over batch and positions
    losses = []
    for s in range(n):
        px = [xs[s, :, i] - mu for i in range(xs.shape[2])]
        py = [ys[s, :, j] - mu for j in range(ys.shape[2])]
        px = [v / max(math.sqrt(float(v @ v)), 1e-12) for v in px]
        py = [v / max(math.sqrt(float(v @ v)), 1e-12) for v in py]
        d = [[1.0 - float(a @ b) for b in py] for a in px]
        cx = []
        for i in range(len(px)):
            dmin = min(d[i])
            w = [math.exp((1.0 - d[i][j] / (dmin + eps)) / h) for j in range(len(py))]
            total = sum(w)
            cx.append([wj / total for wj in w])
        score = sum(max(cx[i][j] for i in range(len(px))) for j in range(len(py))) / len(py)
        losses.append(-math.log(score + eps))
    return sum(losses) / n


@pytest.mark.parametrize("h", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("shape_x,shape_y", [((2, 5, 3, 4), (2, 5, 3, 4)), ((3, 4, 2, 2), (3, 4, 3, 2))])
def test_matches_the_per_sample_loop(h, shape_x, shape_y):
    g = torch.Generator().manual_seed(int(h * 10) + shape_x[0])
    x = torch.randn(*shape_x, generator=g, dtype=torch.float64)
    y = torch.randn(*shape_y, generator=g, dtype=torch.float64) + 0.3
    got = contextual_loss(x, y, band_width=h).item()
    assert got == pytest.approx(_cx_loop(x.numpy(), y.numpy(), h), rel=1e-10, abs=1e-12)
    got32 = contextual_loss(x.float(), y.float(), band_width=h).item()
    assert got32 == pytest.approx(_cx_loop(x.numpy(), y.numpy(), h), rel=1e-4)


def test_identical_features_are_near_zero_and_shuffled_ones_too():
    """CX is invariant to where features are (non-aligned data): a spatial permutation of y loses nothing."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    perm = torch.randperm(16, generator=g)
    shuffled = y.reshape(2, 8, 16)[:, :, perm].reshape(2, 8, 4, 4)
    same = contextual_loss(y, y).item()
    assert same == pytest.approx(contextual_loss(shuffled, y).item(), rel=1e-12)
    assert same < contextual_loss(torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64), y).item()


def test_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: contextual_loss(a, b, band_width=0.5), (x, y))
    # and the analytic gradient agrees with central differences of the independent loop
    gx, = torch.autograd.grad(contextual_loss(x, y), x)
    xe, ye = x.detach().numpy().copy(), y.detach().numpy()
    for idx in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 0)]:
        step = 1e-6
        xe[idx] += step
        up = _cx_loop(xe, ye, 0.5)
        xe[idx] -= 2 * step
        down = _cx_loop(xe, ye, 0.5)
        xe[idx] += step
        assert gx[idx].item() == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal N and C"):
        contextual_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="band_width"):
        contextual_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), band_width=0.0)


def test_feature_matching_loss():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, 3, generator=g,
                                                                                    dtype=torch.float64)]
    ys = [torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, 3, generator=g,
                                                                                    dtype=torch.float64)]
    expected = 0.0
    for a, b in zip(xs, ys):
        ma, mb = a.numpy().mean(axis=(2, 3)), b.numpy().mean(axis=(2, 3))
        expected += float(((ma - mb) ** 2).mean())
    assert feature_matching_loss(xs, ys).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        feature_matching_loss(xs, ys[:1])
    with pytest.raises(ValueError, match="do not match"):
        feature_matching_loss(xs[:1], [torch.randn(2, 5, 4, 4)])
