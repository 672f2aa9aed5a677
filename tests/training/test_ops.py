"""training.ops (upfirdn2d, bias_act, modulated_conv2d) against independent float64 numpy references.

The references below are written from the textbook definitions (zero insertion, padding, true convolution,
decimation; per-sample modulated kernels with demodulation; transposed convolution by scattering), never
from the code under test.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from training.ops import (DEMOD_EPS, bias_act, downsample2d, filter2d, modulated_conv2d, modulated_conv2d_grouped,
                          setup_filter, upfirdn2d, upsample2d)
from training.ops import _dispatch

SQRT2 = math.sqrt(2.0)
BLUR_1331 = np.outer([1.0, 3.0, 3.0, 1.0], [1.0, 3.0, 3.0, 1.0]) / 64.0

# Default gains by activation, from the StyleGAN2 paper / NVlabs bias_act: keep the second moment.
DEFAULT_GAIN = {"linear": 1.0, "lrelu": SQRT2, "relu": SQRT2}


# ----------------------------------------------------------------------------------------------------------
# Independent numpy references


def upfirdn2d_np(x, f, up=1, down=1, padding=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """Zero-insert by `up`, pad [px0, px1, py0, py1] (negative = crop), convolve with f * gain, keep every
    `down`-th sample. f may be 1D (separable: outer(f, f)). Explicit loops, float64."""
    x = np.asarray(x, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 1:
        f = np.outer(f, f)
    n, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    # 1. zero insertion: sample (i, j) goes to (i*up, j*up)
    hu, wu = h * up, w * up
    xu = np.zeros((n, c, hu, wu))
    for i in range(h):
        for j in range(w):
            xu[:, :, i * up, j * up] = x[:, :, i, j]
    # 2. pad / crop: padded index p reads source index p - p0 (zero outside)
    hp, wp = hu + py0 + py1, wu + px0 + px1
    xp = np.zeros((n, c, hp, wp))
    for i in range(hp):
        si = i - py0
        if not 0 <= si < hu:
            continue
        for j in range(wp):
            sj = j - px0
            if 0 <= sj < wu:
                xp[:, :, i, j] = xu[:, :, si, sj]
    # 3. FIR: true convolution y[i, j] = sum_{a, b} xp[i + a, j + b] * f[fh-1-a, fw-1-b] (correlation if flip)
    fh, fw = f.shape
    k = f if flip_filter else f[::-1, ::-1]
    oh, ow = hp - fh + 1, wp - fw + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = (xp[:, :, i: i + fh, j: j + fw] * k).sum(axis=(2, 3)) * gain
    # 4. decimation
    return y[:, :, ::down, ::down]


def bias_act_np(x, b=None, dim=1, act="linear", alpha=0.2, gain=None, clamp=None):
    y = np.asarray(x, dtype=np.float64).copy()
    if b is not None:
        shape = [1] * y.ndim
        shape[dim] = -1
        y = y + np.asarray(b, dtype=np.float64).reshape(shape)
    if act == "lrelu":
        y = np.where(y >= 0, y, alpha * y)
    elif act == "relu":
        y = np.where(y >= 0, y, 0.0)
    y = y * (DEFAULT_GAIN[act] if gain is None else gain)
    if clamp is not None:
        y = np.minimum(np.maximum(y, -clamp), clamp)
    return y


def per_sample_kernels_np(weight, styles, demodulate):
    """wk[n, o, i] = weight[o, i] * styles[n, i]; demod: / sqrt(sum_{i,kh,kw} wk^2 + 1e-8)."""
    weight = np.asarray(weight, np.float64)
    styles = np.asarray(styles, np.float64)
    wk = weight[None, :, :, :, :] * styles[:, None, :, None, None]  # [N, O, I, k, k]
    if demodulate:
        wk = wk / np.sqrt((wk ** 2).sum(axis=(2, 3, 4), keepdims=True) + 1e-8)
    return wk


def conv2d_same_np(x, wk):
    """Per-sample cross-correlation with zero padding k//2: y[n,o,h,w] = sum_{i,a,b} xpad[n,i,h+a,w+b] wk[n,o,i,a,b]."""
    n, i, h, w = x.shape
    k = wk.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    y = np.zeros((n, wk.shape[1], h, w))
    for a in range(k):
        for b in range(k):
            y += np.einsum("nihw,noi->nohw", xp[:, :, a: a + h, b: b + w], wk[:, :, :, a, b])
    return y


def conv_transpose2d_stride2_np(x, wk):
    """Per-sample transposed conv, stride 2, by scattering: out[n,o,2h+a,2w+b] += x[n,i,h,w] wk[n,o,i,a,b]."""
    n, i, h, w = x.shape
    k = wk.shape[-1]
    out = np.zeros((n, wk.shape[1], 2 * (h - 1) + k, 2 * (w - 1) + k))
    for a in range(k):
        for b in range(k):
            out[:, :, a: a + 2 * h: 2, b: b + 2 * w: 2] += np.einsum("nihw,noi->nohw", x, wk[:, :, :, a, b])
    return out


