"""GPU checks of the modulated-conv CUDA kernels (both bindings) against the reference ops (impl="ref").

Tolerances (scale = max |reference before the clamp|):
    fp32: max |err| <= 1e-4 * scale vs a float64 reference (the kernels accumulate in fp32; summation order only).
    fp16: max |err| <= 2e-3 * scale vs a float64 reference on the same fp16-rounded inputs (one output rounding,
          2^-11 relative, dominates), and <= 1e-2 * scale vs the fp16 reference itself (which rounds after every op).
TF32 is switched off for the references: cuDNN would otherwise round the fp32 reference to 10 mantissa bits.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

pytestmark = pytest.mark.gpu


def channels(res: int) -> int:
    """StyleGAN2 config-f channel count at a resolution (channel_base 32768, channel_max 512)."""
    return min(32768 // res, 512)


def config_f_layers() -> list[tuple]:
    """(name, N, I, O, H_in, k, up, kind) for every synthesis layer of a 1024 px config-f generator."""
    layers = []
    batches = [1, 2, 3, 5, 8]
    for idx, res in enumerate([8, 16, 32, 64, 128, 256, 512, 1024]):
        n = batches[idx % len(batches)]
        layers.append((f"up_{res}", n, channels(res // 2), channels(res), res // 2, 3, 2, "conv"))
        layers.append((f"conv_{res}", batches[(idx + 1) % len(batches)], channels(res), channels(res), res, 3, 1,
                       "conv"))
        layers.append((f"torgb_{res}", batches[(idx + 2) % len(batches)], channels(res), 3, res, 1, 1, "rgb"))
    return layers


def random_layers(count: int = 12, seed: int = 0) -> list[tuple]:
    """Odd shapes with every optional part toggled.

    Returns (name, N, I, O, H, W, k, up, demod, noise (0 none, 1 broadcast, -1 per sample), bias, act, clamp, skip).
    """
    rng = random.Random(seed)
    out = []
    for idx in range(count):
        up = rng.choice([1, 2])
        k = rng.choice([1, 3, 3]) if up == 1 else 3
        to_rgb = k == 1 and rng.random() < 0.5
        o = 3 if to_rgb else rng.choice([1, 5, 64, 65, 130])
        out.append((f"random_{idx}", rng.randint(1, 8), rng.choice([3, 16, 37, 128, 300]), o, rng.randint(1, 21),
                    rng.randint(1, 21), k, up, not to_rgb and rng.random() < 0.7, rng.choice([0, 1, -1]),
                    rng.random() < 0.7, "linear" if to_rgb else rng.choice(["linear", "lrelu"]),
                    rng.choice([None, None, 0.7, 256.0]), to_rgb or rng.random() < 0.2))
    return out


@pytest.fixture(autouse=True)
def no_tf32():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_inputs(n, i, o, h, w, k, up, noise_batch, has_bias, has_skip, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(n, i, h, w, **kw)
    weight = torch.randn(o, i, k, k, **kw) / math.sqrt(i * k * k)
    styles = torch.randn(n, i, **kw) * 0.5 + 1.0
    noise = torch.randn(noise_batch, 1, h * up, w * up, **kw) * 0.1 if noise_batch else None
    bias = torch.randn(o, **kw) * 0.2 if has_bias else None
    skip = torch.randn(n, o, h * up // 2, w * up // 2, **kw) if has_skip else None
    return [None if t is None else t.to(dtype) for t in (x, weight, styles, noise, bias, skip)]


def compare(ext, inputs, dtype, **kwargs):
    x, weight, styles, noise, bias, skip = inputs
    f = setup_filter([1, 3, 3, 1], device="cuda")
    gain = -1.0
    got = ext.modulated_conv2d(x, weight, styles, kwargs["demodulate"], kwargs["up"], f, noise, bias, kwargs["act"],
                               gain, -1.0 if kwargs["clamp"] is None else kwargs["clamp"], skip)
    torch.cuda.synchronize()
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref_kwargs = dict(resample_filter=f.double(), noise=f64(noise), bias=f64(bias), skip=f64(skip), impl="ref",
                      **{k: v for k, v in kwargs.items() if k != "clamp"})
    ref = modulated_conv2d(f64(x), f64(weight), f64(styles), clamp=kwargs["clamp"], **ref_kwargs)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    # Output scale before the clamp: rounding errors scale with the pre-clamp values.
    scale = max(modulated_conv2d(f64(x), f64(weight), f64(styles), clamp=None, **ref_kwargs).abs().max().item(), 1e-6)
    err = (got.double() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert err <= tol * scale, f"max|err| {err:.3e} > {tol:.0e} * scale {scale:.3e}"
    if dtype == torch.float16:
        ref16 = modulated_conv2d(x, weight, styles, resample_filter=f, noise=noise, bias=bias, skip=skip, impl="ref",
                                 **kwargs)
        err16 = (got.float() - ref16.float()).abs().max().item()
        assert err16 <= 1e-2 * scale, f"vs fp16 reference: max|err| {err16:.3e} > 1e-2 * scale {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layer", config_f_layers(), ids=lambda layer: layer[0])
def test_config_f_layers_match_reference(torch_ext, layer, dtype):
    name, n, i, o, h, k, up, kind = layer
    if kind == "rgb":
        inputs = make_inputs(n, i, o, h, h, k, 1, 0, True, True, dtype, seed=h)
        compare(torch_ext, inputs, dtype, demodulate=False, up=1, act="linear", clamp=256.0)
    else:
        inputs = make_inputs(n, i, o, h, h, k, up, 1, True, False, dtype, seed=h + up)
        compare(torch_ext, inputs, dtype, demodulate=True, up=up, act="lrelu", clamp=256.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layer", random_layers(), ids=lambda layer: layer[0])
def test_random_layers_match_reference(torch_ext, layer, dtype):
    name, n, i, o, h, w, k, up, demod, noise_mode, has_bias, act, clamp, has_skip = layer
    out_h, out_w = h * up, w * up
    if has_skip and (out_h % 2 or out_w % 2):
        h, w = h + (out_h % 2), w + (out_w % 2)  # skip needs an even output size
    noise_batch = {0: 0, 1: 1, -1: n}[noise_mode]
    inputs = make_inputs(n, i, o, h, w, k, up, noise_batch, has_bias, has_skip, dtype, seed=int(name.split("_")[1]))
    compare(torch_ext, inputs, dtype, demodulate=demod, up=up, act=act, clamp=clamp)


def test_dispatcher_uses_extension(torch_ext, monkeypatch):
    """training.ops with impl='cuda' reaches the extension and agrees with impl='ref'."""
    from training.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_ext_loaded", False)
    monkeypatch.setattr(_dispatch, "_ext", None)
    x, weight, styles, noise, bias, _ = make_inputs(2, 32, 48, 16, 16, 3, 2, 1, True, False, torch.float32, 7)
    f = setup_filter([1, 3, 3, 1], device="cuda")
    kwargs = dict(demodulate=True, up=2, resample_filter=f, noise=noise, bias=bias, act="lrelu")
    with torch.no_grad():
        fast = modulated_conv2d(x, weight, styles, impl="cuda", **kwargs)
        ref = modulated_conv2d(x, weight, styles, impl="ref", **kwargs)
    assert (fast - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_extension_runs_on_current_stream(torch_ext):
    x, weight, styles, _, bias, _ = make_inputs(3, 64, 64, 32, 32, 3, 1, 0, True, False, torch.float32, 11)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = torch_ext.modulated_conv2d(x, weight, styles, True, 1, None, None, bias, "lrelu", -1.0, -1.0, None)
    stream.synchronize()
    ref = modulated_conv2d(x, weight, styles, bias=bias, act="lrelu", impl="ref")
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_extension_refuses_autograd(torch_ext):
    x, weight, styles, *_ = make_inputs(1, 8, 8, 4, 4, 3, 1, 0, False, False, torch.float32, 1)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        torch_ext.modulated_conv2d(x, weight, styles, True, 1, None, None, None, "linear", -1.0, -1.0, None)


def test_plugin_enqueue_on_device_buffers(plugin_build):
    """The TensorRT plugin's own enqueue() (real library, device buffers) vs the harness's float64 reference."""
    if "harness_gpu" not in plugin_build:
        pytest.skip("the GPU harness was not built (no nvcc)")
    proc = subprocess.run([plugin_build["harness_gpu"], plugin_build["plugin"], "--enqueue"], capture_output=True,
                          text=True, timeout=600)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, proc.stdout + proc.stderr
    assert "PASS enqueue_large_up2_fp16" in proc.stdout


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
def test_compute_sanitizer(plugin_build, tool):
    """Every kernel, both dtypes, odd multi-tile shapes, under compute-sanitizer (via the GPU harness)."""
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    if "harness_gpu" not in plugin_build:
        pytest.skip("the GPU harness was not built (no nvcc)")
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "99", plugin_build["harness_gpu"],
                           plugin_build["plugin"], "--enqueue"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr
