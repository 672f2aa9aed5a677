"""Style losses of DualStyleGAN's Stage III (Yang et al., CVPR 2022): the contextual loss (Mechrez et al., "The
Contextual Loss for Image Transformation with Non-Aligned Data", ECCV 2018) and the feature-matching loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Bandwidth h of the common implementation's default; DualStyleGAN's finetune_dualstylegan.py calls it with
# band_width=0.2 on VGG19 relu3_1 features.
CX_BANDWIDTH = 0.5
# Added to min_k d_ik before dividing (relative distances) and to CX before the log, as in the common code.
CX_EPS = 1e-5


def contextual_loss(x: torch.Tensor, y: torch.Tensor, band_width: float = CX_BANDWIDTH,
                    eps: float = CX_EPS, y_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Contextual loss with cosine distances (the implementation DualStyleGAN ships, Eq. 1-5 of the paper).

    With x_i the feature vectors of x at its positions i and y_j those of y, both centred by the channel mean
    of y (taken over the batch and all of y's positions) and L2-normalised:
        d_ij   = 1 - <x_i, y_j>                      cosine distance
        d~_ij  = d_ij / (min_k d_ik + eps)           relative to x_i's nearest y feature
        w_ij   = exp((1 - d~_ij) / band_width)
        cx_ij  = w_ij / sum_k w_ik
        CX     = mean_j max_i cx_ij                  per sample
        loss   = mean over samples of -log(CX + eps)

    Args:
        x: [N, C, H, W] features of the generated image (float32/float64).
        y: [N, C, H', W'] features of the target (any spatial size).
        band_width: h.
        eps: see above.
        y_mean: [C] the channel mean of y to centre with, when y is one slice of a larger batch (data-parallel
            training passes the mean over the whole global batch); None = computed from y.
    Returns:
        scalar tensor (differentiable in x and y).
    """
    if x.ndim != 4 or y.ndim != 4 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"contextual_loss needs [N, C, H, W] features with equal N and C, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if not band_width > 0:
        raise ValueError(f"band_width must be positive, got {band_width}")
    n, c = x.shape[:2]
    if y_mean is None:
        y_mu = y.mean(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
    else:
        if y_mean.shape != (c,):
            raise ValueError(f"y_mean must have shape [{c}], got {tuple(y_mean.shape)}")
        y_mu = y_mean.to(y.dtype).reshape(1, c, 1, 1)
    xn = F.normalize((x - y_mu).reshape(n, c, -1), p=2, dim=1)  # [N, C, HW]
    yn = F.normalize((y - y_mu).reshape(n, c, -1), p=2, dim=1)  # [N, C, H'W']
    dist = 1 - torch.bmm(xn.transpose(1, 2), yn)  # [N, HW, H'W']
    dist_tilde = dist / (dist.min(dim=2, keepdim=True).values + eps)
    w = torch.exp((1 - dist_tilde) / band_width)
    cx = w / w.sum(dim=2, keepdim=True)  # [N, HW, H'W']
    cx = cx.max(dim=1).values.mean(dim=1)  # [N]
    return (-torch.log(cx + eps)).mean()


def feature_matching_loss(x_feats: Sequence[torch.Tensor], y_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of MSE between the spatial means of features (DualStyleGAN's style loss term, used on
    VGG19 relu2_1 and relu3_1 with weight 0.25).

    Args:
        x_feats, y_feats: equally long sequences of [N, C_k, H_k, W_k] features (spatial sizes may differ
            between x and y).
    Returns:
        scalar tensor.
    """
    if len(x_feats) != len(y_feats) or not x_feats:
        raise ValueError(f"feature_matching_loss needs two equally long non-empty feature lists, got "
                         f"{len(x_feats)} and {len(y_feats)}")
    total = x_feats[0].new_zeros(())
    for a, b in zip(x_feats, y_feats):
        if a.ndim != 4 or b.ndim != 4 or a.shape[:2] != b.shape[:2]:
            raise ValueError(f"feature shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")
        total = total + F.mse_loss(a.mean(dim=(2, 3)), b.mean(dim=(2, 3)))
    return total