def modulated_conv2d_np(x, weight, styles, demodulate=True, up=1, f=None, noise=None, bias=None,
                        act="linear", gain=None, clamp=None, skip=None):
    """StyleGAN2 synthesis layer (rosinality ModulatedConv2d + NoiseInjection + FusedLeakyReLU + ToRGB skip)."""
    x = np.asarray(x, np.float64)
    wk = per_sample_kernels_np(weight, styles, demodulate)
    k = wk.shape[-1]
    if up == 1:
        y = conv2d_same_np(x, wk)
    else:
        y = conv_transpose2d_stride2_np(x, wk)
        # rosinality Blur after the transposed conv: p = (len(f) - factor) - (k - 1),
        # pad = ((p + 1) // 2 + factor - 1, p // 2 + 1), kernel * factor**2.
        p = (f.shape[-1] - 2) - (k - 1)
        pad0, pad1 = (p + 1) // 2 + 1, p // 2 + 1
        y = upfirdn2d_np(y, f, padding=(pad0, pad1, pad0, pad1), gain=4.0)
    if noise is not None:
        y = y + np.asarray(noise, np.float64)
    y = bias_act_np(y, bias, 1, act, 0.2, gain, clamp)
    if skip is not None:
        # rosinality Upsample: kernel * 4, pad ((4 - 2 + 1) // 2 + 1, (4 - 2) // 2) = (2, 1).
        y = y + upfirdn2d_np(skip, f, up=2, padding=(2, 1, 2, 1), gain=4.0)
    return y


def _t(a, dtype=torch.float64, grad=False):
    t = torch.as_tensor(np.asarray(a), dtype=dtype).clone()
    return t.requires_grad_(grad)


# ----------------------------------------------------------------------------------------------------------
# upfirdn2d


ASYM_2D = np.array([[1.0, 2.0, -1.0], [0.5, 3.0, 1.5], [-2.0, 1.0, 0.25]])
ASYM_3x4 = np.array([[1.0, 2.0, -1.0, 0.5], [0.5, 3.0, 1.5, -0.5], [-2.0, 1.0, 0.25, 2.0]])
ASYM_1D = np.array([1.0, 2.0, 5.0, -1.0])

UPFIRDN_CASES = [
    # (name, f, up, down, padding, flip_filter, gain)
    ("identity-pad", ASYM_2D, 1, 1, (1, 1, 1, 1), False, 1.0),
    ("up2-blur", BLUR_1331, 2, 1, (2, 1, 2, 1), False, 4.0),
    ("down2-blur", BLUR_1331, 1, 2, (1, 1, 1, 1), False, 1.0),
    ("up2-down2-asym-pad", ASYM_2D, 2, 2, (1, 2, 0, 3), False, 1.0),
    ("negative-crop", ASYM_2D, 1, 1, (-1, 2, 1, -2), False, 1.0),
    ("up2-negative-crop", BLUR_1331, 2, 1, (-2, -1, 0, 1), False, 4.0),
    ("flip-nonsquare", ASYM_3x4, 1, 1, (2, 1, 0, 2), True, 1.0),
    ("noflip-nonsquare", ASYM_3x4, 1, 1, (2, 1, 0, 2), False, 1.0),
    ("gain", ASYM_2D, 1, 1, (1, 1, 1, 1), False, 2.5),
    ("separable", ASYM_1D, 1, 1, (2, 1, 1, 2), False, 1.0),
    ("separable-flip-up2-gain", ASYM_1D, 2, 1, (1, 2, 2, 1), True, 3.0),
    ("up3-down2", ASYM_2D, 3, 2, (1, 1, 2, 0), False, 9.0),
]


