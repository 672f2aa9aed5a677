"""training.dualstyle.model: DualStyleGAN against an independent float64 re-implementation of the official
forward (reading the official-layout state dict), the initialisation properties, exact intrinsic-only
limits, per-sample weights, helpers and input validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from training.dualstyle import (DualStyleConfig, DualStyleGAN, colour_only_weights, default_weights,
                                dualstylegan_to_official, official_key_map, preserve_colour_codes,
                                structure_only_weights)
from training.networks import GeneratorConfig

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------
# An independent float64 implementation of the official DualStyleGAN.forward (williamyang1991/DualStyleGAN
# model/dualstylegan.py on top of rosinality's model.py: fused grouped modulated convs, Blur/Upsample FIR,
# NoiseInjection with the stored noises (randomize_noise=False), FusedLeakyReLU, AdaptiveInstanceNorm via
# F.instance_norm, AdaResBlock with its `w == 0` shortcut), written from the description, one sample at a
# time so every sample can have its own interp_weights list, exactly as the official code takes them.


def _flrelu(x, b):
    return F.leaky_relu(x + b.reshape([1, -1] + [1] * (x.ndim - 2)), 0.2) * SQRT2


def _equal_linear(x, weight, bias, lr_mul=1.0, act=False):
    out = x @ (weight * (lr_mul / math.sqrt(weight.shape[1]))).T
    return _flrelu(out, bias * lr_mul) if act else out + bias * lr_mul


def _pixel_norm(x):
    return x * torch.rsqrt((x ** 2).mean(dim=1, keepdim=True) + 1e-8)


def _upfirdn(x, k, up, pad0, pad1):
    n, c, h, w = x.shape
    if up > 1:
        xu = x.new_zeros(n, c, h * up, w * up)
        xu[:, :, ::up, ::up] = x
        x = xu
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    return F.conv2d(x, torch.flip(k, [0, 1]).expand(c, 1, *k.shape), groups=c)


class OfficialDualStyleGAN:
    """Official DualStyleGAN(size, style_dim, n_mlp, channel_multiplier, res_index) on a g_ema state dict."""

    def __init__(self, g_ema: dict[str, torch.Tensor]):
        self.sd = {k: v.detach().double() for k, v in g_ema.items()}
        self.n_mlp = sum(1 for k in self.sd if k.startswith("generator.style.") and k.endswith(".weight"))
        self.n_style = sum(1 for k in self.sd if k.startswith("style.") and k.endswith(".weight"))
        self.n_rgbs = sum(1 for k in self.sd if k.startswith("generator.to_rgbs.") and k.endswith("conv.weight"))
        self.n_latent = 2 * (self.n_rgbs + 2) - 2
        self.res_index = sum(1 for k in self.sd if k.endswith(".norm.style.weight")) - 1

    # rosinality's generator
    def get_latent(self, z):
        x = _pixel_norm(z)
        for i in range(1, self.n_mlp + 1):
            x = _equal_linear(x, self.sd[f"generator.style.{i}.weight"], self.sd[f"generator.style.{i}.bias"],
                              0.01, act=True)
        return x

    def _modconv(self, p, x, s, demodulate, upsample):
        weight = self.sd[f"{p}.weight"]
        _, o, i, k, _ = weight.shape
        n = x.shape[0]
        style = _equal_linear(s, self.sd[f"{p}.modulation.weight"], self.sd[f"{p}.modulation.bias"])
        wk = weight / math.sqrt(i * k * k) * style.view(n, 1, i, 1, 1)
        if demodulate:
            wk = wk * torch.rsqrt(wk.pow(2).sum([2, 3, 4]) + 1e-8).view(n, o, 1, 1, 1)
        xg = x.reshape(1, n * i, *x.shape[2:])
        if upsample:
            out = F.conv_transpose2d(xg, wk.transpose(1, 2).reshape(n * i, o, k, k), stride=2, groups=n)
            return _upfirdn(out.view(n, o, *out.shape[2:]), self.sd[f"{p}.blur.kernel"], 1, 1, 1)
        out = F.conv2d(xg, wk.reshape(n * o, i, k, k), padding=k // 2, groups=n)
        return out.view(n, o, *out.shape[2:])

    def _styled_conv(self, p, x, s, noise_idx, upsample):
        out = self._modconv(f"{p}.conv", x, s, True, upsample)
        out = out + self.sd[f"{p}.noise.weight"] * self.sd[f"generator.noises.noise_{noise_idx}"]
        return _flrelu(out, self.sd[f"{p}.activate.bias"])

    def _to_rgb(self, p, x, s, skip):
        out = self._modconv(f"{p}.conv", x, s, False, False) + self.sd[f"{p}.bias"]
        if skip is not None:
            out = out + _upfirdn(skip, self.sd[f"{p}.upsample.kernel"], 2, 2, 1)
        return out

    # the extrinsic path
    def style(self, w):
        x = _pixel_norm(w)
        for i in range(1, self.n_style + 1):
            x = _equal_linear(x, self.sd[f"style.{i}.weight"], self.sd[f"style.{i}.bias"], 0.01, act=True)
        return x

    def _adain(self, p, x, s):
        gamma, beta = (s @ self.sd[f"{p}.style.weight"].T + self.sd[f"{p}.style.bias"]).chunk(2, 1)
        return gamma[:, :, None, None] * F.instance_norm(x, eps=1e-5) + beta[:, :, None, None]

    def _conv_layer(self, p, x):
        weight = self.sd[f"{p}.0.weight"]
        out = F.conv2d(x, weight / math.sqrt(weight.shape[1] * 9), padding=1)
        return _flrelu(out, self.sd[f"{p}.1.bias"])

    def _adares(self, j, x, s, w):
        if w == 0:
            return x
        out = self._conv_layer(f"res.{j}.conv", self._adain(f"res.{j}.norm", x, s))
        out = self._conv_layer(f"res.{j}.conv2", self._adain(f"res.{j}.norm2", out, s))
        return out * w + x

    def _colour(self, j, s):
        return _equal_linear(s, self.sd[f"res.{j}.weight"], self.sd[f"res.{j}.bias"])

    def forward_one(self, latent, exstyles, interp_weights, use_res=True, fuse_index=18):
        """latent, exstyles [1, n_latent, D] (W+, after truncation); interp_weights a list of floats."""
        res_index, w = self.res_index, interp_weights
        if use_res:
            resstyles = self.style(exstyles[0]).unsqueeze(0)
            adastyles = exstyles
        out = self.sd["generator.input.input"]
        out = self._styled_conv("generator.conv1", out, latent[:, 0], 0, False)
        if use_res and fuse_index > 0:
            out = self._adares(0, out, resstyles[:, 0], w[0])
        skip = self._to_rgb("generator.to_rgb1", out, latent[:, 1], None)
        i = 1
        for b in range(self.n_rgbs):
            c1, c2, rgb = f"generator.convs.{2 * b}", f"generator.convs.{2 * b + 1}", f"generator.to_rgbs.{b}"
            if use_res and fuse_index >= i and i > res_index:
                out = self._styled_conv(c1, out, w[i] * self._colour(i, adastyles[:, i])
                                        + (1 - w[i]) * latent[:, i], 2 * b + 1, True)
            else:
                out = self._styled_conv(c1, out, latent[:, i], 2 * b + 1, True)
            if use_res and fuse_index >= i and i <= res_index:
                out = self._adares(i, out, resstyles[:, i], w[i])
            if use_res and fuse_index >= i + 1 and i > res_index:
                out = self._styled_conv(c2, out, w[i + 1] * self._colour(i + 1, adastyles[:, i + 1])
                                        + (1 - w[i + 1]) * latent[:, i + 1], 2 * b + 2, False)
            else:
                out = self._styled_conv(c2, out, latent[:, i + 1], 2 * b + 2, False)
            if use_res and fuse_index >= i + 1 and i <= res_index:
                out = self._adares(i + 1, out, resstyles[:, i + 1], w[i + 1])
            if use_res and fuse_index >= i + 2 and i >= res_index - 1:
                skip = self._to_rgb(rgb, out, w[i + 2] * self._colour(i + 2, adastyles[:, i + 2])
                                    + (1 - w[i + 2]) * latent[:, i + 2], skip)
            else:
                skip = self._to_rgb(rgb, out, latent[:, i + 2], skip)
            i += 2
        return skip

    def __call__(self, latent, exstyles, weights, use_res=True, fuse_index=18):
        latent, exstyles = latent.double(), exstyles.double()
        outs = [self.forward_one(latent[n: n + 1], exstyles[n: n + 1], [float(v) for v in weights[n]],
                                 use_res, fuse_index) for n in range(latent.shape[0])]
        return torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def _randomize_extrinsic(model: DualStyleGAN, seed: int) -> DualStyleGAN:
    """Make every extrinsic parameter matter: large ModRes residuals, colour transforms far from identity,
    non-zero biases."""
    torch.manual_seed(seed)
    model.init_extrinsic_path(modres_scale=0.5, colour_noise=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.extrinsic_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def make_model(tiny_G):
    def make(res_index: int, seed: int = 0, randomize: bool = True) -> DualStyleGAN:
        torch.manual_seed(seed)
        m = DualStyleGAN.from_generator(copy.deepcopy(tiny_G), res_index=res_index).eval()
        return _randomize_extrinsic(m, seed) if randomize else m
    return make


def _codes(model: DualStyleGAN, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(n, model.num_ws, model.w_dim, generator=g)
    ex = torch.randn(n, model.num_ws, model.w_dim, generator=g)
    return ws, ex


def _weights(n: int, num_ws: int, seed: int) -> torch.Tensor:
    """Per-sample weights with exact 0 and 1 entries mixed in (the official w == 0 shortcut is exercised)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, num_ws, generator=g)
    w[0, ::3] = 0.0
    w[-1, 1::3] = 1.0
    return w


