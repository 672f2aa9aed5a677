"""Layer cases and comparisons for the fused modulated-convolution kernels (StyleGAN2, Karras et al., 2020) against
the reference op (training.ops, impl="ref") evaluated in float64 on the same rounded inputs.

Two runners share the cases: the compiled PyTorch extension on a GPU (`stylecast_ops_cuda`) and the CPU
emulation of the same kernel source (`libstylecast_emu.so`, cudaEmulation.h) for machines without one.

Tolerances (by I/O precision; `scale` multiplies them, a check of the check):
    rel_l2  = ||out - ref|| / ||ref||       (METHOD: float32 lands far under 1e-3)
    max_rel = max |out - ref| / max |ref|  (the reference before the clamp where a clamp bites)
  fp32: rel_l2 <= 1e-5, max_rel <= 1e-4. The kernels accumulate K = I * k * k <= 4608 products in float32;
        the rounding of such a sum is about sqrt(K) * 2^-24 ~ 4e-6 of its largest terms and usually far less,
        and rsqrtf adds 2 ulp to the demodulation. A wrong tap, a missed tile, a race or an unwritten element
        costs 1e-2 or more.
  fp16: rel_l2 <= 2e-3, max_rel <= 2e-3 against float64 on the fp16 inputs: one rounding of the output
        (2^-11 relative at most, ~2.8e-4 rms) plus the tensor-core path's rounding of x * styles to fp16 (as the
        reference rounds it), together ~4e-4 rms; and max_rel <= 1e-2 against the fp16 reference itself, which
        rounds after every op.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

TOLERANCES = {
    "fp32": {"rel_l2": 1e-5, "max_rel": 1e-4},
    "fp16": {"rel_l2": 2e-3, "max_rel": 2e-3, "max_rel_vs_fp16_ref": 1e-2},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BLUR = (1.0, 3.0, 3.0, 1.0)
ASYMMETRIC = (1.0, 2.0, 4.0, 1.0)  # catches a missing flip: the reference convolves, it does not correlate


@dataclass(frozen=True)
class LayerCase:
    """One call of the op: shapes and every optional part. noise_batch 0: none, 1: broadcast, n: per sample."""

    name: str
    n: int
    i: int
    o: int
    h: int
    w: int
    k: int
    up: int
    demodulate: bool
    noise_batch: int
    bias: bool
    act: str
    clamp: float | None
    skip: bool
    taps: tuple[float, ...] = BLUR

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = list(self.taps)
        return d


def channels(res: int, base: int = 32768, cmax: int = 512) -> int:
    """StyleGAN2 config-f channel count at a resolution (channel_base 32768, channel_max 512)."""
    return min(base // res, cmax)


def config_f_cases(resolution: int = 1024, batches: tuple[int, ...] = tuple(range(1, 9)),
                   clamp: float | None = 256.0) -> list[LayerCase]:
    """Every synthesis layer of a config-f generator (4 px conv and to-RGB, then per resolution the x2 up-conv,
    the conv and the to-RGB with its skip), at every batch size, in the generator's own configuration (demod,
    broadcast noise, bias, lrelu; to-RGB: no demod, linear, skip) and NVlabs' fp16 clamp.

    Batches are ordered 1 and max first, then the rest, so a time budget cut keeps the extremes of every layer.
    """
    order = [b for b in batches if b in (min(batches), max(batches))] + \
        [b for b in batches if b not in (min(batches), max(batches))]
    layers: list[tuple[str, int, int, int, int, int, bool, str, bool]] = [
        ("conv_4", channels(4), channels(4), 4, 3, 1, True, "lrelu", False),
        ("torgb_4", channels(4), 3, 4, 1, 1, False, "linear", False),
    ]
    res = 8
    while res <= resolution:
        c_in, c = channels(res // 2), channels(res)
        layers += [(f"up_{res}", c_in, c, res // 2, 3, 2, True, "lrelu", False),
                   (f"conv_{res}", c, c, res, 3, 1, True, "lrelu", False),
                   (f"torgb_{res}", c, 3, res, 1, 1, False, "linear", True)]
        res *= 2
    cases = []
    for b in order:
        for name, i, o, h, k, up, demod, act, skip in layers:
            rgb = name.startswith("torgb")
            cases.append(LayerCase(f"{name}_b{b}", b, i, o, h, h, k, up, demod, 0 if rgb else 1, True, act, clamp,
                                   skip))
    return cases


def odd_cases(count: int = 12, seed: int = 0) -> list[LayerCase]:
    """Odd shapes with every optional part toggled (several tiles along every GEMM axis, odd sizes, per-sample
    noise, biting clamps), plus asymmetric filters for the x2 path and the skip."""
    rng = random.Random(seed)
    out = []
    for idx in range(count):
        up = rng.choice([1, 2])
        k = rng.choice([1, 3, 3]) if up == 1 else 3
        to_rgb = k == 1 and rng.random() < 0.5
        o = 3 if to_rgb else rng.choice([1, 5, 64, 65, 130])
        n = rng.randint(1, 8)
        h, w = rng.randint(1, 21), rng.randint(1, 21)
        skip = to_rgb or rng.random() < 0.2
        if skip and ((h * up) % 2 or (w * up) % 2):
            h, w = h + (h * up) % 2, w + (w * up) % 2  # skip needs an even output size
        out.append(LayerCase(f"odd_{idx}", n, rng.choice([3, 16, 37, 128, 300]), o, h, w, k, up,
                             not to_rgb and rng.random() < 0.7, rng.choice([0, 1, n]), rng.random() < 0.7,
                             "linear" if to_rgb else rng.choice(["linear", "lrelu"]),
                             rng.choice([None, None, 0.7, 256.0]), skip))
    out.append(LayerCase("asym_up2", 3, 40, 70, 9, 6, 3, 2, True, 3, True, "lrelu", None, False, ASYMMETRIC))
    out.append(LayerCase("asym_skip", 2, 64, 3, 12, 10, 1, 1, False, 0, True, "linear", None, True, ASYMMETRIC))
    return out


# Small shapes for the CPU emulation, where every GPU thread is a fiber: the variants of
# tests/trt_plugins/test_kernels_emulated.py.
EMULATED_CASES = [
    LayerCase("up1_demod_noise_bias_lrelu", 2, 5, 7, 9, 6, 3, 1, True, 1, True, "lrelu", None, False),
    LayerCase("up1_multi_tile_clamp_per_sample_noise", 2, 20, 70, 9, 13, 3, 1, True, 2, True, "lrelu", 0.5, False),
    LayerCase("up1_plain", 1, 6, 5, 5, 5, 3, 1, False, 0, False, "linear", None, False),
    LayerCase("up1_small_out_channels_k3", 2, 9, 3, 6, 7, 3, 1, True, 0, True, "lrelu", None, False),
    LayerCase("up1_1x1_many_out_channels", 2, 9, 8, 5, 4, 1, 1, True, 0, True, "linear", None, False),
    LayerCase("up1_skip", 2, 8, 6, 6, 4, 3, 1, True, 0, True, "lrelu", None, True),
    LayerCase("up2_demod_noise_bias_lrelu", 3, 6, 5, 5, 7, 3, 2, True, 1, True, "lrelu", None, False),
    LayerCase("up2_multi_tile_no_demod", 2, 17, 66, 6, 6, 3, 2, False, 0, False, "linear", None, False),
    LayerCase("up2_clamp_per_sample_noise", 2, 7, 9, 4, 5, 3, 2, True, 2, True, "lrelu", 0.3, False),
    LayerCase("up2_1x1", 1, 8, 6, 4, 4, 1, 2, True, 0, True, "linear", None, False),
    LayerCase("to_rgb_skip_clamp", 2, 40, 3, 8, 10, 1, 1, False, 0, True, "linear", 0.3, True),
    LayerCase("to_rgb_many_in_channels", 2, 300, 3, 4, 4, 1, 1, False, 0, True, "linear", None, True),
    LayerCase("to_rgb_no_skip", 1, 16, 3, 5, 3, 1, 1, False, 0, True, "linear", None, False),
]


# ----------------------------------------------------------------------------------------------------------
# Inputs and the reference


def make_inputs(case: LayerCase, dtype: torch.dtype, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Random inputs of one case, already rounded to `dtype` (never zeros: they hide unwritten outputs).

    Returns:
        {"x" [N, I, H, W], "weight" [O, I, k, k] (gain applied), "styles" [N, I] (around 1), "noise"
        [noise_batch, 1, H*up, W*up] or None, "bias" [O] or None, "skip" [N, O, H*up/2, W*up/2] or None,
        "filter" [f, f] float32}, on `device`.
    """
    # Drawn on the device itself: the largest config-f inputs hold 2^28 values, slow to draw on a host.
    g = torch.Generator(device=device).manual_seed(seed)
    c = case
    kw = dict(generator=g, device=device)
    x = torch.randn(c.n, c.i, c.h, c.w, **kw)
    weight = torch.randn(c.o, c.i, c.k, c.k, **kw) / math.sqrt(c.i * c.k * c.k)
    styles = torch.randn(c.n, c.i, **kw) * 0.5 + 1.0
    noise = torch.randn(c.noise_batch, 1, c.h * c.up, c.w * c.up, **kw) * 0.1 if c.noise_batch else None
    bias = torch.randn(c.o, **kw) * 0.2 if c.bias else None
    skip = torch.randn(c.n, c.o, c.h * c.up // 2, c.w * c.up // 2, **kw) if c.skip else None
    out = {key: None if t is None else t.to(dtype)
           for key, t in (("x", x), ("weight", weight), ("styles", styles), ("noise", noise), ("bias", bias),
                          ("skip", skip))}
    out["filter"] = setup_filter(list(c.taps), device=device)
    return out


def reference(case: LayerCase, inputs: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """impl="ref" on the inputs cast to `dtype` (float64 by default: the independent reference)."""
    dtype = dtype or torch.float64
    cast = {k: None if v is None else v.to(dtype) for k, v in inputs.items() if k != "filter"}
    return modulated_conv2d(cast["x"], cast["weight"], cast["styles"], demodulate=case.demodulate, up=case.up,
                            resample_filter=inputs["filter"].to(dtype), noise=cast["noise"], bias=cast["bias"],
                            act=case.act, clamp=case.clamp, skip=cast["skip"], impl="ref")


def compare(got: torch.Tensor, ref: torch.Tensor, precision: str, scale: float = 1.0,
            ref_same_dtype: torch.Tensor | None = None, magnitude: float | None = None) -> dict[str, Any]:
    """The error metrics of `got` against the float64 reference and whether they meet the precision's tolerances.

    magnitude: max |reference before the clamp| when a clamp bites (rounding errors scale with the values
    before it), else max |ref| is used.

    Returns:
        {"finite", "rel_l2", "max_rel", ("max_rel_vs_fp16_ref"), "tolerances", "ok", "reason"}; non-finite
        outputs (poisoned elements never written, inf) fail whatever the numbers.
    """
    tol = {k: v * scale for k, v in TOLERANCES[precision].items()}
    out: dict[str, Any] = {"tolerances": tol}
    if got.shape != ref.shape:
        return {**out, "finite": None, "ok": False, "reason": f"shape {tuple(got.shape)} != {tuple(ref.shape)}"}
    g64 = got.double()
    finite = bool(torch.isfinite(g64).all())
    out["finite"] = finite
    if not finite:
        bad = int((~torch.isfinite(g64)).sum())
        return {**out, "ok": False, "reason": f"{bad} non-finite output elements (unwritten or overflow)"}
    err = g64 - ref
    ref_norm = max(float(ref.norm()), 1e-300)
    ref_max = max(float(ref.abs().max()), magnitude or 0.0, 1e-300)
    out["rel_l2"] = float(err.norm()) / ref_norm
    out["max_rel"] = float(err.abs().max()) / ref_max
    if ref_same_dtype is not None:
        out["max_rel_vs_fp16_ref"] = float((g64 - ref_same_dtype.double()).abs().max()) / ref_max
    failed = [f"{k} {out[k]:.3g} > {tol[k]:.3g}" for k in tol if k in out and not out[k] <= tol[k]]
    out["ok"] = not failed
    out["reason"] = "; ".join(failed)
    return out


def check_case(case: LayerCase, precision: str, seed: int, run: Callable[..., torch.Tensor], device: str,
               scale: float = 1.0) -> dict[str, Any]:
    """Run one case through `run` (a kernel runner: see cuda_runner / emulated_runner) and compare it.

    Returns:
        a record: the case, precision, seed, metrics, status ("ok" / "failed") and reason.
    """
    dtype = DTYPES[precision]
    inputs = make_inputs(case, dtype, seed, device)
    got = run(case, inputs)
    ref = reference(case, inputs)
    ref16 = reference(case, inputs, torch.float16) if precision == "fp16" else None
    magnitude = None
    if case.clamp is not None and (case.skip or bool((ref.abs() >= case.clamp).any())):
        # The clamp bit (or a skip hides whether it did): errors scale with the values before it.
        magnitude = float(reference(dataclasses.replace(case, clamp=None), inputs).abs().max())
    metrics = compare(got, ref, precision, scale, ref16, magnitude)
    return {"name": case.name, "precision": precision, "seed": seed, "case": case.describe(),
            **{k: v for k, v in metrics.items() if k not in ("ok", "reason")},
            "status": "ok" if metrics["ok"] else "failed", "reason": metrics["reason"]}


# ----------------------------------------------------------------------------------------------------------
# Runners


def cuda_runner(ext) -> Callable[[LayerCase, dict[str, Any]], torch.Tensor]:
    """Call the compiled extension with a NaN-filled output and a poisoned workspace (every element must be
    written; scratch that is read before it is written turns into NaN)."""

    def run(case: LayerCase, t: dict[str, Any]) -> torch.Tensor:
        out = torch.full((case.n, case.o, case.h * case.up, case.w * case.up), float("nan"), dtype=t["x"].dtype,
                         device=t["x"].device)
        ext.modulated_conv2d(t["x"], t["weight"], t["styles"], case.demodulate, case.up, t["filter"], t["noise"],
                             t["bias"], case.act, -1.0, -1.0 if case.clamp is None else float(case.clamp), t["skip"],
                             out=out, poison=True)
        torch.cuda.synchronize()
        return out

    return run


def load_emulator(path: str) -> ctypes.CDLL:
    """ctypes handle on libstylecast_emu.so (the real kernel source running on the CPU)."""
    lib = ctypes.CDLL(path)
    lib.stylecastEmuModulatedConv2d.restype = ctypes.c_int32
    return lib


def run_emulated(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool,
                 up: int, resample_filter: torch.Tensor | None, noise: torch.Tensor | None, bias: torch.Tensor | None,
                 act: str, clamp: float | None, skip: torch.Tensor | None, filter_on_device: bool = False,
                 tensor_cores: bool = True) -> torch.Tensor:
    """stylecastEmuModulatedConv2d on CPU tensors (output poisoned with NaN first; the emulator poisons its
    workspace itself).

    Returns:
        [N, O, H*up, W*up] in x's dtype.
    Raises:
        RuntimeError: the emulator refused the arguments or caught a divergent barrier / misaligned fragment.
    """
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


def emulated_runner(lib: ctypes.CDLL, tensor_cores: bool = True) -> Callable[[LayerCase, dict[str, Any]], torch.Tensor]:
    """The CPU-emulated kernels as a runner for check_case (fp16: WMMA or the fp32 SIMT GEMM)."""

    def run(case: LayerCase, t: dict[str, Any]) -> torch.Tensor:
        return run_emulated(lib, t["x"], t["weight"], t["styles"], demodulate=case.demodulate, up=case.up,
                            resample_filter=t["filter"], noise=t["noise"], bias=t["bias"], act=case.act,
                            clamp=case.clamp, skip=t["skip"], tensor_cores=tensor_cores)

    return run