@pytest.mark.parametrize("name,f,up,down,padding,flip,gain", UPFIRDN_CASES, ids=[c[0] for c in UPFIRDN_CASES])
def test_upfirdn2d_matches_loop_reference(name, f, up, down, padding, flip, gain):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 6, 7)
    want = upfirdn2d_np(x, f, up, down, padding, flip, gain)
    got = upfirdn2d(_t(x), _t(f), up=up, down=down, padding=padding, flip_filter=flip, gain=gain, impl="ref")
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # float32 inputs give the same result to float32 precision
    got32 = upfirdn2d(_t(x, torch.float32), _t(f, torch.float32), up=up, down=down, padding=padding,
                      flip_filter=flip, gain=gain, impl="ref")
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_output_shape_formula():
    x = torch.randn(1, 2, 5, 9)
    f = torch.ones(3, 4) / 12
    y = upfirdn2d(x, f, up=2, down=3, padding=(1, 2, 3, 0), impl="ref")
    # [(H*up + py0 + py1 - fh) // down + 1, (W*up + px0 + px1 - fw) // down + 1]
    assert tuple(y.shape) == (1, 2, (10 + 3 - 3) // 3 + 1, (18 + 3 - 4) // 3 + 1)


def test_upfirdn2d_padding_forms_are_equivalent():
    rng = np.random.RandomState(1)
    x = _t(rng.randn(1, 2, 5, 6))
    f = _t(ASYM_2D)
    a = upfirdn2d(x, f, padding=2, impl="ref")
    b = upfirdn2d(x, f, padding=(2, 2, 2, 2), impl="ref")
    assert torch.equal(a, b)
    # [px, py] form: px on both sides of W, py on both sides of H
    c = upfirdn2d(x, f, padding=(1, 3), impl="ref")
    np.testing.assert_allclose(c.numpy(), upfirdn2d_np(x.numpy(), ASYM_2D, padding=(1, 1, 3, 3)), atol=1e-12)


def test_upfirdn2d_rejects_bad_arguments():
    x = torch.randn(1, 1, 4, 4)
    f = setup_filter([1, 3, 3, 1])
    with pytest.raises(ValueError, match="N, C, H, W"):
        upfirdn2d(torch.randn(4, 4), f)
    with pytest.raises(ValueError, match="up and down"):
        upfirdn2d(x, f, up=0)
    with pytest.raises(ValueError, match="down"):
        upfirdn2d(x, f, down=0)
    with pytest.raises(ValueError, match="padding"):
        upfirdn2d(x, f, padding=(1, 2, 3))


def test_setup_filter():
    f = setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and tuple(f.shape) == (4, 4)
    np.testing.assert_allclose(f.numpy(), BLUR_1331, rtol=1e-7)
    f1 = setup_filter([1, 2, 1], separable=True)
    np.testing.assert_allclose(f1.numpy(), [0.25, 0.5, 0.25])
    raw = setup_filter([1, 2, 1], normalize=False)
    np.testing.assert_allclose(raw.numpy(), np.outer([1, 2, 1], [1, 2, 1]))


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7)])
def test_upsample2d_and_downsample2d_shapes(h, w):
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, h, w)
    assert tuple(upsample2d(x, f, impl="ref").shape) == (2, 3, 2 * h, 2 * w)
    assert tuple(upsample2d(x, f, up=4, impl="ref").shape) == (2, 3, 4 * h, 4 * w)
    x2 = torch.randn(2, 3, 2 * h, 2 * w)
    assert tuple(downsample2d(x2, f, impl="ref").shape) == (2, 3, h, w)
    assert tuple(filter2d(x, f, impl="ref").shape) == (2, 3, h, w)


def test_upsample2d_is_pixel_centre_aligned():
    """x2 upsampling with [1,3,3,1] of a ramp v[i] = i gives v'[j] = j/2 - 1/4 away from the borders
    (output pixel j's centre lies at (j + 0.5)/2 - 0.5 in input coordinates); constants stay constant."""
    f = setup_filter([1, 3, 3, 1])
    n = 8
    ramp = torch.arange(n, dtype=torch.float64)
    x = (ramp[None, :] + 10 * ramp[:, None])[None, None]  # [1, 1, n, n], ramp along both axes
    y = upsample2d(x, f.double(), impl="ref")[0, 0].numpy()
    j = np.arange(2 * n)
    want = (j[None, :] / 2 - 0.25) + 10 * (j[:, None] / 2 - 0.25)
    inner = slice(2, 2 * n - 2)
    np.testing.assert_allclose(y[inner, inner], want[inner, inner], atol=1e-12)
    c = upsample2d(torch.full((1, 2, 5, 5), 3.0, dtype=torch.float64), f.double(), impl="ref")
    np.testing.assert_allclose(c[..., 2:-2, 2:-2].numpy(), 3.0, atol=1e-12)