# ----------------------------------------------------------------------------------------------------------
# Against the official forward


@pytest.mark.parametrize("res_index,fuse_index", [(6, 18), (4, 18), (2, 18), (0, 18), (4, 3), (4, 5),
                                                  (2, 0), (0, 1), (6, 6)])
def test_forward_matches_official_float64(make_model, res_index, fuse_index):
    """Random per-sample weights, a distinct latent per layer in both codes: which layer reads which latent,
    ModRes and colour transform, to-RGB latents i+2, fuse_index (incl. the layer-0 `> 0` rule)."""
    model = make_model(res_index)
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    assert ref.res_index == res_index
    ws, ex = _codes(model, 3, seed=res_index + 10 * fuse_index)
    weights = _weights(3, model.num_ws, seed=fuse_index)
    with torch.no_grad():
        ours = model(ws, ex, weights, fuse_index=fuse_index)
        base = model.generator.synthesis(ws)
    expected = ref(ws, ex, weights, fuse_index=fuse_index)
    assert ours.shape == expected.shape == (3, 3, 32, 32)
    if fuse_index > 0:
        assert (expected - base.double()).abs().max() > 0.05  # the extrinsic path changes the image
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=2e-4)


def test_float64_forward_matches_tightly(make_model):
    """The same comparison with our model in float64: agreement to ~1e-10 rules out compensating errors."""
    model = make_model(4).double()
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    ws, ex = _codes(model, 2, seed=5)
    weights = _weights(2, model.num_ws, seed=6).double()
    with torch.no_grad():
        ours = model(ws.double(), ex.double(), weights, impl="ref")
    torch.testing.assert_close(ours, ref(ws, ex, weights), rtol=1e-9, atol=1e-9)


