"""StyleGAN2 training losses (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"):
the non-saturating logistic GAN loss, the R1 gradient penalty (Mescheder et al. 2018) and path-length
regularisation, with the lazy-regularisation scaling of the paper (a term evaluated every k steps is
multiplied by k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """E[softplus(-D(G(z)))] = -E[log sigmoid(D(G(z)))] (scalar)."""
    return F.softplus(-fake_logits).mean()


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """E[softplus(D(fake))] + E[softplus(-D(real))] (scalar)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_img: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample squared gradient norm ||d sum(D(x)) / d x_i||^2, differentiable (create_graph) -> [N].

    Args:
        real_img: [N, C, H, W] the tensor D was evaluated on (requires_grad=True, possibly before augmentation).
        real_logits: [N, 1] D's outputs for it.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_img, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])


def r1_loss(real_img: torch.Tensor, real_logits: torch.Tensor, gamma: float, interval: int = 1) -> torch.Tensor:
    """Lazy R1: gamma / 2 * E||grad_x D(x)||^2, times the interval k it is evaluated at (scalar)."""
    return r1_penalty(real_img, real_logits).mean() * (gamma / 2) * interval


class PathLengthRegularizer:
    """Path-length regularisation: E[(||J_w^T y|| - a)^2], y ~ N(0, I) / sqrt(H*W), a the running mean length.

    Keeps `pl_mean` (float32 scalar tensor), updated as pl_mean += decay * (mean length - pl_mean), the
    NVlabs form (decay 0.01).
    """

    def __init__(self, decay: float = 0.01, device: str | torch.device = "cpu"):
        self.decay = float(decay)
        self.pl_mean = torch.zeros([], device=device)

    def penalty(self, img: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample penalty [N] and path lengths [N] for images img [N, C, H, W] generated from ws [N, L, D].

        Updates pl_mean with the batch mean length (detached).
        """
        h, w = img.shape[2], img.shape[3]
        # Scaling the noise by 1/sqrt(H*W) makes the length independent of the image resolution.
        pl_noise = torch.randn_like(img) / math.sqrt(h * w)
        (grad,) = torch.autograd.grad((img * pl_noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()  # [N]
        pl_mean = self.pl_mean.lerp(lengths.mean().detach(), self.decay)
        self.pl_mean.copy_(pl_mean)
        return (lengths - pl_mean).square(), lengths


__all__ = ["PathLengthRegularizer", "d_logistic_loss", "g_nonsaturating_loss", "r1_loss", "r1_penalty"]
