"""The whole StyleGAN2 synthesis network (Karras et al., 2020) through the fused kernels against the reference ops,
both against a float64 evaluation of the same weights, plus its cost in FLOPs.

Tolerances for a whole generator (relative L2 error against float64, `scale` multiplies them):
  fp32 <= 1e-4: each of the 17 (1024 px) layers adds float32 rounding of ~1e-6 relative and demodulation keeps
       every layer's output at unit scale, so the errors add up instead of growing; the reference ops (cuDNN,
       TF32 off) must meet the same bound, which makes the check symmetric.
  fp16 <= 2e-2: the fp16 generator rounds activations to 11 bits at every layer (~3e-4 each), and each layer
       passes its input error on, amplified by its gain; bf16-level figures of 1e-3..1e-2 are expected
       (METHOD), a wrong layout or a dropped layer is O(1).
PSNR against the fp32 reference output must also reach benchmarks.harness.PSNR_THRESHOLDS (fp32 60 dB, fp16 40).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from benchmarks.harness import PSNR_THRESHOLDS, psnr
from training.networks.stylegan2 import Generator, GeneratorConfig

GEN_TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
#: GFLOP per image of config-f synthesis (REFERENCE.md: 2 x GMAC, convolutions and the FIR blurs).
CONFIG_F_GFLOP = {256: 90.8, 512: 120.4, 1024: 150.8}


def synthesis_gflop(cfg: GeneratorConfig) -> float:
    """FLOPs (2 x multiply-adds) of one image through the synthesis network: every modulated convolution (the
    x2 layers counted on their input pixels, as a stride-2 transposed convolution), the 4x4 blur after each x2
    convolution and the blur of each to-RGB skip. Modulation, demodulation, noise and bias are left out (they
    are O(channels x pixels), under 0.1%)."""
    taps = len(cfg.blur_kernel) ** 2
    macs = 0
    for res in cfg.resolutions:
        c = cfg.channels_at(res)
        if res > 4:
            c_in = cfg.channels_at(res // 2)
            macs += c_in * c * 9 * (res // 2) ** 2      # x2 transposed conv
            macs += c * res * res * taps                  # blur after it
            macs += cfg.img_channels * res * res * taps   # upsampled skip
        macs += c * c * 9 * res * res                     # conv
        macs += c * cfg.img_channels * res * res          # to-RGB
    return 2 * macs / 1e9


def gflop_per_image(cfg: GeneratorConfig) -> float:
    """The REFERENCE.md figure for config-f resolutions, else synthesis_gflop."""
    if cfg == GeneratorConfig.rosinality(cfg.resolution, 2) and cfg.resolution in CONFIG_F_GFLOP:
        return CONFIG_F_GFLOP[cfg.resolution]
    return synthesis_gflop(cfg)


def make_checked_generator(cfg: GeneratorConfig, seed: int) -> Generator:
    """A random generator with non-zero noise strengths and biases, so that every part of every layer counts
    (a fresh Generator has both at zero, which would hide a broken noise or bias path)."""
    torch.manual_seed(seed)
    G = Generator(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in G.synthesis.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=g))
            elif name.endswith(".bias") and ".affine." not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return G


def metrics(got: torch.Tensor, ref64: torch.Tensor, fp32_out: torch.Tensor) -> dict[str, Any]:
    """max abs and relative L2 against float64, PSNR against the fp32 reference output (peak 2, as the
    benchmarks and `export verify`)."""
    g = got.detach().double().cpu()
    r = ref64.detach().cpu()
    finite = bool(torch.isfinite(g).all())
    if not finite:
        return {"finite": False, "max_abs": None, "rel_l2": None, "psnr_db": None}
    err = g - r
    return {"finite": True, "max_abs": float(err.abs().max()), "rel_l2": float(err.norm() / max(r.norm(), 1e-300)),
            "psnr_db": psnr(g.numpy(), fp32_out.detach().double().cpu().numpy())}


def judge(m: dict[str, Any], precision: str, scale: float) -> tuple[str, str]:
    """(status, reason) of one comparison against the tolerances above."""
    if not m["finite"]:
        return "failed", "non-finite output"
    tol = GEN_TOLERANCES[precision] * scale
    reasons = []
    if not m["rel_l2"] <= tol:
        reasons.append(f"rel_l2 {m['rel_l2']:.3g} > {tol:.3g}")
    p = m["psnr_db"]
    if not (math.isinf(p) or p >= PSNR_THRESHOLDS[precision]):
        reasons.append(f"PSNR {p:.1f} dB < {PSNR_THRESHOLDS[precision]:.0f} dB")
    return ("failed" if reasons else "ok"), "; ".join(reasons)


def run_generator_check(cfg: GeneratorConfig, batch: int, seed: int, device: str, fused: bool,
                        scale: float = 1.0, fp16: bool = True) -> list[dict[str, Any]]:
    """Synthesise one batch of random W+ latents (from the mapping network, psi 0.7) through the reference ops
    in float64, fp32 and (fp16) the half-precision generator, and with `fused` through the compiled kernels.

    Returns:
        one record per (implementation, precision): {name, precision, impl, max_abs, rel_l2, psnr_db, status,
        reason, tolerance_rel_l2, against}.
    """
    from export.onnx_export import half_generator

    G = make_checked_generator(cfg, seed)
    with torch.no_grad():
        z = torch.from_numpy(np.random.RandomState(seed).randn(batch, cfg.z_dim).astype(np.float32))
        ws = G.map(z, psi=0.7)
    out: list[dict[str, Any]] = []

    def synth(model: Generator, x: torch.Tensor, impl: str) -> torch.Tensor:
        with torch.inference_mode():
            y = model.synthesis(x, noise_mode="const", impl=impl)
        if y.is_cuda:
            torch.cuda.synchronize()
        return y

    ref64 = synth(copy.deepcopy(G).double().to(device), ws.double().to(device), "ref")
    Gd = copy.deepcopy(G).to(device)
    eager32 = synth(Gd, ws.to(device), "ref")
    runs = [("reference", "fp32", eager32, ref64)]
    if fused:
        runs.append(("fused", "fp32", synth(Gd, ws.to(device), "cuda"), ref64))
    if fp16:
        Gh = half_generator(G).to(device)
        wsh = ws.half()
        # float64 on the fp16 generator's own (rounded) weights and clamp: only the arithmetic differs.
        ref64h = synth(copy.deepcopy(Gh).double(), wsh.double().to(device), "ref")
        runs.append(("reference", "fp16", synth(Gh, wsh.to(device), "ref"), ref64h))
        if fused:
            runs.append(("fused", "fp16", synth(Gh, wsh.to(device), "cuda"), ref64h))
    for impl, precision, got, ref in runs:
        m = metrics(got, ref, eager32)
        status, reason = judge(m, precision, scale)
        out.append({"name": f"{impl}_{precision}", "impl": impl, "precision": precision, "batch": batch,
                    "resolution": cfg.resolution, "seed": seed, **m,
                    "tolerance_rel_l2": GEN_TOLERANCES[precision] * scale,
                    "psnr_min_db": PSNR_THRESHOLDS[precision],
                    "against": "float64 of the same weights (rel_l2, max_abs); reference fp32 output (PSNR)",
                    "status": status, "reason": reason})
    return out
