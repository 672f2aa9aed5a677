"""GPU checks of the modulated-conv CUDA kernels (both bindings) against the reference ops (impl="ref").

The cases, the float64 reference and the tolerances are the device check's (benchmarks/device/kernels.py, whose
docstring justifies them): every config-f layer shape of a 1024 px generator at batch 1 and 8, and odd shapes,
fp32 and fp16, with a NaN-poisoned output and workspace. TF32 is switched off for the references: cuDNN would
otherwise round the fp32 reference to 10 mantissa bits.
"""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

from benchmarks.device.builds import cuda_tool
from benchmarks.device.kernels import check_case, config_f_cases, cuda_runner, odd_cases
from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

pytestmark = pytest.mark.gpu

CASES = odd_cases() + config_f_cases(1024, (1, 8))


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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernels_match_reference(torch_ext, case, precision):
    seed = 2 * CASES.index(case) + (precision == "fp16")
    rec = check_case(case, precision, seed=seed, run=cuda_runner(torch_ext), device="cuda")
    assert rec["status"] == "ok", rec["reason"]


def test_extension_checks_its_out_argument(torch_ext):
    x, weight, styles, *_ = make_inputs(1, 8, 4, 4, 4, 3, 1, 0, False, False, torch.float32, 3)
    wrong = torch.empty(1, 4, 5, 4, device="cuda")
    with pytest.raises(RuntimeError, match="out must be"):
        torch_ext.modulated_conv2d(x, weight, styles, True, 1, None, None, None, "linear", -1.0, -1.0, None, out=wrong)
    out = torch.full((1, 4, 4, 4), float("nan"), device="cuda")
    got = torch_ext.modulated_conv2d(x, weight, styles, True, 1, None, None, None, "linear", -1.0, -1.0, None,
                                     out=out, poison=True)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()


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


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
def test_compute_sanitizer(plugin_build, tool):
    """Every kernel, both dtypes, odd multi-tile shapes, under compute-sanitizer (via the GPU harness)."""
    sanitizer = cuda_tool("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    if "harness_gpu" not in plugin_build:
        pytest.skip("the GPU harness was not built (no nvcc)")
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "99", plugin_build["harness_gpu"],
                           plugin_build["plugin"], "--enqueue"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr
