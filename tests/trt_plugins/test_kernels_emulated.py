"""The modulated-conv CUDA kernel source, run on the CPU through the fiber emulation (cudaEmulation.h), against the
PyTorch reference ops (impl="ref", the specification). Runs in CI without a GPU; shapes are small because every
GPU thread becomes a fiber. What it cannot see: warp scheduling, real memory coalescing, device-specific math.

The matrix of variants x {fp32, fp16 WMMA, fp16 SIMT} runs as the kernels step of the device check's dry run
(tests/trt_plugins/test_device_check.py); this file holds the checks that need their own arguments.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.device import kernels
from benchmarks.device.kernels import EMULATED_CASES, run_emulated
from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

VARIANTS = {c.name: c for c in EMULATED_CASES}


def make_inputs(case, dtype, seed=0):
    """x, weight, styles, noise, bias, skip of a case (benchmarks.device.kernels.make_inputs, as a list)."""
    t = kernels.make_inputs(case, dtype, seed)
    return [t[k] for k in ("x", "weight", "styles", "noise", "bias", "skip")]


def test_emulated_filter_from_device_pointer(emulator):
    """The torch binding passes the filter as a device pointer (no host sync); the kernels read it the same way."""
    spec = VARIANTS["up2_demod_noise_bias_lrelu"]
    f = setup_filter([1, 2, 4, 1])  # asymmetric: catches a missing flip
    x, weight, styles, noise, bias, skip = make_inputs(spec, torch.float32, seed=3)
    kwargs = dict(demodulate=True, up=2, resample_filter=f, noise=noise, bias=bias, act="lrelu", clamp=None,
                  skip=None)
    by_value = run_emulated(emulator, x, weight, styles, **kwargs)
    by_pointer = run_emulated(emulator, x, weight, styles, filter_on_device=True, **kwargs)
    ref = modulated_conv2d(x, weight, styles, impl="ref", **kwargs)
    assert torch.equal(by_value, by_pointer)
    assert (by_value - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def test_emulated_asymmetric_filter_skip(emulator):
    """Skip upsampling with a non-symmetric filter: the reference convolves (flips); so must the kernel."""
    spec = VARIANTS["to_rgb_skip_clamp"]
    f = setup_filter([1, 2, 4, 1])
    x, weight, styles, noise, bias, skip = make_inputs(spec, torch.float32, seed=5)
    kwargs = dict(demodulate=False, up=1, resample_filter=f, noise=None, bias=bias, act="linear", clamp=None,
                  skip=skip)
    got = run_emulated(emulator, x, weight, styles, **kwargs)
    ref = modulated_conv2d(x, weight, styles, impl="ref", **kwargs)
    assert (got - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def test_emulated_zero_styles_stay_finite(emulator):
    """All-zero styles: demod = rsqrt(0 + 1e-8) multiplies an all-zero conv; the output is bias only, no NaN."""
    spec = VARIANTS["up1_demod_noise_bias_lrelu"]
    x, weight, styles, noise, bias, skip = make_inputs(spec, torch.float32)
    styles = torch.zeros_like(styles)
    got = run_emulated(emulator, x, weight, styles, demodulate=True, up=1, resample_filter=None, noise=None,
                       bias=bias, act="lrelu", clamp=None, skip=None)
    ref = modulated_conv2d(x, weight, styles, demodulate=True, bias=bias, act="lrelu", impl="ref")
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-6)


def test_emulated_rejects_invalid_arguments(emulator):
    spec = VARIANTS["up2_demod_noise_bias_lrelu"]
    x, weight, styles, noise, bias, skip = make_inputs(spec, torch.float32)
    with pytest.raises(RuntimeError, match="up=2 needs resample_filter"):
        run_emulated(emulator, x, weight, styles, demodulate=True, up=2, resample_filter=None, noise=None,
                     bias=None, act="linear", clamp=None, skip=None)
    with pytest.raises(RuntimeError, match="noise batch"):
        bad_noise = torch.zeros(2, 1, 10, 14)  # batch 3 needs noise batch 1 or 3
        run_emulated(emulator, x, weight, styles, demodulate=True, up=2, resample_filter=setup_filter([1, 3, 3, 1]),
                     noise=bad_noise, bias=None, act="linear", clamp=None, skip=None)
