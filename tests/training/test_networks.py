"""training.networks.stylegan2: the generator against an independent float64 rosinality forward pass, plus
seeds, truncation, style mixing, noise modes, batching, the discriminator and config validation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from training.checkpoints import generator_to_rosinality
from training.networks import (Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, mix_styles,
                               rosinality_channels, seed_to_z, seeds_to_z, truncate)

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------
# An independent float64 numpy implementation of rosinality's StyleGAN2 Generator.forward, reading the
# `g_ema` state dict (rosinality/stylegan2-pytorch model.py: PixelNorm, EqualLinear, ModulatedConv2d with the
# fused grouped path, NoiseInjection, FusedLeakyReLU, ToRGB with Upsample, randomize_noise=False).


def _lrelu_sqrt2(x, bias):
    # FusedLeakyReLU: leaky_relu(x + bias, 0.2) * sqrt(2)
    y = x + bias
    return np.where(y >= 0, y, 0.2 * y) * SQRT2


def _fir_np(x, k, up, pad0, pad1):
    """rosinality upfirdn2d_native: zero-insert `up`, pad (pad0, pad1) on both axes, true-convolve with k."""
    n, c, h, w = x.shape
    xu = np.zeros((n, c, h * up, w * up))
    xu[:, :, ::up, ::up] = x
    xp = np.pad(xu, ((0, 0), (0, 0), (pad0, pad1), (pad0, pad1)))
    kf = k[::-1, ::-1]
    kh = k.shape[0]
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kh + 1
    y = np.zeros((n, c, oh, ow))
    for a in range(kh):
        for b in range(kh):
            y += xp[:, :, a: a + oh, b: b + ow] * kf[a, b]
    return y


def _conv_same(x, wk):
    # per-sample cross-correlation, zero padding k // 2; wk [N, O, I, k, k]
    n, i, h, w = x.shape
    k = wk.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    y = np.zeros((n, wk.shape[1], h, w))
    for a in range(k):
        for b in range(k):
            y += np.einsum("nihw,noi->nohw", xp[:, :, a: a + h, b: b + w], wk[:, :, :, a, b], optimize=True)
    return y


def _conv_transpose_s2(x, wk):
    # per-sample transposed conv, stride 2, padding 0: out[n, o, 2h+a, 2w+b] += x[n, i, h, w] wk[n, o, i, a, b]
    n, i, h, w = x.shape
    k = wk.shape[-1]
    out = np.zeros((n, wk.shape[1], 2 * (h - 1) + k, 2 * (w - 1) + k))
    for a in range(k):
        for b in range(k):
            out[:, :, a: a + 2 * h: 2, b: b + 2 * w: 2] += np.einsum("nihw,noi->nohw", x, wk[:, :, :, a, b],
                                                                    optimize=True)
    return out


class RosinalityNumpy:
    """rosinality Generator(size, style_dim, n_mlp, channel_multiplier, blur_kernel=[1,3,3,1], lr_mlp=0.01)."""

    def __init__(self, g_ema: dict[str, torch.Tensor], lr_mlp: float = 0.01):
        self.sd = {k: v.detach().double().numpy() for k, v in g_ema.items()}
        self.lr_mlp = lr_mlp
        self.n_mlp = sum(1 for k in self.sd if k.startswith("style.") and k.endswith(".weight"))
        self.n_rgbs = sum(1 for k in self.sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
        self.log_size = self.n_rgbs + 2
        self.n_latent = self.log_size * 2 - 2
        # make_kernel([1,3,3,1]): outer product normalised to sum 1
        k1 = np.array([1.0, 3.0, 3.0, 1.0])
        self.kernel = np.outer(k1, k1) / np.outer(k1, k1).sum()

    def style(self, z):
        x = z / np.sqrt((z ** 2).mean(axis=1, keepdims=True) + 1e-8)  # PixelNorm
        for i in range(1, self.n_mlp + 1):
            wgt, b = self.sd[f"style.{i}.weight"], self.sd[f"style.{i}.bias"]
            scale = (1 / math.sqrt(wgt.shape[1])) * self.lr_mlp  # EqualLinear.scale
            x = _lrelu_sqrt2(x @ (wgt * scale).T, b * self.lr_mlp)
        return x

    def _modulation(self, prefix, s):
        wgt, b = self.sd[f"{prefix}.weight"], self.sd[f"{prefix}.bias"]  # EqualLinear(style_dim, in, bias_init=1)
        return s @ (wgt * (1 / math.sqrt(wgt.shape[1]))).T + b

    def _modconv(self, prefix, x, s, demodulate, upsample):
        weight = self.sd[f"{prefix}.weight"]  # [1, O, I, k, k]
        _, o, i, k, _ = weight.shape
        style = self._modulation(f"{prefix}.modulation", s)  # [N, I]
        scale = 1 / math.sqrt(i * k * k)
        wk = scale * weight * style[:, None, :, None, None]  # [N, O, I, k, k]
        if demodulate:
            wk = wk / np.sqrt((wk ** 2).sum(axis=(2, 3, 4), keepdims=True) + 1e-8)
        if upsample:
            out = _conv_transpose_s2(x, wk)
            blur = self.sd[f"{prefix}.blur.kernel"]
            np.testing.assert_array_equal(blur, self.kernel * 4)  # Blur(kernel, upsample_factor=2)
            p = (len(self.kernel) - 2) - (k - 1)
            return _fir_np(out, self.kernel * 4, 1, (p + 1) // 2 + 1, p // 2 + 1)
        return _conv_same(x, wk)

    def _styled_conv(self, prefix, x, s, noise_idx, upsample):
        out = self._modconv(f"{prefix}.conv", x, s, demodulate=True, upsample=upsample)
        out = out + self.sd[f"{prefix}.noise.weight"][0] * self.sd[f"noises.noise_{noise_idx}"]  # NoiseInjection
        return _lrelu_sqrt2(out, self.sd[f"{prefix}.activate.bias"][None, :, None, None])

    def _to_rgb(self, prefix, x, s, skip):
        out = self._modconv(f"{prefix}.conv", x, s, demodulate=False, upsample=False)
        out = out + self.sd[f"{prefix}.bias"]
        if skip is not None:
            # Upsample(blur_kernel, factor=2): kernel * 4, p = 4 - 2, pad ((p + 1) // 2 + 1, p // 2)
            np.testing.assert_array_equal(self.sd[f"{prefix}.upsample.kernel"], self.kernel * 4)
            out = out + _fir_np(skip, self.kernel * 4, 2, 2, 1)
        return out

    def synthesis(self, latent):
        n = latent.shape[0]
        assert latent.shape[1] == self.n_latent
        out = np.repeat(self.sd["input.input"], n, axis=0)  # ConstantInput
        out = self._styled_conv("conv1", out, latent[:, 0], 0, upsample=False)
        skip = self._to_rgb("to_rgb1", out, latent[:, 1], None)
        i = 1
        for j in range(self.n_rgbs):
            out = self._styled_conv(f"convs.{2 * j}", out, latent[:, i], 2 * j + 1, upsample=True)
            out = self._styled_conv(f"convs.{2 * j + 1}", out, latent[:, i + 1], 2 * j + 2, upsample=False)
            skip = self._to_rgb(f"to_rgbs.{j}", out, latent[:, i + 2], skip)
            i += 2
        return skip

    def __call__(self, z, latent_avg, psi=1.0):
        w = self.style(z)
        w = latent_avg + psi * (w - latent_avg)  # truncation
        return self.synthesis(np.repeat(w[:, None], self.n_latent, axis=1))


# ----------------------------------------------------------------------------------------------------------
# Generator vs the independent reference


@pytest.fixture(scope="module")
def ros_ref(tiny_G):
    return RosinalityNumpy(generator_to_rosinality(tiny_G))


@pytest.mark.parametrize("psi", [1.0, 0.6])
def test_generator_matches_independent_rosinality_forward(tiny_G, ros_ref, psi):
    z = seeds_to_z([0, 1], tiny_G.z_dim)
    with torch.no_grad():
        ours = tiny_G(z, psi=psi, noise_mode="const").numpy()
    ref = ros_ref(z.double().numpy(), tiny_G.w_avg.double().numpy(), psi)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert np.abs(ref).max() > 0.1  # a non-trivial image
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_synthesis_matches_reference_for_distinct_per_layer_latents(tiny_G, ros_ref):
    """Random W+ (a different latent per layer) checks which layer reads which latent."""
    ws = torch.randn(2, tiny_G.num_ws, tiny_G.w_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = tiny_G.synthesis(ws, noise_mode="const").numpy()
    ref = ros_ref.synthesis(ws.double().numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_mapping_matches_reference(tiny_G, ros_ref):
    z = seeds_to_z([4, 5, 6], tiny_G.z_dim)
    with torch.no_grad():
        w = tiny_G.mapping(z).numpy()
    np.testing.assert_allclose(w, ros_ref.style(z.double().numpy()), rtol=1e-5, atol=1e-5)


def test_every_latent_is_used(tiny_G):
    ws = torch.randn(1, tiny_G.num_ws, tiny_G.w_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_G.synthesis(ws)
        for j in range(tiny_G.num_ws):
            ws2 = ws.clone()
            ws2[:, j] += 1.0
            assert not torch.allclose(tiny_G.synthesis(ws2), base, atol=1e-6), f"latent {j} has no effect"


# ----------------------------------------------------------------------------------------------------------
# Seeds, truncation, mixing, W / W+


def test_seed_to_z_is_numpy_randomstate():
    for seed in (0, 1, 42, 2**32 - 1):
        want = np.random.RandomState(seed).randn(1, 64)
        got = seed_to_z(seed, 64)
        assert got.shape == (1, 64) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))
    z = seeds_to_z([3, 9, 3], 16)
    assert z.dtype == torch.float32 and tuple(z.shape) == (3, 16)
    np.testing.assert_array_equal(z[1].numpy(), np.random.RandomState(9).randn(16).astype(np.float32))
    assert torch.equal(z[0], z[2])


def test_same_seed_same_image(tiny_G):
    with torch.no_grad():
        a = tiny_G(seeds_to_z([7], tiny_G.z_dim))
        b = tiny_G(seeds_to_z([7], tiny_G.z_dim))
        c = tiny_G(seeds_to_z([8], tiny_G.z_dim))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_psi_zero_gives_the_w_avg_image(tiny_G):
    z = seeds_to_z([0, 11], tiny_G.z_dim)
    with torch.no_grad():
        img = tiny_G(z, psi=0.0)
        avg = tiny_G.synthesis(tiny_G.w_avg[None, None].repeat(1, tiny_G.num_ws, 1))
    assert torch.equal(tiny_G.map(z, psi=0.0), tiny_G.w_avg.expand(2, tiny_G.num_ws, -1))
    # batch 2 vs batch 1 convolutions may differ in the last bits
    torch.testing.assert_close(img[0:1], avg, rtol=0, atol=1e-5)
    torch.testing.assert_close(img[1:2], avg, rtol=0, atol=1e-5)


def test_truncation_formula_and_cutoff(tiny_G):
    z = seeds_to_z([5, 6], tiny_G.z_dim)
    with torch.no_grad():
        w = tiny_G.mapping(z).double().numpy()
        ws = tiny_G.map(z, psi=0.5, cutoff=3).double().numpy()
    w_avg = tiny_G.w_avg.double().numpy()
    assert ws.shape == (2, tiny_G.num_ws, tiny_G.w_dim)
    truncated = w_avg + 0.5 * (w - w_avg)
    for j in range(tiny_G.num_ws):
        np.testing.assert_allclose(ws[:, j], truncated if j < 3 else w, rtol=1e-6, atol=1e-6)
    # per-sample psi
    ws_t = truncate(torch.from_numpy(w)[:, None].repeat(1, 4, 1), torch.from_numpy(w_avg),
                    torch.tensor([0.0, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(ws_t[0].numpy(), np.broadcast_to(w_avg, (4, w.shape[1])))
    np.testing.assert_allclose(ws_t[1].numpy(), np.broadcast_to(w[1], (4, w.shape[1])))


def test_cutoff_only_changes_the_coarse_latents_image(tiny_G):
    z = seeds_to_z([2], tiny_G.z_dim)
    with torch.no_grad():
        full = tiny_G.map(z)
        cut = tiny_G.map(z, psi=0.0, cutoff=2)
    assert torch.equal(cut[:, 2:], full[:, 2:])
    assert torch.allclose(cut[:, :2], tiny_G.w_avg.expand(1, 2, -1))


def test_mix_styles_layout():
    a = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    b = -a - 1
    for k in range(7):
        m = mix_styles(a, b, k).numpy()
        want = np.concatenate([a.numpy()[:, :k], b.numpy()[:, k:]], axis=1)
        np.testing.assert_array_equal(m, want)
    with pytest.raises(ValueError, match="crossover"):
        mix_styles(a, b, 7)
    with pytest.raises(ValueError, match="crossover"):
        mix_styles(a, b, -1)
    with pytest.raises(ValueError, match="equal shapes"):
        mix_styles(a, b[:, :5], 2)


@pytest.mark.parametrize("res,expected", [(4, 2), (8, 4), (16, 6), (32, 8), (256, 14), (1024, 18)])
def test_num_ws(res, expected):
    cfg = GeneratorConfig.rosinality(res, 2)
    assert cfg.num_ws == expected == 2 * int(math.log2(res)) - 2


@pytest.mark.parametrize("res", [4, 8, 16])
def test_small_generators_build_and_consume_num_ws(res):
    torch.manual_seed(0)
    G = Generator(GeneratorConfig.tiny(res, w_dim=16, max_channels=16, min_channels=8)).eval()
    assert G.num_ws == 2 * int(math.log2(res)) - 2
    with torch.no_grad():
        img = G(torch.randn(2, 16))
        assert tuple(img.shape) == (2, 3, res, res)
        with pytest.raises(ValueError, match="ws must have shape"):
            G.synthesis(torch.randn(2, G.num_ws + 1, 16))


def test_w_and_w_plus_inputs_are_equivalent(tiny_G):
    z = seeds_to_z([1, 2], tiny_G.z_dim)
    with torch.no_grad():
        w = tiny_G.mapping(z)
        ws = w[:, None].repeat(1, tiny_G.num_ws, 1)
        assert torch.equal(tiny_G.broadcast(w), ws)
        assert torch.equal(tiny_G.broadcast(ws), ws)  # W+ passes through
        a = tiny_G.synthesis(tiny_G.broadcast(w))
        b = tiny_G.synthesis(ws)
        c = tiny_G(z)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------
# Noise modes and batching


def test_noise_modes(tiny_G):
    z = seeds_to_z([3], tiny_G.z_dim)
    with torch.no_grad():
        c1 = tiny_G(z, noise_mode="const")
        c2 = tiny_G(z, noise_mode="const")
        torch.manual_seed(1)
        r1 = tiny_G(z, noise_mode="random")
        r2 = tiny_G(z, noise_mode="random")
        torch.manual_seed(1)
        r1_again = tiny_G(z, noise_mode="random")
        none = tiny_G(z, noise_mode="none")
        silent = copy.deepcopy(tiny_G)
        for name, p in silent.named_parameters():
            if name.endswith("noise_strength"):
                p.zero_()
        zero_strength = silent(z, noise_mode="const")
        zero_strength_random = silent(z, noise_mode="random")
    assert torch.equal(c1, c2)
    assert not torch.allclose(r1, r2, atol=1e-4)
    assert not torch.allclose(r1, c1, atol=1e-4)
    assert torch.equal(r1, r1_again)  # random noise comes from the torch RNG
    assert not torch.allclose(none, c1, atol=1e-4)
    assert torch.equal(none, zero_strength)
    assert torch.equal(none, zero_strength_random)
    with pytest.raises(ValueError, match="noise_mode"):
        tiny_G(z, noise_mode="fixed")


def test_batch_independence(tiny_G):
    z = seeds_to_z([0, 1, 2, 3, 4], tiny_G.z_dim)
    with torch.no_grad():
        batch = tiny_G(z, psi=0.7)
        for i in range(5):
            alone = tiny_G(z[i: i + 1], psi=0.7)
            torch.testing.assert_close(batch[i: i + 1], alone, rtol=0, atol=1e-5)


def test_mapping_rejects_bad_z(tiny_G):
    with pytest.raises(ValueError, match="z must have shape"):
        tiny_G.mapping(torch.randn(2, tiny_G.z_dim + 1))
    with pytest.raises(ValueError, match="z must have shape"):
        tiny_G.mapping(torch.randn(tiny_G.z_dim))


def test_w_avg_tracking_is_an_ema(tiny_cfg):
    G = Generator(tiny_cfg)
    before = G.w_avg.clone()
    z = torch.randn(4, tiny_cfg.z_dim)
    w = G.mapping(z, update_w_avg=True).detach()
    beta = tiny_cfg.w_avg_beta
    torch.testing.assert_close(G.w_avg, beta * before + (1 - beta) * w.mean(0), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Discriminator


def _mbstd_np(x, group, f=1, eps=1e-8):
    """NVlabs / rosinality minibatch stddev: sample n is in group column n % (N / G); std over the group
    (biased), + eps under the sqrt, averaged over channels and pixels, one value per (column, f)."""
    n, c, h, w = x.shape
    m = n // group
    out = np.zeros((n, f, h, w))
    for col in range(m):
        members = x[[g * m + col for g in range(group)]]  # [G, C, H, W]
        std = np.sqrt(members.var(axis=0) + eps)  # [C, H, W]
        per_f = std.reshape(f, c // f, h, w).mean(axis=(1, 2, 3))  # [F]
        for g in range(group):
            out[g * m + col] = per_f[:, None, None]
    return out


@pytest.fixture(scope="module")
def tiny_D(tiny_cfg):
    torch.manual_seed(5)
    D = Discriminator(DiscriminatorConfig.from_generator(tiny_cfg)).eval()
    with torch.no_grad():
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return D.requires_grad_(False)


@pytest.mark.parametrize("n,group", [(8, 4), (4, 4), (2, 2), (1, 1), (6, 3)])
def test_minibatch_stddev_matches_numpy(tiny_D, n, group):
    x = torch.randn(n, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = tiny_D.minibatch_stddev(x)
    assert tuple(y.shape) == (n, 7, 4, 4)
    assert torch.equal(y[:, :6], x)
    np.testing.assert_allclose(y[:, 6:].numpy(), _mbstd_np(x.numpy(), group), rtol=1e-12, atol=1e-12)


def test_discriminator_output_shape_and_batch_mixing(tiny_D):
    img = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_D(img)
        assert tuple(out.shape) == (4, 1) and torch.isfinite(out).all()
        # minibatch stddev couples the samples of a group: changing sample 3 changes sample 0's logit
        img2 = img.clone()
        img2[3] *= 3.0
        out2 = tiny_D(img2)
    assert not torch.allclose(out[0], out2[0])
    with pytest.raises(ValueError, match="D expects"):
        tiny_D(torch.randn(2, 3, 16, 16))


def test_discriminator_backward_through_r1(tiny_D):
    """R1 needs d(D(x))/dx and its gradient w.r.t. D's weights (double backward)."""
    D = copy.deepcopy(tiny_D).requires_grad_(True)
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(D(img).sum(), img, create_graph=True)
    g.square().sum().backward()
    # every weight gets a gradient (the final bias cannot influence dD/dx, so it has none)
    for name, p in D.named_parameters():
        if name != "out.bias":
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if name.endswith("weight"):
                assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------------------
