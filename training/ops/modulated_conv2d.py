"""Modulated convolution with weight demodulation, the core layer of StyleGAN2 (Karras et al., 2020).

The reference scales activations instead of building per-sample kernels:
    y[n] = demod[n] * conv(x[n] * styles[n], weight)
which equals convolving with the per-sample kernel weight[o, i] * styles[n, i] * demod[n, o], yet keeps one
shared kernel, so the batch axis of an exported ONNX graph stays dynamic. The grouped-convolution form lives
in `modulated_conv2d_grouped` only as a test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import extension, use_cuda_impl
from .bias_act import bias_act
from .upfirdn2d import upfirdn2d, upsample2d

# Added under the square root of the demodulation coefficients (as in the official code) so an all-zero
# style cannot divide by zero.
DEMOD_EPS = 1e-8


def demod_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = DEMOD_EPS) -> torch.Tensor:
    """rsqrt(sum_{i,kh,kw} (weight[o,i,kh,kw] * styles[n,i])^2 + eps), computed without per-sample kernels.

    Args:
        weight: [O, I, kh, kw] effective (already gain-scaled) kernel.
        styles: [N, I] per-sample input-channel scales.
    Returns:
        [N, O] coefficients in at least float32 (float32 even for half inputs: the sum of squares of
        512*9 terms overflows fp16; float64 inputs stay float64).
    """
    dtype = torch.promote_types(torch.promote_types(weight.dtype, styles.dtype), torch.float32)
    wsq = weight.to(dtype).square().sum(dim=(2, 3))  # [O, I]
    return (styles.to(dtype).square() @ wsq.t() + eps).rsqrt()  # [N, O]


def _up2_padding(kernel_size: int, filter_taps: int) -> tuple[int, int]:
    # Padding of the blur after a stride-2 transposed conv so the output is exactly 2H x 2W.
    p = (filter_taps - 2) - (kernel_size - 1)
    return (p + 1) // 2 + 1, p // 2 + 1


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, up: int = 1, resample_filter: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     act: str = "linear", gain: float | None = None, clamp: float | None = None,
                     skip: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """One StyleGAN2 synthesis layer: modulate, convolve, demodulate, add noise, bias, activate, clamp.

    Args:
        x: [N, I, H, W] activations.
        weight: [O, I, k, k] effective kernel (the equalized-lr gain already applied).
        styles: [N, I] per-sample channel scales (output of the layer's affine map).
        demodulate: normalise each output channel to unit expected variance (False for to-RGB).
        up: 1, or 2 for the upsampling layer (stride-2 transposed conv followed by the blur filter).
        resample_filter: [f, f] FIR filter (sum 1) used when up=2 and for `skip`.
        noise: [N or 1, 1, H', W'] (or [H', W'], broadcast) noise already multiplied by its strength, or None.
        bias: [O] bias added before the activation, or None.
        act: "linear" or "lrelu".
        gain: activation gain (None: the activation's default, sqrt(2) for lrelu).
        clamp: clamp outputs to [-clamp, clamp] after the gain, or None.
        skip: [N, O, H'/2, W'/2] previous image; if given it is upsampled (x2) and added (to-RGB skip).
        impl: "ref" | "cuda" | "auto".
    Returns:
        [N, O, H*up, W*up] tensor of x's dtype.
    """
    _check_shapes(x, weight, styles, up, resample_filter, skip)
    if use_cuda_impl("modulated_conv2d", impl, x, weight, styles, noise, bias, skip):
        if noise is not None and noise.ndim == 2:
            # The synthesis layers' const noise is one [H', W'] image that broadcasts over batch and channels;
            # the kernel takes the same broadcast as [1, 1, H', W'].
            noise = noise.reshape(1, 1, *noise.shape)
        return extension().modulated_conv2d(
            x, weight, styles, demodulate, up, resample_filter, noise, bias, act,
            -1.0 if gain is None else float(gain), -1.0 if clamp is None else float(clamp), skip)

    n, i = styles.shape
    k = weight.shape[-1]
    dtype = x.dtype
    # Modulate the activations instead of the weights: [N, I, H, W].
    x = x * styles.to(dtype).reshape(n, i, 1, 1)
    w = weight.to(dtype)
    if up == 1:
        x = F.conv2d(x, w, padding=k // 2)
    else:
        # Transposed conv wants [I, O, k, k]; the blur after it removes the checkerboard of zero insertion.
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)
        p0, p1 = _up2_padding(k, resample_filter.shape[-1])
        x = upfirdn2d(x, resample_filter, padding=(p0, p1, p0, p1), gain=4, impl="ref")
    if demodulate:
        # Demodulation stays in float32 (see demod_coefficients) and is cast only when applied.
        dcoefs = demod_coefficients(weight, styles)  # [N, O]
        x = x * dcoefs.to(dtype).reshape(n, -1, 1, 1)
    if noise is not None:
        x = x + noise.to(dtype)
    x = bias_act(x, bias, act=act, gain=gain, clamp=clamp, impl="ref")
    if skip is not None:
        x = x + upsample2d(skip.to(dtype), resample_filter, impl="ref")
    return x


def _check_shapes(x, weight, styles, up, resample_filter, skip) -> None:
    if x.ndim != 4 or weight.ndim != 4 or styles.ndim != 2:
        raise ValueError("modulated_conv2d expects x [N, I, H, W], weight [O, I, k, k], styles [N, I]; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(styles.shape)}")
    if styles.shape[0] != x.shape[0] or styles.shape[1] != x.shape[1] or weight.shape[1] != x.shape[1]:
        raise ValueError(f"modulated_conv2d: shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"styles {tuple(styles.shape)}")
    if up not in (1, 2):
        raise ValueError(f"modulated_conv2d: up must be 1 or 2, got {up}")
    if (up == 2 or skip is not None) and resample_filter is None:
        raise ValueError("modulated_conv2d: up=2 and skip need resample_filter")


def modulated_conv2d_grouped(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                             demodulate: bool = True, up: int = 1,
                             resample_filter: torch.Tensor | None = None) -> torch.Tensor:
    """Test oracle: the per-sample kernel form with groups=N (as in the StyleGAN2 paper and rosinality).

    Bakes N into the computation, so it is never exported; returns the pre-noise/bias convolution output.
    """
    n, i, h, w_ = x.shape
    o, _, k, _ = weight.shape
    wk = weight[None] * styles.reshape(n, 1, i, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        wk = wk * (wk.square().sum(dim=(2, 3, 4)) + DEMOD_EPS).rsqrt().reshape(n, o, 1, 1, 1)
    xg = x.reshape(1, n * i, h, w_)
    if up == 1:
        out = F.conv2d(xg, wk.reshape(n * o, i, k, k), padding=k // 2, groups=n)
        return out.reshape(n, o, h, w_)
    wt = wk.transpose(1, 2).reshape(n * i, o, k, k)
    out = F.conv_transpose2d(xg, wt, stride=2, groups=n)
    out = out.reshape(n, o, out.shape[2], out.shape[3])
    p0, p1 = _up2_padding(k, resample_filter.shape[-1])
    return upfirdn2d(out, resample_filter, padding=(p0, p1, p0, p1), gain=4, impl="ref")
