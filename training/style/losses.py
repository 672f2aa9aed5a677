"""Perceptual losses of neural style transfer (Gatys et al., "Image Style Transfer Using Convolutional Neural
Networks", CVPR 2016; Johnson et al., "Perceptual Losses for Real-Time Style Transfer", ECCV 2016).

Definitions (those of jcjohnson/neural-style, which are per-element means, so they do not grow with the image):

* Gram matrix of a feature map F [N, C, H, W]: ``G[n] = F_n F_n^T / (C * H * W)`` with F_n reshaped to
  [C, H*W], i.e. ``G[n, i, j] = sum_p F[n, i, p] * F[n, j, p] / (C * H * W)``.
* Content loss of a layer: ``mean((F - F_target)^2)`` over all N*C*H*W elements.
* Style loss of a layer: ``mean((G(F) - G_target)^2)`` over N*C*C elements; with several style images the
  target is the blend ``G_target = sum_k b_k G(F_style_k)`` with the blend weights normalised to sum 1
  (neural-style's ``-style_blend_weights``).
* Total variation of an image x [N, C, H, W]:
  ``(sum (x[:, :, 1:, :] - x[:, :, :-1, :])^2 + sum (x[:, :, :, 1:] - x[:, :, :, :-1])^2) / N``
  (squared differences of vertical and horizontal neighbours, per image).
* Total: ``sum_l cw_l * content_l + sum_l sw_l * style_l + tv_weight * tv``, where the per-layer weights are
  the global weight times an optional per-layer factor.

Images are ``img`` in [-1, 1]; the TV term is measured in those units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite during optimisation or training."""


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrix of feature maps.

    Args:
        x: [N, C, H, W] activations.
    Returns:
        [N, C, C], ``F F^T / (C * H * W)`` per sample.
    """
    n, c, h, w = x.shape
    f = x.reshape(n, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def content_loss(feats: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum over layers of the mean squared feature difference.

    Args:
        feats: {layer: [N, C, H, W]} activations of the image being optimised / generated.
        targets: {layer: [N or 1, C, H, W]} activations of the content image(s) (broadcast over N).
        weights: {layer: weight}; only these layers count.
    Returns:
        Scalar tensor.
    """
    total = feats[next(iter(weights))].new_zeros(())
    for layer, wt in weights.items():
        total = total + wt * torch.mean((feats[layer] - targets[layer]) ** 2)
    return total


def style_loss(feats: Mapping[str, torch.Tensor], target_grams: Mapping[str, torch.Tensor],
               weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum over layers of the mean squared Gram-matrix difference.

    Args:
        feats: {layer: [N, C, H, W]} activations of the image being optimised / generated.
        target_grams: {layer: [1 or N, C, C]} target Gram matrices (see blended_grams).
        weights: {layer: weight}; only these layers count.
    Returns:
        Scalar tensor.
    """
    total = feats[next(iter(weights))].new_zeros(())
    for layer, wt in weights.items():
        total = total + wt * torch.mean((gram_matrix(feats[layer]) - target_grams[layer]) ** 2)
    return total


def tv_loss(img: torch.Tensor) -> torch.Tensor:
    """Total variation: summed squared differences of vertical and horizontal neighbours, averaged over N.

    Args:
        img: [N, C, H, W].
    Returns:
        Scalar tensor.
    """
    dh = img[:, :, 1:, :] - img[:, :, :-1, :]
    dw = img[:, :, :, 1:] - img[:, :, :, :-1]
    return (dh.pow(2).sum() + dw.pow(2).sum()) / img.shape[0]


def normalize_blend_weights(blend: Sequence[float] | None, count: int) -> list[float]:
    """Blend weights for ``count`` style images, normalised to sum 1 (None or empty -> equal weights).

    Raises:
        ValueError: wrong count, negative or non-finite weights, or all zero.
    """
    if not blend:
        return [1.0 / count] * count
    if len(blend) != count:
        raise ValueError(f"got {len(blend)} style blend weights for {count} style image(s)")
    if any(not math.isfinite(b) or b < 0 for b in blend):
        raise ValueError(f"style blend weights must be finite and >= 0, got {list(blend)}")
    s = float(sum(blend))
    if s <= 0:
        raise ValueError("style blend weights must not all be zero")
    return [float(b) / s for b in blend]


def blended_grams(style_feats: Sequence[Mapping[str, torch.Tensor]], blend: Sequence[float] | None,
                  layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Style targets: ``sum_k b_k G(F_k)`` per layer over several style images (b normalised to sum 1).

    Args:
        style_feats: one {layer: [1, C, H_k, W_k]} per style image (sizes may differ).
        blend: blend weights, one per style image (None -> equal).
        layers: the style layers.
    Returns:
        {layer: [1, C, C]} (detached).
    """
    b = normalize_blend_weights(blend, len(style_feats))
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        out[layer] = sum(bk * gram_matrix(f[layer]).detach() for bk, f in zip(b, style_feats))
    return out


def layer_weights(layers: Sequence[str], weight: float, per_layer: Sequence[float] = ()) -> dict[str, float]:
    """{layer: weight * factor}: the global weight times optional per-layer factors (empty -> all 1).

    Raises:
        ValueError: when the number of factors does not match the layers, or a value is not finite / negative.
    """
    factors = list(per_layer) if per_layer else [1.0] * len(layers)
    if len(factors) != len(layers):
        raise ValueError(f"got {len(factors)} per-layer weights for {len(layers)} layer(s) {list(layers)}")
    if not math.isfinite(weight) or weight < 0 or any(not math.isfinite(f) or f < 0 for f in factors):
        raise ValueError(f"loss weights must be finite and >= 0, got {weight} x {factors}")
    out: dict[str, float] = {}
    for layer, f in zip(layers, factors):
        out[layer] = out.get(layer, 0.0) + weight * f
    return out


@dataclass(frozen=True)
class LossWeights:
    """Resolved weights of the total loss: {content layer: weight}, {style layer: weight}, TV weight."""

    content: Mapping[str, float]
    style: Mapping[str, float]
    tv: float

    @property
    def layers(self) -> tuple[str, ...]:
        """Every VGG layer the loss reads, content layers first."""
        return tuple(dict.fromkeys([*self.content, *self.style]))


def total_loss(img: torch.Tensor, feats: Mapping[str, torch.Tensor], content_targets: Mapping[str, torch.Tensor],
               style_targets: Mapping[str, torch.Tensor], weights: LossWeights) -> dict[str, torch.Tensor]:
    """The weighted sum of content, style and TV losses.

    Args:
        img: [N, 3, H, W] image in [-1, 1] (for the TV term).
        feats: VGG activations of ``img``.
        content_targets: {layer: [N or 1, C, H, W]}.
        style_targets: {layer: [1 or N, C, C]}.
        weights: the resolved weights.
    Returns:
        {"content", "style", "tv", "total"}: scalar tensors (content/style/tv already weighted).
    """
    zero = img.new_zeros(())
    c = content_loss(feats, content_targets, weights.content) if weights.content else zero
    s = style_loss(feats, style_targets, weights.style) if weights.style else zero
    t = weights.tv * tv_loss(img) if weights.tv else zero
    return {"content": c, "style": s, "tv": t, "total": c + s + t}
