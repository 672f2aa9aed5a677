"""Finetuning building blocks against independent computations: R1, path length, EMA, augmentation, ADA,
Freeze-D."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from training.finetune import (AdaController, AugmentPipe, PathLengthRegularizer, d_logistic_loss, ema_beta,
                               freeze_discriminator, g_nonsaturating_loss, r1_loss, r1_penalty, update_ema)
from training.networks import Discriminator, DiscriminatorConfig, Generator


@pytest.fixture()
def D64(ft_cfg):
    torch.manual_seed(3)
    return Discriminator(DiscriminatorConfig.from_generator(ft_cfg)).double()


def test_logistic_losses():
    real, fake = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [-3.0]])
    assert g_nonsaturating_loss(fake).item() == pytest.approx(-torch.log(torch.sigmoid(fake)).mean().item())
    want = -torch.log(1 - torch.sigmoid(fake)).mean() - torch.log(torch.sigmoid(real)).mean()
    assert d_logistic_loss(real, fake).item() == pytest.approx(want.item(), rel=1e-6)


def test_r1_equals_independent_autograd(D64):
    """gamma/2 * E||grad_x D(x)||^2 against the full Jacobian of sum(D(x)) (minibatch-stddev couples samples)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    gamma, k = 10.0, 16
    jac = torch.autograd.functional.jacobian(lambda t: D64(t).sum(), x)  # [4, 3, 16, 16]
    want = gamma / 2 * jac.square().sum(dim=[1, 2, 3]).mean() * k
    xr = x.clone().requires_grad_(True)
    got = r1_loss(xr, D64(xr), gamma, k)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(r1_penalty(xr, D64(xr)), jac.square().sum(dim=[1, 2, 3]), rtol=1e-10, atol=0)


