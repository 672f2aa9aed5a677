"""The modulated-conv CUDA kernel source, run on the CPU through the fiber emulation (cudaEmulation.h), against the
PyTorch reference ops (impl="ref", the specification). Runs in CI without a GPU; shapes are small because every
GPU thread becomes a fiber. What it cannot see: warp scheduling, real memory coalescing, device-specific math."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

# name: (N, I, O, H, W, k, up, demodulate, noise batch (0 none), bias, act, clamp, skip)
VARIANTS = {
    "up1_demod_noise_bias_lrelu": (2, 5, 7, 9, 6, 3, 1, True, 1, True, "lrelu", None, False),
    "up1_multi_tile_clamp_per_sample_noise": (2, 20, 70, 9, 13, 3, 1, True, 2, True, "lrelu", 0.5, False),
    "up1_plain": (1, 6, 5, 5, 5, 3, 1, False, 0, False, "linear", None, False),
    "up1_small_out_channels_k3": (2, 9, 3, 6, 7, 3, 1, True, 0, True, "lrelu", None, False),
    "up1_1x1_many_out_channels": (2, 9, 8, 5, 4, 1, 1, True, 0, True, "linear", None, False),
    "up1_skip": (2, 8, 6, 6, 4, 3, 1, True, 0, True, "lrelu", None, True),
    "up2_demod_noise_bias_lrelu": (3, 6, 5, 5, 7, 3, 2, True, 1, True, "lrelu", None, False),
    "up2_multi_tile_no_demod": (2, 17, 66, 6, 6, 3, 2, False, 0, False, "linear", None, False),
    "up2_clamp_per_sample_noise": (2, 7, 9, 4, 5, 3, 2, True, 2, True, "lrelu", 0.3, False),
    "up2_1x1": (1, 8, 6, 4, 4, 1, 2, True, 0, True, "linear", None, False),
    "to_rgb_skip_clamp": (2, 40, 3, 8, 10, 1, 1, False, 0, True, "linear", 0.3, True),
    "to_rgb_many_in_channels": (2, 300, 3, 4, 4, 1, 1, False, 0, True, "linear", None, True),
    "to_rgb_no_skip": (1, 16, 3, 5, 3, 1, 1, False, 0, True, "linear", None, False),
}


def run_emulated(lib, x, weight, styles, *, demodulate, up, resample_filter, noise, bias, act, clamp, skip,
                 filter_on_device=False, tensor_cores=True):
    """Call libstylecast_emu's stylecastEmuModulatedConv2d on CPU tensors; returns the output tensor."""
    n, i, h, w = x.shape
    o, _, k, _ = weight.shape
    use_filter = resample_filter is not None and (up == 2 or skip is not None)
    f = resample_filter.float().contiguous() if use_filter else torch.zeros(1)
    gain = math.sqrt(2.0) if act == "lrelu" else 1.0
    out = torch.full((n, o, h * up, w * up), float("nan"), dtype=x.dtype)
    dims = (ctypes.c_int32 * 7)(n, i, o, h, w, k, 0 if noise is None else noise.shape[0])
    flags = (ctypes.c_int32 * 8)(int(demodulate), up, 1 if act == "lrelu" else 0, int(bias is not None),
                                 int(skip is not None), f.shape[0] if use_filter else 0, int(filter_on_device),
                                 int(tensor_cores))
    scalars = (ctypes.c_float * 3)(0.2, gain, -1.0 if clamp is None else clamp)
    tensors = [t.contiguous() if t is not None else None for t in (x, weight, styles, noise, bias, skip)]
    ptrs = (ctypes.c_void_p * 6)(*[t.data_ptr() if t is not None else None for t in tensors])
    msg = ctypes.create_string_buffer(512)
    rc = lib.stylecastEmuModulatedConv2d(x.dtype == torch.float16, dims, flags, scalars, ctypes.c_void_p(f.data_ptr()),
                                         ptrs, ctypes.c_void_p(out.data_ptr()), msg, 512)
    if rc != 0:
        raise RuntimeError(f"emulated kernel failed ({rc}): {msg.value.decode()}")
    return out


def make_inputs(spec, dtype, seed=0):
    n, i, o, h, w, k, up, _demod, noise_batch, has_bias, _act, _clamp, has_skip = spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, h, w, generator=g)
    weight = torch.randn(o, i, k, k, generator=g) / math.sqrt(i * k * k)
    styles = torch.randn(n, i, generator=g)
    noise = torch.randn(noise_batch, 1, h * up, w * up, generator=g) * 0.1 if noise_batch else None
    bias = torch.randn(o, generator=g) * 0.2 if has_bias else None
    skip = torch.randn(n, o, h * up // 2, w * up // 2, generator=g) if has_skip else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (x, weight, styles, noise, bias, skip)]


# fp16 runs both GEMMs: the tensor-core (WMMA) kernel, the default, and the fp32 SIMT kernel.
PATHS = {"fp32": (torch.float32, False), "fp16_wmma": (torch.float16, True), "fp16_simt": (torch.float16, False)}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_emulated_kernels_match_reference(emulator, name, path):
    dtype, tensor_cores = PATHS[path]
    spec = VARIANTS[name]
    demodulate, up, act, clamp = spec[7], spec[6], spec[10], spec[11]
    f = setup_filter([1, 3, 3, 1])
    x, weight, styles, noise, bias, skip = make_inputs(spec, dtype)
    got = run_emulated(emulator, x, weight, styles, demodulate=demodulate, up=up, resample_filter=f, noise=noise,
                       bias=bias, act=act, clamp=clamp, skip=skip, tensor_cores=tensor_cores)
    # The reference in float32 on the same (rounded) inputs: the kernels accumulate in float32 whatever the I/O type.
    up32 = lambda t: None if t is None else t.float()  # noqa: E731
    kwargs = dict(demodulate=demodulate, up=up, resample_filter=f, noise=up32(noise), bias=up32(bias), act=act,
                  skip=up32(skip), impl="ref")
    ref = modulated_conv2d(up32(x), up32(weight), up32(styles), clamp=clamp, **kwargs)
    assert got.shape == ref.shape and got.dtype == dtype
    assert torch.isfinite(got).all(), "kernel left outputs unwritten (NaN) or produced inf"
    # The output scale is taken before the clamp: rounding errors scale with the pre-clamp values.
    scale = modulated_conv2d(up32(x), up32(weight), up32(styles), clamp=None, **kwargs).abs().max().item()
    # fp32: summation order only. fp16: one rounding of the output (2^-11 relative); the WMMA path also rounds
    # x * styles to fp16 as the reference does, which the float32 reference here does not (hence 2e-3, not 1e-3).
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = (got.float() - ref).abs().max().item()
    assert err <= tol * scale, f"max|err| {err:.3e} > {tol * scale:.3e}"


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