def test_downsample2d_is_pixel_centre_aligned():
    """/2 downsampling with [1,3,3,1] of a ramp v[i] = i gives v'[k] = 2k + 0.5 away from the borders."""
    f = setup_filter([1, 3, 3, 1]).double()
    n = 12
    ramp = torch.arange(n, dtype=torch.float64)
    x = (ramp[None, :] - 3 * ramp[:, None])[None, None]
    y = downsample2d(x, f, impl="ref")[0, 0].numpy()
    k = np.arange(n // 2)
    want = (2 * k[None, :] + 0.5) - 3 * (2 * k[:, None] + 0.5)
    np.testing.assert_allclose(y[1:-1, 1:-1], want[1:-1, 1:-1], atol=1e-12)


def test_filter2d_keeps_constants_and_matches_reference():
    f = setup_filter([1, 3, 3, 1]).double()
    x = np.random.RandomState(2).randn(1, 2, 6, 6)
    got = filter2d(_t(x), f, impl="ref").numpy()
    # 'same' padding for an even 4-tap filter: 2 before, 1 after (as NVlabs filter2d)
    np.testing.assert_allclose(got, upfirdn2d_np(x, BLUR_1331, padding=(2, 1, 2, 1)), atol=1e-12)
    c = filter2d(torch.full((1, 1, 6, 6), -2.0, dtype=torch.float64), f, impl="ref")
    np.testing.assert_allclose(c[..., 2:-2, 2:-2].numpy(), -2.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# bias_act


BIAS_ACT_CASES = [
    # (shape, dim, act, alpha, gain, clamp, with_bias)
    ((2, 5, 3, 4), 1, "linear", 0.2, None, None, True),
    ((2, 5, 3, 4), 1, "lrelu", 0.2, None, None, True),
    ((2, 5, 3, 4), 1, "lrelu", 0.1, None, None, True),
    ((2, 5, 3, 4), 1, "lrelu", 0.2, 0.5, None, True),
    ((2, 5, 3, 4), 1, "lrelu", 0.2, None, 0.7, True),
    ((2, 5, 3, 4), 1, "relu", 0.2, None, None, True),
    ((2, 5, 3, 4), 1, "relu", 0.2, 2.0, 1.1, False),
    ((2, 5, 3, 4), 1, "linear", 0.2, 3.0, 2.0, False),
    ((3, 4, 6), 2, "lrelu", 0.2, None, 1.5, True),
    ((7, 4), 0, "lrelu", 0.3, None, None, True),
    ((7, 4), -1, "linear", 0.2, 1.5, None, True),
]


@pytest.mark.parametrize("shape,dim,act,alpha,gain,clamp,with_bias", BIAS_ACT_CASES)
def test_bias_act_matches_numpy(shape, dim, act, alpha, gain, clamp, with_bias):
    rng = np.random.RandomState(3)
    x = rng.randn(*shape)
    b = rng.randn(shape[dim]) if with_bias else None
    want = bias_act_np(x, b, dim, act, alpha, gain, clamp)
    got = bias_act(_t(x), None if b is None else _t(b), dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp,
                   impl="ref")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    got32 = bias_act(_t(x, torch.float32), None if b is None else _t(b, torch.float32), dim=dim, act=act,
                     alpha=alpha, gain=gain, clamp=clamp, impl="ref")
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-6, atol=1e-6)


def test_bias_act_default_gain_is_sqrt2_for_lrelu():
    x = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(bias_act(x, act="lrelu", impl="ref"), torch.tensor([[-0.2 * SQRT2, 2 * SQRT2]],
                                                                             dtype=torch.float64))
    assert torch.equal(bias_act(x, act="linear", impl="ref"), x)


def test_bias_act_clamp_bounds_output():
    x = torch.linspace(-1000, 1000, 101)
    y = bias_act(x[None], act="lrelu", clamp=256, impl="ref")
    assert y.abs().max().item() == 256.0


def test_bias_act_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="activation"):
        bias_act(x, act="gelu")
    with pytest.raises(ValueError, match="bias shape"):
        bias_act(x, torch.zeros(4))
    with pytest.raises(ValueError, match="bias shape"):
        bias_act(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="clamp"):
        bias_act(x, clamp=-1.0)


# ----------------------------------------------------------------------------------------------------------
# modulated_conv2d


def _modconv_inputs(rng, n=2, i=5, o=4, h=6, k=3, up=1, epilogue=False, f_taps=(1, 3, 3, 1)):
    x = rng.randn(n, i, h, h)
    weight = rng.randn(o, i, k, k) / math.sqrt(i * k * k)
    styles = rng.randn(n, i) + 1.0
    f = np.outer(f_taps, f_taps) / np.sum(f_taps) ** 2
    out = dict(x=x, weight=weight, styles=styles, f=f)
    if epilogue:
        ho = h * up
        out["noise"] = rng.randn(n, 1, ho, ho) * 0.3
        out["bias"] = rng.randn(o) * 0.5
        out["skip"] = rng.randn(n, o, ho // 2, ho // 2)
    return out


MODCONV_CASES = [
    # (up, demodulate, k, epilogue: (act, gain, clamp) or None)
    (1, True, 3, None),
    (1, False, 3, None),
    (2, True, 3, None),
    (2, False, 3, None),
    (1, False, 1, None),
    (2, True, 1, None),
    (1, True, 3, ("lrelu", None, None)),
    (2, True, 3, ("lrelu", None, 0.8)),
    (1, False, 1, ("linear", None, None)),
    (2, False, 3, ("lrelu", 1.3, 0.5)),
]


@pytest.mark.parametrize("up,demod,k,epi", MODCONV_CASES)
def test_modulated_conv2d_matches_per_sample_textbook_formula(up, demod, k, epi):
    rng = np.random.RandomState(10 + up + 2 * k)
    inp = _modconv_inputs(rng, k=k, up=up, epilogue=epi is not None)
    kw = {}
    np_kw = {}
    if epi is not None:
        act, gain, clamp = epi
        kw = dict(noise=_t(inp["noise"], torch.float32), bias=_t(inp["bias"], torch.float32), act=act, gain=gain,
                  clamp=clamp, skip=_t(inp["skip"], torch.float32))
        np_kw = dict(noise=inp["noise"], bias=inp["bias"], act=act, gain=gain, clamp=clamp, skip=inp["skip"])
    want = modulated_conv2d_np(inp["x"], inp["weight"], inp["styles"], demodulate=demod, up=up, f=inp["f"],
                               **np_kw)
    got = modulated_conv2d(_t(inp["x"], torch.float32), _t(inp["weight"], torch.float32),
                           _t(inp["styles"], torch.float32), demodulate=demod, up=up,
                           resample_filter=_t(inp["f"], torch.float32), impl="ref", **kw)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == want.shape == (2, 4, 6 * up, 6 * up)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=2e-5)