def test_r1_double_backward_matches_finite_differences(D64):
    """The R1 gradient w.r.t. D's weights (double backward) against central differences in float64."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def loss() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        return r1_loss(xr, D64(xr), 10.0)

    param = D64.b8.conv0.weight
    D64.zero_grad()
    loss().backward()
    idx = (1, 2, 0, 1)
    analytic = param.grad[idx].item()
    eps = 1e-6

    def shifted(delta: float) -> float:
        with torch.no_grad():
            param[idx] += delta
        value = loss().item()
        with torch.no_grad():
            param[idx] -= delta
        return value

    up, down = shifted(eps), shifted(-eps)
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_path_length_matches_per_sample_vjp(ft_cfg):
    torch.manual_seed(2)
    G = Generator(ft_cfg)
    ws = G.map(torch.randn(3, ft_cfg.z_dim)).detach().requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const")
    pl = PathLengthRegularizer(decay=0.01)
    pl.pl_mean.fill_(0.5)
    torch.manual_seed(7)
    penalty, lengths = pl.penalty(img, ws)
    torch.manual_seed(7)
    y = torch.randn_like(img) / math.sqrt(16 * 16)  # the same pl_noise
    want = []
    for i in range(3):
        def synth_one(w: torch.Tensor) -> torch.Tensor:
            return G.synthesis(w[None], noise_mode="const")[0]

        _, g = torch.autograd.functional.vjp(synth_one, ws[i].detach(), y[i])
        want.append(g.square().sum(dim=1).mean().sqrt())
    want = torch.stack(want)
    torch.testing.assert_close(lengths, want, rtol=1e-4, atol=1e-6)
    mean = 0.5 + 0.01 * (want.mean() - 0.5)
    torch.testing.assert_close(pl.pl_mean, mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(penalty, (want - mean).square(), rtol=1e-4, atol=1e-7)
    penalty.mean().backward()  # differentiable w.r.t. G's weights (double backward through the synthesis)
    assert G.synthesis.b8.conv0.weight.grad is not None


@pytest.mark.parametrize("cur_nimg,rampup", [(0, 0.05), (4, 0.05), (1000, 0.05), (10**7, 0.05), (123, None)])
def test_ema_beta_formula(cur_nimg, rampup):
    batch, ema_kimg = 4, 10.0
    ema_nimg = ema_kimg * 1000.0
    if rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    want = 0.5 ** (batch / max(ema_nimg, 1e-8))
    assert ema_beta(batch, ema_kimg, rampup, cur_nimg) == want
    if cur_nimg == 0 and rampup:
        assert want == 0.0  # the first step copies the trained weights


def test_ema_update_matches_float64(ft_cfg):
    torch.manual_seed(4)
    G, G_ema = Generator(ft_cfg), Generator(ft_cfg)
    G.mapping.w_avg.normal_()
    beta = ema_beta(4, 10.0, 0.05, 2000)
    before = {k: v.double().clone() for k, v in G_ema.state_dict().items()}
    update_ema(G_ema, G, beta)
    params = dict(G.named_parameters())
    for k, v in G_ema.state_dict().items():
        src = G.state_dict()[k].double()
        if k in params:
            want = src + beta * (before[k] - src)
            # float32 rounding bound of the lerp: a few ulps of the operands' magnitude.
            bound = 2.0**-22 * (src.abs() + before[k].abs()) + 1e-30
            assert ((v.double() - want).abs() <= bound).all(), k
        else:
            assert torch.equal(v, G.state_dict()[k]), k  # buffers (w_avg, noise, filters) are copied
    G2 = copy.deepcopy(G)
    update_ema(G2, G, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(G2.parameters(), G.parameters()))


def test_augment_identity_at_p0_and_differentiable():
    x = torch.randn(4, 3, 16, 16)
    assert AugmentPipe(0.0)(x) is x
    pipe = AugmentPipe(1.0)
    xd = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(t):
        torch.manual_seed(5)  # the same random transform in every gradcheck evaluation
        return pipe(t)

    assert torch.autograd.gradcheck(f, (xd,), eps=1e-6, atol=1e-5)


def test_augment_transforms():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    # Translation only: each output is the input shifted by an integer (dx, dy) with reflection at the borders.
    out = AugmentPipe(1.0, xflip=False, color=False)(x)
    for i in range(8):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                pad = F.pad(x[i:i + 1], (2, 2, 2, 2), mode="reflect")[0]
                if torch.equal(out[i], pad[:, 2 - dy:18 - dy, 2 - dx:18 - dx]):
                    found = True
        assert found, i
    # Colour on a grey image keeps it grey (saturation acts orthogonally to the grey axis).
    grey = torch.rand(6, 1, 8, 8).expand(6, 3, 8, 8) * 2 - 1
    g = AugmentPipe(1.0, xflip=False, translate=False)(grey)
    torch.testing.assert_close(g[:, 0], g[:, 1])
    torch.testing.assert_close(g[:, 1], g[:, 2])
    # x-flip: every output is the input or its mirror image.
    f = AugmentPipe(1.0, translate=False, color=False)(x)
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2)) for i in range(8))


def test_ada_adjusts_towards_target():
    pipe = AugmentPipe(0.1)
    ada = AdaController(pipe, target=0.6, interval=4, ada_kimg=1.0, batch=2)
    step_size = 2 * 4 / 1000
    for s in range(1, 5):  # D confident on reals (r_t = 1 > 0.6): more augmentation
        ada.accumulate(torch.ones(2, 1))
        ada.step(s)
    assert pipe.p == pytest.approx(0.1 + step_size)
    assert ada.last_rt == 1.0
    for s in range(5, 9):  # r_t = 0 < 0.6: less
        ada.accumulate(torch.tensor([[1.0], [-1.0]]))
        ada.step(s)
    assert pipe.p == pytest.approx(0.1)
    pipe.p = 0.001
    for s in range(9, 13):
        ada.accumulate(-torch.ones(2, 1))
        ada.step(s)
    assert pipe.p == 0.0  # clamped


def test_freeze_d_names(ft_cfg):
    D = Discriminator(DiscriminatorConfig.from_generator(ft_cfg))
    assert D.resolutions == [16, 8]
    assert freeze_discriminator(D, 0) == []
    frozen = freeze_discriminator(D, 1)
    assert {n.split(".")[0] for n in frozen} == {"fromrgb", "b16"}
    assert set(freeze_discriminator(D, 2)) > set(frozen)
    with pytest.raises(ValueError, match="exceeds"):
        freeze_discriminator(D, 3)
