"""Differentiable augmentation with an adaptive probability, after ADA (Karras et al. 2020, "Training
Generative Adversarial Networks with Limited Data"), reduced to a small, real subset:

x-flip, integer translation (reflect padding, up to 1/8 of the image), brightness, contrast and saturation.
Each transform is applied to each sample independently with probability p. Every op is differentiable in the
image (indexing and affine colour maps), so G is trained through it and R1 is taken through it. The same
pipeline is applied to reals and fakes before every D evaluation, so D never sees un-augmented images and
the augmentations do not leak into G's outputs as long as p stays below ~0.8.

The adaptive controller follows the paper's r_t = E[sign(D(real))] heuristic: every `interval` steps,
p += sign(r_t - target) * (batch * interval) / (ada_kimg * 1000), clamped to [0, 1], so p can move from 0 to 1
in ada_kimg thousand images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Strengths of the NVlabs 'bgc' colour pipeline (brightness in [-1, 1] units; contrast/saturation in log2).
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5
SATURATION_STD = 1.0
TRANSLATE_MAX = 0.125


class AugmentPipe:
    """Per-sample random augmentations with probability p (a float attribute, 0 = identity)."""

    def __init__(self, p: float = 0.0, xflip: bool = True, translate: bool = True, color: bool = True):
        self.p = float(p)
        self.xflip, self.translate, self.color = xflip, translate, color

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """img [N, C, H, W] -> augmented [N, C, H, W] (the input itself when p == 0)."""
        if self.p <= 0:
            return img
        n, c, h, w = img.shape
        dev = img.device
        # All random numbers are drawn every call (whatever p is) so the RNG stream does not depend on p.
        gate = torch.rand([5, n], device=dev) < self.p  # one gate per transform and sample
        flip = torch.rand([n], device=dev) < 0.5
        shift = torch.rand([2, n], device=dev) * 2 - 1
        b = torch.randn([n], device=dev) * BRIGHTNESS_STD
        cst = torch.exp2(torch.randn([n], device=dev) * CONTRAST_STD)
        sat = torch.exp2(torch.randn([n], device=dev) * SATURATION_STD)

        x = img
        if self.xflip:
            do = (gate[0] & flip).reshape(n, 1, 1, 1)
            x = torch.where(do, x.flip(3), x)
        if self.translate:
            x = _translate(x, gate[1], shift)
        if self.color:
            one = torch.ones_like(b)
            x = x + torch.where(gate[2], b, torch.zeros_like(b)).reshape(n, 1, 1, 1)
            x = x * torch.where(gate[3], cst, one).reshape(n, 1, 1, 1)
            if c > 1:
                # Saturation scales the component orthogonal to the grey axis (1, 1, 1) / sqrt(3).
                mean = x.mean(dim=1, keepdim=True)
                x = mean + (x - mean) * torch.where(gate[4], sat, one).reshape(n, 1, 1, 1)
        return x


def _translate(x: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each sample by an integer number of pixels (|t| <= 1/8 of the size), reflecting at the borders."""
    n, c, h, w = x.shape
    m = max(1, int(math.ceil(TRANSLATE_MAX * max(h, w))))
    if m >= min(h, w):  # reflect padding needs pad < size
        m = min(h, w) - 1
    if m < 1:
        return x
    tx = torch.where(gate, (shift[0] * TRANSLATE_MAX * w).round(), torch.zeros_like(shift[0])).long().clamp(-m, m)
    ty = torch.where(gate, (shift[1] * TRANSLATE_MAX * h).round(), torch.zeros_like(shift[1])).long().clamp(-m, m)
    padded = F.pad(x, (m, m, m, m), mode="reflect")  # [N, C, H+2m, W+2m]
    rows = torch.arange(h, device=x.device).reshape(1, h) + m - ty.reshape(n, 1)  # [N, H]
    cols = torch.arange(w, device=x.device).reshape(1, w) + m - tx.reshape(n, 1)  # [N, W]
    idx_n = torch.arange(n, device=x.device).reshape(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.reshape(n, h, 1), cols.reshape(n, 1, w)]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2)


class AdaController:
    """Adjusts an AugmentPipe's p from the sign of D's outputs on reals (ADA's r_t heuristic)."""

    def __init__(self, pipe: AugmentPipe, target: float = 0.6, interval: int = 4, ada_kimg: float = 500.0,
                 batch: int = 4):
        if not 0 < target < 1:
            raise ValueError(f"ADA target must be in (0, 1), got {target}")
        self.pipe, self.target, self.interval, self.ada_kimg, self.batch = pipe, target, interval, ada_kimg, batch
        self.sign_sum = 0.0
        self.count = 0
        self.last_rt: float | None = None

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Record sign(D(real)) of one batch."""
        self.sign_sum += float(real_logits.detach().sign().sum())
        self.count += int(real_logits.numel())

    def step(self, step_index: int) -> None:
        """Call after every training step (step_index counts completed steps); adjusts p every `interval`."""
        if step_index % self.interval or self.count == 0:
            return
        rt = self.sign_sum / self.count
        adjust = math.copysign(1.0, rt - self.target) * (self.batch * self.interval) / (self.ada_kimg * 1000)
        if rt == self.target:
            adjust = 0.0
        self.pipe.p = min(max(self.pipe.p + adjust, 0.0), 1.0)
        self.last_rt = rt
        self.sign_sum, self.count = 0.0, 0


__all__ = ["AdaController", "AugmentPipe"]