def test_modulated_conv2d_clamp_and_noise_broadcast():
    rng = np.random.RandomState(5)
    inp = _modconv_inputs(rng, n=3)
    noise_hw = rng.randn(6, 6)  # [H, W] noise (the layer's const noise) broadcasts over N and C
    want = modulated_conv2d_np(inp["x"] * 50, inp["weight"], inp["styles"], demodulate=False,
                               noise=noise_hw[None, None], bias=np.zeros(4), act="lrelu", clamp=3.0)
    got = modulated_conv2d(_t(inp["x"] * 50), _t(inp["weight"]), _t(inp["styles"]), demodulate=False,
                           noise=_t(noise_hw), bias=torch.zeros(4, dtype=torch.float64), act="lrelu", clamp=3.0,
                           impl="ref")
    assert (np.abs(want) == 3.0).any()  # the clamp is active in this case
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demod", [True, False])
def test_modulated_conv2d_matches_grouped_oracle(up, demod):
    rng = np.random.RandomState(20 + up)
    inp = _modconv_inputs(rng, n=3, up=up)
    args = (_t(inp["x"], torch.float32), _t(inp["weight"], torch.float32), _t(inp["styles"], torch.float32))
    f = _t(inp["f"], torch.float32)
    a = modulated_conv2d(*args, demodulate=demod, up=up, resample_filter=f, impl="ref")
    b = modulated_conv2d_grouped(*args, demodulate=demod, up=up, resample_filter=f)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the oracle itself matches the textbook formula
    want = modulated_conv2d_np(inp["x"], inp["weight"], inp["styles"], demodulate=demod, up=up, f=inp["f"])
    np.testing.assert_allclose(b.numpy(), want, rtol=1e-5, atol=2e-5)


def test_modulated_conv2d_demod_normalises_output_channels():
    """With demodulation, each per-sample kernel has unit L2 norm (up to eps), so scaling styles or weight
    by a constant does not change the output."""
    rng = np.random.RandomState(6)
    inp = _modconv_inputs(rng)
    x, w, s = _t(inp["x"]), _t(inp["weight"]), _t(inp["styles"])
    a = modulated_conv2d(x, w, s, impl="ref")
    b = modulated_conv2d(x, w * 7.0, s * 0.25, impl="ref")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert DEMOD_EPS == 1e-8


def test_modulated_conv2d_float64_is_float64_accurate():
    rng = np.random.RandomState(7)
    inp = _modconv_inputs(rng)
    want = modulated_conv2d_np(inp["x"], inp["weight"], inp["styles"], demodulate=True)
    got = modulated_conv2d(_t(inp["x"]), _t(inp["weight"]), _t(inp["styles"]), demodulate=True, impl="ref")
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_modulated_conv2d_rejects_bad_shapes():
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(4, 3, 3, 3)
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="expects"):
        modulated_conv2d(x[0], w, s)
    with pytest.raises(ValueError, match="disagree"):
        modulated_conv2d(x, w, torch.randn(3, 3))
    with pytest.raises(ValueError, match="disagree"):
        modulated_conv2d(x, torch.randn(4, 2, 3, 3), s)
    with pytest.raises(ValueError, match="up must be"):
        modulated_conv2d(x, w, s, up=3, resample_filter=setup_filter([1, 3, 3, 1]))
    with pytest.raises(ValueError, match="resample_filter"):
        modulated_conv2d(x, w, s, up=2)
    with pytest.raises(ValueError, match="resample_filter"):
        modulated_conv2d(x, w, s, skip=torch.randn(2, 4, 2, 2))


# ----------------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck of the references (float64)


@pytest.mark.parametrize("up,down,padding,sep", [(1, 1, (1, 1, 1, 1), False), (2, 1, (2, 1, 2, 1), False),
                                                 (1, 2, (1, 2, 0, 1), False), (2, 2, (-1, 2, 1, 0), True)])
