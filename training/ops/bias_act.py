"""Fused bias + activation + gain + clamp, the epilogue of every StyleGAN2 layer (Karras et al., 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import use_cuda_impl

# Default gains keep the activations' second moment: sqrt(2) for leaky ReLU as in StyleGAN2.
ACTIVATIONS = {
    "linear": 1.0,
    "lrelu": math.sqrt(2.0),
    "relu": math.sqrt(2.0),
}


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, act: str = "linear",
             alpha: float = 0.2, gain: float | None = None, clamp: float | None = None,
             impl: str = "auto") -> torch.Tensor:
    """y = clamp(act(x + b) * gain, -clamp, clamp).

    Args:
        x: any-shaped float tensor, e.g. [N, C, H, W].
        b: [x.shape[dim]] bias or None.
        dim: axis of x the bias runs along.
        act: "linear", "lrelu" (slope alpha) or "relu".
        gain: multiplier after the activation; None uses the activation's default (sqrt(2) for lrelu).
        clamp: symmetric clamp after the gain (NVlabs uses 256 to keep fp16 finite) or None.
        impl: "ref" | "auto" (both run stock torch ops, on any device); "cuda" is an error: there is no
            separate kernel (in the synthesis network the modulated-conv kernel fuses this epilogue).
    Returns:
        tensor of x's shape and dtype.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f"bias_act: bias shape {tuple(b.shape)} does not match x.shape[{dim}]={x.shape[dim]}")
    if clamp is not None and clamp < 0:
        raise ValueError(f"bias_act: clamp must be >= 0, got {clamp}")
    gain = ACTIVATIONS[act] if gain is None else float(gain)
    # Validates impl; bias_act has no kernel of its own (training.ops._dispatch says why), so this is its path.
    use_cuda_impl("bias_act", impl, x, b)

    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, alpha)
    elif act == "relu":
        x = F.relu(x)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x
