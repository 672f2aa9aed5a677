"""Ranger (RAdam + Lookahead + gradient centralization) against an independent float64 numpy re-derivation of the
update over a run that crosses RAdam's rectification threshold and two Lookahead synchronisations; its state
survives the encoder trainer's safetensors round trip; bad hyper-parameters are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.inversion.encoder_trainer import load_optimizer_state, optimizer_state
from training.inversion.ranger import Ranger


def _reference(params, grads_fn, steps, lr, alpha=0.5, k=6, threshold=5.0, b1=0.95, b2=0.999, eps=1e-5, wd=0.0):
    """Ranger written from the papers' formulas, float64, all parameters treated alike."""
    p = [x.astype(np.float64).copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    slow = [x.copy() for x in p]
    rho_inf = 2 / (1 - b2) - 1
    for t in range(1, steps + 1):
        grads = grads_fn(p)
        for i, g in enumerate(grads):
            if g.ndim > 1:  # gradient centralization over all but the output dimension
                g = g - g.reshape(g.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (g.ndim - 1))
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
            p[i] = p[i] - wd * lr * p[i]
            if rho > threshold:
                r = math.sqrt((1 - b2**t) * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                p[i] = p[i] - lr * r / (1 - b1**t) * m[i] / (np.sqrt(v[i]) + eps)
            else:
                p[i] = p[i] - lr / (1 - b1**t) * m[i]
            if t % k == 0:
                slow[i] = slow[i] + alpha * (p[i] - slow[i])
                p[i] = slow[i].copy()
    return p


def _problem(seed=0):
    rng = np.random.RandomState(seed)
    A, b = rng.randn(5, 4), rng.randn(5, 3)
    W0, c0 = rng.randn(4, 3), rng.randn(3)

    def grads(p):  # f = ||A W + c - b||^2 summed: dW = 2 A^T r, dc = 2 sum_rows r
        W, c = p
        r = A @ W + c - b
        return [2 * A.T @ r, 2 * r.sum(0)]

    def loss(p):
        return float(((A @ p[0] + p[1] - b) ** 2).sum())
    return A, b, W0, c0, grads, loss


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_ranger_matches_the_reference(wd):
    A, b, W0, c0, grads, loss = _problem()
    W = torch.tensor(W0, dtype=torch.float32, requires_grad=True)
    c = torch.tensor(c0, dtype=torch.float32, requires_grad=True)
    opt = Ranger([W, c], lr=0.05, weight_decay=wd)
    At, bt = torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    steps = 14  # rectification from t = 6 on; Lookahead syncs at 6 and 12
    for _ in range(steps):
        opt.zero_grad()
        ((At @ W + c - bt) ** 2).sum().backward()
        opt.step()
    want = _reference([W0, c0], grads, steps, lr=0.05, wd=wd)
    np.testing.assert_allclose(W.detach().numpy(), want[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(c.detach().numpy(), want[1], rtol=0, atol=2e-5)
    assert opt.state[W]["step"] == steps
    assert loss([W.detach().double().numpy(), c.detach().double().numpy()]) < loss([W0, c0])
    # The gradient itself is left as autograd computed it (centralization works on a copy).
    assert not torch.allclose(W.grad.mean(dim=1), torch.zeros(4))


def test_ranger_state_round_trip_continues_identically():
    A, b, W0, c0, _, _ = _problem(1)
    At, bt = torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)

    def run(opt, W, c, n):
        for _ in range(n):
            opt.zero_grad()
            ((At @ W + c - bt) ** 2).sum().backward()
            opt.step()

    W1, c1 = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (W0, c0))
    o1 = Ranger([W1, c1], lr=0.03)
    run(o1, W1, c1, 10)
    W2, c2 = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (W0, c0))
    o2 = Ranger([W2, c2], lr=0.03)
    run(o2, W2, c2, 4)
    tensors, scalars = optimizer_state(o2, "opt")
    assert set(scalars.values()) == {4}  # the step counters
    W3, c3 = (x.detach().clone().requires_grad_(True) for x in (W2, c2))
    o3 = Ranger([W3, c3], lr=0.03)
    load_optimizer_state(o3, tensors, scalars, "opt")
    run(o3, W3, c3, 6)
    assert torch.equal(W3, W1) and torch.equal(c3, c1)


def test_ranger_skips_parameters_without_gradients_and_checks_arguments():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = Ranger([a, b])
    (a * 2).sum().backward()
    opt.step()
    assert b not in opt.state and torch.equal(b, torch.ones(3)) and not torch.equal(a, torch.ones(3))
    for kw, match in (({"lr": 0}, "lr"), ({"alpha": 2}, "alpha"), ({"k": 0}, "k"), ({"betas": (1.0, 0.9)}, "betas"),
                      ({"eps": 0}, "eps")):
        with pytest.raises(ValueError, match=match):
            Ranger([a], **kw)