def test_upfirdn2d_gradcheck(up, down, padding, sep):
    rng = np.random.RandomState(30)
    x = _t(rng.randn(1, 2, 3, 4), grad=True)
    f = _t(rng.randn(3) if sep else rng.randn(3, 3), grad=True)

    def fn(x, f):
        return upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.7, impl="ref")
    assert torch.autograd.gradcheck(fn, (x, f))
    assert torch.autograd.gradgradcheck(fn, (x, f), fast_mode=True)


@pytest.mark.parametrize("act,clamp,dim", [("lrelu", None, 1), ("lrelu", 1.0, 1), ("relu", None, 2),
                                           ("linear", 0.8, 0)])
def test_bias_act_gradcheck(act, clamp, dim):
    rng = np.random.RandomState(31)
    # keep values away from the kinks (0 and +-clamp) so finite differences are valid
    x = rng.randn(2, 3, 4)
    x = np.where(np.abs(x) < 0.05, 0.3, x)
    shape = x.shape
    b = np.full(shape[dim], 0.0) + rng.randn(shape[dim]) * 1e-3
    xt, bt = _t(x, grad=True), _t(b, grad=True)
    if clamp is not None:  # the clamp is active somewhere, and no value sits on its kink
        pre = bias_act_np(x, b, dim, act)
        assert np.abs(np.abs(pre) - clamp).min() > 1e-3 and (np.abs(pre) > clamp).any()

    def fn(x, b):
        return bias_act(x, b, dim=dim, act=act, clamp=clamp, impl="ref")
    assert torch.autograd.gradcheck(fn, (xt, bt))
    assert torch.autograd.gradgradcheck(fn, (xt, bt))


def _modconv_grad_inputs(up, epilogue, n=2, i=3, o=2, h=4):
    rng = np.random.RandomState(40 + up)
    inp = _modconv_inputs(rng, n=n, i=i, o=o, h=h, up=up, epilogue=epilogue)
    ts = [_t(inp["x"], grad=True), _t(inp["weight"], grad=True), _t(inp["styles"], grad=True),
          _t(inp["f"], grad=True)]
    if epilogue:
        ts += [_t(inp["noise"], grad=True), _t(inp["bias"], grad=True), _t(inp["skip"], grad=True)]
    return ts


def _modconv_fn(up, demod, epilogue):
    def fn(x, weight, styles, f, noise=None, bias=None, skip=None):
        return modulated_conv2d(x, weight, styles, demodulate=demod, up=up, resample_filter=f, noise=noise,
                                bias=bias, act="lrelu" if epilogue else "linear", clamp=2.5 if epilogue else None,
                                skip=skip, impl="ref")
    return fn


@pytest.fixture
def quick_gradcheck_failures(monkeypatch):
    """A failing fast-mode gradcheck re-runs the slow mode only to format its message; skip that (the
    expected failures below would otherwise dominate the suite's runtime)."""
    import torch.autograd.gradcheck  # noqa: F401
    mod = sys.modules["torch.autograd.gradcheck"]
    monkeypatch.setattr(mod, "_run_slow_mode_and_get_error", lambda *a, **k: "(slow-mode details skipped)")


@pytest.mark.parametrize("demod", [False, True])
def test_modulated_conv2d_gradcheck_full_jacobian(demod):
    # Every Jacobian entry (slow mode) on a very small case, w.r.t. x, weight, styles and the filter.
    ts = _modconv_grad_inputs(2, epilogue=False, n=2, i=2, o=2, h=2)
    assert torch.autograd.gradcheck(_modconv_fn(2, demod, False), tuple(ts))


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demod", [False, True])
def test_modulated_conv2d_gradcheck(up, demod, quick_gradcheck_failures):
    # All float inputs incl. the noise / bias / lrelu / clamp / skip epilogue; fast mode (random projections
    # of the Jacobian) keeps this under a second.
    ts = _modconv_grad_inputs(up, epilogue=True, n=2, i=2, o=2, h=2)
    assert torch.autograd.gradcheck(_modconv_fn(up, demod, True), tuple(ts), fast_mode=True)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demod", [False, True])
def test_modulated_conv2d_gradgradcheck(up, demod, quick_gradcheck_failures):
    # R1 and path-length regularisation differentiate the synthesis layers twice.
    ts = _modconv_grad_inputs(up, epilogue=True, n=2, i=2, o=2, h=2)
    assert torch.autograd.gradgradcheck(_modconv_fn(up, demod, True), tuple(ts), fast_mode=True)


# ----------------------------------------------------------------------------------------------------------
# impl selection


OPS = {
    "upfirdn2d": lambda impl: upfirdn2d(torch.randn(1, 2, 4, 4), setup_filter([1, 3, 3, 1]), padding=1, impl=impl),
    "bias_act": lambda impl: bias_act(torch.randn(1, 2, 4, 4), torch.zeros(2), act="lrelu", impl=impl),
    "modulated_conv2d": lambda impl: modulated_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3),
                                                      torch.ones(1, 2), impl=impl),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_bad_impl_string_is_rejected(op):
    with pytest.raises(ValueError, match="impl must be one of"):
        OPS[op]("fast")


