"""Upsample, FIR filter, downsample (upfirdn2d) as used by StyleGAN2 (Karras et al., 2020) for resampling.

The reference is stock torch ops only; it is also what plain ONNX export emits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import use_cuda_impl


def setup_filter(f: Sequence[float] | torch.Tensor, normalize: bool = True, separable: bool = False,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Build a 2D FIR filter from 1D taps (outer product), normalised to sum 1.

    Args:
        f: 1D taps (e.g. [1, 3, 3, 1]) or an existing 2D filter.
        normalize: divide by the sum so the filter keeps the DC level.
        separable: keep a 1D filter instead of the outer product.
    Returns:
        float32 tensor [fh, fw] (or [fw] when separable).
    """
    f = torch.as_tensor(f, dtype=torch.float32, device=device)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def _parse_padding(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) != 4:
        raise ValueError(f"padding must be an int, [px, py] or [px0, px1, py0, py1], got {padding}")
    return padding  # type: ignore[return-value]


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding: int | Sequence[int] = 0, flip_filter: bool = False, gain: float = 1.0,
              impl: str = "auto") -> torch.Tensor:
    """Pad, upsample by zero insertion, FIR-filter and downsample a batch of images.

    y = downsample(conv(pad(zero_insert(x, up)), f * gain), down); the filter is applied as a true
    convolution (flipped) unless flip_filter. For the symmetric filters StyleGAN uses both agree.

    Args:
        x: [N, C, H, W] float tensor.
        f: [fh, fw] (or 1D [fw], applied separably) float32 filter.
        up, down: integer factors.
        padding: [px0, px1, py0, py1] applied after upsampling (negative values crop).
        flip_filter: use correlation instead of convolution.
        gain: overall scaling of the filter (e.g. up**2 to keep brightness when upsampling).
        impl: "ref" | "auto" (both run stock torch ops, on any device); "cuda" is an error: there is no
            separate kernel (the synthesis network's x2 blur is fused into the modulated-conv kernel).
    Returns:
        [N, C, (H*up + py0 + py1 - fh) // down + 1, (W*up + px0 + px1 - fw) // down + 1].
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}")
    px0, px1, py0, py1 = _parse_padding(padding)
    # Validates impl; upfirdn2d has no kernel of its own (training.ops._dispatch says why), so this is its path.
    use_cuda_impl("upfirdn2d", impl, x, f)
    return _upfirdn2d_ref(x, f, up, down, (px0, px1, py0, py1), flip_filter, gain)


def _upfirdn2d_ref(x: torch.Tensor, f: torch.Tensor, up: int, down: int,
                   padding: tuple[int, int, int, int], flip_filter: bool, gain: float) -> torch.Tensor:
    n, c, h, w = x.shape
    c = int(c)  # channel counts are static; keeps the exported depthwise kernel a constant
    px0, px1, py0, py1 = padding
    f = f.to(x.dtype)

    # Upsample by inserting up-1 zeros after every sample (reshape trick keeps ONNX shapes symbolic).
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)

    # Pad (positive) and crop (negative) separately: F.pad handles both, but cropping with slicing keeps
    # the exported graph free of negative Pad attributes, which some runtimes reject.
    if max(px0, px1, py0, py1) > 0:
        x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    if min(px0, px1, py0, py1) < 0:
        x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]

    # Filter: depthwise conv; F.conv2d is a correlation, so flip for a true convolution.
    scale = gain ** (f.ndim / 2)
    f = f * scale
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        weight = f[None, None].repeat(c, 1, 1, 1)  # [C, 1, fh, fw]
        x = F.conv2d(x, weight, groups=c)
    else:
        x = F.conv2d(x, f[None, None, None, :].repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(x, f[None, None, :, None].repeat(c, 1, 1, 1), groups=c)

    # Downsample by keeping every down-th sample.
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, impl: str = "auto") -> torch.Tensor:
    """Upsample by `up` with FIR filter f (gain up**2), output [N, C, H*up, W*up]."""
    fw = f.shape[-1]
    p0 = (fw + up - 1) // 2
    p1 = (fw - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up, impl=impl)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, impl: str = "auto") -> torch.Tensor:
    """Downsample by `down` with FIR filter f, output [N, C, H//down, W//down]."""
    fw = f.shape[-1]
    p0 = (fw - down + 1) // 2
    p1 = (fw - down) // 2
    return upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1), impl=impl)


def filter2d(x: torch.Tensor, f: torch.Tensor, padding: int | Sequence[int] = 0, gain: float = 1.0,
             impl: str = "auto") -> torch.Tensor:
    """FIR-filter without resampling; `padding` is added to the filter's own 'same' padding."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw = f.shape[-1]
    fh = f.shape[0] if f.ndim == 2 else fw
    pad = (px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2)
    return upfirdn2d(x, f, padding=pad, gain=gain, impl=impl)