# Configs


def test_rosinality_channel_table():
    assert GeneratorConfig.rosinality(1024, 2).channels == (512, 512, 512, 512, 512, 256, 128, 64, 32)
    assert rosinality_channels(1024, 1) == (512, 512, 512, 512, 256, 128, 64, 32, 16)
    assert GeneratorConfig.rosinality(256, 2).channels == (512, 512, 512, 512, 512, 256, 128)
    cfg = GeneratorConfig.rosinality(1024, 2)
    # NVlabs: min(32768 // res, 512)
    assert cfg.channels == tuple(min(32768 // (4 * 2**i), 512) for i in range(9))
    assert (cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_mul) == (512, 512, 8, 0.01)
    assert GeneratorConfig() == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(resolution=48, channels=(8,) * 4), "power of two"),
    (dict(resolution=2, channels=(8,)), "power of two"),
    (dict(resolution=0, channels=()), "power of two"),
    (dict(resolution=32, channels=(8, 8, 8)), "channels must list 4"),
    (dict(resolution=32, channels=(8,) * 5), "channels must list 4"),
    (dict(resolution=16, channels=(8, 0, 8)), "positive"),
    (dict(resolution=16, channels=(8, 8, 8), mapping_layers=0), "positive"),
    (dict(resolution=16, channels=(8, 8, 8), z_dim=0), "positive"),
])
def test_generator_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeneratorConfig(**kwargs)


def test_generator_config_dict_round_trip(tiny_cfg):
    for cfg in (tiny_cfg, GeneratorConfig.rosinality(1024, 2), GeneratorConfig.tiny(16, conv_clamp=256.0)):
        d = cfg.to_dict()
        assert isinstance(d["channels"], list)
        back = GeneratorConfig.from_dict(json.loads(json.dumps(d)))
        assert back == cfg
        assert back.to_dict() == d
    with pytest.raises(ValueError, match="unknown GeneratorConfig fields"):
        GeneratorConfig.from_dict({**tiny_cfg.to_dict(), "architecture": "resnet"})


def test_generator_config_is_frozen(tiny_cfg):
    with pytest.raises(Exception):
        tiny_cfg.resolution = 64  # type: ignore[misc]


def test_discriminator_config_round_trip(tiny_cfg):
    dc = DiscriminatorConfig.from_generator(tiny_cfg)
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(dc.to_dict()))) == dc
    with pytest.raises(ValueError, match="channels"):
        DiscriminatorConfig(resolution=32, channels=(8, 8))