def test_impl_cuda_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="modulated_conv2d: impl='cuda' needs CUDA tensors"):
        OPS["modulated_conv2d"]("cuda")


@pytest.mark.parametrize("op", ["bias_act", "upfirdn2d"])
def test_impl_cuda_on_an_op_without_a_kernel_says_so(op):
    # Whatever the device: these ops have no kernel, so asking for one is a usage error, not a missing build.
    with pytest.raises(ValueError, match=f"{op}: there is no CUDA kernel for this op"):
        OPS[op]("cuda")


@pytest.mark.parametrize("op", sorted(OPS))
def test_impl_auto_on_cpu_is_the_reference_without_warning(op, monkeypatch):
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")  # strict mode concerns CUDA tensors only
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = OPS[op]("auto")
    torch.manual_seed(0)
    b = OPS[op]("ref")
    assert torch.equal(a, b)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False),
                                            ("no", False)])
def test_strict_ops_env_parsing(value, expected, monkeypatch):
    monkeypatch.setenv("STYLECAST_STRICT_OPS", value)
    assert _dispatch.strict_ops() is expected


def test_strict_ops_unset_is_lenient(monkeypatch):
    monkeypatch.delenv("STYLECAST_STRICT_OPS", raising=False)
    assert _dispatch.strict_ops() is False


@pytest.mark.gpu
def test_strict_ops_on_cuda_without_extension(monkeypatch):
    """impl='auto' on CUDA tensors without the compiled extension: one warning and the reference, or an
    error under STYLECAST_STRICT_OPS=1."""
    monkeypatch.setenv("STYLECAST_OPS_LIBRARY", "")
    _dispatch.reset_extension()
    monkeypatch.setattr(_dispatch, "_ext_loaded", False)
    if _dispatch.load_extension() is not None:
        _dispatch.reset_extension()
        pytest.skip("the CUDA extension is installed; this test covers the fallback")
    x = torch.randn(1, 2, 4, 4, device="cuda")

    def call(impl):
        return modulated_conv2d(x, torch.ones(3, 2, 3, 3, device="cuda"), torch.ones(1, 2, device="cuda"), impl=impl)

    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    with pytest.raises(RuntimeError, match="STYLECAST_STRICT_OPS"):
        call("auto")
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "0")
    with pytest.warns(RuntimeWarning, match="reference"):
        y = call("auto")
    torch.testing.assert_close(y, call("ref"))
    with pytest.raises(RuntimeError, match="not available"):
        call("cuda")
    _dispatch.reset_extension()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["bias_act", "upfirdn2d"])
