"""Optimisation-based GAN inversion: project a photo into W or W+ (Karras et al., "Analyzing and Improving the
Image Quality of StyleGAN", CVPR 2020, Sec. 5; the projector of NVlabs' and rosinality's code).

Adam on the latent (and, by default, the per-layer noise maps) against a perceptual loss on a <= 256 px
downsample, with a cosine learning-rate ramp (up over the first 5%, down over the last 25%), Gaussian noise on
the latent that decays to 0 over the first 75% of the run, and a multi-scale autocorrelation penalty that keeps the
optimised noise maps noise-like (weight 1e5).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from training.networks import Generator

SPACES = ("w", "w+")
#: (img, target) -> per-sample loss [N]; both img in [-1, 1] NCHW at the same size.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProjectorConfig:
    """Settings of the projector (official defaults)."""

    space: str = "w+"
    steps: int = 1000
    lr: float = 0.1
    lr_rampup: float = 0.05
    lr_rampdown: float = 0.25
    noise_start: float = 0.05       # latent noise, times the spread of W, at the start
    noise_ramp: float = 0.75        # fraction of the run over which that noise decays to 0
    noise_reg: float = 1e5          # weight of the noise-map autocorrelation penalty
    optimize_noise: bool = True
    mse_weight: float = 0.0         # extra pixel MSE (0 = perceptual only, as the official projector)
    loss_size: int = 256            # images larger than this are area-downsampled for the loss
    w_avg_samples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"latent space must be one of {SPACES}, got {self.space!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("lr_rampup", "lr_rampdown", "noise_ramp"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.loss_size < 8:
            raise ValueError(f"loss_size must be >= 8, got {self.loss_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate(cfg: ProjectorConfig, t: float) -> float:
    """lr at progress t in [0, 1]: linear warm-up over lr_rampup, cosine decay over the last lr_rampdown."""
    ramp = min(1.0, (1.0 - t) / cfg.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / cfg.lr_rampup)
    return cfg.lr * ramp


def noise_regularization(noises: list[torch.Tensor]) -> torch.Tensor:
    """Sum over maps and scales (down to 8 px) of the squared mean products with the 1-px shifted map (x and y):
    zero for white noise, large when the maps encode image structure."""
    reg = torch.zeros([], device=noises[0].device if noises else "cpu")
    for n in noises:
        x = n.reshape(1, 1, n.shape[-2], n.shape[-1])
        while True:
            reg = reg + (x * torch.roll(x, 1, dims=3)).mean() ** 2 + (x * torch.roll(x, 1, dims=2)).mean() ** 2
            if x.shape[-1] <= 8:
                break
            x = F.avg_pool2d(x, 2)
    return reg


def _normalize_noise(noises: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for n in noises:
            n.sub_(n.mean()).div_(n.std() + 1e-8)


def _loss_view(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-1] > size:
        return F.interpolate(img, size=(size, size), mode="area")
    return img


@dataclass
class Projection:
    """Result: ws [1, num_ws, w_dim] float32 (the final latent, without exploration noise), the optimised noise maps
    (name -> [R, R]; empty when noise was not optimised), the reconstruction img [1, 3, R, R] in [-1, 1], and the
    per-step history of losses."""

    ws: torch.Tensor
    noise: dict[str, torch.Tensor]
    img: torch.Tensor
    history: list[dict[str, float]]
    snapshots: list[tuple[int, torch.Tensor]]


def project(G: Generator, target: torch.Tensor, loss_fn: LossFn, cfg: ProjectorConfig | None = None,
            init_ws: torch.Tensor | None = None, snapshot_every: int = 0,
            progress: Callable[[int, dict[str, float]], None] | None = None) -> Projection:
    """Project one aligned image into G's latent space.

    Args:
        G: the generator (not modified: a copy carries the optimised noise maps).
        target: img [1, 3, R, R] float32 in [-1, 1] at G's resolution (FFHQ-aligned for face models).
        loss_fn: perceptual loss (img, target) -> [N], e.g. training.inversion.losses.PerceptualLoss.
        init_ws: start here ([1, w_dim] or [1, num_ws, w_dim], e.g. an encoder's output) instead of w_avg.
        snapshot_every: keep the reconstruction every this many steps (0 = none) for a progress video / grid.
        progress: called after each step with (step, losses).
    Returns:
        a Projection.
    """
    cfg = cfg or ProjectorConfig()
    R = G.resolution
    if target.ndim != 4 or target.shape[0] != 1 or tuple(target.shape[1:]) != (G.cfg.img_channels, R, R):
        raise ValueError(f"target must be [1, {G.cfg.img_channels}, {R}, {R}], got {list(target.shape)}")
    if not torch.isfinite(target).all():
        raise ValueError("target image contains NaN or Inf")
    device = next(G.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    target = target.to(device, torch.float32)

    # Spread of W around its mean, for the latent noise scale (as NVlabs: from w_avg_samples mapped z).
    with torch.no_grad():
        z = torch.randn(cfg.w_avg_samples, G.z_dim, generator=gen).to(device)
        w_samples = torch.cat([G.mapping(c) for c in z.split(1000)])  # [S, w_dim]
        w_mean = w_samples.mean(0, keepdim=True)
        w_std = float(((w_samples - w_mean) ** 2).sum() / w_samples.shape[0]) ** 0.5

    if init_ws is None:
        start = G.w_avg.detach().clone().reshape(1, -1)
    else:
        start = init_ws.detach().to(device, torch.float32).clone()
        if start.ndim == 3 and cfg.space == "w":
            start = start.mean(1)
    if cfg.space == "w+" and start.ndim == 2:
        start = start.unsqueeze(1).repeat(1, G.num_ws, 1)
    expect = (1, G.w_dim) if cfg.space == "w" else (1, G.num_ws, G.w_dim)
    if tuple(start.shape) != expect:
        raise ValueError(f"init_ws must be [1, {G.w_dim}] or [1, {G.num_ws}, {G.w_dim}], got {list(init_ws.shape)}")
    w_opt = start.requires_grad_(True)

    noise_named: dict[str, torch.Tensor] = {}
    if cfg.optimize_noise:
        for name, buf in G.named_buffers():
            if name.endswith("noise_const"):
                buf.copy_(torch.randn(buf.shape, generator=gen).to(device))
                buf.requires_grad_(True)
                noise_named[name] = buf
    noises = list(noise_named.values())
    opt = torch.optim.Adam([w_opt] + noises, betas=(0.9, 0.999), lr=cfg.lr)
    target_view = _loss_view(target, cfg.loss_size)

    history: list[dict[str, float]] = []
    snapshots: list[tuple[int, torch.Tensor]] = []
    for step in range(cfg.steps):
        t = step / max(cfg.steps, 1)
        lr = learning_rate(cfg, t)
        for group in opt.param_groups:
            group["lr"] = lr
        noise_scale = w_std * cfg.noise_start * max(0.0, 1.0 - t / cfg.noise_ramp) ** 2
        w_noisy = w_opt + torch.randn(w_opt.shape, generator=gen).to(device) * noise_scale
        ws = w_noisy.unsqueeze(1).repeat(1, G.num_ws, 1) if cfg.space == "w" else w_noisy
        img = G.synthesis(ws, noise_mode="const")
        view = _loss_view(img, cfg.loss_size)
        percep = loss_fn(view, target_view).sum()
        mse = F.mse_loss(img, target)
        reg = noise_regularization(noises) if noises else torch.zeros([], device=device)
        loss = percep + cfg.mse_weight * mse + cfg.noise_reg * reg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"projection diverged at step {step} (loss {float(loss)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _normalize_noise(noises)
        rec = {"step": step, "loss": float(loss.detach()), "perceptual": float(percep.detach()),
               "mse": float(mse.detach()), "noise_reg": float(reg.detach()), "lr": lr}
        history.append(rec)
        if snapshot_every and (step % snapshot_every == 0 or step == cfg.steps - 1):
            snapshots.append((step, img.detach().cpu().clamp(-1, 1)))
        if progress is not None:
            progress(step, rec)

    # The answer is the final latent without the exploration noise (the learning rate has ramped down to 0).
    w_final = w_opt.detach()
    ws_final = w_final.unsqueeze(1).repeat(1, G.num_ws, 1) if w_final.ndim == 2 else w_final
    with torch.no_grad():
        for buf in noises:
            buf.requires_grad_(False)
        img = G.synthesis(ws_final, noise_mode="const")
    return Projection(ws=ws_final.cpu(), noise={k: v.detach().cpu() for k, v in noise_named.items()},
                      img=img.detach().cpu(), history=history, snapshots=snapshots)


def apply_noise(G: Generator, noise: dict[str, torch.Tensor]) -> Generator:
    """A copy of G whose constant noise buffers are the projected maps (to re-render a projection exactly)."""
    G = copy.deepcopy(G)
    bufs = dict(G.named_buffers())
    for name, value in noise.items():
        if name not in bufs or bufs[name].shape != value.shape:
            raise ValueError(f"noise map {name!r} {list(value.shape)} does not fit this generator")
        with torch.no_grad():
            bufs[name].copy_(value)
    return G
