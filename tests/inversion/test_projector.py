"""The optimisation projector: recovers a generated image's latent on a tiny generator; schedule and noise penalty
against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.inversion.projector import (ProjectorConfig, apply_noise, learning_rate, noise_regularization,
                                          project)


def _mse(img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((img - target) ** 2).flatten(1).mean(1)


def test_learning_rate_schedule():
    cfg = ProjectorConfig(lr=0.1, lr_rampup=0.05, lr_rampdown=0.25)
    assert learning_rate(cfg, 0.0) == 0.0
    assert learning_rate(cfg, 0.025) == pytest.approx(0.05)          # half-way up the linear warm-up
    assert learning_rate(cfg, 0.5) == pytest.approx(0.1)             # plateau
    assert learning_rate(cfg, 0.875) == pytest.approx(0.05)          # half-way down the cosine (0.5 - 0.5 cos(pi/2))
    assert learning_rate(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_noise_regularization_against_a_loop():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((16, 16)), rng.standard_normal((8, 8))]
    expected = 0.0
    for m in maps:
        x = m.copy()
        while True:
            h, w = x.shape
            sx = sum(x[i, j] * x[i, (j - 1) % w] for i in range(h) for j in range(w)) / (h * w)
            sy = sum(x[i, j] * x[(i - 1) % h, j] for i in range(h) for j in range(w)) / (h * w)
            expected += sx ** 2 + sy ** 2
            if w <= 8:
                break
            x = x.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    got = noise_regularization([torch.tensor(m) for m in maps])
    assert float(got) == pytest.approx(expected, rel=1e-10)
    smooth = torch.ones(16, 16)
    assert float(noise_regularization([smooth])) > 100 * float(noise_regularization([torch.randn(16, 16)]))


@pytest.fixture(scope="module")
def G_real_avg(tiny_G):
    """tiny_G with w_avg set to the true mean of its mapping outputs (what a trained checkpoint stores)."""
    import copy
    G = copy.deepcopy(tiny_G)
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(10_000, G.z_dim, generator=torch.Generator().manual_seed(1)))
                              .mean(0))
    return G


@pytest.mark.parametrize("space", ["w", "w+"])
def test_projector_reconstruction_error_falls_from_w_avg(G_real_avg, space):
    G = G_real_avg
    torch.manual_seed(3)
    ws_true = G.mapping(torch.randn(1, G.z_dim)).unsqueeze(1).repeat(1, G.num_ws, 1)
    with torch.no_grad():
        target = G.synthesis(ws_true)
        start_err = float(_mse(G.synthesis(G.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1)), target))
    res = project(G, target, _mse, ProjectorConfig(space=space, steps=200, optimize_noise=False, w_avg_samples=2000))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.1 * losses[0]
    assert float(_mse(res.img, target)) < 0.1 * start_err
    assert res.ws.shape == (1, G.num_ws, G.w_dim) and res.noise == {}
    if space == "w":
        assert torch.equal(res.ws[:, 0], res.ws[:, -1])  # one w broadcast to every layer


@pytest.mark.parametrize("seed", [3, 5])
def test_projector_recovers_the_true_w(G_real_avg, seed):
    """From a start near the truth (as an encoder gives), W-space projection converges onto the generating w.
    (A random tiny generator's loss landscape is too non-convex to expect this from w_avg.)"""
    G = G_real_avg
    torch.manual_seed(seed)
    w_true = G.mapping(torch.randn(1, G.z_dim))
    with torch.no_grad():
        target = G.synthesis(w_true.unsqueeze(1).repeat(1, G.num_ws, 1))
    init = w_true + 0.5 * torch.randn(1, G.w_dim)
    d0 = float((init - w_true).norm())
    cfg = ProjectorConfig(space="w", steps=300, lr=0.03, noise_start=0.0, optimize_noise=False, w_avg_samples=1000)
    res = project(G, target, _mse, cfg, init_ws=init)
    d1 = float((res.ws[:, 0] - w_true).norm())
    assert d1 < 0.35 * d0, (d0, d1)


def test_projector_noise_optimisation_and_reapply(tiny_G):
    torch.manual_seed(4)
    ws = tiny_G.mapping(torch.randn(1, tiny_G.z_dim)).unsqueeze(1).repeat(1, tiny_G.num_ws, 1)
    with torch.no_grad():
        target = tiny_G.synthesis(ws)
    snaps = []
    cfg = ProjectorConfig(steps=40, w_avg_samples=1000)
    res = project(tiny_G, target, _mse, cfg, snapshot_every=10, progress=lambda s, rec: snaps.append(s))
    assert snaps == list(range(40))
    assert [s for s, _ in res.snapshots] == [0, 10, 20, 30, 39]
    assert res.noise and all(math.isfinite(float(v.std())) for v in res.noise.values())
    # Noise maps stay normalised white-ish noise.
    for v in res.noise.values():
        assert abs(float(v.mean())) < 1e-4 and float(v.std()) == pytest.approx(1.0, abs=1e-3)
    # The returned image is exactly what the generator renders with the projected noise.
    G2 = apply_noise(tiny_G, res.noise)
    with torch.no_grad():
        again = G2.synthesis(res.ws)
    torch.testing.assert_close(again, res.img, rtol=0, atol=1e-6)
    # The original generator is untouched.
    assert not any(b.requires_grad for b in tiny_G.buffers())


def test_projector_init_and_bad_inputs(tiny_G):
    target = torch.zeros(1, 3, tiny_G.resolution, tiny_G.resolution)
    res = project(tiny_G, target, _mse, ProjectorConfig(steps=0, w_avg_samples=100),
                  init_ws=tiny_G.w_avg.reshape(1, -1) + 1.0)
    torch.testing.assert_close(res.ws[0, 0], tiny_G.w_avg + 1.0)
    with pytest.raises(ValueError, match="target must be"):
        project(tiny_G, torch.zeros(1, 3, 16, 16), _mse, ProjectorConfig(steps=1))
    with pytest.raises(ValueError, match="NaN"):
        project(tiny_G, target * float("nan"), _mse, ProjectorConfig(steps=1))
    with pytest.raises(ValueError, match="init_ws"):
        project(tiny_G, target, _mse, ProjectorConfig(steps=1, w_avg_samples=10), init_ws=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="latent space"):
        ProjectorConfig(space="z")
    with pytest.raises(ValueError, match="steps"):
        ProjectorConfig(steps=-1)