def test_ops_without_a_kernel_run_on_cuda_under_strict_ops(op, monkeypatch):
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    x = torch.randn(1, 2, 4, 4, device="cuda")
    calls = {"upfirdn2d": lambda impl: upfirdn2d(x, setup_filter([1, 3, 3, 1], device="cuda"), padding=1, impl=impl),
             "bias_act": lambda impl: bias_act(x, torch.zeros(2, device="cuda"), act="lrelu", impl=impl)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(calls[op]("auto"), calls[op]("ref"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Dispatch on CUDA tensors, on the CPU: a tensor subclass that reports is_cuda, and a fake extension that holds
# the binding to its contract (trt_plugins/src/torchExtension.cpp) and computes with the reference.


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device (ops on it keep the subclass)."""

    @property
    def is_cuda(self):  # noqa: D401 - mirrors torch.Tensor.is_cuda
        return True


class FakeExtension:
    """Stands in for stylecast_ops_cuda: checks the arguments as the C++ binding does, records each call."""

    def __init__(self):
        self.calls = []

    def modulated_conv2d(self, x, weight, styles, demodulate, up, resample_filter, noise, bias, act, gain, clamp,
                         skip, out=None, poison=False):
        n, _, h, w = x.shape
        if noise is not None:
            # torchExtension.cpp: TORCH_CHECK(noise.dim() == 4 && noise.size(1) == 1 && ...)
            assert noise.dim() == 4 and noise.shape[1] == 1 and tuple(noise.shape[2:]) == (h * up, w * up) \
                and noise.shape[0] in (1, n), f"noise must be [1 or N, 1, H*up, W*up], got {tuple(noise.shape)}"
        assert act in ("linear", "lrelu", "relu") and (gain == -1.0 or gain >= 0) and (clamp == -1.0 or clamp >= 0)
        self.calls.append(tuple(x.shape))
        plain = [None if t is None else t.as_subclass(torch.Tensor) for t in (x, weight, styles, noise, bias, skip)]
        return modulated_conv2d(plain[0], plain[1], plain[2], demodulate=demodulate, up=up,
                                resample_filter=resample_filter, noise=plain[3], bias=plain[4], act=act,
                                gain=None if gain < 0 else gain, clamp=None if clamp < 0 else clamp, skip=plain[5],
                                impl="ref")


@pytest.fixture
def fake_extension(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(_dispatch, "_ext", ext)
    monkeypatch.setattr(_dispatch, "_ext_loaded", True)
    monkeypatch.setattr(_dispatch, "_ext_error", None)
    return ext


def _fake_cuda(t):
    return t.as_subclass(FakeCudaTensor)


def test_dispatch_registry_names_only_ops_with_kernels():
    # The extension binds exactly these ops (PYBIND11_MODULE in torchExtension.cpp); the rest are reference-only.
    src = (Path(__file__).resolve().parents[2] / "trt_plugins" / "src" / "torchExtension.cpp").read_text()
    bound = set(re.findall(r'm\.def\("(\w+)"', src))
    assert bound == set(_dispatch.KERNEL_OPS) == {"modulated_conv2d"}


def test_auto_on_cuda_calls_the_extension_and_strict_ops_accept_it(fake_extension, monkeypatch):
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    torch.manual_seed(0)
    x, weight, styles = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(2, 4)
    with torch.no_grad():
        got = modulated_conv2d(_fake_cuda(x), weight, styles, impl="auto")
    assert fake_extension.calls == [(2, 4, 5, 5)]
    torch.testing.assert_close(got.as_subclass(torch.Tensor), modulated_conv2d(x, weight, styles, impl="ref"))


def test_strict_ops_still_catch_a_missing_modulated_conv2d(monkeypatch):
    monkeypatch.setattr(_dispatch, "_ext", object())  # an extension without the op
    monkeypatch.setattr(_dispatch, "_ext_loaded", True)
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    x = _fake_cuda(torch.randn(1, 2, 4, 4))
    with torch.no_grad(), pytest.raises(RuntimeError, match="STYLECAST_STRICT_OPS=1 .*op missing"):
        modulated_conv2d(x, torch.randn(3, 2, 3, 3), torch.ones(1, 2), impl="auto")


@pytest.mark.parametrize("op", ["bias_act", "upfirdn2d"])
def test_ops_without_a_kernel_are_no_missing_fast_version(op, fake_extension, monkeypatch):
    """On CUDA tensors under STYLECAST_STRICT_OPS=1, bias_act and upfirdn2d run their reference without error or
    warning: there is no kernel to miss (the extension, like the real one, has none for them)."""
    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    x = torch.randn(1, 2, 6, 6)
    calls = {"upfirdn2d": lambda t, impl: upfirdn2d(t, setup_filter([1, 3, 3, 1]), up=2, padding=1, impl=impl),
             "bias_act": lambda t, impl: bias_act(t, torch.ones(2), act="lrelu", impl=impl)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = calls[op](_fake_cuda(x), "auto")
    assert torch.equal(got.as_subclass(torch.Tensor), calls[op](x, "ref"))
    assert fake_extension.calls == []


def test_generator_on_cuda_passes_the_kernel_its_contract(fake_extension, monkeypatch):
    """The whole synthesis through the dispatcher: const noise ([H, W]) reaches the kernel as [1, 1, H, W], every
    modulated layer calls the extension, and the image equals the reference's."""
    from training.networks import Generator, GeneratorConfig

    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    torch.manual_seed(0)
    G = Generator(GeneratorConfig.tiny(resolution=16, w_dim=16, max_channels=16, min_channels=8)).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
        ws = torch.randn(2, G.num_ws, G.w_dim)
        got = G.synthesis(_fake_cuda(ws), noise_mode="const", impl="auto")
        ref = G.synthesis(ws, noise_mode="const", impl="ref")
    assert len(fake_extension.calls) == 3 * 3 - 1  # 4 px: conv + to-RGB; 8, 16 px: up-conv, conv, to-RGB
    torch.testing.assert_close(got.as_subclass(torch.Tensor), ref)


def test_dualstylegan_on_cuda_runs_under_strict_ops(fake_extension, monkeypatch):
    """DualStyleGAN's ModRes blocks call bias_act (no kernel): under STYLECAST_STRICT_OPS=1 on CUDA tensors the
    forward must not raise, and it must equal the reference."""
    from training.dualstyle.model import DualStyleGAN
    from training.networks import Generator, GeneratorConfig

    monkeypatch.setenv("STYLECAST_STRICT_OPS", "1")
    torch.manual_seed(0)
    D = DualStyleGAN.from_generator(Generator(GeneratorConfig.tiny(resolution=16, w_dim=16, max_channels=16,
                                                                   min_channels=8)), res_index=2).eval()
    ws, ex = torch.randn(2, D.num_ws, D.w_dim), torch.randn(2, D.num_ws, D.w_dim)
    with torch.no_grad():
        got = D(_fake_cuda(ws), _fake_cuda(ex), impl="auto")
        ref = D(ws, ex, impl="ref")
    assert fake_extension.calls
    torch.testing.assert_close(got.as_subclass(torch.Tensor), ref)
