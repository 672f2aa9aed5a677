"""Ranger, the optimizer pSp and e4e train their encoders with: RAdam (Liu et al., "On the Variance of the Adaptive
Learning Rate and Beyond", ICLR 2020) + Lookahead (Zhang et al., "Lookahead Optimizer: k steps forward, 1 step
back", NeurIPS 2019) + gradient centralization (Yong et al., "Gradient Centralization", ECCV 2020), in the variant
pSp ships (Ranger 20.4.11: every parameter with more than one dimension is centralized).

One step for a parameter p with gradient g (t counts this parameter's steps from 1):

    g      <- g - mean(g over all dims but the first)           (only when g.ndim > 1 and use_gc)
    m      <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    rho_inf = 2 / (1 - b2) - 1 ;   rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    rho_t > threshold:  p <- p - lr * r_t / (1 - b1^t) * m / (sqrt(v) + eps),
                        r_t = sqrt((1 - b2^t) (rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    otherwise:          p <- p - lr / (1 - b1^t) * m                     (un-adapted momentum while v is unreliable)
    every k steps:      slow <- slow + alpha (p - slow) ;  p <- slow    (slow starts as p before the first step)

Weight decay (default 0) is applied as p <- p - lr * wd * p before the update, as Ranger does. The state of a
parameter is ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and ``slow_buffer``; parameters without a gradient are
skipped and keep no state, like torch's optimizers.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

#: pSp / e4e: Ranger(params, lr=opts.learning_rate) with Ranger's own defaults below; lr 1e-4 in their options.
DEFAULTS = {"lr": 1e-3, "alpha": 0.5, "k": 6, "threshold": 5.0, "betas": (0.95, 0.999), "eps": 1e-5,
            "weight_decay": 0.0}


class Ranger(torch.optim.Optimizer):
    """RAdam + Lookahead + gradient centralization (see the module docstring for the exact update).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (pSp / e4e train with 1e-4).
        alpha: Lookahead interpolation towards the fast weights.
        k: Lookahead synchronisation period in steps.
        threshold: RAdam's rho_t above which the adaptive (rectified) step is used.
        betas: (beta1, beta2) of the moment estimates.
        eps: added to sqrt(v).
        weight_decay: decoupled-style decay applied before the update.
        use_gc: gradient centralization for parameters with more than one dimension.
    """

    def __init__(self, params: Iterable, lr: float = DEFAULTS["lr"], alpha: float = DEFAULTS["alpha"],
                 k: int = DEFAULTS["k"], threshold: float = DEFAULTS["threshold"],
                 betas: tuple[float, float] = DEFAULTS["betas"], eps: float = DEFAULTS["eps"],
                 weight_decay: float = DEFAULTS["weight_decay"], use_gc: bool = True):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"Ranger lr must be positive, got {lr}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Ranger alpha must be in [0, 1], got {alpha}")
        if int(k) < 1:
            raise ValueError(f"Ranger k must be >= 1, got {k}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 < betas[1] < 1.0):
            raise ValueError(f"Ranger betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"Ranger eps must be positive, got {eps}")
        defaults = dict(lr=lr, alpha=alpha, k=int(k), threshold=threshold, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, use_gc=use_gc)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rho_inf = 2.0 / (1.0 - beta2) - 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                grad = p.grad.float()
                if group["use_gc"] and grad.ndim > 1:
                    grad = grad - grad.mean(dim=tuple(range(1, grad.ndim)), keepdim=True)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["slow_buffer"] = p.detach().clone()
                t = int(state["step"]) + 1
                state["step"] = t
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)

                beta2_t = beta2**t
                rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
                data = p.float()
                if group["weight_decay"] != 0:
                    data = data - group["weight_decay"] * group["lr"] * data
                if rho_t > group["threshold"]:
                    rect = math.sqrt((1.0 - beta2_t) * (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                    step_size = rect / (1.0 - beta1**t)
                    data = data - group["lr"] * step_size * exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                else:
                    data = data - group["lr"] / (1.0 - beta1**t) * exp_avg
                p.copy_(data)
                if t % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(p - slow, alpha=group["alpha"])
                    p.copy_(slow)
        return loss


__all__ = ["DEFAULTS", "Ranger"]