def test_use_res_false_matches_official(make_model):
    model = make_model(4)
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    ws, ex = _codes(model, 2, seed=1)
    with torch.no_grad():
        ours = model(ws, ex, use_res=False)
    torch.testing.assert_close(ours.double(), ref(ws, ex, torch.ones(2, 8), use_res=False), rtol=1e-4, atol=1e-4)


def test_default_weights_are_used_when_none(make_model):
    model = make_model(4)
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    ws, ex = _codes(model, 2, seed=2)
    with torch.no_grad():
        ours = model(ws, ex)
    expected = ref(ws, ex, [default_weights(model.cfg)] * 2)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=2e-4)


def test_mapping_and_truncation_towards_zero_match_official(make_model):
    """z+ mapped layer by layer through the base mapping; truncation is psi * w (truncation_latent=0)."""
    model = make_model(4)
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    g = torch.Generator().manual_seed(3)
    zp = torch.randn(2, model.num_ws, model.z_dim, generator=g)
    with torch.no_grad():
        ws = model.map_intrinsic(zp, psi=0.7)
        ex = model.map_extrinsic(zp)
        psi_t = model.map_intrinsic(zp, psi=torch.tensor([0.7, 0.3]))
    w_ref = torch.stack([ref.get_latent(zp[:, j].double()) for j in range(model.num_ws)], dim=1)
    torch.testing.assert_close(ws.double(), 0.7 * w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ex.double(), w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(psi_t[1].double(), 0.3 * w_ref[1], rtol=1e-5, atol=1e-5)
    # a plain z is the z+ code with that z in every layer
    z = zp[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(model.map_intrinsic(z), model.map_intrinsic(z[:, None].repeat(1, 8, 1)))


def test_stylize_is_the_official_style_transfer_pipeline(make_model):
    """instyle z+ (truncated towards 0), exstyle z+ mapped untruncated, --preserve_color swapping latents
    res_index+1.. of the exstyle z+ code for the instyle ones before mapping."""
    model = make_model(4)
    ref = OfficialDualStyleGAN(dualstylegan_to_official(model))
    g = torch.Generator().manual_seed(4)
    instyle = torch.randn(2, model.num_ws, model.z_dim, generator=g)
    exstyle = torch.randn(1, model.num_ws, model.z_dim, generator=g)
    weights = default_weights(model.cfg)
    for preserve in (False, True):
        with torch.no_grad():
            ours = model.stylize(instyle, exstyle, psi=0.75, weights=weights, preserve_colour=preserve)
        latent = exstyle.repeat(2, 1, 1).double()
        if preserve:
            latent[:, 5:8] = instyle[:, 5:8].double()
        ex_w = torch.stack([ref.get_latent(latent[:, j]) for j in range(8)], dim=1)
        in_w = 0.75 * torch.stack([ref.get_latent(instyle[:, j].double()) for j in range(8)], dim=1)
        torch.testing.assert_close(ours.double(), ref(in_w, ex_w, [weights] * 2), rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------------------
# Exact limits and initialisation


def test_zero_weights_give_exactly_the_base_generator(make_model):
    """weights 0 -> bit-identical to the plain Generator on the same ws (as do use_res=False, fuse_index=-1)."""
    model = make_model(4)
    ws, ex = _codes(model, 3, seed=7)
    with torch.no_grad():
        base = model.generator.synthesis(ws)
        assert torch.equal(model(ws, ex, torch.zeros(8)), base)
        assert torch.equal(model(ws, ex, torch.zeros(3, 8)), base)
        assert torch.equal(model(ws, use_res=False), base)
        assert torch.equal(model(ws, ex, torch.ones(8), fuse_index=-1), base)
        assert not torch.allclose(model(ws, ex, torch.ones(8)), base, atol=1e-3)


def test_identity_init_leaves_the_base_generator_unchanged(make_model):
    """Exact property: with the official init in its zero-noise limit (ModRes conv weights * 0, colour
    transforms exactly the identity) and exstyle_w == ws, the output equals the base generator's within float32
    rounding, |delta| <= 1e-5 (w * ws + (1 - w) * ws is ws up to an ulp), for any per-sample weights; with
    all weights 1 it is bit-identical here (w_dim 64: eye * 8 times the gain 1/8 is exact). With a different
    extrinsic code the colour layers do change the image."""
    model = make_model(4, randomize=False)
    model.init_extrinsic_path(modres_scale=0.0, colour_noise=0.0)
    ws, ex = _codes(model, 3, seed=8)
    weights = _weights(3, 8, seed=9)
    with torch.no_grad():
        base = model.generator.synthesis(ws)
        torch.testing.assert_close(model(ws, ws, weights), base, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ws, ws), base, rtol=0, atol=1e-5)
        assert torch.equal(model(ws, ws, torch.ones(8)), base)
        assert (model(ws, ex, torch.ones(8)) - base).abs().max() > 0.05


def test_official_init_is_close_to_the_base_generator_and_converges(make_model):
    """The official init (ModRes conv weights * 0.01, colour transforms identity + N(0, 0.01) raw noise) is
    not exact: with exstyle == intrinsic and all weights 1 the image moves by a few percent of its std, and
    the deviation shrinks monotonically to 0 (<= 1e-6) as both init scales go to 0."""
    model = make_model(4, randomize=False)
    g = torch.Generator().manual_seed(11)
    ws = model.map_intrinsic(torch.randn(4, model.z_dim, generator=g))
    with torch.no_grad():
        base = model.generator.synthesis(ws)
        devs = []
        for scale in (0.1, 0.01, 0.001, 0.0):
            torch.manual_seed(0)
            model.init_extrinsic_path(modres_scale=scale, colour_noise=scale)
            devs.append((model(ws, ws, torch.ones(8)) - base).abs().mean().item())
    assert devs[0] > devs[1] > devs[2] > devs[3]
    assert devs[1] < 0.05 * base.std().item()  # the official 0.01
    assert devs[3] <= 1e-6


def test_official_init_values(make_model):
    """ModRes convs ~ N(0, 0.01^2) with zero biases, AdaIN bias (gamma 1, beta 0), colour raw weights
    eye * sqrt(w_dim) + N(0, 0.01^2)."""
    torch.manual_seed(0)
    model = DualStyleGAN(DualStyleConfig(generator=GeneratorConfig.tiny(64), res_index=4))
    block = model.modres[3]
    assert 0.008 < block.conv0.weight.std().item() < 0.012 and block.conv1.bias.abs().max() == 0
    c = block.channels
    assert torch.equal(block.norm0.affine.bias[:c], torch.ones(c))
    assert torch.equal(block.norm1.affine.bias[c:], torch.zeros(c))
    t = model.colour_transform[0].weight
    off = t - torch.eye(64) * 8.0
    assert 0.008 < off.std().item() < 0.012
    assert len(model.modres) == 5 and len(model.colour_transform) == 5
    assert [b.channels for b in model.modres] == [64, 64, 64, 64, 64]


def test_per_sample_weights_equal_separate_runs(make_model):
    model = make_model(2)
    ws, ex = _codes(model, 3, seed=12)
    weights = _weights(3, 8, seed=13)
    with torch.no_grad():
        batch = model(ws, ex, weights)
        single = torch.cat([model(ws[i: i + 1], ex[i: i + 1], weights[i]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_exstyle_broadcasts_over_the_batch(make_model):
    model = make_model(4)
    ws, ex = _codes(model, 3, seed=14)
    with torch.no_grad():
        a = model(ws, ex[:1])
        b = model(ws, ex[:1].expand(3, -1, -1))
        c = model(ws, ex[:1, 0])  # a single w for every layer
        d = model(ws, ex[:1, :1].expand(3, 8, -1))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)


def test_gradients_reach_the_extrinsic_path_only_where_weighted(make_model):
    model = make_model(4)
    ws, ex = _codes(model, 2, seed=15)
    weights = torch.ones(8)
    weights[2] = 0.0
    model.zero_grad()
    model(ws, ex, weights).square().mean().backward()
    assert model.modres[2].conv0.weight.grad.abs().max() == 0
    assert model.modres[3].conv0.weight.grad.abs().max() > 0
    assert model.colour_transform[0].weight.grad.abs().max() > 0
    assert model.structure_mapping.fc0.weight.grad.abs().max() > 0
    extrinsic = {id(p) for p in model.extrinsic_parameters()}
    assert extrinsic == {id(p) for n, p in model.named_parameters() if not n.startswith("generator.")}
    assert {id(p) for p in model.res_parameters()} == extrinsic - {id(p) for p in model.structure_mapping.parameters()}
    model.zero_grad()


# ----------------------------------------------------------------------------------------------------------
# Config, helpers, validation


def test_official_config_layout_and_parameter_count():
    """1024 px: 7 ModRes blocks (4..32 px, 512 channels), 11 colour transforms, ~74.2 M parameters."""
    cfg = DualStyleConfig.official()
    assert cfg.num_ws == 18 and list(cfg.structure_indices) == list(range(7))
    with torch.device("meta"):
        model = DualStyleGAN(cfg)
    assert len(model.modres) == 7 and len(model.colour_transform) == 11
    assert sum(p.numel() for p in model.parameters()) == 74_176_268
    table = official_key_map(cfg)
    assert table["res.0.norm.style.weight"][1] == (1024, 512)
    assert table["res.6.conv2.0.weight"][1] == (512, 512, 3, 3)
    assert table["res.7.weight"] == ("colour_transform.0.weight", (512, 512))
    assert table["res.17.bias"] == ("colour_transform.10.bias", (512,))
    assert table["style.2.weight"] == ("structure_mapping.fc1.weight", (512, 512))
    assert default_weights(cfg) == [0.75] * 7 + [1.0] * 11


def test_weight_and_code_helpers():
    cfg = DualStyleConfig.official()
    assert colour_only_weights(cfg) == [0.0] * 7 + [1.0] * 11
    assert structure_only_weights(cfg) == [0.75] * 7 + [0.0] * 11
    assert colour_only_weights(cfg, [0.5] * 18) == [0.0] * 7 + [0.5] * 11
    with pytest.raises(ValueError, match="18 values"):
        colour_only_weights(cfg, [1.0] * 17)
    ex, ins = torch.randn(1, 18, 4), torch.randn(2, 18, 4)
    before = ex.clone()
    out = preserve_colour_codes(ex, ins, cfg)
    assert torch.equal(ex, before)
    assert torch.equal(out[:, :7], ex[:, :7].expand(2, -1, -1)) and torch.equal(out[:, 7:], ins[:, 7:])
    with pytest.raises(ValueError, match="codes of one shape"):
        preserve_colour_codes(ex, torch.randn(2, 17, 4), cfg)


def test_config_round_trip_and_validation(tiny_cfg):
    cfg = DualStyleConfig(generator=tiny_cfg, res_index=2, structure_layers=1)
    assert DualStyleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="even integer"):
        DualStyleConfig(generator=tiny_cfg, res_index=3)
    with pytest.raises(ValueError, match="even integer in 0..6"):
        DualStyleConfig(generator=tiny_cfg, res_index=8)
    with pytest.raises(ValueError, match="structure_layers"):
        DualStyleConfig(generator=tiny_cfg, structure_layers=-1)
    with pytest.raises(ValueError, match="unknown DualStyleConfig fields"):
        DualStyleConfig.from_dict({**cfg.to_dict(), "two_res": True})
    with pytest.raises(ValueError, match="lacks 'generator'"):
        DualStyleConfig.from_dict({"res_index": 2})
    with pytest.raises(ValueError, match="config differs"):
        DualStyleGAN(DualStyleConfig(generator=GeneratorConfig.tiny(64)), generator=DualStyleGAN(cfg).generator)


def test_bad_inputs_are_clear_errors(make_model):
    model = make_model(4, randomize=False)
    ws, ex = _codes(model, 2, seed=16)
    with pytest.raises(ValueError, match=r"ws must have shape \[N, 8, 64\]"):
        model(ws[:, :7], ex)
    with pytest.raises(ValueError, match="exstyle_w must have shape"):
        model(ws, ex[:, :, :3])
    with pytest.raises(ValueError, match="exstyle_w is required"):
        model(ws)
    with pytest.raises(ValueError, match=r"weights must have shape \[8\]"):
        model(ws, ex, [1.0] * 7)
    with pytest.raises(ValueError, match="weights must have shape"):
        model(ws, ex, torch.ones(3, 8))
    with pytest.raises(ValueError, match="intrinsic code must have shape"):
        model.map_intrinsic(torch.randn(2, 7, 64))
    with pytest.raises(ValueError, match="extrinsic code must have shape"):
        model.map_extrinsic(torch.randn(2, 3))
